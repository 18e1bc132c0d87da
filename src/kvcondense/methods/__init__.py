"""Compression methods and baselines, by name. Adding a method = one class plus one line in :data:`METHODS`."""

from __future__ import annotations

import dataclasses

from ..errors import UsageError
from .base import Method, TokenizedText, tokenize
from .baselines import FullAttention, LocalAttention, NoContext, ScatteredAttention, SlidingWindow, StreamingLLM
from .ccm import CCMConcat, CCMMerge, EpisodeTokens, tokenize_episode
from .gist import Gist
from .sentinel import Sentinel

METHODS: dict[str, type[Method]] = {
    "full": FullAttention,
    "sentinel": Sentinel,
    "gist": Gist,
    "ccm-concat": CCMConcat,
    "ccm-merge": CCMMerge,
    "local": LocalAttention,
    "scattered": ScatteredAttention,
    "streaming": StreamingLLM,
    "no-context": NoContext,
    "window": SlidingWindow,
}


def build_method(name: str, **params) -> Method:
    """Instantiate a method by name. Parameters the method does not have are ignored (``ratio`` for ``full``);
    ``None`` values mean "use the method's default"."""
    if name not in METHODS:
        raise UsageError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    cls = METHODS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in params.items() if k in fields and v is not None})


__all__ = [
    "METHODS",
    "CCMConcat",
    "CCMMerge",
    "EpisodeTokens",
    "tokenize_episode",
    "Method",
    "TokenizedText",
    "build_method",
    "tokenize",
    "Sentinel",
    "FullAttention",
    "LocalAttention",
    "ScatteredAttention",
    "StreamingLLM",
]
