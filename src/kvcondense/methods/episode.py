"""An online episode as token ids (:class:`EpisodeTokens`): the input of ``Method.episode_layout`` (CCM and the
memory baselines) and of the memory evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..data.episodes import truncation
from ..errors import UsageError


@dataclass
class EpisodeTokens:
    """A tokenized episode (see :class:`kvcondense.data.Episode`): chunks, then a query and its answer.

    Attributes:
        chunks: token ids of each context chunk, in order. Each (T_i,) int64.
        query: token ids of the input I(T). (Q,) int64, non-empty: its last token predicts the answer.
        answer: token ids of the output O(T) that is scored. (A,) int64.
        options: token ids of each answer option (classification tasks), empty otherwise.
        evidence: index of the one chunk the answer depends on (recall facts), kept when the episode is cut.
    """

    chunks: list[torch.Tensor]
    query: torch.Tensor
    answer: torch.Tensor
    options: list[torch.Tensor] = field(default_factory=list)
    evidence: int | None = None

    def truncated(self, t: int) -> EpisodeTokens:
        """The same episode with only ``t`` chunks (t = 0: no context): the last ones, the evidence chunk kept (see
        :func:`kvcondense.data.episodes.truncation`)."""
        kept, evidence = truncation(len(self.chunks), t, self.evidence)
        return EpisodeTokens([self.chunks[i] for i in kept], self.query, self.answer, self.options, evidence)

    def with_answer(self, answer: torch.Tensor) -> EpisodeTokens:
        return EpisodeTokens(self.chunks, self.query, answer, self.options, self.evidence)


def tokenize_episode(episode, tokenizer) -> EpisodeTokens:
    """Tokenize a :class:`kvcondense.data.Episode` piece by piece (no special tokens)."""

    def ids(text: str) -> torch.Tensor:
        return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    if not episode.query:
        raise UsageError("an episode needs a non-empty query: its last token predicts the answer")
    chunks, options = [ids(c) for c in episode.chunks], [ids(o) for o in episode.options]
    return EpisodeTokens(chunks, ids(episode.query), ids(episode.answer), options, episode.evidence)
