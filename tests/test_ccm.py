"""Compressed Context Memory: literal masks, merge weights, the conditional-LoRA gate, and the equivalence of the
parallel training forward with the recursive online inference, for concat and merge."""

import pytest
import torch
from conftest import COMP, assert_equivalent, episode, lora_model

from kvcondense.forward import parallel_forward
from kvcondense.layout import IGNORE, NEVER, Kind
from kvcondense.masks import layout_visibility
from kvcondense.merge import merge_rates, merge_weights
from kvcondense.methods import EpisodeTokens, TokenizedText, build_method


def small(method: str, **params):
    """Two chunks of two tokens, one COMP token per chunk, a one-token tail: the SPEC example."""
    m = build_method(method, comp_tokens=1, chunk_tokens=2, **params)
    return m.layout(TokenizedText.from_ids(torch.arange(5)), {"<COMP_0>": 9})


def test_concat_mask_literal():
    lay = small("ccm-concat")
    # t0 t1 C1 t2 t3 C2 tail
    assert lay.input_ids.tolist() == [0, 1, 9, 2, 3, 9, 4]
    assert lay.position_ids.tolist() == [0, 1, 2, 2, 3, 4, 4]  # COMP borrows the next text position ("skip")
    expected = [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [0, 0, 1, 1, 0, 0, 0],  # chunk 2 sees the memory (C1) and itself, not chunk 1's text
        [0, 0, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1, 0],
        [0, 0, 1, 0, 0, 1, 1],  # the tail sees all COMP tokens only
    ]
    assert layout_visibility(lay).int().tolist() == expected
    assert lay.kept_slots() == 3  # C1, C2, tail


def test_gisting_online_mask_literal():
    lay = small("ccm-concat", recurrent=False)
    expected = [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 1, 0, 0, 0],  # chunk 2 is compressed without the memory
        [0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 1, 1, 1, 0],
        [0, 0, 1, 0, 0, 1, 1],
    ]
    assert layout_visibility(lay).int().tolist() == expected


def test_merge_mask_and_rules_literal():
    lay = small("ccm-merge")
    # t0 t1 C1 S1 t2 t3 C2 S2 tail
    assert lay.input_ids.tolist() == [0, 1, 9, 9, 2, 3, 9, 9, 4]
    assert lay.kinds.tolist() == [0, 0, Kind.COMP, Kind.SUM, 0, 0, Kind.COMP, Kind.SUM, 0]
    assert lay.position_ids.tolist() == [0, 1, 2, 2, 2, 3, 4, 4, 4]
    expected = [
        [1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 0, 0, 0, 0, 0],
        [0, 0, 0, 1, 1, 0, 0, 0, 0],  # chunk 2 sees Mem(1) = S1, never C1 directly
        [0, 0, 0, 1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 1, 1],  # the tail sees Mem(2) = S2 only
    ]
    assert layout_visibility(lay).int().tolist() == expected
    mix, online = lay.mix, lay.mix_online
    # closed form: S1 = C1, S2 = (C1 + C2) / 2; recursive: S2 = S1 / 2 + C2 / 2
    assert (mix.dst.tolist(), mix.src.tolist(), mix.weight.tolist()) == ([3, 7, 7], [2, 2, 6], [1.0, 0.5, 0.5])
    assert (online.dst.tolist(), online.src.tolist(), online.weight.tolist()) == ([3, 7, 7], [2, 6, 3], [1, 0.5, 0.5])
    assert lay.cuts == (4, 8)
    assert lay.kept_slots() == 2  # S2 and the tail


def test_merge_weights_running_mean_and_ema():
    assert merge_rates(3) == [1.0, 1 / 2, 1 / 3]
    w = merge_weights(3)
    for t in range(3):
        assert torch.allclose(w[t, : t + 1], torch.full((t + 1,), 1 / (t + 1), dtype=torch.float64))
        assert w[t, t + 1 :].abs().sum() == 0
    ema = merge_weights(3, ema=0.5)
    assert ema[2].tolist() == [0.25, 0.25, 0.5]
    assert torch.allclose(ema.sum(1), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("n", [0, 9])
def test_comp_tokens_out_of_range(n):
    with pytest.raises(ValueError, match="comp tokens must be in 1..8"):
        build_method("ccm-merge", comp_tokens=n)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("method", ["ccm-concat", "ccm-merge"])
@pytest.mark.parametrize("recurrent", [True, False])
def test_parallel_equals_online(family, method, recurrent):
    m = build_method(method, comp_tokens=2, chunk_tokens=16, recurrent=recurrent)
    model = lora_model(family, m)
    text = TokenizedText.from_ids(torch.randint(0, 90, (70,), generator=torch.Generator().manual_seed(0)))
    for lay in (m.layout(text, COMP), m.episode_layout(episode(), COMP)):
        for chunk in (1, 5, 64):
            assert_equivalent(model, lay, chunk)


def test_ema_merge_equivalence():
    m = build_method("ccm-merge", comp_tokens=2, ema_rate=0.3)
    assert_equivalent(lora_model("llama", m), m.episode_layout(episode(chunks=5), COMP), 7)


def test_memory_slots_per_chunk():
    """Concat stores n slots per chunk, merge a constant n (plus the tail, which is never compressed)."""
    for chunks in (1, 3, 6):
        ep = episode(chunks=chunks)
        tail = len(ep.query) + len(ep.answer)
        concat = build_method("ccm-concat", comp_tokens=3).episode_layout(ep, COMP)
        merge = build_method("ccm-merge", comp_tokens=3).episode_layout(ep, COMP)
        assert concat.kept_slots() == 3 * chunks + tail
        assert merge.kept_slots() == 3 + tail


def test_merge_mixing_is_used_negative_control():
    """Dropping the K/V replacement changes the answer's logits: the equivalence above can fail."""
    m = build_method("ccm-merge", comp_tokens=2)
    model = lora_model("llama", m)
    lay = m.episode_layout(episode(chunks=3), COMP)
    with torch.no_grad():
        merged = parallel_forward(model, [lay]).logits[0]
        lay.mix = None
        plain = parallel_forward(model, [lay]).logits[0]
    scored = lay.targets != IGNORE
    assert (merged[scored] - plain[scored]).abs().max() > 1e-3


def test_merge_of_one_chunk_is_concat():
    """a_1 = 1: after one chunk the merged memory is that chunk's COMP group, so with the same weights the answer's
    logits equal concat's (the SUM placeholders change nothing); from two chunks on they differ."""
    merge, concat = (build_method(m, comp_tokens=2) for m in ("ccm-merge", "ccm-concat"))
    model = lora_model("llama", merge)
    for chunks, same in ((1, True), (2, False)):
        ep = episode(seed=chunks, chunks=chunks)
        with torch.no_grad():
            got = [
                parallel_forward(model, [lay]).logits[0][lay.targets != IGNORE]
                for lay in (merge.episode_layout(ep, COMP), concat.episode_layout(ep, COMP))
            ]
        diff = (got[0] - got[1]).abs().max().item()
        assert (diff < 1e-5) == same, f"{chunks} chunk(s): max diff {diff:.2e}"


def test_episode_scores_the_answer_only():
    ep = episode(chunks=2)
    lay = build_method("ccm-concat", comp_tokens=2).episode_layout(ep, COMP)
    assert lay.targets[lay.targets != IGNORE].tolist() == ep.answer.tolist()
    assert int((lay.expire == NEVER).sum()) == 2 * 2 + len(ep.query) + len(ep.answer)


def test_sampled_chunk_counts_cut_each_episode_keeping_its_evidence():
    from kvcondense.train import TrainConfig, block_layout

    m = build_method("ccm-concat", comp_tokens=2)
    full = episode(chunks=8)
    ep = EpisodeTokens(full.chunks, full.query, full.answer, evidence=1)  # an old evidence chunk: kept when cut
    cfg = TrainConfig(method="ccm-concat", sample_chunks=[1, 2, 4])

    def comp_slots(seed):
        return int((block_layout(None, m, cfg, ep, COMP, seed).kinds == Kind.COMP).sum())

    counts = [comp_slots(seed) // 2 for seed in range(16)]  # two COMP tokens per compressed chunk
    assert set(counts) == {1, 2, 4} and counts == [comp_slots(seed) // 2 for seed in range(16)]
    for seed in range(16):
        lay = block_layout(None, m, cfg, ep, COMP, seed)
        t = int((lay.kinds == Kind.COMP).sum()) // 2
        kept = list(range(8 - t, 8))  # the most recent t chunks, the evidence (chunk 1) in place of one of them
        kept[1 % t] = 1
        text = lay.input_ids[lay.kinds == Kind.TEXT].tolist()
        expected = [tok for i in kept for tok in ep.chunks[i].tolist()] + ep.query.tolist() + ep.answer.tolist()
        assert text == expected, (seed, t)
    assert int((block_layout(None, m, TrainConfig(method="ccm-concat"), ep, COMP, 0).kinds == Kind.COMP).sum()) == 16
    assert int((block_layout(None, m, TrainConfig(sample_chunks=[99]), ep, COMP, 0).kinds == Kind.COMP).sum()) == 16


def test_gate_off_equals_base_model_exactly():
    """Text tokens run the frozen base model: with no COMP token in sight, the LoRA model equals the base."""
    m = build_method("ccm-concat", comp_tokens=2, chunk_tokens=1000)
    model = lora_model("llama", m)
    lay = m.layout(TokenizedText.from_ids(torch.randint(0, 90, (40,))), COMP)  # one chunk: no COMP at all
    assert not bool((lay.kinds == Kind.COMP).any())
    with torch.no_grad():
        gated = parallel_forward(model, [lay]).logits
        with model.disable_adapter():
            base = parallel_forward(model, [lay]).logits
    assert torch.equal(gated, base)
    # and LoRA does act on COMP tokens (positive control)
    lay = m.episode_layout(episode(chunks=2), COMP)
    with torch.no_grad():
        gated = parallel_forward(model, [lay]).logits
        with model.disable_adapter():
            base = parallel_forward(model, [lay]).logits
    assert not torch.allclose(gated, base)


def test_no_lora_gradient_before_the_first_comp_token():
    m = build_method("ccm-merge", comp_tokens=2)
    model = lora_model("llama", m)
    model.train()
    for p in model.parameters():
        p.lora_dropout = None
    lay = m.episode_layout(episode(chunks=3), COMP)
    first_comp = int(torch.nonzero(lay.kinds == Kind.COMP)[0])
    lora = [p for n, p in model.named_parameters() if "lora_" in n]

    def grads(rows: slice) -> float:
        model.zero_grad()
        logits = parallel_forward(model, [lay]).logits[0, rows]
        logits.float().pow(2).mean().backward()
        return sum(float(p.grad.abs().sum()) for p in lora if p.grad is not None)

    assert grads(slice(0, first_comp)) == 0.0
    assert grads(slice(len(lay) - 3, len(lay))) > 0  # positive control: the answer depends on LoRA'd memory


@pytest.mark.parametrize("method", ["ccm-concat", "ccm-merge"])
def test_streaming_sinks_window_and_memory(method):
    """Streaming: sinks + a recent window + the compressed older chunks; parallel == online, and the merge
    budget is sinks + window + n, whatever the length."""
    m = build_method(method, comp_tokens=2, chunk_tokens=8, window=12, sinks=2)
    model = lora_model("llama", m)
    for n in (60, 120):
        lay = m.layout(TokenizedText.from_ids(torch.randint(0, 90, (n,))), COMP)
        for chunk in (1, 16):
            assert_equivalent(model, lay, chunk)
        if method == "ccm-merge":
            assert lay.kept_slots() == 2 + 12 + 2
    budget = build_method("streaming", sinks=2, slots=16).layout(TokenizedText.from_ids(torch.arange(120)), {})
    assert budget.kept_slots() == 16  # the StreamingLLM baseline at the same budget
