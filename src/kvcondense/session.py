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
turn that fails leaves the memory as it was. :meth:`MemorySession.save` and :meth:`MemorySession.load` use the
memory file of :mod:`kvcondense.memory_file` (safetensors with JSON bookkeeping: no code can be loaded), whose loading
checks the untrusted file field by field and tensor by tensor first.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .cache import EvictingCache
from .engine import Stream, generate_step
from .errors import UsageError
from .forward import feed, num_layers
from .generate import context_limit
from .layout import NEVER, text_layout
from .memory_file import load_memory, memory_identity, save_memory
from .methods import Method, StepPiece
from .methods.ccm import MemoryWriter
from .methods.memory import TextWriter


class TailPolicy:
    """Answer tokens after a memory: plain text that takes the writer's next logical index and position."""

    def __init__(self, writer: MemoryWriter | TextWriter):
        self.writer = writer

    def step(self, token: int) -> StepPiece:
        return StepPiece(self.writer.tail(torch.tensor([token])), 0, [])


class ContextFullError(UsageError):
    """A turn would take positions past the model's context (``max_position_embeddings``)."""


def make_writer(method: Method, token_ids: dict[str, int]) -> MemoryWriter | TextWriter:
    """The memory writer of an online session with ``method`` (its :meth:`Method.memory_writer`)."""
    return method.memory_writer(token_ids)


@dataclass
class _Snapshot:
    """Everything a turn may change, to put back when it fails: the cache object, its state
    (:meth:`EvictingCache.snapshot`) and the writer's."""

    cache: EvictingCache
    state: tuple
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
        self.model, self.tokenizer, self.method, self.name = model, tokenizer, method, name
        self.writer = make_writer(method, token_ids)  # refuses a method that keeps no chat memory
        self.cache = EvictingCache(num_layers(model))
        self.identity = memory_identity(model, method)
        self._geometry: list[tuple[int, int, int]] | None = None

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, model_name: str | None = None, device: str | None = None, dtype: str | None = None
    ) -> MemorySession:
        from .loader import load

        got = load(path, model=model_name, device=device, dtype=dtype)
        return cls(got.model, got.tokenizer, got.method, got.token_ids, name=str(path))

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
        if text.dim() != 1:
            raise UsageError(f"the {what} takes a 1-D tensor of token ids, got shape {tuple(text.shape)}")
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
        return _Snapshot(self.cache, self.cache.snapshot(), copy.deepcopy(self.writer.state()))

    def _restore(self, snap: _Snapshot) -> None:
        """Put the memory back exactly as it was at ``snap`` (after a failed turn, or after an answer)."""
        self.cache = snap.cache
        self.cache.restore(snap.state)
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
        return float(F.cross_entropy(pred, a.to(pred.device), reduction="sum")), len(a)

    @torch.no_grad()
    def answer(self, query: str, max_new_tokens: int = 64, stop: str = "\n") -> str:
        """Greedy answer to ``query`` from memory; generation stops after ``stop`` or at end of sequence."""
        if max_new_tokens < 0:
            raise UsageError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        eos = self.tokenizer.eos_token_id
        new: list[int] = []
        ids = self._ids(query, "input")
        self.check_room(self.turn_end(tail_tokens=len(ids) + max_new_tokens), "this answer")
        with self._scratch():
            logits = self._run_tail(ids)[-1]
            stream = Stream(self.model, None, {}, self.cache, policy=TailPolicy(self.writer), seen=self.writer.next)
            for (token,) in generate_step(stream, logits, max_new_tokens, eos):
                new.append(token)
                if stop and stop in self.tokenizer.decode([token]):
                    break
        text = self.tokenizer.decode(new)
        return text.split(stop)[0] if stop else text

    # -- disk -------------------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the memory (keys/values and bookkeeping) to one safetensors file, atomically (a unique temp file
        beside ``path``, then a rename: an existing file is replaced whole or not at all); see
        :mod:`kvcondense.memory_file`."""
        return save_memory(self, path)

    def load(self, path: str | Path) -> None:
        """Replace the memory by one saved with :meth:`save` by a session on the same checkpoint.

        The file is untrusted: its format, the checkpoint it was made with, every field of its bookkeeping and
        every tensor's name, dtype, shape and values are checked against this session before anything is used;
        a file that fails raises :class:`MemoryFileError` naming it and the problem, and the memory is unchanged.
        """
        self.cache, state = load_memory(self, path)
        self.writer.restore(state)

    def kv_geometry(self) -> list[tuple[int, int, int]]:
        """(key/value heads, key dim, value dim) of each layer's cache, measured with one token."""
        if self._geometry is None:
            cache = EvictingCache(num_layers(self.model))
            with torch.no_grad():
                feed(self.model, cache, text_layout(torch.tensor([0])), 0)
            self._geometry = [(la.keys.shape[1], la.keys.shape[3], la.values.shape[3]) for la in cache.layers]
        return self._geometry
