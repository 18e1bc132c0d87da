"""Per-(layer, KV head) expiry (``scored --per-head``): the parallel forward and the evicting cache agree, each head
really keeps its own keys (the memory of one head's choice, not of their union), and misuse fails loudly."""

import dataclasses

import pytest
import torch
from conftest import assert_equivalent, decode_with_policy, tiny_model
from test_equivalence import TOKENS, text

from kvcondense.cache import EvictingCache
from kvcondense.engine import Stream, generate_step, incremental_forward
from kvcondense.errors import UsageError
from kvcondense.forward import parallel_forward
from kvcondense.heads import head_order
from kvcondense.layout import NEVER, with_continuation
from kvcondense.methods import build_method
from kvcondense.methods.placements import scored_window
from kvcondense.scoring import method_layout, with_scores


def per_head(ratio=0.5, **kw):
    return build_method("scored", ratio=ratio, per_head=True, score_window=4, **kw)


def continued(model, n=60, ratio=0.5, seed=1):
    prompt = method_layout(model, per_head(ratio), text(n), TOKENS)
    ids = torch.randint(0, 90, (20,), generator=torch.Generator().manual_seed(seed))
    return prompt, with_continuation(prompt, ids)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_per_head_parallel_equals_incremental_and_frees_memory(family):
    model = tiny_model(family)
    prompt, lay = continued(model)
    kept = (prompt.head_expire == NEVER).sum(-1)
    assert bool((kept == 30).all())  # every head of every layer keeps half the 60 prompt tokens
    assert not bool((prompt.head_expire == prompt.head_expire[:1, :1]).all())  # and the heads choose differently
    for chunk in (1, 7, 64):
        stats = assert_equivalent(model, lay, chunk)
        cfg = model.config
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        per_slot = 2 * cfg.num_hidden_layers * heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
        assert stats.stored_slots == 30 + 20 and stats.kv_bytes == 50 * per_slot  # one head's choice, not the union


def test_per_head_hiding_matters_negative_control():
    """The same layout with only the per-token rule (every head sees the union) gives other logits: the test above
    can fail."""
    model = tiny_model("llama")
    _, lay = continued(model)
    union = dataclasses.replace(lay, head_expire=None, cuts=())
    with torch.no_grad():
        diff = (parallel_forward(model, [lay]).logits - parallel_forward(model, [union]).logits).abs().max()
    assert diff > 1e-3


def test_per_head_choice_is_each_heads_top_scores():
    model = tiny_model("llama")
    method = per_head(0.75)  # 25 % kept: 20 of 80
    scored = with_scores(model, method, text(80))
    lay = method.layout(scored, TOKENS)
    keep = lay.head_expire == NEVER
    window = scored_window(80, 0.25, 4, method.window_share, 4)  # 8 recent tokens
    assert bool(keep[..., :4].all()) and bool(keep[..., -window:].all())  # sinks and window in every head
    for layer in range(keep.shape[0]):
        for head in range(keep.shape[1]):
            chosen = keep[layer, head, 4:-window]
            older = scored.head_scores[layer, head, 4:-window]
            assert int(chosen.sum()) == 20 - 4 - window
            assert float(older[chosen].min()) >= float(older[~chosen].max())
    uniform = build_method("scored", ratio=0.75, score_window=4).layout(scored, TOKENS)
    assert uniform.head_expire is None and uniform.kept_slots() == lay.kept_slots() == 20


def test_decode_after_a_per_head_prompt_matches_parallel():
    model = tiny_model("llama")
    method = per_head()
    prompt = method_layout(model, method, text(40), TOKENS)
    tokens = torch.randint(0, 90, (12,), generator=torch.Generator().manual_seed(5)).tolist()
    full, got, rows, cache, _ = decode_with_policy(model, prompt, method.decode_policy(prompt, TOKENS), tokens)
    with torch.no_grad():
        parallel = parallel_forward(model, [full]).logits[0]
    assert (parallel[rows] - got).abs().max() < 1e-4
    assert int(cache.stored_slots()[0]) == full.kept_slots() == 20 + 12


def test_eager_backend_per_head():
    model = tiny_model("llama", attn="eager")
    _, lay = continued(model)
    assert_equivalent(model, lay, 7)


def test_ragged_batch_of_per_head_prompts_decodes_as_single_rows():
    model = tiny_model("llama")
    method = per_head()
    prompts = [text(50, seed=1), text(30, seed=2)]
    stream, logits = Stream.batch(model, method, TOKENS, prompts)
    together = [t for t in generate_step(stream, logits, 6)]
    for b, p in enumerate(prompts):
        alone = Stream(model, method, TOKENS)
        first = alone.prefill(p)
        assert [t[0] for t in generate_step(alone, first, 6)] == [t[b] for t in together]
    assert stream.cache.stored_slots().tolist() == [25 + 6, 15 + 6]


def test_a_chunk_across_a_per_head_expiry_is_refused():
    model = tiny_model("llama")
    _, lay = continued(model)
    with pytest.raises(ValueError, match="per-head expiry"):
        incremental_forward(model, dataclasses.replace(lay, cuts=()), 64)


def test_heads_keeping_unequal_counts_are_refused():
    slot_idx = torch.arange(4)[None]
    expire = torch.full((1, 4), NEVER)
    heads = torch.full((1, 1, 2, 4), NEVER)
    heads[0, 0, 0, 1] = heads[0, 0, 0, 2] = heads[0, 0, 1, 3] = 0  # head 0 keeps 2, head 1 keeps 3
    with pytest.raises(ValueError, match="same number"):
        head_order(slot_idx, expire, torch.zeros(1, 4, dtype=torch.bool), heads, 1)


def test_a_bad_head_expire_is_refused():
    model = tiny_model("llama")
    prompt, _ = continued(model)
    with pytest.raises(ValueError, match="maximum over heads"):
        dataclasses.replace(prompt, head_expire=prompt.head_expire.clamp(max=3))


def test_cache_state_round_trips_a_pending_per_head_expiry():
    model = tiny_model("llama")
    prompt, _ = continued(model)
    cache = EvictingCache(model.config.num_hidden_layers)
    stream = Stream(model, None, {}, cache)
    stream.prefill(prompt.slice(0, 30), chunk_tokens=30)  # the prompt half read: heads not applied yet
    assert cache.slot_heads is not None
    state = cache.state_dict()
    back = EvictingCache.from_state(state, model.config.num_hidden_layers, cache.seen)
    assert torch.equal(back.slot_heads, cache.slot_heads)
    assert torch.equal(cache.clone().slot_heads, cache.slot_heads)


def test_recent_keeps_exactly_that_window_and_score_window_0_scores_with_every_token():
    model = tiny_model("llama")
    method = build_method("scored", ratio=0.5, per_head=True, score_window=0, score_mean=True, recent=3)
    assert method.scoring().window >= 10**9  # the scoring pass clips it to the prompt: every query scores
    lay = method_layout(model, method, text(60), TOKENS)
    keep = lay.head_expire == NEVER
    assert bool(keep[..., -3:].all()) and bool((keep.sum(-1) == 30).all())
    assert not bool(keep[..., -12:-3].all())  # no longer a window of half the budget
    with pytest.raises(UsageError, match="score_window and recent"):
        build_method("scored", recent=-1)


@pytest.mark.parametrize("kept, window", [(0.5, 32), (0.25, 17), (0.125, 7)])
def test_recent_takes_at_most_the_window_share_of_a_short_prompts_budget(kept, window):
    """156 tokens (a recall episode): 32 recent tokens would fill most of a 39-slot budget; they get (39 - 4) / 2."""
    t = text(156)
    t.scores = torch.rand(156, generator=torch.Generator().manual_seed(0))
    t.scores[-40:] = -1.0  # the recent tokens only stay as the window
    lay = build_method("scored", ratio=1 - kept, recent=32).layout(t, {})
    keep = lay.expire == NEVER
    assert int(keep.sum()) == int(kept * 156)
    assert bool(keep[-window:].all()) and not bool(keep[-window - 1])


def test_scored_heads_is_scored_with_the_best_settings():
    model = tiny_model("llama")
    preset = method_layout(model, build_method("scored-heads", ratio=0.5), text(200), TOKENS)
    flags = dict(per_head=True, score_window=0, score_mean=True, score_pool=1, value_norm=True, recent=32, replay=0.75)
    flags.update(allocate="layer", window_share=0.25)
    spelled = method_layout(model, build_method("scored", ratio=0.5, **flags), text(200), TOKENS)
    assert torch.equal(preset.head_expire, spelled.head_expire)
    assert not bool((preset.head_expire == preset.head_expire[:1, :1]).all())  # the heads chose differently


@pytest.mark.parametrize("name, family", [("scored-heads", "llama"), ("scored-heads", "gpt2"), ("scored", "llama")])
def test_prefill_takes_the_scoring_passs_read_and_equals_feeding_the_prompt(name, family):
    """A prompt the scoring pass read whole is not read again: the engine stores the pass's keys and values (2n
    tokens read in all, not 3n), and the cache, the first logits and the decode after it equal those of feeding
    the same layout chunk by chunk."""
    model, t = tiny_model(family), text(50)
    method = build_method(name, ratio=0.5)
    read = []
    hook = model.get_input_embeddings().register_forward_hook(lambda mod, args, out: read.append(args[0].shape[1]))
    reused = Stream(model, method, TOKENS)
    first = reused.prefill(t, chunk_tokens=16)
    hook.remove()
    assert sum(read) == (100 if name == "scored-heads" else 50)
    fed = Stream(model, method, TOKENS)
    want = fed.prefill(reused.layouts[0], chunk_tokens=16)
    torch.testing.assert_close(first, want, atol=1e-4, rtol=1e-4)
    a, b = reused.cache, fed.cache
    assert torch.equal(a.slot_idx, b.slot_idx) and torch.equal(a.slot_expire, b.slot_expire)
    assert int(a.stored_slots()[0]) == 25
    for la, lb in zip(a.layers, b.layers, strict=True):
        torch.testing.assert_close(la.keys, lb.keys, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(la.values, lb.values, atol=1e-4, rtol=1e-4)
    for token in (5, 17, 42):
        torch.testing.assert_close(reused.step([token]).logits, fed.step([token]).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name, n", [("scored", 16), ("scored-heads", 8)])
def test_prefill_reuses_a_read_as_long_as_a_sliding_window_whole(name, n):
    """A read exactly as long as a sliding window (the prompt, or the prompt and its copy) is allowed: the pass's
    cache must then hold every key of it (a sliding layer's cache keeps one fewer), or the stored prompt would miss
    or shift a key and the decode go wrong silently."""
    from transformers import AutoModelForCausalLM, MistralConfig

    shape = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, sliding_window=16)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MistralConfig(**shape), attn_implementation="sdpa").eval()
    method, t = build_method(name, ratio=0.5), text(n)
    reused = Stream(model, method, TOKENS)
    first = reused.prefill(t, chunk_tokens=16)
    fed = Stream(model, method, TOKENS)
    torch.testing.assert_close(first, fed.prefill(reused.layouts[0], chunk_tokens=16), atol=1e-5, rtol=1e-4)
    for la, lb in zip(reused.cache.layers, fed.cache.layers, strict=True):
        torch.testing.assert_close(la.keys, lb.keys, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(reused.step([5]).logits, fed.step([5]).logits, atol=1e-5, rtol=1e-4)
