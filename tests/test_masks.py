"""Mask builders against the literal matrices of SPEC section 1 (the test is the specification)."""

import torch

from kvcondense.layout import Kind
from kvcondense.masks import layout_visibility, to_attention_mask
from kvcondense.methods.sentinel import sentinel_layout

L, R = 90, 91  # ids of <CL> and <CR> in these tests


def rows(text: str) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in line.split()] for line in text.strip().splitlines()])


# a b L c d R e f
ONE_SPAN = rows("""
1 0 0 0 0 0 0 0
1 1 0 0 0 0 0 0
0 0 1 0 0 0 0 0
1 1 0 1 0 0 0 0
1 1 0 1 1 0 0 0
0 0 1 1 1 1 0 0
1 1 0 0 0 1 1 0
1 1 0 0 0 1 1 1
""")


# a L b c R L d e R f  (SPEC's two-span example, every row written out from its rules)
TWO_SPANS = rows("""
1 0 0 0 0 0 0 0 0 0
0 1 0 0 0 0 0 0 0 0
1 0 1 0 0 0 0 0 0 0
1 0 1 1 0 0 0 0 0 0
0 1 1 1 1 0 0 0 0 0
0 0 0 0 0 1 0 0 0 0
1 0 0 0 1 0 1 0 0 0
1 0 0 0 1 0 1 1 0 0
0 0 0 0 0 1 1 1 1 0
1 0 0 0 1 0 0 0 1 1
""")


def one_span():
    return sentinel_layout(torch.tensor([1, 2, 3, 4, 5, 6]), [(2, 3)], L, R)


def test_one_span_literal_matrix():
    lay = one_span()
    assert lay.input_ids.tolist() == [1, 2, L, 3, 4, R, 5, 6]
    assert torch.equal(layout_visibility(lay), ONE_SPAN)


def test_two_spans_literal_matrix_sdpa_and_eager():
    # a L b c R L d e R f
    lay = sentinel_layout(torch.tensor([1, 2, 3, 4, 5, 6]), [(1, 2), (3, 4)], L, R)
    assert lay.input_ids.tolist() == [1, L, 2, 3, R, L, 4, 5, R, 6]
    vis = layout_visibility(lay)
    assert torch.equal(vis, TWO_SPANS)
    eager = to_attention_mask(vis.unsqueeze(0), "eager", torch.float32)[0, 0]
    assert torch.equal(eager == 0, TWO_SPANS)
    assert vis[6].nonzero().flatten().tolist() == [0, 4, 6]  # d sees a, the first R and itself
    assert vis[9].nonzero().flatten().tolist() == [0, 4, 8, 9]  # f sees a, both Rs and itself
    assert vis[8].nonzero().flatten().tolist() == [5, 6, 7, 8]  # second R: its L, its span, itself


def test_cr_sees_prefix_option():
    lay = sentinel_layout(torch.tensor([1, 2, 3, 4, 5, 6]), [(2, 3)], L, R, cr_sees_prefix=True)
    expected = ONE_SPAN.clone()
    expected[5, :2] = True
    assert torch.equal(layout_visibility(lay), expected)


def test_sdpa_mask_is_bool_and_eager_mask_is_additive():
    vis = layout_visibility(one_span()).unsqueeze(0)
    sdpa = to_attention_mask(vis, "sdpa", torch.float32)
    assert sdpa.dtype == torch.bool and sdpa.shape == (1, 1, 8, 8)
    assert torch.equal(sdpa[0, 0], ONE_SPAN)
    eager = to_attention_mask(vis, "eager", torch.float32)
    assert eager.dtype == torch.float32
    assert torch.equal(eager[0, 0] == 0, ONE_SPAN)
    assert torch.all(eager[0, 0][~ONE_SPAN] == torch.finfo(torch.float32).min)


def test_positions_and_kinds_of_spec_example():
    lay = one_span()
    assert lay.position_ids.tolist() == [0, 1, 1, 2, 3, 3, 4, 5]
    assert lay.kinds.tolist() == [
        Kind.TEXT,
        Kind.TEXT,
        Kind.OPEN,
        Kind.TEXT,
        Kind.TEXT,
        Kind.CLOSE,
        Kind.TEXT,
        Kind.TEXT,
    ]


def test_unsupported_backend_is_refused():
    import pytest

    with pytest.raises(ValueError, match="not supported"):
        to_attention_mask(layout_visibility(one_span()).unsqueeze(0), "flash_attention_2", torch.float32)
