"""The method interface: turn a tokenized text into a :class:`~kvcondense.layout.Layout`.

A method is a small dataclass whose hyperparameters are its fields, validated in ``__post_init__``. Methods and
baselines share this interface, so training, evaluation and generation never special-case one of them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..layout import IGNORE, NEVER, Kind, Layout


@dataclass
class TokenizedText:
    """Token ids of a text with the whitespace word and the line each token belongs to.

    Attributes:
        ids: token ids. (T,) int64.
        word_ids: index of the whitespace-separated word each token starts in, -1 for pure whitespace. (T,) int64.
        line_ids: index of the line (newline-separated) each token is in. (T,) int64.
        sentence_end: whether a sentence ends with this token (see ``methods.gist.sentence_ends``). (T,) bool.
        scores: how much the model needs each token, from a scoring pass (:mod:`kvcondense.scoring`), or None.
            (T,) float. Only a method whose layout reads scores needs them.
        head_scores: the same scores per layer and KV head, or None. (layers, KV heads, T) float. Only a method
            that chooses per head needs them.
    """

    ids: torch.Tensor
    word_ids: torch.Tensor
    line_ids: torch.Tensor
    sentence_end: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    head_scores: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.sentence_end is None:
            self.sentence_end = torch.zeros(self.ids.shape, dtype=torch.bool)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, sl: slice) -> TokenizedText:
        scores = None if self.scores is None else self.scores[sl]
        heads = None if self.head_scores is None else self.head_scores[..., sl]
        return TokenizedText(self.ids[sl], self.word_ids[sl], self.line_ids[sl], self.sentence_end[sl], scores, heads)

    @classmethod
    def from_ids(cls, ids) -> TokenizedText:
        """Ids without text: every token is its own word, all on one line, no sentence ends."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        return cls(ids, torch.arange(ids.shape[0]), torch.zeros_like(ids))


@dataclass(frozen=True)
class Scoring:
    """What a method asks of the scoring pass (:mod:`kvcondense.scoring`).

    Attributes:
        window: the last tokens of the text whose attention scores every token.
        per_head: also give the scores per layer and KV head (``TokenizedText.head_scores``).
        mean: a token's score is the mean attention of the scoring queries that see it, not their sum (with a long
            window, early tokens are then not favoured for being seen by more queries: H2O's accumulated attention,
            normalised).
        pool: each score is averaged with its neighbours' over this many tokens (SnapKV's kernel); 1: not at all.
        value_norm: each score is weighed by the norm of the token's value (ExpectedAttention's weighting).
        replay: the weight of KVzip's replay score: the model reads the text twice, and a token's score is the
            largest attention the second reading puts on it. 0: not used; 1: the replay score alone (``window``,
            ``mean`` and ``value_norm`` then do not apply: they shape the attention score only); between: each
            head's two scores, each normalised to sum 1 over the text, mixed with this weight.
    """

    window: int
    per_head: bool = False
    mean: bool = False
    pool: int = 5
    value_norm: bool = False
    replay: float = 0.0


_WORD = re.compile(r"\S+")


def tokenize(text: str, tokenizer) -> TokenizedText:
    """Tokenize ``text`` (no special tokens) and map every token to its whitespace word and its line."""
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    words = [(m.start(), m.end()) for m in _WORD.finditer(text)]
    word_line, line, pos = [], 0, 0
    for s, _ in words:
        line += text.count("\n", pos, s)
        pos = s
        word_line.append(line)
    word_ids, line_ids, firsts = [], [], []
    w = 0
    for s, e in enc["offset_mapping"]:
        first = s + (len(text[s:e]) - len(text[s:e].lstrip()))
        firsts.append(first if first < e else s)  # a whitespace-only token stays with what precedes it
        while w < len(words) and words[w][1] <= first:
            w += 1
        inside = w < len(words) and words[w][0] <= first < words[w][1] and first < e
        word_ids.append(w if inside else -1)
        line_ids.append(word_line[w] if inside else (word_line[w - 1] if w > 0 else 0))
    # a sentence ends with the last token whose first non-space character comes before the boundary offset
    ends = torch.zeros(len(firsts), dtype=torch.bool)
    order = torch.tensor(firsts, dtype=torch.long)
    for boundary in sentence_ends(text):
        t = int((order < boundary).sum()) - 1
        if t >= 0:
            ends[t] = True
    return TokenizedText(
        torch.tensor(enc["input_ids"], dtype=torch.long),
        torch.tensor(word_ids, dtype=torch.long),
        torch.tensor(line_ids, dtype=torch.long),
        ends,
    )


# punctuation, optional closing quotes/brackets, then whitespace or the end of the text
_BOUNDARY = re.compile(r"[.?!][\"'\u201d\u2019)\]]*(?:\s+|$)")


def sentence_ends(text: str) -> list[int]:
    """Character offsets where a sentence ends: after ``. ``/``? ``/``! `` (newline forms too, closing quotes
    allowed) and after a final ``.``/``?``/``!``. Decimals (``3.14``) have no whitespace after the point, so they
    are no boundary; abbreviations and list numbers are (as in the gist paper)."""
    return [m.end() for m in _BOUNDARY.finditer(text)]


def param(default, help: str, flag: str | None = None, choices: tuple | None = None, before=None):
    """A method hyperparameter: a dataclass field whose metadata makes its command-line flag (help text, a flag
    name other than ``--field-name``, choices). Every method field becomes a flag of train, eval and generate.
    ``before``: what a checkpoint saved before the field existed did (it loads as trained, not with a newer
    default); None: the default."""
    meta = {"help": help, "flag": flag, "choices": choices, "before": before}
    return dataclasses.field(default=default, metadata=meta)


@dataclass
class Method:
    """Base class of every compression method and baseline.

    Subclasses set ``name``, ``special_tokens`` (new vocabulary rows, added in this order), ``trainable``
    (whether ``kvcondense train`` makes sense for it) and ``predict_from`` (which rows' logits predict the next
    token at inference), and implement :meth:`layout` (plain text), :meth:`episode_layout` (online episodes:
    chunks, a query, an answer), or both. What a method reads is what it implements: :meth:`reads_text`,
    :meth:`reads_episodes`.
    """

    name: ClassVar[str] = ""
    special_tokens: ClassVar[tuple[str, ...]] = ()
    trainable: ClassVar[bool] = True
    predict_from: ClassVar[tuple[Kind, ...]] = (Kind.TEXT,)  # kinds whose logits predict the next text token
    lora_on: ClassVar[tuple[Kind, ...] | None] = None  # conditional LoRA: active only on these kinds (None: all)
    inference_params: ClassVar[tuple[str, ...]] = ()  # parameters eval may set apart from the checkpoint's
    exact_budget: ClassVar[bool] = False  # its layout keeps 1 - ratio of any prompt: no reachability check needed

    def layout(self, text: TokenizedText, token_ids: dict[str, int], seed: int = 0) -> Layout:
        """Build the layout of plain ``text``. ``token_ids`` maps each special token to its id; ``seed`` drives any
        random choice (span placement, scattered keys) so that a given (text, seed) always gives one layout."""
        from ..errors import UsageError

        raise UsageError(
            f"method {self.name!r} evaluates online episodes only; pass --data chitchat, analogy, recall or a "
            "chat .jsonl (for plain text use full, streaming or a compression method)"
        )

    def episode_layout(self, episode, token_ids: dict[str, int]) -> Layout:
        """Build the layout of an online ``episode`` (:class:`kvcondense.methods.episode.EpisodeTokens`): its context
        chunks, query and answer in one sequence, only the answer scored."""
        from ..errors import UsageError

        raise UsageError(
            f"method {self.name!r} does not read online episodes; use a ccm-concat, ccm-merge, full, window or "
            "no-context method for chat data"
        )

    @classmethod
    def reads_text(cls) -> bool:
        """Whether :meth:`layout` is implemented (plain text: training, perplexity, the prefix and QA tasks)."""
        return cls.layout is not Method.layout

    @classmethod
    def reads_episodes(cls) -> bool:
        """Whether :meth:`episode_layout` is implemented (online episodes: CCM data, chat memory)."""
        return cls.episode_layout is not Method.episode_layout

    def scoring(self) -> Scoring | None:
        """The scoring pass this method's layout reads (``TokenizedText.scores`` and, per head, ``head_scores``,
        from :func:`kvcondense.scoring.method_layout`); None when it reads none."""
        return None

    def compresses_at_prompt_end(self) -> bool:
        """Whether this method frees nothing until the prompt has been read whole (as a KV press compresses after
        the prefill): every prompt token then sees the whole prompt, so a score over the prompt itself (perplexity,
        a training loss without ``--continuation-tokens``) measures full attention, not the compression."""
        return False

    def decode_policy(self, prompt: Layout, token_ids: dict[str, int], seed: int = 0):
        """The method's rule for generated tokens after ``prompt``: an object whose ``step(token)`` returns the
        :class:`StepPiece` to feed (see :mod:`kvcondense.engine`). Default: every generated token is kept."""
        return TextPolicy.after(prompt)

    def memory_writer(self, token_ids: dict[str, int]):
        """The writer that lays out an online chat's memory turn by turn (:class:`kvcondense.session.MemorySession`);
        methods that keep no chat memory refuse."""
        from ..errors import UsageError

        raise UsageError(
            f"method {self.name!r} keeps no memory of a chat; use a ccm-concat, ccm-merge or full checkpoint"
        )

    def params_for_budget(self, kv_budget: float, texts: Sequence[TokenizedText] = ()) -> dict:
        """The hyperparameters that keep about ``kv_budget`` of a context (``eval --kv-budget``; ``texts``: the
        contexts it will compress, for a method whose KV kept depends on the text): a method with a compression
        ratio keeps ``1 - ratio``; a method without a budget to set refuses in one line."""
        from ..errors import UsageError

        if "ratio" not in self.params():
            raise UsageError(f"method {self.name} has no budget to set (its KV kept follows from its own parameters)")
        return {**self.params(), "ratio": 1 - kv_budget}

    def params(self) -> dict:
        """The hyperparameters, as saved in checkpoints and results."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


# ------------------------------------------------------------------------------------------- generated tokens
@dataclass
class StepPiece:
    """One decode step of a method's policy: the layout piece to feed, the row whose logits predict the next
    token, and expiry updates ``(logical indices, expire)`` for keys already stored."""

    layout: Layout
    next_row: int
    updates: list[tuple[torch.Tensor, int]]


def piece_layout(rows: list[dict]) -> Layout:
    """A layout from row dicts with keys id, kind, pos, expire, start, closer."""
    return Layout(
        input_ids=torch.tensor([r["id"] for r in rows], dtype=torch.long),
        kinds=torch.tensor([int(r["kind"]) for r in rows], dtype=torch.long),
        position_ids=torch.tensor([r["pos"] for r in rows], dtype=torch.long),
        expire=torch.tensor([r["expire"] for r in rows], dtype=torch.long),
        start=torch.tensor([r["start"] for r in rows], dtype=torch.long),
        closer_only=torch.tensor([r["closer"] for r in rows], dtype=torch.bool),
        targets=torch.full((len(rows),), IGNORE, dtype=torch.long),
    )


class TextPolicy:
    """Plain text tokens whose expiry is a function of their logical index (all the baselines), from logical index
    ``index`` at position ``position`` on."""

    def __init__(self, index: int, position: int, expiry: Callable[[int], int] = lambda index: NEVER):
        self.index, self.n_text, self.expiry = index, position, expiry

    @classmethod
    def after(cls, prompt: Layout, expiry: Callable[[int], int] = lambda index: NEVER) -> TextPolicy:
        """Text continuing ``prompt``: logical indices after its rows, positions after its text tokens."""
        return cls(len(prompt), prompt.n_text, expiry)

    def step(self, token: int) -> StepPiece:
        row = {
            "id": token,
            "kind": Kind.TEXT,
            "pos": self.n_text,
            "expire": self.expiry(self.index),
            "start": 0,
            "closer": False,
        }
        self.index += 1
        self.n_text += 1
        return StepPiece(piece_layout([row]), 0, [])
