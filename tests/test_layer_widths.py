"""Per-layer widths (``scored --per-head --allocate layer``): each layer keeps its own share of one budget, the cache
stores a different number of slots in each layer, and the parallel forward and the evicting cache still agree,
through prefill, decoding, ragged batches, a later expiry and the cache's state."""

import dataclasses

import pytest
import torch
from conftest import assert_equivalent, decode_with_policy, tiny_model
from test_equivalence import TOKENS, text

from kvcondense.cache import EvictingCache
from kvcondense.engine import Stream, generate_step
from kvcondense.errors import UsageError
from kvcondense.forward import feed, parallel_forward
from kvcondense.layout import NEVER, text_layout, with_continuation
from kvcondense.merge import MixRules
from kvcondense.methods import build_method
from kvcondense.methods.scored import layer_budgets
from kvcondense.scoring import method_layout


def by_layer(ratio=0.5, **kw):
    return build_method("scored", ratio=ratio, per_head=True, score_window=4, allocate="layer", **kw)


def layer_counts(layout):
    """Prompt tokens each head keeps, (layers, heads)."""
    return (layout.head_expire == NEVER).sum(-1)


def per_slot_bytes(model) -> int:
    """Bytes one slot takes in one layer (keys and values, fp32)."""
    cfg = model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return 2 * heads * (cfg.hidden_size // cfg.num_attention_heads) * 4


def uneven_prompt(model, n=60, ratio=0.5, seed=0):
    """A per-layer prompt whose layers really keep different numbers (the test is about them)."""
    prompt = method_layout(model, by_layer(ratio), text(n, seed), TOKENS)
    counts = layer_counts(prompt)
    assert bool((counts == counts[:, :1]).all()), "the heads of a layer keep equally many"
    assert len(set(counts[:, 0].tolist())) > 1, "the layers keep different numbers"
    return prompt


def test_layer_budgets_share_one_ranking_exactly():
    scores = torch.rand(3, 2, 10, generator=torch.Generator().manual_seed(0))
    scores[0] += 1.0  # layer 0's entries outrank every other
    counts = layer_budgets(scores, 4)
    assert int(counts.sum()) == 12 and counts.tolist() == [10, 2, 0]
    even = layer_budgets(torch.rand(4, 2, 50, generator=torch.Generator().manual_seed(1)), 7)
    assert int(even.sum()) == 28 and bool((even <= 50).all())


def test_each_layer_keeps_its_share_of_the_same_budget():
    model = tiny_model("llama")
    m = by_layer(0.75)
    lay = method_layout(model, m, text(80), TOKENS)
    per_head = method_layout(model, dataclasses.replace(m, allocate="head"), text(80), TOKENS)
    counts = layer_counts(lay)
    assert int(counts[:, 0].sum()) == int(layer_counts(per_head)[:, 0].sum()) == 20 * counts.shape[0]
    assert lay.kept_slots() == per_head.kept_slots() == 20
    assert bool((lay.head_expire[..., :4] == NEVER).all())  # sinks in every head of every layer


@pytest.mark.parametrize("family, attn", [("llama", "sdpa"), ("gpt2", "sdpa"), ("llama", "eager")])
def test_parallel_equals_incremental_and_each_layer_frees_its_own(family, attn):
    model = tiny_model(family, attn=attn)
    prompt = uneven_prompt(model)
    lay = with_continuation(prompt, torch.randint(0, 90, (20,), generator=torch.Generator().manual_seed(1)))
    widths = layer_counts(prompt)[:, 0]
    for chunk in (1, 7, 64):
        stats = assert_equivalent(model, lay, chunk)
        assert stats.kv_bytes == int((widths + 20).sum()) * per_slot_bytes(model)  # each layer its own width


def test_decode_after_a_per_layer_prompt_matches_parallel():
    model = tiny_model("llama")
    method = by_layer()
    prompt = uneven_prompt(model, 40)
    tokens = torch.randint(0, 90, (12,), generator=torch.Generator().manual_seed(5)).tolist()
    full, got, rows, cache, _ = decode_with_policy(model, prompt, method.decode_policy(prompt, TOKENS), tokens)
    with torch.no_grad():
        parallel = parallel_forward(model, [full]).logits[0]
    assert (parallel[rows] - got).abs().max() < 1e-4
    assert cache.layer_kept is not None and int(cache.stored_slots()[0]) == full.kept_slots() == 20 + 12


def later_expiry(prompt, n_more=20):
    """``prompt`` then text whose tokens 2..5 expire at the continuation's 9th query (a second eviction)."""
    lay = with_continuation(prompt, torch.randint(0, 90, (n_more,), generator=torch.Generator().manual_seed(2)))
    n = len(prompt)
    lay.expire[n + 2 : n + 6] = n + 8
    heads = lay.head_expire.clone()
    heads[..., n + 2 : n + 6] = n + 8
    return dataclasses.replace(lay, head_expire=heads)


def test_a_later_expiry_after_a_per_layer_prompt():
    """Tokens fed after the prompt expire later: freed by the per-head path (the continuation carries per-head
    expiry) and by the plain compaction (fed as plain text), both equal to the parallel forward."""
    model = tiny_model("llama")
    prompt = uneven_prompt(model)
    lay = later_expiry(prompt)
    for chunk in (1, 5):
        assert_equivalent(model, lay, chunk)
    with torch.no_grad():
        parallel = parallel_forward(model, [lay]).logits[0]
        stream = Stream(model, None, {})
        stream.prefill(prompt, chunk_tokens=len(prompt))
        n, rest = len(prompt), dataclasses.replace(lay.slice(len(prompt), len(lay)), head_expire=None)
        got = []
        for i in range(len(rest)):
            got.append(feed(model, stream.cache, rest.slice(i, i + 1), n + i)[0])
            stream.cache.evict(n + i + 1)
    assert (parallel[n:] - torch.cat(got)).abs().max() < 1e-4
    assert int(stream.cache.stored_slots()[0]) == lay.kept_slots() == 30 + 16
    assert stream.cache.layer_kept is not None


def test_ragged_batch_of_per_layer_prompts_decodes_as_single_rows():
    model = tiny_model("llama")
    method = by_layer()
    prompts = [text(50, seed=1), text(36, seed=4)]
    stream, logits = Stream.batch(model, method, TOKENS, prompts)
    kept = stream.cache.layer_kept
    assert kept.tolist() == [[27, 23], [17, 19]]  # row 1 is padded in layer 0, past its own 19 slots elsewhere
    tokens = torch.randint(0, 90, (6, 2), generator=torch.Generator().manual_seed(4)).tolist()
    together = [logits] + [stream.step(t).logits for t in tokens]
    for b, p in enumerate(prompts):
        alone = Stream(model, method, TOKENS)
        got = [alone.prefill(p)] + [alone.step([t[b]]).logits[0] for t in tokens]
        assert max(float((x - y[b]).abs().max()) for x, y in zip(got, together, strict=True)) < 1e-4
    assert stream.cache.stored_slots().tolist() == [25 + 6, 18 + 6]


def test_cache_state_clone_and_snapshot_carry_the_widths():
    model = tiny_model("llama")
    method = by_layer()
    stream = Stream(model, method, TOKENS)
    logits = stream.prefill(text(60))
    cache = stream.cache
    state = cache.state_dict()
    assert torch.equal(state["layer_kept"], cache.layer_kept)
    back = EvictingCache.from_state(state, model.config.num_hidden_layers, cache.seen)
    snap = cache.snapshot()
    copies = [cache.clone(), back]
    want = list(generate_step(stream, logits, 5))
    cache.restore(snap)
    stream.seen, stream.policies = [60], [method.decode_policy(stream.layouts[0], TOKENS)]
    assert list(generate_step(stream, logits, 5)) == want  # restored: the same continuation
    for other in copies:
        s = Stream(model, method, TOKENS, other)
        s.policies = [method.decode_policy(stream.layouts[0], TOKENS)]
        assert list(generate_step(s, logits, 5)) == want


def test_what_a_per_layer_cache_cannot_do_is_refused():
    model = tiny_model("llama")
    stream = Stream(model, by_layer(), TOKENS)
    logits = stream.prefill(text(60))
    cache = stream.cache
    with pytest.raises(ValueError, match="per-layer"):
        cache.set_expire(0, torch.tensor([0]), 70)
    with pytest.raises(ValueError, match="per-layer"):
        cache.mix(MixRules(torch.tensor([0]), torch.tensor([1]), torch.ones(1, 1)))
    list(generate_step(stream, logits, 2))
    with pytest.raises(ValueError, match="per-layer"):
        EvictingCache.stack([cache, cache.clone()])
    cache.slot_expire[0, 5] = 0  # a slot of the per-layer region told to expire
    with pytest.raises(ValueError, match="per-layer"):
        cache.evict(70)


def test_allocate_layer_needs_per_head_and_a_known_name():
    with pytest.raises(UsageError, match="per_head"):
        build_method("scored", ratio=0.5, allocate="layer")
    with pytest.raises(UsageError, match="unknown allocate"):
        build_method("scored", ratio=0.5, per_head=True, allocate="global")


def test_a_per_layer_prompt_differs_from_the_per_head_one_negative_control():
    """The allocation changes what the model reads (so the tests above can fail on it)."""
    model = tiny_model("llama")
    prompt = uneven_prompt(model)
    even = method_layout(model, dataclasses.replace(by_layer(), allocate="head"), text(60), TOKENS)
    ids = torch.randint(0, 90, (10,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = parallel_forward(model, [with_continuation(prompt, ids)]).logits[0, 60:]
        b = parallel_forward(model, [with_continuation(even, ids)]).logits[0, 60:]
    assert (a - b).abs().max() > 1e-3


def test_a_second_per_head_eviction_in_a_ragged_per_layer_batch():
    """Two rows whose layers keep different numbers (row 1 padded in layer 0), then a chunk whose tokens expire
    per head (every head alike): the cache applies the heads again over per-layer widths, each row as alone."""
    model = tiny_model("llama")
    method = by_layer()
    prompts = [text(50, seed=1), text(50, seed=2)]
    stream, _ = Stream.batch(model, method, TOKENS, prompts)
    assert stream.cache.layer_kept.tolist() == [[27, 23], [24, 26]]
    ids = torch.randint(0, 90, (2, 6), generator=torch.Generator().manual_seed(6))
    expire = torch.full((6,), NEVER)
    expire[1:3] = 53
    heads = expire.expand(model.config.num_hidden_layers, model.config.num_key_value_heads, -1).clone()
    chunk = dataclasses.replace(text_layout(ids[0], expire), head_expire=heads)
    nxt = torch.tensor([[7], [11]])

    def run(cache, rows):
        feed(model, cache, chunk, 50, input_ids=ids[rows])
        cache.evict(56)
        return feed(model, cache, text_layout(nxt[rows][0]), 56, input_ids=nxt[rows])[:, 0]

    together = run(stream.cache, slice(0, 2))
    assert int(stream.cache.stored_slots()[0]) == 25 + 4 + 1
    for b, p in enumerate(prompts):
        alone = Stream(model, method, TOKENS)
        alone.prefill(p)
        assert (run(alone.cache, slice(b, b + 1))[0] - together[b]).abs().max() < 1e-4


def test_layers_dropping_different_numbers_later_count_their_mean():
    """After the prompt, layer 0 drops 4 later tokens and layer 1 drops 3 (a second per-head eviction with unequal
    counts): equal to the parallel forward, and the stored slots are the layers' mean, rounded once (46.5 -> 46,
    as the layout counts), not the prompt's part rounded apart."""
    model = tiny_model("llama")
    prompt = uneven_prompt(model)
    n = len(prompt)
    lay = with_continuation(prompt, torch.randint(0, 90, (20,), generator=torch.Generator().manual_seed(2)))
    heads = lay.head_expire.clone()
    heads[0, :, n + 2 : n + 6] = n + 8
    heads[1, :, n + 10 : n + 13] = n + 14
    lay = dataclasses.replace(lay, head_expire=heads, cuts=(n, n + 9, n + 15))
    for chunk in (1, 7):
        stats = assert_equivalent(model, lay, chunk)  # stored slots == the layout's kept slots
        widths = layer_counts(prompt)[:, 0] + 20 - torch.tensor([4, 3])
        assert stats.kv_bytes == int(widths.sum()) * per_slot_bytes(model)


def test_set_expire_refuses_a_token_only_a_narrower_layer_holds():
    model = tiny_model("llama")
    stream = Stream(model, by_layer(), TOKENS)
    stream.prefill(text(60))
    cache = stream.cache
    named = set(cache.slot_idx[0].tolist())
    kept = (stream.layouts[0].head_expire == NEVER).any(1)  # (layers, tokens): what each layer holds
    held_elsewhere = [t for t in range(60) if t not in named and bool(kept[:, t].any())]
    assert held_elsewhere
    with pytest.raises(ValueError, match="per-layer"):
        cache.set_expire(0, torch.tensor(held_elsewhere[:1]), 61)


def test_a_checkpoint_saved_before_allocate_loads_as_trained():
    """A scored-heads checkpoint whose metadata predates ``allocate`` was trained with equal counts per head: it
    loads so (``param(before=...)``), not with the preset's newer default; one saved with it keeps its own."""
    from kvcondense.checkpoint import method_from_meta

    old = {"method": {"name": "scored-heads", "params": {"ratio": 0.5, "replay": 0.5}}}
    assert method_from_meta(old).allocate == "head"
    assert build_method("scored-heads").allocate == "layer"
    new = {"method": {"name": "scored-heads", "params": {"ratio": 0.5, "allocate": "layer"}}}
    assert method_from_meta(new).allocate == "layer"
