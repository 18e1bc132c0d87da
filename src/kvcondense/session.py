"""An online interaction with a compressed context memory (CCM): feed chunks, answer from memory, save, load.

    from kvcondense import MemorySession
    session = MemorySession.from_checkpoint("checkpoints/merge-chitchat")
    session.feed("A: I just moved to Lisbon for a new job.\\n")
    print(session.answer("B:"))        # generated from the memory plus the input; the memory is unchanged
    session.save("memory.safetensors")  # reuse it in another process, with the same checkpoint

Each :meth:`MemorySession.feed` runs the chunk and its ``<COMP>`` tokens through an evicting cache, folds the
COMP keys/values into memory (concat appends them, merge averages them into a constant n slots) and frees the
chunk's keys/values. Answering runs the input after the memory and then removes it again. The ``full``,
``window`` and ``no-context`` baselines hold a chat memory too (all turns, a sliding window, nothing).

A turn never runs past the model's context (``max_position_embeddings``): it is refused before it starts, and a
turn that fails leaves the memory as it was. Memory files are safetensors with JSON bookkeeping (no pickle),
written atomically; a file to load is untrusted and checked field by field and tensor by tensor first.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from . import atomic
from .cache import EvictingCache
from .errors import UsageError
from .forward import feed, num_layers
from .generate import context_limit
from .layout import IGNORE, NEVER, Layout, text_layout
from .methods import Method
from .methods.baselines import FullAttention, NoContext, SlidingWindow
from .methods.ccm import CCMConcat, MemoryWriter, Piece
from .models import model_identity

FORMAT = "kvcondense-memory/1"
MAX_HEADER_BYTES = 1 << 20  # a memory file's safetensors header is a few KB
MAX_COUNTER = 1 << 53  # writer counters beyond this are no chat's (JSON integers stay exact below it)
KV_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class MemoryFileError(UsageError):
    """A memory file cannot be used with this session (another checkpoint, another format, damaged or crafted
    contents), or cannot be written."""


class ContextFullError(UsageError):
    """A turn would take positions past the model's context (``max_position_embeddings``)."""


class TextWriter:
    """The memory of the plain-text baselines, with :class:`~kvcondense.methods.ccm.MemoryWriter`'s interface.

    - ``full``: every turn is kept as plain text;
    - ``window``: a sliding window of ``window`` tokens plus ``sinks`` first tokens: token ``k`` expires at
      ``k + window``, and the window stops while an answer is written (what
      :func:`kvcondense.methods.baselines.episode_layout` does);
    - ``no-context`` (``keep=False``): nothing is kept, every turn is forgotten at once; an answer sees only its
      own input.

    Positions and logical indices are the count of kept tokens, so the state is the same four numbers as CCM's.
    """

    def __init__(self, keep: bool = True, window: int | None = None, sinks: int = 0):
        self.keep, self.window, self.sinks = keep, window, sinks
        self.next = self.text_pos = self.steps = 0
        self.memory: list[int] = []

    def state(self) -> dict:
        return {"next": self.next, "text_pos": self.text_pos, "steps": self.steps, "memory": []}

    def restore(self, state: dict) -> None:
        self.next, self.text_pos, self.steps = state["next"], state["text_pos"], state["steps"]

    def expiry(self, k: int) -> int:
        return NEVER if self.window is None or k < self.sinks else k + self.window

    def kept(self, next_index: int) -> list[int]:
        """Logical indices stored after ``next_index`` tokens were kept (each chunk evicted what expired)."""
        if not self.keep:
            return []
        if self.window is None:
            return list(range(next_index))
        sinks = min(self.sinks, next_index)
        return list(range(sinks)) + list(range(max(sinks, next_index - self.window), next_index))

    def _text(self, ids: torch.Tensor, expire: torch.Tensor | None) -> Layout:
        lay = text_layout(ids, expire)
        lay.position_ids += self.text_pos
        lay.targets[:] = IGNORE
        self.next += len(ids)
        self.text_pos += len(ids)
        return lay

    def chunk(self, ids: torch.Tensor) -> Piece | None:
        """Lay out one turn (None: nothing is kept)."""
        self.steps += 1
        if not self.keep:
            return None
        first = self.next
        expire = torch.tensor([self.expiry(k) for k in range(first, first + len(ids))], dtype=torch.long)
        return Piece(self._text(ids, expire), first, [], NEVER)

    def tail(self, ids: torch.Tensor) -> Layout:
        return self._text(ids, None)


def make_writer(method: Method, token_ids: dict[str, int]) -> MemoryWriter | TextWriter:
    """The memory writer of an online session with ``method`` (refused for methods that hold no chat memory)."""
    if isinstance(method, CCMConcat):
        comp_ids = [token_ids[t] for t in method.special_tokens]
        return MemoryWriter(comp_ids, method.merge, method.recurrent, method.ema())
    if isinstance(method, SlidingWindow):
        return TextWriter(window=method.slots - method.sinks, sinks=method.sinks)
    if isinstance(method, FullAttention):
        return TextWriter()
    if isinstance(method, NoContext):
        return TextWriter(keep=False)
    raise UsageError(
        f"method {method.name!r} keeps no memory of a chat; use a ccm-concat, ccm-merge or full checkpoint"
    )


@dataclass
class _Snapshot:
    """Everything a turn may change, to put back when it fails. Key/value buffers are shared, not copied: the
    cache only ever writes past a layer's used slots or into a fresh buffer (:class:`EvictingLayer`)."""

    cache: EvictingCache
    layers: list[tuple]
    slots: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    seen: int
    writer: dict


class MemorySession:
    """Compressed memory of an online interaction, on a CCM model (see :mod:`kvcondense.methods.ccm`), or the
    plain-text memory of the ``full``, ``window`` and ``no-context`` baselines (see :class:`TextWriter`).

    Args:
        model: the model with the method's conditional LoRA and token rows (e.g. from ``load_checkpoint``).
        tokenizer: its tokenizer.
        method: a ``ccm-concat``, ``ccm-merge``, ``full``, ``window`` or ``no-context`` method.
        token_ids: the special tokens' ids.
        name: a label for the checkpoint, used in error messages.
    """

    def __init__(self, model, tokenizer, method: Method, token_ids: dict[str, int], name: str = "model"):
        if not method.episodic:
            raise UsageError(f"method {method.name!r} keeps no memory; use a ccm-concat, ccm-merge or full checkpoint")
        self.model, self.tokenizer, self.method, self.name = model, tokenizer, method, name
        self.writer = make_writer(method, token_ids)
        self.cache = EvictingCache(num_layers(model))
        self.identity = memory_identity(model, method)
        self._geometry: list[tuple[int, int, int]] | None = None

    @classmethod
    def from_checkpoint(cls, path: str | Path, model_name: str | None = None) -> MemorySession:
        from .checkpoint import load_checkpoint

        model, tokenizer, method, token_ids, _ = load_checkpoint(path, model_name)
        return cls(model, tokenizer, method, token_ids, name=str(path))

    # -- memory -----------------------------------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        """Chunks compressed so far (t)."""
        return self.writer.steps

    def memory_slots(self) -> int:
        """KV slots stored per layer (concat: n per chunk; merge: n)."""
        return int(self.cache.stored_slots()[0])

    def memory_bytes(self) -> int:
        """Bytes of keys and values stored, all layers."""
        return self.cache.kv_bytes()

    def _ids(self, text: str | torch.Tensor, what: str) -> torch.Tensor:
        if isinstance(text, str):
            if not text.strip():
                raise UsageError(f"the {what} is empty; give some text")
            return torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        if text.numel() == 0:
            raise UsageError(f"the {what} is empty; give some text")
        return text.long()

    # -- positions --------------------------------------------------------------------------------------------------
    def _memory_tokens(self) -> int:
        """Positions a chunk's memory tokens take after its text (CCM: its n COMP tokens, last text + 1..n)."""
        return len(self.writer.comp_ids) if isinstance(self.writer, MemoryWriter) else 0

    def _keeps(self) -> bool:
        return not isinstance(self.writer, TextWriter) or self.writer.keep

    def turn_end(self, chunk_tokens: int = 0, tail_tokens: int = 0, after_chunk_tokens: int = 0) -> int:
        """The highest position a chunk of ``chunk_tokens`` takes, then (from where it leaves off) a tail of
        ``tail_tokens`` and another chunk of ``after_chunk_tokens`` (a chat turn: the user's line, the answer, the
        reply). -1 when nothing takes a position."""
        pos, ends = self.writer.text_pos, [-1]
        if chunk_tokens and self._keeps():
            ends.append(pos + chunk_tokens - 1 + self._memory_tokens())
            pos += chunk_tokens
        if tail_tokens:
            ends.append(pos + tail_tokens - 1)
        if after_chunk_tokens and self._keeps():
            ends.append(pos + after_chunk_tokens - 1 + self._memory_tokens())
        return max(ends)

    def check_room(self, last: int, what: str = "this turn") -> None:
        """Refuse (:class:`ContextFullError`) before anything would run at position ``last`` or beyond the
        model's context: a model with learned positions (GPT-2) cannot, one with RoPE was not trained to."""
        limit = context_limit(self.model)
        if limit is not None and last >= limit:
            raise ContextFullError(
                f"{what} would reach position {last:,}, past the model's context of {limit:,} positions "
                f"({self.writer.text_pos:,} used after {self.steps} turns); the memory so far is unchanged and can "
                "still be saved: start a new chat, or use a model with a longer context"
            )

    @torch.no_grad()
    def feed(self, chunk: str | torch.Tensor) -> None:
        """Compress one chunk (text or token ids) into memory and free its keys/values."""
        ids = self._ids(chunk, "turn")
        self.check_room(self.turn_end(chunk_tokens=len(ids)))
        with self.turn():
            piece = self.writer.chunk(ids)
            if piece is None:  # no-context: nothing is kept
                return
            if piece.retire:  # the previous merged memory is replaced by this chunk's SUM slots
                self.cache.set_expire(0, torch.tensor(piece.retire), piece.retire_at)
            feed(self.model, self.cache, piece.layout, piece.first)
            self.cache.evict(piece.first + len(piece.layout))

    @contextmanager
    def turn(self):
        """All or nothing: if the block raises (or is interrupted), the memory is put back as it was before it."""
        snap = self._snapshot()
        try:
            yield
        except BaseException:
            self._restore(snap)
            raise

    def _snapshot(self) -> _Snapshot:
        cache = self.cache
        layers = [(la.is_initialized, la._keys, la._values, la._used) for la in cache.layers]
        slots = (cache.slot_idx.clone(), cache.slot_expire.clone(), cache.slot_closer.clone())
        return _Snapshot(cache, layers, slots, cache.seen, copy.deepcopy(self.writer.state()))

    def _restore(self, snap: _Snapshot) -> None:
        """Put the memory back exactly as it was at ``snap`` (after a failed turn, or after an answer)."""
        self.cache = snap.cache
        for layer, (initialized, keys, values, used) in zip(snap.cache.layers, snap.layers, strict=True):
            layer.is_initialized, layer._keys, layer._values, layer._used = initialized, keys, values, used
        self.cache.slot_idx, self.cache.slot_expire, self.cache.slot_closer = (t.clone() for t in snap.slots)
        self.cache.seen = snap.seen
        self.writer.restore(copy.deepcopy(snap.writer))

    @contextmanager
    def _scratch(self):
        """Run text after the memory, then drop it again: the memory and the positions are as before."""
        snap = self._snapshot()
        if isinstance(self.writer, TextWriter) and self.writer.window is not None:
            self.cache.slot_expire[self.cache.slot_idx >= 0] = NEVER  # the window stops while an answer runs
        try:
            yield
        finally:
            self._restore(snap)

    def _run_tail(self, ids: torch.Tensor) -> torch.Tensor:
        lay = self.writer.tail(ids)
        first = self.writer.next - len(ids)
        return feed(self.model, self.cache, lay, first)[0]  # (len, V)

    @torch.no_grad()
    def score(self, query: str | torch.Tensor, answer: str | torch.Tensor) -> tuple[float, int]:
        """Negative log-likelihood (sum, in nats) of ``answer`` after memory + ``query``, and its token count."""
        q, a = self._ids(query, "query"), self._ids(answer, "answer")
        self.check_room(self.turn_end(tail_tokens=len(q) + len(a)), "scoring this answer")
        with self._scratch():
            logits = self._run_tail(torch.cat([q, a]))
        pred = logits[len(q) - 1 : -1].float()
        return float(F.cross_entropy(pred, a, reduction="sum")), len(a)

    @torch.no_grad()
    def answer(self, query: str, max_new_tokens: int = 64, stop: str = "\n") -> str:
        """Greedy answer to ``query`` from memory; generation stops after ``stop`` or at end of sequence."""
        eos = self.tokenizer.eos_token_id
        new: list[int] = []
        ids = self._ids(query, "input")
        self.check_room(self.turn_end(tail_tokens=len(ids) + max_new_tokens), "this answer")
        with self._scratch():
            logits = self._run_tail(ids)[-1]
            for _ in range(max_new_tokens):
                token = int(logits.argmax())
                if token == eos:
                    break
                new.append(token)
                if stop and stop in self.tokenizer.decode([token]):
                    break
                logits = self._run_tail(torch.tensor([token]))[-1]
        text = self.tokenizer.decode(new)
        return text.split(stop)[0] if stop else text

    # -- disk -------------------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the memory (keys/values and bookkeeping) to one safetensors file, atomically (a unique temp file
        beside ``path``, then a rename: an existing file is replaced whole or not at all)."""
        path = check_save_path(path)
        tensors = {"slot_idx": self.cache.slot_idx, "slot_expire": self.cache.slot_expire}
        for i, layer in enumerate(self.cache.layers):
            if layer.is_initialized:
                tensors[f"keys.{i}"], tensors[f"values.{i}"] = layer.keys, layer.values
        info = {"format": FORMAT, "identity": self.identity, "writer": self.writer.state(), "seen": self.cache.seen}
        data = save_safetensors(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata={"kvcondense": json.dumps(info)}
        )
        try:
            atomic.write_bytes(path, data)
        except OSError as e:
            raise MemoryFileError(f"cannot write memory file {path}: {e.strerror or e}") from e
        return path

    def load(self, path: str | Path) -> None:
        """Replace the memory by one saved with :meth:`save` by a session on the same checkpoint.

        The file is untrusted: its format, the checkpoint it was made with, every field of its bookkeeping and
        every tensor's name, dtype, shape and values are checked against this session before anything is used;
        a file that fails raises :class:`MemoryFileError` naming it and the problem, and the memory is unchanged.
        """
        path = Path(path)
        info, tensors = self._read_memory_file(path)
        cache = EvictingCache(num_layers(self.model))
        cache.slot_idx, cache.slot_expire = tensors["slot_idx"], tensors["slot_expire"]
        cache.slot_closer = torch.zeros_like(cache.slot_idx, dtype=torch.bool)
        cache.seen = info["seen"]
        device, dtype = self.model.device, self.model.dtype
        for i, layer in enumerate(cache.layers):
            if f"keys.{i}" in tensors and cache.physical_length:
                keys, values = tensors[f"keys.{i}"].to(device, dtype), tensors[f"values.{i}"].to(device, dtype)
                layer.lazy_initialization(keys, values)
                layer.keys, layer.values = keys, values
        self.cache = cache
        self.writer.restore(info["writer"])

    def _kv_geometry(self) -> list[tuple[int, int, int]]:
        """(key/value heads, key dim, value dim) of each layer's cache, measured with one token."""
        if self._geometry is None:
            cache = EvictingCache(num_layers(self.model))
            with torch.no_grad():
                feed(self.model, cache, text_layout(torch.tensor([0])), 0)
            self._geometry = [(la.keys.shape[1], la.keys.shape[3], la.values.shape[3]) for la in cache.layers]
        return self._geometry

    def _read_memory_file(self, path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
        """The checked bookkeeping and tensors of a memory file (see :meth:`load`)."""

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
                header = _json(f.read(n), bad, "header")
                if not isinstance(header, dict):
                    raise bad("is not a safetensors memory file (its header is not an object)")
                meta = header.pop("__metadata__", None)
                raw = meta.get("kvcondense") if isinstance(meta, dict) else None
                if not isinstance(raw, str):
                    raise bad(f"is not a kvcondense memory file ({FORMAT}): no kvcondense metadata")
                info = _json(raw, bad, "metadata")
                if not isinstance(info, dict) or info.get("format") != FORMAT:
                    raise bad(f"is not a kvcondense memory file ({FORMAT})")
                if info.get("identity") != self.identity:
                    raise MemoryFileError(
                        f"memory {path} was made with another checkpoint or method ({info.get('identity')!r:.40}), "
                        f"not {self.name} ({self.identity}); load it with the checkpoint that made it"
                    )
                expected = self._check_info(info, bad)
                total = _check_header(header, expected, bad)
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
        self._check_tensors(info, tensors, expected, bad)
        return info, tensors

    def _check_info(self, info: dict, bad) -> dict[str, tuple[torch.dtype | None, tuple[int, ...]]]:
        """Check the bookkeeping of a memory file against this session's method and model. Returns the tensors the
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
        limit = context_limit(self.model)
        if limit is not None and pos > limit:
            raise bad(f"has {pos:,} positions, more than the model's context of {limit:,}")
        w = self.writer
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
            for i, (heads, dk, dv) in enumerate(self._kv_geometry()):
                expected[f"keys.{i}"] = (None, (1, heads, slots, dk))
                expected[f"values.{i}"] = (None, (1, heads, slots, dv))
        return expected

    def _check_tensors(self, info: dict, tensors: dict[str, torch.Tensor], expected: dict, bad) -> None:
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
        problem = self._slot_problem(info["writer"], idx, expire)
        if problem:
            raise bad(f"has slot bookkeeping that this session never writes ({problem})")

    def _slot_problem(self, state: dict, idx: list[int], expire: list[int]) -> str | None:
        """Why stored slots (logical index, expiry) cannot come from ``state``; None when they can."""
        w, nxt = self.writer, state["next"]
        if isinstance(w, TextWriter):
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


def _json(raw: bytes | str, bad, what: str):
    """Parse the JSON of a memory file's header or metadata; anything malformed is the file's fault."""
    try:
        return json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except UnicodeDecodeError as e:
        raise bad(f"is not a safetensors memory file (its {what} is not UTF-8)") from e
    except json.JSONDecodeError as e:
        raise bad(f"is not a safetensors memory file (its {what} is not JSON: {e.msg})") from e
    except RecursionError as e:
        raise bad(f"is not a kvcondense memory file (its {what} is JSON nested too deeply)") from e


_HEADER_DTYPES = {"I64": torch.int64, **KV_DTYPES}


def _check_header(header: dict, expected: dict, bad) -> int:
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


def chat(session: MemorySession, lines, out, err, stats: bool = False, max_new_tokens: int = 48) -> int:
    """Chat turn by turn: each user line and each reply is compressed into memory as one turn (speakers A/B, the
    dialogue format of :mod:`kvcondense.data.episodes`). Returns the number of rejected (empty) turns.

    A turn (the user's line, the answer, the reply) goes into memory whole or not at all. One that would pass the
    model's context is refused before it runs (:class:`ContextFullError`); one that fails in any way, or is
    interrupted, leaves the memory as it was before it (:meth:`MemorySession.turn`). Either error propagates
    (a failure that is not the user's is named on ``err`` first), so the caller can still save the memory, the
    last good state, in a ``finally``.
    """
    from .data.episodes import SPEAKERS, TURN

    user, bot = SPEAKERS
    prompt = f"{bot}:"
    answer_tokens = len(session._ids(prompt, "prompt")) + max_new_tokens
    reply_tokens = len(session._ids(TURN.format(speaker=bot, text="."), "reply")) - 1 + max_new_tokens  # estimate
    rejected = 0
    for line in lines:
        message = line.strip()
        if not message:
            print("error: the turn is empty; type some text (nothing was added to memory)", file=err)
            rejected += 1
            continue
        ids = session._ids(TURN.format(speaker=user, text=message), "turn")
        session.check_room(session.turn_end(len(ids), answer_tokens, reply_tokens))
        try:
            with session.turn():
                session.feed(ids)
                reply = session.answer(prompt, max_new_tokens=max_new_tokens).strip()
                if reply:
                    session.feed(TURN.format(speaker=bot, text=reply))
        except UsageError:
            raise
        except Exception as e:
            print(f"error: the turn failed ({type(e).__name__}: {e}); the memory is as before it", file=err)
            raise
        print(f"{bot}: {reply}", file=out, flush=True)
        if stats:
            print(f"memory: {session.memory_slots()} slots, {session.memory_bytes()} bytes", file=out, flush=True)
    return rejected
