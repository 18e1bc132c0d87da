"""An online interaction with a compressed context memory (CCM): feed chunks, answer from memory, save, load.

    from kvcondense import MemorySession
    session = MemorySession.from_checkpoint("checkpoints/merge-chitchat")
    session.feed("A: I just moved to Lisbon for a new job.\\n")
    print(session.answer("B:"))        # generated from the memory plus the input; the memory is unchanged
    session.save("memory.safetensors")  # reuse it in another process, with the same checkpoint

Each :meth:`MemorySession.feed` runs the chunk and its ``<COMP>`` tokens through an evicting cache, folds the
COMP keys/values into memory (concat appends them, merge averages them into a constant n slots) and frees the
chunk's keys/values. Answering runs the input after the memory and then removes it again.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .cache import EvictingCache
from .errors import UsageError
from .forward import feed, num_layers
from .methods import Method
from .methods.ccm import MemoryWriter
from .models import model_identity

FORMAT = "kvcondense-memory/1"


class MemoryFileError(UsageError):
    """A memory file cannot be used with this session (another checkpoint, another format)."""


class MemorySession:
    """Compressed memory of an online interaction, on a CCM model (see :mod:`kvcondense.methods.ccm`).

    Args:
        model: the model with the method's conditional LoRA and token rows (e.g. from ``load_checkpoint``).
        tokenizer: its tokenizer.
        method: a ``ccm-concat`` or ``ccm-merge`` method.
        token_ids: the special tokens' ids.
        name: a label for the checkpoint, used in error messages.
    """

    def __init__(self, model, tokenizer, method: Method, token_ids: dict[str, int], name: str = "model"):
        if not method.episodic:
            raise UsageError(f"method {method.name!r} keeps no memory; use a ccm-concat or ccm-merge checkpoint")
        self.model, self.tokenizer, self.method, self.name = model, tokenizer, method, name
        comp_ids = [token_ids[t] for t in method.special_tokens]
        self.writer = MemoryWriter(comp_ids, method.merge, method.recurrent, method.ema())
        self.cache = EvictingCache(num_layers(model))
        self.identity = memory_identity(model, method)

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

    @torch.no_grad()
    def feed(self, chunk: str | torch.Tensor) -> None:
        """Compress one chunk (text or token ids) into memory and free its keys/values."""
        piece = self.writer.chunk(self._ids(chunk, "turn"))
        if piece.retire:  # the previous merged memory is replaced by this chunk's SUM slots
            self.cache.set_expire(0, torch.tensor(piece.retire), piece.retire_at)
        feed(self.model, self.cache, piece.layout, piece.first)
        self.cache.evict(piece.first + len(piece.layout))

    @contextmanager
    def _scratch(self):
        """Run text after the memory, then drop it again: the memory and the positions are as before."""
        state, seen = self.writer.state(), self.cache.seen
        try:
            yield
        finally:
            scratch = self.cache.slot_idx >= state["next"]
            self.cache.slot_expire[scratch] = state["next"] - 1
            self.cache.evict(state["next"])
            self.writer.restore(state)
            self.cache.seen = seen

    def _run_tail(self, ids: torch.Tensor) -> torch.Tensor:
        lay = self.writer.tail(ids)
        first = self.writer.next - len(ids)
        return feed(self.model, self.cache, lay, first)[0]  # (len, V)

    @torch.no_grad()
    def score(self, query: str | torch.Tensor, answer: str | torch.Tensor) -> tuple[float, int]:
        """Negative log-likelihood (sum, in nats) of ``answer`` after memory + ``query``, and its token count."""
        q, a = self._ids(query, "query"), self._ids(answer, "answer")
        with self._scratch():
            logits = self._run_tail(torch.cat([q, a]))
        pred = logits[len(q) - 1 : -1].float()
        return float(F.cross_entropy(pred, a, reduction="sum")), len(a)

    @torch.no_grad()
    def answer(self, query: str, max_new_tokens: int = 64, stop: str = "\n") -> str:
        """Greedy answer to ``query`` from memory; generation stops after ``stop`` or at end of sequence."""
        eos = self.tokenizer.eos_token_id
        new: list[int] = []
        with self._scratch():
            logits = self._run_tail(self._ids(query, "input"))[-1]
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
        """Write the memory (keys/values and bookkeeping) to one safetensors file, atomically."""
        path = Path(path)
        tensors = {"slot_idx": self.cache.slot_idx, "slot_expire": self.cache.slot_expire}
        for i, layer in enumerate(self.cache.layers):
            if layer.is_initialized:
                tensors[f"keys.{i}"], tensors[f"values.{i}"] = layer.keys.contiguous(), layer.values.contiguous()
        info = {"format": FORMAT, "identity": self.identity, "writer": self.writer.state(), "seen": self.cache.seen}
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(
            {k: v.detach().cpu() for k, v in tensors.items()}, str(tmp), metadata={"kvcondense": json.dumps(info)}
        )
        tmp.replace(path)
        return path

    def load(self, path: str | Path) -> None:
        """Replace the memory by one saved with :meth:`save` by a session on the same checkpoint."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise MemoryFileError(f"memory file {path} does not exist; save one with session.save or chat --save")
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("kvcondense")
        info = json.loads(raw) if raw else {}
        if info.get("format") != FORMAT:
            raise MemoryFileError(f"{path} is not a kvcondense memory file ({FORMAT})")
        if info["identity"] != self.identity:
            raise MemoryFileError(
                f"memory {path} was made with another checkpoint or method ({info['identity']}), not {self.name} "
                f"({self.identity}); load it with the checkpoint that made it"
            )
        tensors = load_file(str(path))
        cache = EvictingCache(num_layers(self.model))
        cache.slot_idx, cache.slot_expire = tensors["slot_idx"], tensors["slot_expire"]
        cache.slot_closer = torch.zeros_like(cache.slot_idx, dtype=torch.bool)
        cache.seen = info["seen"]
        device, dtype = self.model.device, self.model.dtype
        for i, layer in enumerate(cache.layers):
            if f"keys.{i}" in tensors:
                keys, values = tensors[f"keys.{i}"].to(device, dtype), tensors[f"values.{i}"].to(device, dtype)
                layer.lazy_initialization(keys, values)
                layer.keys, layer.values = keys, values
        self.cache = cache
        self.writer.restore(info["writer"])


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
    dialogue format of :mod:`kvcondense.data.episodes`). Returns the number of rejected (empty) turns."""
    from .data.episodes import SPEAKERS, TURN

    user, bot = SPEAKERS
    rejected = 0
    for line in lines:
        message = line.strip()
        if not message:
            print("error: the turn is empty; type some text (nothing was added to memory)", file=err)
            rejected += 1
            continue
        session.feed(TURN.format(speaker=user, text=message))
        reply = session.answer(f"{bot}:", max_new_tokens=max_new_tokens).strip()
        print(f"{bot}: {reply}", file=out, flush=True)
        if reply:
            session.feed(TURN.format(speaker=bot, text=reply))
        if stats:
            print(f"memory: {session.memory_slots()} slots, {session.memory_bytes()} bytes", file=out, flush=True)
    return rejected
