"""The evicting cache's buffers (room to grow, compaction into fresh buffers, no aliasing of returned views) and
the attention of incremental steps."""

import pytest
import torch
from conftest import tiny_model
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvcondense.cache import EvictingCache, EvictingLayer
from kvcondense.forward import PACKED_SDPA


def kv(rows: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2, n, 4, generator=g), torch.randn(rows, 2, n, 4, generator=g)


def test_decode_steps_write_into_the_room_without_copying():
    layer = EvictingLayer()
    k, v = kv(3, 10, 0)
    layer.update(k, v)
    buffer = layer._keys.data_ptr()
    steps = [kv(3, 1, 1 + i) for i in range(EvictingLayer.spare)]
    for sk, sv in steps:
        keys, values = layer.update(sk, sv)
    assert layer._keys.data_ptr() == buffer  # every step fitted in the spare room
    want_k = torch.cat([k] + [sk for sk, _ in steps], 2)
    want_v = torch.cat([v] + [sv for _, sv in steps], 2)
    assert torch.equal(keys, want_k) and torch.equal(values, want_v)
    keys, _ = layer.update(*kv(3, 1, 99))  # the room is full: a new buffer, same contents
    assert layer._keys.data_ptr() != buffer
    assert torch.equal(keys[:, :, :-1], want_k)


def test_views_handed_out_are_never_overwritten():
    layer = EvictingLayer()
    layer.update(*kv(2, 6, 0))
    before = layer.keys
    snapshot = before.clone()
    layer.update(*kv(2, 1, 1))
    layer.keep(torch.tensor([[0, 2, 4], [1, 3, 5]]))
    layer.update(*kv(2, 2, 2))
    assert torch.equal(before, snapshot)
    kept = torch.stack([snapshot[0, :, [0, 2, 4]], snapshot[1, :, [1, 3, 5]]])
    assert torch.equal(layer.keys[:, :, :3], kept)


def test_compaction_frees_memory_and_keeps_bounded_room():
    cache = EvictingCache(num_layers=2, batch_size=2)
    n = 300
    for layer in cache.layers:
        layer.update(*kv(2, n, 0))
    cache.append(torch.arange(n).expand(2, -1), torch.full((2, n), 10), torch.zeros(2, n, dtype=torch.bool))
    full = cache.reserved_bytes()
    per_slot = full // (2 * (n + EvictingLayer.spare))  # bytes of one slot of one row, both layers, K and V
    cache.evict(next_query=n)  # every key expired at position 10
    assert cache.kv_bytes() == 0
    assert cache.reserved_bytes() == 2 * EvictingLayer.spare * per_slot  # the 300 slots' memory went back
    assert cache.reserved_bytes() < full / 4


@pytest.mark.parametrize("q", [2, 7, 16])
def test_packed_gqa_attention_equals_sdpa(q):
    """Incremental steps stack the query heads of a key/value head instead of repeating the cache: same output."""
    module = tiny_model("llama").model.layers[0].self_attn  # 4 query heads, 2 key/value heads
    g = torch.Generator().manual_seed(q)
    query = torch.randn(3, 4, q, 8, generator=g)
    key, value = torch.randn(3, 2, 40 + q, 8, generator=g), torch.randn(3, 2, 40 + q, 8, generator=g)
    mask = torch.rand(3, 1, q, 40 + q, generator=g) < 0.6
    mask[..., -1] = True  # no row of nothing
    want, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, mask, scaling=0.3)
    got, _ = ALL_ATTENTION_FUNCTIONS[PACKED_SDPA](module, query, key, value, mask, scaling=0.3)
    assert got.shape == want.shape == (3, q, 4, 8)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_state_dict_round_trip_and_snapshot_restore():
    """The cache owns its state: from_state(state_dict()) decodes like the original; restore() undoes a step."""
    from conftest import TOKENS, prompt, tiny_model

    from kvcondense.engine import Stream, generate_step
    from kvcondense.methods import build_method

    model = tiny_model("llama")
    method = build_method("sentinel", ratio=0.5, placement="recent")
    stream = Stream(model, method, TOKENS)
    logits = stream.prefill(prompt(40, 1), chunk_tokens=16)
    state = {k: v.clone() for k, v in stream.cache.state_dict().items()}
    rebuilt = EvictingCache.from_state(state, model.config.num_hidden_layers, stream.cache.seen)
    twin = Stream(model, method, TOKENS, rebuilt, policy=stream.clone().policies[0], seen=stream.seen[0])
    snap = stream.cache.snapshot()
    before = {k: v.clone() for k, v in stream.cache.state_dict().items()}
    assert list(generate_step(stream, logits, 6)) == list(generate_step(twin, logits, 6))
    stream.cache.restore(snap)
    after = stream.cache.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_an_evicting_cache_outside_kvcondense_refuses_instead_of_silently_keeping_everything():
    """model.generate(past_key_values=EvictingCache(...)) would store every token and free nothing: it raises."""
    from kvcondense.errors import UsageError

    model = tiny_model("llama")
    ids = torch.randint(0, 90, (1, 12))
    with pytest.raises(UsageError, match="evicts only when kvcondense feeds it"):
        model.generate(ids, past_key_values=EvictingCache(model.config.num_hidden_layers), max_new_tokens=3)
    with pytest.raises(UsageError, match="kvcondense.generate"):
        model(input_ids=ids, past_key_values=EvictingCache(model.config.num_hidden_layers), use_cache=True)
