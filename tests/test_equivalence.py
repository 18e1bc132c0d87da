"""The backbone: the parallel masked forward and the incremental forward with real eviction give the same logits,
for every method, on a RoPE model (Llama, Qwen2) and on one with learned absolute positions (GPT-2)."""

import pytest
import torch
from conftest import assert_equivalent, decode_with_policy, tiny_model

from kvcondense.cache import EvictingCache
from kvcondense.engine import incremental_forward
from kvcondense.forward import parallel_forward
from kvcondense.layout import IGNORE
from kvcondense.methods import METHODS, TokenizedText, build_method
from kvcondense.scoring import method_layout

TOKENS = {
    "<CL>": 94,
    "<CR>": 95,
    **{f"<GIST_{i}>": 96 + i for i in range(4)},
    **{f"<COMP_{i}>": 90 + i for i in range(4)},
}


def text(n=90, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 90, (n,), generator=g)
    # one long "line" of single-token words so that sentinel spans are placed; a sentence ends every ~8 tokens
    ends = torch.rand(n, generator=g) < 0.12
    return TokenizedText(ids, torch.arange(n), torch.zeros(n, dtype=torch.long), ends)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("method", [m for m in METHODS if METHODS[m].reads_text()])
def test_parallel_equals_incremental(family, method):
    model = tiny_model(family)
    m = build_method(method, ratio=0.5, min_line_words=1, max_span_words=8, chunk_tokens=16)
    layout = method_layout(model, m, text(), TOKENS, seed=1)  # (after the scoring pass for a method that reads it)
    for chunk in (1, 5, 64):
        assert_equivalent(model, layout, chunk)


def test_eager_backend_with_additive_mask():
    model = tiny_model("llama", attn="eager")
    layout = build_method("sentinel", ratio=0.5, min_line_words=1, max_span_words=8).layout(text(), TOKENS, seed=2)
    assert_equivalent(model, layout, 7)


def test_masks_matter_negative_control():
    """Without eviction (plain causal attention over everything) the logits differ: the test above can fail."""
    model = tiny_model("llama")
    layout = build_method("sentinel", ratio=0.5, min_line_words=1, max_span_words=8).layout(text(), TOKENS, seed=1)
    with torch.no_grad():
        masked = parallel_forward(model, [layout]).logits[0]
        plain = model(input_ids=layout.input_ids[None], position_ids=layout.position_ids[None]).logits[0]
    assert (masked - plain).abs().max() > 1e-2


def test_cache_memory_is_physically_freed():
    model = tiny_model("llama")
    layout = build_method("sentinel", ratio=0.5, min_line_words=1, max_span_words=8).layout(text(200), TOKENS, seed=3)
    cache = EvictingCache(model.config.num_hidden_layers)
    _, stats = incremental_forward(model, layout, 16, cache=cache)
    cfg = model.config
    per_slot = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    assert cache.kv_bytes() == layout.kept_slots() * per_slot
    assert stats.kv_bytes < 0.7 * layout.n_text * per_slot
    assert cache.get_seq_length() == len(layout)  # logical length drives positions, not the physical one
    assert cache.physical_length == layout.kept_slots()
    assert stats.peak_slots <= layout.kept_slots() + 16 + 16  # kept so far + one chunk


@pytest.mark.parametrize("method", [m for m in METHODS if METHODS[m].reads_text()])
def test_decode_time_eviction_matches_parallel(method):
    """Tokens laid out by the decode policy (spans closing over generated text, windows sliding) and fed one
    step at a time through the cache give the parallel forward's logits over the final layout."""
    model = tiny_model("llama")
    m = build_method(method, ratio=0.5, min_line_words=1, max_span_words=8, chunk_tokens=16)
    prompt = method_layout(model, m, text(40), TOKENS, seed=1)
    tokens = torch.randint(0, 90, (30,), generator=torch.Generator().manual_seed(5)).tolist()
    full, got, rows, cache, _ = decode_with_policy(model, prompt, m.decode_policy(prompt, TOKENS, seed=1), tokens)
    with torch.no_grad():
        parallel = parallel_forward(model, [full]).logits[0]
    diff = (parallel[rows] - got).abs().max().item()
    assert diff < 1e-4, f"max abs diff {diff:.2e}"
    assert int(cache.stored_slots()[0]) == full.kept_slots()
    if m.compresses_at_prompt_end():  # the prompt only, as a KV press: generated text is kept
        assert prompt.kept_slots() <= 0.5 * prompt.n_text
    elif method != "full":
        assert full.kept_slots() < 0.8 * full.n_text


def test_batched_right_padded_parallel_forward_matches_single_rows():
    model = tiny_model("llama")
    m = build_method("sentinel", ratio=0.5, min_line_words=1, max_span_words=8)
    a, b = m.layout(text(70, seed=1), TOKENS, seed=1), m.layout(text(40, seed=2), TOKENS, seed=2)
    with torch.no_grad():
        both = parallel_forward(model, [a, b]).logits
        for row, lay in enumerate((a, b)):
            alone = parallel_forward(model, [lay]).logits[0]
            diff = (both[row, : len(lay)] - alone).abs().max().item()
            assert diff < 1e-4, f"row {row}: max abs diff {diff:.2e}"


def test_eval_perplexity_matches_a_direct_cross_entropy():
    """The evaluation's perplexity is exp(mean next-text-token cross-entropy) of the parallel forward."""
    import math

    import torch.nn.functional as F

    from kvcondense.evaluate import perplexity

    model = tiny_model("llama")
    m = build_method("sentinel", ratio=0.5, min_line_words=1, max_span_words=8)
    blocks = [text(60, seed=s) for s in range(3)]
    res = perplexity(model, m, blocks, TOKENS, batch_size=2, seed=0, prefix_buckets=(20, 1000))
    total, n = 0.0, 0
    for i, b in enumerate(blocks):
        lay = m.layout(b, TOKENS, seed=i)
        with torch.no_grad():
            logits = parallel_forward(model, [lay]).logits[0]
        scored = lay.targets != IGNORE
        total += F.cross_entropy(logits[scored], lay.targets[scored], reduction="sum").item()
        n += int(scored.sum())
    assert res["tokens_scored"] == n
    assert res["perplexity"] == pytest.approx(math.exp(total / n), rel=1e-5)
    assert sum(b["tokens"] for b in res["perplexity_by_prefix"]) == n


def test_decode_with_compaction_slack_gives_the_same_logits():
    """Dead slots left for a later compaction are invisible: logits equal, memory bounded by the slack."""
    model = tiny_model("llama")
    m = build_method("local", ratio=0.5)
    prompt = method_layout(model, m, text(40), TOKENS, seed=1)
    tokens = torch.randint(0, 90, (30,), generator=torch.Generator().manual_seed(5)).tolist()
    exact = decode_with_policy(model, prompt, m.decode_policy(prompt, TOKENS), tokens)
    lazy = decode_with_policy(model, prompt, m.decode_policy(prompt, TOKENS), tokens, slack=6)
    assert (exact[1] - lazy[1]).abs().max() < 1e-5
    assert all(0 <= b - a <= 6 for a, b in zip(exact[4], lazy[4], strict=True))
    assert max(b - a for a, b in zip(exact[4], lazy[4], strict=True)) > 0
