"""Nested training state (optimizer, scheduler, RNG) stored as safetensors + JSON: no file can run code.

``save_state(obj, folder)`` splits an object of dicts, lists, tuples, numbers, strings and tensors into
``state.safetensors`` (every tensor, under a generated key) and ``state.json`` (the structure, with each tensor
replaced by ``{"__tensor__": key}``). Dict keys keep their type (optimizer states are keyed by int, FSDP's by name),
tuples stay tuples. ``load_state(folder)`` rebuilds it and refuses, with :class:`CheckpointError`, a structure that
names a missing tensor or a node it does not know.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import UsageError

TENSORS = "state.safetensors"
STRUCTURE = "state.json"
MAX_DEPTH = 32  # optimizer state is ~5 levels deep; a deeper file is crafted


class StateError(UsageError):
    """A stored training state is malformed."""


def _encode(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and "__tensor__" not in obj and "__items__" not in obj:
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[k, _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a training state")  # our bug: keep the traceback


def _decode(node, tensors: dict[str, torch.Tensor], where: str, depth: int = 0):
    if depth > MAX_DEPTH:
        raise StateError(f"{where} is nested deeper than {MAX_DEPTH} levels; it was not written by kvcondense")
    if isinstance(node, list):
        return [_decode(v, tensors, where, depth + 1) for v in node]
    if not isinstance(node, dict):
        if node is None or isinstance(node, bool | int | float | str):
            return node
        raise StateError(f"{where} holds a value of type {type(node).__name__}")
    if "__tensor__" in node:
        key = node["__tensor__"]
        if not isinstance(key, str) or key not in tensors:
            raise StateError(f"{where} names a tensor {key!r} that {TENSORS} does not hold")
        return tensors[key]
    if "__tuple__" in node:
        return tuple(_decode(v, tensors, where, depth + 1) for v in _list(node["__tuple__"], where))
    if "__items__" in node:
        items = _list(node["__items__"], where)
        if not all(isinstance(kv, list) and len(kv) == 2 and isinstance(kv[0], str | int) for kv in items):
            raise StateError(f"{where} holds a malformed key-value list")
        return {k: _decode(v, tensors, where, depth + 1) for k, v in items}
    return {k: _decode(v, tensors, where, depth + 1) for k, v in node.items()}


def _list(node, where: str) -> list:
    if not isinstance(node, list):
        raise StateError(f"{where} holds a malformed list")
    return node


def save_state(obj, folder: str | Path) -> None:
    """Write ``obj`` into ``folder`` (which must exist) as ``state.safetensors`` + ``state.json``."""
    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(obj, tensors)
    save_file(tensors, str(folder / TENSORS))
    (folder / STRUCTURE).write_text(json.dumps(structure))


def load_state(folder: str | Path):
    """Read what :func:`save_state` wrote, validating its structure."""
    folder = Path(folder)
    where = folder / STRUCTURE
    try:
        tensors = load_file(str(folder / TENSORS))
        structure = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, SafetensorError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise StateError(f"training state in {folder} is unreadable ({type(e).__name__}: {str(e)[:120]})") from None
    return _decode(structure, tensors, str(where))
