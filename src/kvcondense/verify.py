"""Equivalence of the two forwards, as a user-facing check and as a guard against unsupported model families.

``max_abs_diff`` compares the logits of the parallel masked forward and of the incremental forward with real
eviction at every position that carries a target (text positions).
"""

from __future__ import annotations

import torch

from .engine import incremental_forward
from .errors import UsageError
from .forward import parallel_forward
from .layout import IGNORE, Layout
from .masks import SUPPORTED_ATTN
from .methods.sentinel import sentinel_layout

VERIFIED_FAMILIES = ("llama", "qwen2", "gpt2")
TOLERANCE = 1e-3


class UnsupportedModelError(UsageError):
    """The model family cannot run the evicting cache correctly."""


@torch.no_grad()
def max_abs_diff(model, layout: Layout, chunk_size: int = 64) -> float:
    """Largest |parallel - incremental| logit difference over the layout's scored positions."""
    parallel = parallel_forward(model, [layout]).logits[0]
    incremental, _ = incremental_forward(model, layout, chunk_size)
    scored = layout.targets != IGNORE
    return float((parallel[scored] - incremental[scored]).abs().max())


def check_family(model) -> None:
    """Refuse a model whose attention backend or family cannot honour the masks and the evicting cache.

    Families covered by the test suite pass at once; any other is probed with a short sentinel-style layout
    (spans, eviction, non-contiguous positions) through both forwards.
    """
    attn = getattr(model.config, "_attn_implementation", None) or "eager"
    if attn not in SUPPORTED_ATTN:
        raise UnsupportedModelError(
            f"attention implementation {attn!r} is not supported; load the model with attn_implementation='sdpa'"
        )
    if model.config.model_type in VERIFIED_FAMILIES:
        return
    vocab = model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (40,), generator=gen)
    open_id, close_id = 1, 2  # any ids will do: the probe checks the attention path, not the tokens
    layout = sentinel_layout(ids, [(4, 10), (11, 17), (25, 30)], open_id, close_id)
    try:
        diff = max_abs_diff(model, layout, chunk_size=8)
    except Exception as e:  # any failure inside the model's forward means the family is not supported
        raise UnsupportedModelError(
            f"model family {model.config.model_type!r} cannot run with an evicting cache ({type(e).__name__}: {e})"
        ) from None
    if not diff <= TOLERANCE:
        raise UnsupportedModelError(
            f"model family {model.config.model_type!r} gives different logits with eviction (max diff {diff:.2e}); "
            "it is not supported"
        )
