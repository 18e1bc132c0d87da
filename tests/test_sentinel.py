"""Sentinel spans, positions, targets and the measured ratio."""

import random

import pytest
import torch

from kvcondense.layout import IGNORE, NEVER
from kvcondense.methods import Sentinel, TokenizedText, build_method, tokenize
from kvcondense.methods.sentinel import select_spans, sentinel_layout

L, R = 90, 91


def test_targets_skip_sentinels_including_adjacent_spans():
    # text a b c d e with spans (b c) and (d) adjacent: a L b c R L d R e   ("c <CR> <CL> d")
    lay = sentinel_layout(torch.tensor([10, 11, 12, 13, 14]), [(1, 2), (3, 3)], L, R)
    assert lay.input_ids.tolist() == [10, L, 11, 12, R, L, 13, R, 14]
    # c predicts d (not <CL>), d predicts e; sentinels predict nothing
    assert lay.targets.tolist() == [11, IGNORE, 12, 13, IGNORE, IGNORE, 14, IGNORE, IGNORE]


def test_span_at_start_positions_copy_zero():
    lay = sentinel_layout(torch.tensor([10, 11, 12]), [(0, 1)], L, R)
    assert lay.input_ids.tolist() == [L, 10, 11, R, 12]
    assert lay.position_ids.tolist() == [0, 0, 1, 1, 2]


def test_expiry_and_kept_slots():
    lay = sentinel_layout(torch.tensor([1, 2, 3, 4, 5, 6]), [(2, 3)], L, R)
    assert lay.expire.tolist() == [NEVER, NEVER, 5, 5, 5, NEVER, NEVER, NEVER]
    assert lay.kept_slots() == 5  # a b R e f
    assert lay.compression_ratio() == pytest.approx(5 / 6)


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.9])
def test_select_spans_properties(ratio):
    rng = random.Random(0)
    spans = select_spans(200, ratio, 25, rng)
    covered = set()
    for a, b in spans:
        assert 2 <= b - a + 1 <= 25
        assert not covered & set(range(a, b + 1))
        covered |= set(range(a, b + 1))
    assert spans == sorted(spans)
    assert len(covered) <= 200


def long_line_text(n_words: int, lines: int = 3) -> TokenizedText:
    ids, words, line_ids = [], [], []
    for line in range(lines):
        for w in range(n_words):
            ids.append(w % 50)
            words.append(line * n_words + w)
            line_ids.append(line)
    return TokenizedText(torch.tensor(ids), torch.tensor(words), torch.tensor(line_ids))


def test_measured_ratio_tracks_target():
    text = long_line_text(120, lines=20)
    for ratio in (0.3, 0.5, 0.7):
        lay = Sentinel(ratio=ratio).layout(text, {"<CL>": L, "<CR>": R}, seed=0)
        dropped = 1 - lay.compression_ratio()
        assert abs(dropped - ratio) < 0.1, (ratio, dropped)


def test_short_lines_get_no_spans():
    lay = Sentinel(ratio=0.5).layout(long_line_text(29, lines=5), {"<CL>": L, "<CR>": R}, seed=0)
    assert lay.kept_slots() == lay.n_text == len(lay)


def test_same_seed_same_layout_other_seed_other_layout():
    text, ids = long_line_text(100, lines=4), {"<CL>": L, "<CR>": R}
    a, b, c = (Sentinel(0.5).layout(text, ids, seed=s) for s in (3, 3, 4))
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)


def test_bad_ratio_is_refused():
    with pytest.raises(ValueError, match="ratio must be in"):
        Sentinel(ratio=1.0)


def test_tokenize_maps_tokens_to_words_and_lines(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    text = "Alice was  tired.\nThe Rabbit ran"
    tt = tokenize(text, tok)
    words = {}
    for t, w in zip(tt.ids.tolist(), tt.word_ids.tolist(), strict=True):
        if w >= 0:
            words.setdefault(w, "")
            words[w] += tok.decode([t])
    assert [s.strip() for s in words.values()] == text.split()
    assert set(tt.line_ids.tolist()) == {0, 1}


@pytest.mark.parametrize("kept", [0.5, 0.25, 0.125])
def test_recent_placement_reaches_any_budget(kept):
    """Activation Beacon's layout: sinks and a recent window raw, all older tokens condensed; the KV kept at the end
    of a sequence is the budget, on any text (no line rule)."""
    n = 1024
    ids = torch.arange(n) % 90
    text = TokenizedText(ids, torch.arange(n), torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool))
    m = build_method("sentinel", ratio=1 - kept, placement="recent", sinks=4)
    lay = m.layout(text, {"<CL>": 94, "<CR>": 95})
    assert abs(lay.kept_slots() / n - kept) < 0.005
    raw = lay.expire == NEVER
    assert bool(raw[:4].all()) and bool(raw[-int(kept * n / 2) + 4 :].all())  # sinks and the recent window


def test_recent_placement_is_equivalent_with_eviction():
    from conftest import tiny_model

    from kvcondense.engine import incremental_forward
    from kvcondense.forward import parallel_forward

    n = 120
    g = torch.Generator().manual_seed(0)
    text = TokenizedText(torch.randint(0, 90, (n,), generator=g), torch.arange(n), torch.zeros(n, dtype=torch.long),
                         torch.zeros(n, dtype=torch.bool))  # fmt: skip
    lay = build_method("sentinel", ratio=0.75, placement="recent").layout(text, {"<CL>": 94, "<CR>": 95})
    model = tiny_model("llama")
    with torch.no_grad():
        parallel = parallel_forward(model, [lay]).logits[0]
    incremental, stats = incremental_forward(model, lay, 7)
    scored = lay.targets != -100
    assert (parallel[scored] - incremental[scored]).abs().max() < 1e-4
    assert stats.stored_slots == lay.kept_slots()


def test_unknown_placement_is_refused():
    with pytest.raises(ValueError, match="unknown placement"):
        build_method("sentinel", placement="middle")


# --------------------------------------------------------------------------- lora_scope and sampled ratios (training)
def _random_lora(model, method, seed=0):
    from kvcondense.lora import LoraSettings, attach_lora

    peft = attach_lora(model, LoraSettings(r=4), [94, 95], method.lora_on)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained-looking update (B starts at zero)
    return peft


def _text(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 90, (n,), generator=g)
    return TokenizedText(ids, torch.arange(n), torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool))


@pytest.mark.parametrize("scope", ["special", "all"])
def test_lora_scope_special_leaves_text_on_the_base_model(scope):
    """With LoRA only on <CL>/<CR>, plain text runs the base model exactly (nothing compressed = the base model);
    with LoRA on every token it does not; either way the compressed layout is changed by the adapter."""
    from conftest import tiny_model

    from kvcondense.forward import parallel_forward
    from kvcondense.layout import text_layout

    method = build_method("sentinel", placement="recent", ratio=0.5, lora_scope=scope)
    assert method.lora_on == ((1, 2) if scope == "special" else None)
    model = _random_lora(tiny_model("llama"), method)
    text = _text(48)
    plain = text_layout(text.ids)
    with torch.no_grad():
        adapted = parallel_forward(model, [plain]).logits
        with model.disable_adapter():
            base = parallel_forward(model, [plain]).logits
        lay = method.layout(text, {"<CL>": 94, "<CR>": 95})
        comp = parallel_forward(model, [lay]).logits
        with model.disable_adapter():
            comp_base = parallel_forward(model, [lay]).logits
    assert torch.equal(adapted, base) == (scope == "special")
    assert not torch.allclose(comp, comp_base)


def test_unknown_lora_scope_is_refused():
    from kvcondense.errors import UsageError

    with pytest.raises(UsageError, match="lora_scope"):
        build_method("sentinel", lora_scope="text")


def test_sampled_ratios_vary_by_block_and_repeat_by_seed():
    from kvcondense.train import TrainConfig, block_layout

    method = build_method("sentinel", placement="recent", ratio=0.5)
    cfg = TrainConfig(sample_ratios=[0.5, 0.75, 0.875])
    text, ids = _text(256), {"<CL>": 94, "<CR>": 95}
    kept = [block_layout(None, method, cfg, text, ids, seed).kept_slots() / 256 for seed in range(12)]
    assert len({round(k, 2) for k in kept}) == 3  # all three budgets drawn
    assert kept == [block_layout(None, method, cfg, text, ids, seed).kept_slots() / 256 for seed in range(12)]
    assert {round(k * 8) / 8 for k in kept} == {0.5, 0.25, 0.125}
    fixed = TrainConfig()
    assert {block_layout(None, method, fixed, text, ids, s).kept_slots() for s in range(4)} == {
        method.layout(text, ids).kept_slots()
    }


@pytest.mark.parametrize("ratios", [[0.5, 1.0], [0.0]])
def test_sampled_ratios_outside_the_range_are_refused(ratios):
    from kvcondense.errors import UsageError
    from kvcondense.train import TrainConfig

    with pytest.raises(UsageError, match="sample-ratios"):
        TrainConfig(sample_ratios=ratios)


@pytest.mark.parametrize("share", [0.5, 0.75, 0.9])
def test_window_share_splits_the_budget_and_keeps_it(share):
    """The recent placement keeps about the budget whatever the split; a larger share means a larger raw window
    and fewer, longer spans."""
    method = build_method("sentinel", placement="recent", ratio=0.75, window_share=share)
    text, ids = _text(512), {"<CL>": 94, "<CR>": 95}
    lay = method.layout(text, ids)
    assert lay.kept_slots() / 512 == pytest.approx(0.25, abs=0.02)
    from kvcondense.methods.sentinel import recent_spans

    spans = recent_spans(512, 0.25, 4, share)
    window = 512 - (spans[-1][1] + 1)
    assert window == int((0.25 * 512 - 4) * share)
    with pytest.raises(Exception, match="window_share"):
        build_method("sentinel", window_share=1.0)
