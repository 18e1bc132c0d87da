"""Compression methods and baselines, by name. Adding a method = one class plus one line in :data:`METHODS`."""

from __future__ import annotations

import dataclasses

from ..errors import UsageError
from .base import Method, Scoring, StepPiece, TextPolicy, TokenizedText, param, tokenize
from .baselines import (
    FullAttention,
    LocalAttention,
    NoContext,
    ScatteredAttention,
    SlidingWindow,
    StreamingLLM,
)
from .ccm import CCMConcat, CCMMerge
from .episode import EpisodeTokens, tokenize_episode
from .gist import Gist
from .scored import ScoredEviction, ScoredHeads
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
    "scored": ScoredEviction,
    "scored-heads": ScoredHeads,
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


def check_params(name: str, params: dict, source: str = "") -> None:
    """Refuse parameters that method ``name`` does not take (a flag for another method is never silently ignored)."""
    if name not in METHODS:
        raise UsageError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    cls = METHODS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k, v in params.items() if v is not None and k not in fields)
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        raise UsageError(f"method {name}{source} takes no {flags}; drop the flag (see kvcondense --help)")


def override(method: Method, params: dict, source: str) -> Method:
    """``method`` (a checkpoint's) with the user's ``params`` applied: the ratio and the method's inference-time
    parameters may change; any other parameter must equal the trained one; a parameter it lacks is refused."""
    check_params(method.name, params, f" ({source})")
    saved = method.params()
    free = ("ratio", *method.inference_params)
    for key, value in params.items():
        if key not in free and saved.get(key) != value:
            raise UsageError(f"{source} was trained with {key}={saved.get(key)}, not {value}; drop the flag")
    return build_method(method.name, **{**saved, **params})


__all__ = [
    "param",
    "StepPiece",
    "TextPolicy",
    "METHODS",
    "CCMConcat",
    "CCMMerge",
    "EpisodeTokens",
    "tokenize_episode",
    "Method",
    "Scoring",
    "TokenizedText",
    "build_method",
    "check_params",
    "override",
    "tokenize",
    "Sentinel",
    "FullAttention",
    "LocalAttention",
    "ScatteredAttention",
    "StreamingLLM",
]
