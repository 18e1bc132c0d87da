"""How the next token is picked from the logits (:class:`Sampling`): greedy, or transformers' own temperature,
top-k and top-p warpers with a seeded generator. :func:`kvcondense.engine.generate_step` uses it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .errors import UsageError


@dataclass
class Sampling:
    """How the next token is picked from the logits: greedy (``temperature`` 0, the default) or sampled with
    temperature, top-k and top-p (transformers' own logits warpers), reproducibly from ``seed``."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    _warpers: LogitsProcessorList = field(init=False, repr=False)
    _generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.temperature < float("inf"):  # NaN and inf too
            raise UsageError(f"--temperature must be a number >= 0 (0: greedy), got {self.temperature}")
        if self.top_k < 0:
            raise UsageError(f"--top-k must be >= 0 (0: off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"--top-p must be in (0, 1], got {self.top_p}")
        warpers = LogitsProcessorList()
        if self.temperature > 0:
            warpers.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k:
                warpers.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1:
                warpers.append(TopPLogitsWarper(self.top_p))
        self._warpers = warpers
        self._generator = torch.Generator().manual_seed(self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def __call__(self, logits: torch.Tensor) -> int:
        """The next token from one row's logits (V,)."""
        if self.greedy:
            return int(logits.argmax())
        scores = self._warpers(None, logits.float().cpu().unsqueeze(0))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self._generator))
