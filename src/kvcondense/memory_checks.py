"""The checks of a memory file (``kvcondense-memory/1``, :mod:`kvcondense.memory_file`) against the session that
loads it: its JSON bookkeeping field by field (checkpoint, method, context, writer counters), its safetensors
header entries before any data is read, then every tensor's name, dtype, shape and values and the slots, which
must be what that writer state makes.

Each check takes ``bad``, which turns a problem into the error to raise (naming the file); nothing here reads
a file or changes the session.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

import torch

from .cache import EvictingCache
from .generate import context_limit
from .layout import NEVER
from .methods.ccm import MemoryWriter
from .methods.memory import TextWriter


class MemoryOwner(Protocol):
    """What a memory file is written from and checked against: a :class:`~kvcondense.session.MemorySession`
    (named by its fields here, so that the file format does not import the session that uses it)."""

    model: Any
    name: str
    identity: str
    writer: MemoryWriter | TextWriter
    cache: EvictingCache

    def kv_geometry(self) -> list[tuple[int, int, int]]: ...


MAX_COUNTER = 1 << 53  # writer counters beyond this are no chat's (JSON integers stay exact below it)
KV_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_HEADER_DTYPES = {"I64": torch.int64, **KV_DTYPES}


def check_info(session: MemoryOwner, info: dict, bad) -> dict[str, tuple[torch.dtype | None, tuple[int, ...]]]:
    """Check the bookkeeping of a memory file against ``session``'s method and model. Returns the tensors the
    file must hold: name -> (dtype, or None for any key/value dtype; shape)."""
    fields = {"format", "identity", "writer", "seen"}
    if set(info) != fields:
        extra, missing = sorted(set(info) - fields), sorted(fields - set(info))
        raise bad(f"has {'unexpected' if extra else 'missing'} field(s) {extra or missing} in its metadata")
    state = info["writer"]
    keys = {"next", "text_pos", "steps", "memory"}
    if not isinstance(state, dict) or set(state) != keys:
        raise bad(f"has a malformed writer state (an object with exactly {sorted(keys)} expected)")
    for name in ("next", "text_pos", "steps"):
        if not _counter(state[name]):
            raise bad(f"has writer {name}={state[name]!r}, not a count in 0..2**53")
    if not _counter(info["seen"]):
        raise bad(f"has seen={info['seen']!r}, not a count in 0..2**53")
    memory = state["memory"]
    if not isinstance(memory, list) or len(memory) > 64 or not all(map(_counter, memory)):
        raise bad("has a malformed merged-memory index list")
    nxt, pos, steps = state["next"], state["text_pos"], state["steps"]
    if info["seen"] != nxt:
        raise bad(f"has seen={info['seen']} but writer next={nxt}; they are always equal")
    limit = context_limit(session.model)
    if limit is not None and pos > limit:
        raise bad(f"has {pos:,} positions, more than the model's context of {limit:,}")
    w = session.writer
    if isinstance(w, MemoryWriter):
        n = len(w.comp_ids)
        per_chunk = n * (2 if w.merge else 1)
        if nxt != pos + steps * per_chunk or pos < steps:
            raise bad(
                f"has inconsistent counters (next={nxt}, text_pos={pos}, steps={steps}; with {n} memory "
                f"tokens, next = text_pos + steps * {per_chunk} and every turn has text)"
            )
        expected_memory = list(range(nxt - n, nxt)) if w.merge and steps else []
        if memory != expected_memory:
            raise bad(f"has merged-memory indices {memory[:8]}, expected {expected_memory}")
        slots = (n if w.merge else n * steps) if steps else 0
    else:
        if memory or nxt != pos or (not w.keep and nxt):
            raise bad(f"has inconsistent counters (next={nxt}, text_pos={pos}, memory={memory[:8]})")
        slots = len(w.kept(nxt))
    expected: dict[str, tuple[torch.dtype | None, tuple[int, ...]]] = {
        "slot_idx": (torch.int64, (1, slots)),
        "slot_expire": (torch.int64, (1, slots)),
    }
    if slots:
        for i, (heads, dk, dv) in enumerate(session.kv_geometry()):
            expected[f"keys.{i}"] = (None, (1, heads, slots, dk))
            expected[f"values.{i}"] = (None, (1, heads, slots, dv))
    return expected


def check_tensors(session: MemoryOwner, info: dict, tensors: dict[str, torch.Tensor], expected: dict, bad) -> None:
    """Check tensor names, dtypes, shapes and values (the slot bookkeeping is what this writer state makes)."""
    for name in sorted(set(tensors) | set(expected)):
        if name not in expected and not name.startswith(("keys.", "values.")):
            raise bad(f"holds an unexpected tensor {name!r}")
        want = expected.get(name)
        if want is None and _empty_layer(name, tensors[name].shape):
            continue  # an empty layer of an empty memory
        if want is None:
            raise bad(f"holds an unexpected tensor {name!r}")
        if name not in tensors:
            raise bad(f"has no tensor {name!r}")
        dtype, shape = want
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise bad(f"has {name} of shape {tuple(t.shape)}, expected {shape} for this checkpoint and memory")
        if (dtype is not None and t.dtype != dtype) or (dtype is None and t.dtype not in KV_DTYPES.values()):
            raise bad(f"has {name} of dtype {str(t.dtype).removeprefix('torch.')}, expected {_dtype_name(dtype)}")
        if dtype is None and t.numel() and not bool(torch.isfinite(t).all()):
            raise bad(f"has NaN or infinite values in {name}")
    kv = {tensors[k].dtype for k in tensors if k.startswith(("keys.", "values."))}
    if len(kv) > 1:
        raise bad("mixes key/value dtypes across layers")
    idx, expire = tensors["slot_idx"][0].tolist(), tensors["slot_expire"][0].tolist()
    problem = _slot_problem(session.writer, info["writer"], idx, expire)
    if problem:
        raise bad(f"has slot bookkeeping that this session never writes ({problem})")


def _slot_problem(w, state: dict, idx: list[int], expire: list[int]) -> str | None:
    """Why stored slots (logical index, expiry) cannot come from ``state``; None when they can."""
    nxt = state["next"]
    if not isinstance(w, MemoryWriter):  # a TextWriter
        want = w.kept(nxt)
        if idx != want:
            return f"slots {idx[:8]}..., expected {want[:8]}..."
        if expire != [w.expiry(k) for k in want]:
            return "slot expiry differs from the window's"
        return None
    if any(e != NEVER for e in expire):
        return "a memory slot expires"
    n = len(w.comp_ids)
    if w.merge:
        return None if idx == state["memory"] else f"merged slots {idx[:8]}, expected {state['memory']}"
    groups = [idx[g : g + n] for g in range(0, len(idx), n)]
    for g, group in enumerate(groups):
        if group != list(range(group[0], group[0] + n)):
            return f"memory group {g} is not {n} consecutive slots"
        floor = groups[g - 1][-1] + 2 if g else 1  # every turn has at least one text token before its memory
        if group[0] < floor:
            return f"memory group {g} starts at {group[0]}, before {floor}"
    if groups and groups[-1][-1] != nxt - 1:
        return f"the last memory group ends at {groups[-1][-1]}, not at {nxt - 1}"
    return None


def _empty_layer(name, shape) -> bool:
    """A key/value tensor of no slots (a layer that once ran and then held nothing); such tensors are ignored."""
    return str(name).startswith(("keys.", "values.")) and len(shape) == 4 and shape[0] == 1 and shape[2] == 0


def _counter(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_COUNTER


def _dtype_name(dtype: torch.dtype | None) -> str:
    if dtype is None:
        return "one of " + ", ".join(str(d).removeprefix("torch.") for d in KV_DTYPES.values())
    return str(dtype).removeprefix("torch.")


def parse_json(raw: bytes | str, bad, what: str):
    """Parse the JSON of a memory file's header or metadata; anything malformed is the file's fault."""
    try:
        return json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except UnicodeDecodeError as e:
        raise bad(f"is not a safetensors memory file (its {what} is not UTF-8)") from e
    except json.JSONDecodeError as e:
        raise bad(f"is not a safetensors memory file (its {what} is not JSON: {e.msg})") from e
    except RecursionError as e:
        raise bad(f"is not a kvcondense memory file (its {what} is JSON nested too deeply)") from e


def check_header(header: dict, expected: dict, bad) -> int:
    """Check the tensor entries of a safetensors header against ``expected`` before any data is read. Returns
    the byte length of the data the entries describe."""
    total = 0
    for name, entry in header.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list):
            raise bad(f"is damaged (header entry {str(name)[:40]!r} is malformed)")
        shape = entry["shape"]
        if not all(_counter(d) for d in shape):
            raise bad(f"is damaged (header entry {str(name)[:40]!r} has a malformed shape)")
        offsets = entry.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_counter, offsets))):
            raise bad(f"is damaged (header entry {str(name)[:40]!r} has malformed offsets)")
        total = max(total, offsets[1])
        dtype = _HEADER_DTYPES.get(entry.get("dtype"))
        want = expected.get(name)
        if want is None:
            if _empty_layer(name, shape) and dtype in KV_DTYPES.values():
                continue  # an empty layer of an empty memory
            raise bad(f"holds an unexpected tensor {str(name)[:40]!r}")
        if tuple(shape) != want[1]:
            raise bad(f"has {name} of shape {tuple(shape)}, expected {want[1]} for this checkpoint and memory")
        if dtype is None or (want[0] is not None and dtype != want[0]) or (want[0] is None and dtype == torch.int64):
            raise bad(f"has {name} of dtype {entry.get('dtype')!r}, expected {_dtype_name(want[0])}")
    for name in expected:
        if name not in header:
            raise bad(f"has no tensor {name!r}")
    return total
