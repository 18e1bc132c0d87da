"""The prefix task: a compressed context scored against full attention on the same model, through the library's
own prefill and eviction; the budget knob; the exported token ids."""

import json

import pytest
import torch

from kvcondense.cli import main
from kvcondense.data import load_split
from kvcondense.forward import parallel_forward
from kvcondense.layout import NEVER, concat, text_layout
from kvcondense.methods import build_method
from kvcondense.models import add_special_tokens, load_model
from kvcondense.prefix_task import (
    budget_params,
    check_reachable,
    prefix_task,
    prefix_windows,
    score_after_prefix,
)


@pytest.fixture(scope="module")
def setup(tiny_dir, sample_path):
    model, tok = load_model(str(tiny_dir))
    windows = prefix_windows(load_split(str(sample_path), "train"), tok, 96, 12, 3)
    return model, tok, windows


def test_windows_are_consecutive_token_ids(setup):
    _, _, windows = setup
    assert len(windows) == 3
    for ctx, nxt in windows:
        assert len(ctx) == 96 and nxt.shape == (13,)


def test_full_attention_is_its_own_reference(setup):
    model, _, windows = setup
    res = prefix_task(model, build_method("full"), {}, windows)
    assert res["kl_to_full"] == pytest.approx(0.0, abs=1e-6)
    assert res["perplexity"] == pytest.approx(res["full_perplexity"], rel=1e-6)
    assert res["kv_kept"] == 1.0 and res["tokens_scored"] == 36


@pytest.mark.parametrize("budget", [0.5, 0.25, 0.125])
def test_streaming_keeps_the_budget_and_loses_something(setup, budget):
    model, _, windows = setup
    method = build_method("streaming", **budget_params(build_method("streaming", ratio=0.5, sinks=4), budget))
    res = prefix_task(model, method, {}, windows)
    assert res["kv_kept"] == pytest.approx(budget, abs=1 / 96)
    assert res["kl_to_full"] > 1e-4  # a random model still notices half its context gone


def test_incremental_scores_equal_the_parallel_mask(setup):
    """score_after_prefix (prefill with real eviction, frozen cache, then the scored tokens) equals one parallel
    masked forward over the context layout followed by plain text that sees every key the cache kept."""
    model, _, windows = setup
    ctx, nxt = windows[0]
    method = build_method("streaming", ratio=0.75, sinks=4)
    logp, kept = score_after_prefix(model, method, {}, ctx, nxt)
    lay = method.layout(ctx, {})
    kept_keys = lay.expire >= len(lay)  # what the cache holds after the context (the rest was freed)
    lay.expire = torch.where(kept_keys, torch.full_like(lay.expire, NEVER), lay.expire)
    tail = text_layout(nxt[:-1])
    tail.position_ids += len(lay)
    with torch.no_grad():
        logits = parallel_forward(model, [concat([lay, tail])]).logits[0, len(lay) :]
    assert kept == int(kept_keys.sum())
    diff = (torch.log_softmax(logits.float(), -1) - logp).abs().max().item()
    assert diff < 1e-4, diff


def test_a_budget_out_of_reach_is_one_line(setup):
    model, tok, windows = setup
    method = build_method("sentinel", ratio=0.9, min_line_words=10_000)  # no line is long enough for a span
    token_ids = add_special_tokens(model, tok, method.special_tokens)
    with pytest.raises(ValueError, match="out of its reach"):
        check_reachable(model, method, token_ids, windows, 0.1)


def test_budget_needs_a_method_with_a_ratio():
    with pytest.raises(ValueError, match="no budget"):
        budget_params(build_method("full"), 0.5)


def test_cli_prefix_task_writes_results_and_tasks(capsys, tiny_dir, sample_path, tmp_path):
    out, tasks = tmp_path / "r.json", tmp_path / "tasks.json"
    argv = ["eval", "--task", "prefix", "--method", "streaming", "--kv-budget", "0.5", "0.25", "--model", tiny_dir,
            "--data", sample_path, "--split", "train", "--prefix-tokens", "96", "--new-tokens", "12", "--docs", "2",
            "--json", out, "--export-tasks", tasks]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["kv_budget"] for r in rows] == [0.5, 0.25]
    assert all(r["kind"] == "prefix" and r["compression_ratio_kvpress"] == 1 - r["kv_kept"] for r in rows)
    exported = json.loads(tasks.read_text())
    assert exported["task"] == "prefix" and len(exported["windows"]) == 2
    assert len(exported["windows"][0]["context"]) == 96 and len(exported["windows"][0]["continuation"]) == 13


def test_a_checkpoint_is_evaluated_at_its_trained_ratio(tiny_dir, sample_path, tmp_path):
    """Without --ratio, a checkpoint is scored at the ratio it was trained for (was: always 0.5)."""
    ck = tmp_path / "ck"
    argv = ["train", "--method", "streaming", "--model", tiny_dir, "--data", sample_path, "--out", ck]
    assert main([str(a) for a in argv]) == 2  # streaming is training-free: use a sentinel run instead
    argv = ["train", "--method", "sentinel", "--placement", "recent", "--ratio", "0.75", "--model", tiny_dir,
            "--data", sample_path, "--steps", "1", "--block-tokens", "64", "--out", ck]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    out = tmp_path / "r.json"
    argv = ["eval", "--checkpoint", ck, "--task", "prefix", "--data", sample_path, "--split", "train",
            "--prefix-tokens", "96", "--new-tokens", "8", "--docs", "2", "--reference", "--json", out]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["params"]["ratio"] == 0.75 and row["kv_kept"] == pytest.approx(0.25, abs=0.03)
    assert row["kl_to_base"] > 0 and row["base_perplexity"] > 1  # --reference: against the base model too


def test_a_precomputed_reference_gives_the_same_result(setup):
    from kvcondense.prefix_task import full_reference

    model, _, windows = setup
    method = build_method("streaming", ratio=0.5)
    inline = prefix_task(model, method, {}, windows)
    shared = prefix_task(model, method, {}, windows, reference=full_reference(model, {}, windows))
    for key in ("perplexity", "full_perplexity", "kl_to_full", "kv_kept"):
        assert shared[key] == pytest.approx(inline[key], rel=1e-9, abs=1e-12)


def test_reference_measures_a_checkpoint_against_its_base_model(tiny_dir, sample_path):
    """``--reference`` on the prefix task: KL to the model the adapters were trained from (adapters off). An
    untouched LoRA is the base (the two KLs agree); a moved one is not (they differ, and the base perplexity is the
    plain model's)."""
    from kvcondense.lora import LoraSettings, attach_lora
    from kvcondense.prefix_task import base_reference, full_reference

    model, tok = load_model(str(tiny_dir))
    windows = prefix_windows(load_split(str(sample_path), "train"), tok, 96, 12, 2)
    assert base_reference(model, {}, windows) is None  # no adapters: the model is its own base
    plain = prefix_task(model, build_method("full"), {}, windows)
    peft = attach_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0), [])
    method = build_method("streaming", ratio=0.5)
    fresh = prefix_task(peft, method, {}, windows, base=base_reference(peft, {}, windows))
    assert fresh["kl_to_base"] == pytest.approx(fresh["kl_to_full"], rel=1e-5)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    moved = prefix_task(peft, method, {}, windows, base=base_reference(peft, {}, windows))
    assert abs(moved["kl_to_base"] - moved["kl_to_full"]) > 1e-3
    assert moved["base_perplexity"] == pytest.approx(plain["full_perplexity"], rel=1e-5)
    assert full_reference(peft, {}, windows)[0].shape == base_reference(peft, {}, windows)[0].shape
