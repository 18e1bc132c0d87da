"""Baselines: their expiry reproduces their definitions."""

import pytest
import torch

from kvcondense.masks import layout_visibility
from kvcondense.methods import LocalAttention, ScatteredAttention, StreamingLLM, TokenizedText


def text(n):
    return TokenizedText.from_ids(torch.arange(n) % 50)


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.9])
def test_local_window_matches_definition(ratio):
    n = 97
    vis = layout_visibility(LocalAttention(ratio).layout(text(n), {}))
    for q in range(n):
        lo = int(q * ratio) if abs(q * ratio - round(q * ratio)) > 1e-9 else round(q * ratio)
        assert vis[q].nonzero().flatten().tolist() == list(range(lo, q + 1)), q


def test_scattered_keys_shared_by_all_queries_and_self_visible():
    n = 64
    vis = layout_visibility(ScatteredAttention(0.5).layout(text(n), {}, seed=0))
    assert vis.diagonal().all()
    kept = vis[-1].clone()
    for q in range(n):
        expected = kept[: q + 1].clone()
        expected[q] = True
        assert torch.equal(vis[q, : q + 1], expected)
    assert 0.3 < kept.float().mean() < 0.7


def test_streaming_sinks_and_window_at_budget():
    n, m = 100, StreamingLLM(ratio=0.5, sinks=4)
    lay = m.layout(text(n), {})
    vis = layout_visibility(lay)
    w = m.window(n)
    assert lay.kept_slots() == 50
    assert vis[-1].nonzero().flatten().tolist() == [0, 1, 2, 3, *range(n - 1 - w, n)]


def test_what_a_method_reads_is_what_it_implements():
    """Text and online episodes are two entry points (``layout``, ``episode_layout``), not one input type checked
    inside; a method given the kind it does not read refuses in one line."""
    from conftest import episode

    from kvcondense.errors import UsageError
    from kvcondense.methods import METHODS, build_method

    reads = {name: (cls.reads_text(), cls.reads_episodes()) for name, cls in METHODS.items()}
    assert reads["full"] == (True, True) and reads["ccm-concat"] == (True, True) and reads["ccm-merge"] == (True, True)
    assert reads["window"] == (False, True) and reads["no-context"] == (True, True)
    assert reads["sentinel"] == (True, False) and reads["streaming"] == (True, False)
    with pytest.raises(UsageError, match="online episodes only") as text_refused:
        build_method("window").layout(text(8), {})
    with pytest.raises(UsageError, match="does not read online episodes") as episode_refused:
        build_method("sentinel").episode_layout(episode(), {})
    assert "\n" not in str(text_refused.value) + str(episode_refused.value)


def test_no_context_keeps_nothing_of_a_context():
    from kvcondense.methods import build_method

    lay = build_method("no-context").layout(text(12), {})
    vis = layout_visibility(lay)
    assert torch.equal(vis, torch.eye(12, dtype=torch.bool)) and lay.kept_slots() == 0
