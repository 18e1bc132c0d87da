"""The memory file (``kvcondense-memory/1``): a session's memory on disk, and the checks that make one safe to load.

One safetensors file (no code loads from it), written atomically (temp file + rename), holding ``slot_idx``
and ``slot_expire`` (int64, (1, slots): each stored slot's logical index and expiry), ``keys.<layer>`` and
``values.<layer>`` ((1, key/value heads, slots, head dim), float32, float16 or bfloat16; none while the memory is
empty), and in the header's ``__metadata__["kvcondense"]`` JSON bookkeeping: ``format``, ``identity`` (the
checkpoint and method, :func:`memory_identity`), ``writer`` (counters ``next``, ``text_pos``, ``steps``, merged
indices ``memory``) and ``seen``.

A file to load is untrusted input, possibly damaged or crafted: its size, header and tensor entries are checked
before any data is read, then its bookkeeping against the loading session (checkpoint, method, context), then
every tensor's name, dtype, shape and values (finite) and the slots, which must be what that writer state makes
(those checks are :mod:`kvcondense.memory_checks`). One that fails raises :class:`MemoryFileError` naming the file
and the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from . import atomic
from .cache import EvictingCache
from .errors import UsageError
from .forward import num_layers
from .memory_checks import (  # noqa: F401  (KV_DTYPES, MAX_COUNTER re-exported: they lived here before)
    KV_DTYPES,
    MAX_COUNTER,
    MemoryOwner,
    check_header,
    check_info,
    check_tensors,
    parse_json,
)
from .methods import Method
from .models import model_identity

FORMAT = "kvcondense-memory/1"
MAX_HEADER_BYTES = 1 << 20  # a memory file's safetensors header is a few KB


class MemoryFileError(UsageError):
    """A memory file cannot be used with this session (another checkpoint, another format, damaged or crafted
    contents), or cannot be written."""


def save_memory(session: MemoryOwner, path: str | Path) -> Path:
    """Write ``session``'s memory (keys/values and bookkeeping) to one safetensors file, atomically (see
    :meth:`MemorySession.save <kvcondense.session.MemorySession.save>`)."""
    path = check_save_path(path)
    cache = session.cache
    tensors = {k: v for k, v in cache.state_dict().items() if k != "slot_closer"}  # memory slots are never closers
    info = {"format": FORMAT, "identity": session.identity, "writer": session.writer.state(), "seen": cache.seen}
    data = save_safetensors(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata={"kvcondense": json.dumps(info)}
    )
    try:
        atomic.write_bytes(path, data)
    except OSError as e:
        raise MemoryFileError(f"cannot write memory file {path}: {e.strerror or e}") from e
    return path


def load_memory(session: MemoryOwner, path: str | Path) -> tuple[EvictingCache, dict]:
    """The cache and writer state of a memory file, checked against ``session`` (see
    :meth:`MemorySession.load <kvcondense.session.MemorySession.load>`); nothing of ``session`` is changed."""
    path = Path(path)
    info, tensors = read_memory_file(session, path)
    model = session.model
    cache = EvictingCache.from_state(tensors, num_layers(model), info["seen"], model.device, model.dtype)
    return cache, info["writer"]


def read_memory_file(session: MemoryOwner, path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The checked bookkeeping and tensors of a memory file (see :func:`load_memory`)."""

    def bad(problem: str) -> MemoryFileError:
        return MemoryFileError(f"memory file {path} {problem}")

    if not path.exists():
        raise MemoryFileError(f"memory file {path} does not exist; save one with session.save or chat --save")
    if not path.is_file():
        raise bad("is not a file")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if size == 0:
                raise bad("is empty; save a memory with chat --save")
            if len(head) < 8:
                raise bad(f"is not a safetensors memory file (only {size} bytes)")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise bad(f"is truncated or not a safetensors memory file (header of {n:,} bytes in {size:,})")
            header = parse_json(f.read(n), bad, "header")
            if not isinstance(header, dict):
                raise bad("is not a safetensors memory file (its header is not an object)")
            meta = header.pop("__metadata__", None)
            raw = meta.get("kvcondense") if isinstance(meta, dict) else None
            if not isinstance(raw, str):
                raise bad(f"is not a kvcondense memory file ({FORMAT}): no kvcondense metadata")
            info = parse_json(raw, bad, "metadata")
            if not isinstance(info, dict) or info.get("format") != FORMAT:
                raise bad(f"is not a kvcondense memory file ({FORMAT})")
            if info.get("identity") != session.identity:
                raise MemoryFileError(
                    f"memory {path} was made with another checkpoint or method ({info.get('identity')!r:.40}), "
                    f"not {session.name} ({session.identity}); load it with the checkpoint that made it"
                )
            expected = check_info(session, info, bad)
            total = check_header(header, expected, bad)
            if size != 8 + n + total:
                raise bad(f"is truncated or has trailing bytes ({size:,} bytes, its header says {8 + n + total:,})")
            f.seek(0)
            data = f.read(size + 1)
    except OSError as e:
        raise bad(f"cannot be read ({e.strerror or e})") from e
    if len(data) != size:
        raise bad("changed while it was read; try again")
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise bad(f"is damaged ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
    check_tensors(session, info, tensors, expected, bad)
    return info, tensors


def check_save_path(path: str | Path) -> Path:
    """Refuse (:class:`MemoryFileError`, a :class:`UsageError`) a path the memory cannot be saved to, before a
    chat starts: a directory, something that is not a regular file, a parent that is a file, a folder without
    write permission. Missing folders are fine (saving creates them). Nothing is created or changed. Returns
    the path."""
    path = Path(path)
    if path.is_dir():
        raise MemoryFileError(f"cannot save memory to {path}: it is a directory; give a file name")
    if path.exists() and not path.is_file():
        raise MemoryFileError(f"cannot save memory to {path}: it is not a regular file")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise MemoryFileError(f"cannot save memory to {path}: {folder} is a file, not a directory")
    try:  # the one sure test of write permission (read-only mounts, ACLs): a temp file, removed at once
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=folder)
    except OSError as e:
        raise MemoryFileError(f"cannot save memory to {path}: {folder} is not writable ({e.strerror or e})") from e
    os.close(fd)
    os.unlink(probe)
    return path


def memory_identity(model, method: Method) -> str:
    """A fingerprint of what a memory depends on: the base weights, the method and its trained tensors."""
    h = hashlib.sha256()
    h.update(model_identity(model, "")["fingerprint"].encode())
    h.update(json.dumps({"method": method.name, **method.params()}, sort_keys=True).encode())
    for key, tensor in sorted(model.state_dict().items()):
        if "lora_" in key or "trainable_tokens" in key:
            flat = tensor.detach().float().flatten()
            h.update(key.encode())
            h.update(flat[:: max(1, flat.numel() // 1024)][:1024].numpy().round(5).tobytes())
    return h.hexdigest()[:16]
