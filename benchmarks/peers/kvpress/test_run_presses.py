"""Tests of the kvpress peer runner, in its own venv (make peers):

    benchmarks/peers/kvpress/.venv/bin/python -m pytest -q benchmarks/peers/kvpress/test_run_presses.py

A tiny random LlamaForCausalLM and a BPE tokenizer trained here on made-up text: nothing is downloaded and the
real model is not needed.
"""

from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("kvpress")

import make_demo_tasks  # noqa: E402
import run_presses  # noqa: E402

WORDS = (
    "alice river garden queen rabbit tea party clock door key bottle cake cat smile king court trial card rose "
    "hedgehog mushroom caterpillar pool tears mouse duchess baby pepper hatter dormouse march hare"
).split()
N_LAYERS = 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, text file): a 2-layer random Llama with its own tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny")
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "." for _ in range(600)]
    text = "\n".join(" ".join(sentences[i : i + 5]) for i in range(0, len(sentences), 5))
    (d / "text.txt").write_text(text)

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(
        sentences + ['Question: in the text above, which word comes right after "x"?\nAnswer:'], trainer
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(d)

    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d, d / "text.txt"


def _run(tmp_path, model_dir, tasks: dict, presses, kept, name="out.json"):
    tf = tmp_path / f"tasks-{name}"
    tf.write_text(json.dumps(tasks))
    out = tmp_path / name
    argv = ["--tasks", str(tf), "--model", str(model_dir), "--presses", *presses, "--kept", *map(str, kept)]
    rc = run_presses.main([*argv, "--out", str(out)])
    return rc, json.loads(out.read_text())["results"] if out.exists() else None


def _prefix_tasks(model_dir, text, tmp_path, windows=2, context=96, continuation=8):
    f = tmp_path / "prefix.json"
    make_demo_tasks.main(
        ["--model", str(model_dir), "--text", str(text), "--task", "prefix", "--windows", str(windows)]
        + ["--context", str(context), "--continuation", str(continuation), "--out", str(f)]
    )
    return json.loads(f.read_text())


def test_prefix_rows(tiny, tmp_path):
    model_dir, text = tiny
    tasks = _prefix_tasks(model_dir, text, tmp_path)
    assert len(tasks["windows"][0]["context"]) == 96 and len(tasks["windows"][0]["continuation"]) == 9
    rc, rows = _run(tmp_path, model_dir, tasks, ["streaming_llm", "snapkv", "kvzip"], [0.5, 0.25])
    assert rc == 0
    by = {(r["method"], r["kept_nominal"]): r for r in rows}
    assert len(rows) == 1 + 3 * 2 and rows[0]["method"] == "full"

    full = by[("full", 1.0)]
    assert abs(full["kl_to_full"]) < 1e-6  # the cached two-stage path reproduces one full-attention pass
    assert full["perplexity"] == pytest.approx(full["full_perplexity"], rel=1e-5)
    assert full["kv_kept"] == 1.0 and full["n_tokens"] == 2 * 8 and full["press"] is None

    s = by[("kvpress-streaming_llm", 0.5)]
    assert s["kv_kept"] == pytest.approx(0.5, abs=0.01) and s["kv_kept_measured"] and not s["masks_only"]
    assert s["compression_ratio"] == 0.5 and s["press"] == "StreamingLLMPress" and s["harness"] == "kvpress-0.5.5"
    assert by[("kvpress-streaming_llm", 0.25)]["kv_kept"] == pytest.approx(0.25, abs=0.01)
    assert by[("kvpress-snapkv", 0.25)]["compression_ratio"] == 0.75
    assert all(r["kl_to_full"] > 0 for r in rows[1:])
    assert all(r["full_perplexity"] == full["full_perplexity"] and r["task_name"] == "demo-prefix" for r in rows)

    z = by[("kvpress-kvzip", 0.25)]  # KVzip keeps every KV pair and masks: the nominal kept fraction, flagged
    assert z["masks_only"] and z["kv_kept_measured"] is False and z["kv_kept"] == 0.25
    assert z["kv_kept_stored"] == 1.0 and z["kv_kept_effective"] == pytest.approx(0.25, abs=0.02)


def test_qa_options_compresses_once_per_item(tiny, tmp_path, monkeypatch):
    from kvpress.presses.scorer_press import ScorerPress

    model_dir, text = tiny
    f = tmp_path / "qa.json"
    make_demo_tasks.main(
        ["--model", str(model_dir), "--text", str(text), "--task", "qa", "--items", "2", "--context", "128"]
        + ["--questions", "3", "--options", "4", "--out", str(f)]
    )
    tasks = json.loads(f.read_text())
    assert all(len(q["options"]) == 4 for it in tasks["items"] for q in it["questions"])

    calls = []
    orig = ScorerPress.compress

    def counting(self, module, *a, **k):
        calls.append(module.layer_idx)
        return orig(self, module, *a, **k)

    monkeypatch.setattr(ScorerPress, "compress", counting)
    rc, rows = _run(tmp_path, model_dir, tasks, ["snapkv"], [0.5])
    assert rc == 0
    assert len(calls) == 2 * N_LAYERS  # one compression per item and layer, none per question or option
    for r in rows:
        assert r["kind"] == "qa" and 0.0 <= r["accuracy"] <= 1.0
        assert r["n_questions"] == 6 and r["n_compressions"] == 2 and r["n_open_questions"] == 0
    assert rows[1]["kv_kept"] == pytest.approx(0.5, abs=0.01)


def test_qa_open_questions_generate(tiny, tmp_path):
    model_dir, text = tiny
    f = tmp_path / "qa_open.json"
    make_demo_tasks.main(
        ["--model", str(model_dir), "--text", str(text), "--task", "qa", "--items", "1", "--context", "96"]
        + ["--questions", "2", "--options", "0", "--max-new-tokens", "4", "--out", str(f)]
    )
    rc, rows = _run(tmp_path, model_dir, json.loads(f.read_text()), ["streaming_llm", "pyramidkv"], [0.5])
    assert rc == 0 and [r["method"] for r in rows] == ["full", "kvpress-streaming_llm", "kvpress-pyramidkv"]
    for r in rows:
        assert r["n_open_questions"] == 2 and 0.0 <= r["accuracy"] <= 1.0


def test_pyramidkv_uneven_layers_prefix(tiny, tmp_path):
    model_dir, text = tiny
    rc, rows = _run(tmp_path, model_dir, _prefix_tasks(model_dir, text, tmp_path, windows=1), ["pyramidkv"], [0.5])
    assert rc == 0 and rows[1]["kv_kept_measured"] and 0.3 < rows[1]["kv_kept"] < 0.7


def test_unknown_press_is_one_line_exit_2(tiny, tmp_path, capsys):
    model_dir, text = tiny
    tf = tmp_path / "t.json"
    tf.write_text(json.dumps({"task": "prefix", "name": "x", "windows": [{"context": [1, 2], "continuation": [3, 4]}]}))
    rc = run_presses.main(["--tasks", str(tf), "--model", str(model_dir), "--presses", "nope", "--out", "x.json"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "unknown press 'nope'" in err[0]


def test_bad_tasks_file_exit_2(tiny, tmp_path, capsys):
    model_dir, _ = tiny
    tf = tmp_path / "t.json"
    tf.write_text(json.dumps({"task": "prefix", "name": "x", "windows": [{"context": [1, 2], "continuation": [3]}]}))
    rc = run_presses.main(["--tasks", str(tf), "--model", str(model_dir), "--out", str(tmp_path / "o.json")])
    assert rc == 2 and "S+1 >= 2" in capsys.readouterr().err


def test_normalize_answer():
    assert run_presses.normalize_answer("  The  Mad Hatter! ") == "mad hatter"
    assert run_presses.normalize_answer("an apple, a pear.") == "apple pear"


def test_write_atomic_leaves_no_temp(tmp_path):
    out = tmp_path / "sub" / "r.json"
    run_presses.write_atomic(str(out), {"results": []})
    run_presses.write_atomic(str(out), {"results": [1]})
    assert json.loads(out.read_text()) == {"results": [1]}
    assert [p.name for p in out.parent.iterdir()] == ["r.json"]
