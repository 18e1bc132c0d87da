"""Online episodes for compressed context memory (CCM): chunks arrive one at a time, then a query is answered.

An :class:`Episode` is the data contract: the context chunks c(1..T) that are compressed into memory one by one,
the input I(T) and the output O(T) that is scored (or, for classification, the right one of ``options``).
All text formats live here, so that built-in sources and users' files produce the same strings:

- dialogue: speakers alternate ``A``, ``B``, ``A``, ...; a turn is the chunk ``"A: text\\n"``. A conversation of
  turns t_1..t_K gives chunks = turns 1..K-1, query ``"B:"`` (the speaker of turn K), answer ``" text_K\\n"``.
- in-context learning (ICL): an example is the chunk ``"Input: x\\nOutput: y\\n"``, the query is
  ``"Input: q\\nOutput:"``; the answer and every option carry one leading space (``" y"``).
- recall: a fact is the chunk ``"The code word for Athens is banana.\\n"``, the query
  ``"The code word for Athens is"``; answer and options as for ICL.

Users' ``.jsonl`` files hold one episode a line, either ``{"turns": ["...", "...", ...]}`` (a dialogue of at least
two turns) or ``{"examples": [{"input": ..., "output": ...}, ...], "query": {"input": ..., "options": [...],
"answer": ...}}`` (ICL; ``options`` may be left out for a generated answer; ``"evidence": k`` names the example,
counted from 1, that the answer depends on, which is then kept when the episode is cut to t chunks). Every episode
is assigned to train/validation/test by a hash of a stable id (a conversation id, a task item, or a user line's
content), so splits never share an item and do not depend on order.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..atomic import write_text
from ..fetch import cache_dir
from .documents import SPLITS, DataError, Document, jsonl_records, split_of

SPEAKERS = ("A", "B")
TURN = "{speaker}: {text}\n"
ICL_EXAMPLE = "Input: {x}\nOutput: {y}\n"
ICL_QUERY = "Input: {x}\nOutput:"
RECALL_FACT = "The code word for {subject} is {value}.\n"
RECALL_QUERY = "The code word for {subject} is"
# Bump when a format or a built-in source changes, so stale cached episode sets are not reused.
CACHE_VERSION = 4


@dataclass(frozen=True)
class Episode:
    """One online episode: chunks fed into memory one at a time, then a query answered from memory."""

    chunks: tuple[str, ...]  # context chunks c(1..T), each already formatted text
    query: str  # the input I(T) (may be "")
    answer: str  # the output O(T): the text scored (loss / perplexity), or the right option
    options: tuple[str, ...] = ()  # non-empty for classification tasks; `answer` must be one of them
    evidence: int | None = None  # index of the one chunk the answer depends on (recall), kept by `truncated`

    def __post_init__(self) -> None:
        if self.options and self.answer not in self.options:
            raise DataError(f"answer {self.answer!r} is not one of the options {list(self.options)}")
        if self.evidence is not None and not 0 <= self.evidence < len(self.chunks):
            raise DataError(f"evidence chunk {self.evidence} is not one of the {len(self.chunks)} chunks")

    def truncated(self, t: int) -> Episode:
        """The same episode with only ``t`` chunks (the most recent context); ``t >= 1``.

        An evidence chunk older than the last ``t`` is kept in their place, at position ``evidence % t`` (spread
        over the kept positions), so that every ``t`` can answer and what varies is how much else memory holds.
        """
        if t < 1 or t > len(self.chunks):
            raise DataError(f"cannot keep the last {t} chunks of an episode with {len(self.chunks)} chunks")
        kept, evidence = truncation(len(self.chunks), t, self.evidence)
        return Episode(tuple(self.chunks[i] for i in kept), self.query, self.answer, self.options, evidence)


def truncation(n: int, t: int, evidence: int | None) -> tuple[list[int], int | None]:
    """Which of ``n`` chunks an episode cut to ``t`` keeps, in order, and where its evidence chunk lands.

    The last ``t``; an evidence chunk older than those replaces the kept chunk at position ``evidence % t``.
    """
    kept = list(range(n - t, n))
    if evidence is None or t == 0:
        return kept, None
    if evidence >= n - t:
        return kept, evidence - (n - t)
    kept[evidence % t] = evidence
    return kept, evidence % t


# ---- formatting: the one place where episode text is made ----


def dialogue_episode(turns: Sequence[str]) -> Episode:
    """The episode of a conversation: all turns but the last are chunks; the last turn is the answer."""
    if len(turns) < 2:
        raise DataError(f"a dialogue needs at least 2 turns, got {len(turns)}")
    speakers = [SPEAKERS[i % 2] for i in range(len(turns))]
    chunks = tuple(TURN.format(speaker=s, text=t) for s, t in zip(speakers[:-1], turns[:-1], strict=True))
    return Episode(chunks, f"{speakers[-1]}:", f" {turns[-1]}\n")


def icl_episode(examples: Sequence[tuple[str, str]], query: str, answer: str, options: Sequence[str] = ()) -> Episode:
    """An in-context-learning episode: one chunk per (input, output) example, then the query's input."""
    chunks = tuple(ICL_EXAMPLE.format(x=x, y=y) for x, y in examples)
    return Episode(chunks, ICL_QUERY.format(x=query), " " + answer, tuple(" " + o for o in options))


def recall_episode(facts: Sequence[tuple[str, str]], asked: int, options: Sequence[str]) -> Episode:
    """A recall episode: one (subject, value) fact per chunk, then the question about fact ``asked`` (its evidence)."""
    chunks = tuple(RECALL_FACT.format(subject=s, value=v) for s, v in facts)
    subject, answer = facts[asked]
    query = RECALL_QUERY.format(subject=subject)
    return Episode(chunks, query, " " + answer, tuple(" " + o for o in options), evidence=asked)


RECALL_FACT_PATTERN = re.compile(
    re.escape(RECALL_FACT).replace(re.escape("{subject}"), "(.+)").replace(re.escape("{value}"), "(.+)")
)


def recall_facts(episode: Episode) -> list[tuple[str, str]] | None:
    """The (subject, value) facts of a recall episode's chunks (:data:`RECALL_FACT`); None if a chunk is not one."""
    found = [RECALL_FACT_PATTERN.fullmatch(c) for c in episode.chunks]
    return [m.groups() for m in found] if all(found) else None


def recall_quiz_episode(facts: Sequence[tuple[str, str]], asked: Sequence[int]) -> Episode:
    """A recall episode whose answer states several facts in turn (``asked`` indices, the first one queried): the
    loss of training then falls on every asked value, not on one word. ``"The code word for X is"`` ->
    ``" x.\nThe code word for Y is y.\n..."``."""
    first, *rest = (facts[i] for i in asked)
    tail = "".join(RECALL_FACT.format(subject=s, value=v) for s, v in rest)
    return Episode(
        tuple(RECALL_FACT.format(subject=s, value=v) for s, v in facts),
        RECALL_QUERY.format(subject=first[0]),
        f" {first[1]}.\n{tail}",
    )


def item_split(item_id: str) -> str:
    """The split (train, validation, test) of a conversation or task item, from a hash of its stable id."""
    return split_of(Document(item_id, ""))


# ---- users' .jsonl files ----


def _text(value: object, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: {what} is empty; give it text or remove it")
    return value


def _icl_record(obj: dict, where: str) -> Episode:
    examples, query = obj["examples"], obj.get("query")
    if not isinstance(examples, list) or not examples:
        raise DataError(f'{where}: "examples" must be a non-empty list of {{"input": ..., "output": ...}} objects')
    pairs = []
    for i, ex in enumerate(examples, 1):
        if not isinstance(ex, dict) or "input" not in ex or "output" not in ex:
            raise DataError(f'{where}: example {i} must be an object with "input" and "output"')
        pairs.append(
            (_text(ex["input"], f"example {i} input", where), _text(ex["output"], f"example {i} output", where))
        )
    if not isinstance(query, dict) or "input" not in query or "answer" not in query:
        raise DataError(f'{where}: "query" must be an object with "input", "answer" and optionally "options"')
    q = _text(query["input"], "the query input", where)
    answer = _text(query["answer"], "the query answer", where)
    options = query.get("options", [])
    if not isinstance(options, list):
        raise DataError(f'{where}: "options" must be a list of strings')
    options = [_text(o, f"option {i}", where) for i, o in enumerate(options, 1)]
    if len(set(options)) != len(options):
        raise DataError(f"{where}: the options repeat; list each option once")
    if options and answer not in options:
        raise DataError(f"{where}: the answer {answer!r} is not one of the options {options}; add it to the options")
    episode = icl_episode(pairs, q, answer, options)
    evidence = query.get("evidence")
    if evidence is None:
        return episode
    if not isinstance(evidence, int) or isinstance(evidence, bool) or not 1 <= evidence <= len(pairs):
        raise DataError(f'{where}: "evidence" must be the number (1..{len(pairs)}) of the example the answer needs')
    return replace(episode, evidence=evidence - 1)


def _record(obj: object, where: str) -> Episode:
    if isinstance(obj, dict) and "turns" in obj:
        turns = obj["turns"]
        if not isinstance(turns, list) or len(turns) < 2:
            raise DataError(f'{where}: "turns" must be a list of at least 2 strings (the last one is answered)')
        return dialogue_episode([_text(t, f"turn {i}", where) for i, t in enumerate(turns, 1)])
    if isinstance(obj, dict) and "examples" in obj:
        return _icl_record(obj, where)
    raise DataError(
        f'{where}: expected an object with "turns" (a dialogue) or "examples" and "query" (in-context learning)'
    )


def _read_items(path: str | Path) -> list[tuple[str, Episode]]:
    p = Path(path)
    if not p.exists():
        raise DataError(
            f"episode path {p} does not exist; pass a built-in name ({', '.join(EPISODE_SOURCES)}) "
            "or a .jsonl file or folder"
        )
    if p.is_file() and p.suffix != ".jsonl":
        raise DataError(f"episode file {p} is not .jsonl; give one JSON object a line")
    items = []
    for f in sorted(p.rglob("*.jsonl")) if p.is_dir() else [p]:
        for n, obj in jsonl_records(f):
            # The line's content is its identity: the split does not move when lines are added or reordered.
            items.append((json.dumps(obj, sort_keys=True), _record(obj, f"{f}:{n}")))
    if not items:
        raise DataError(f'{p} holds no episodes; give .jsonl lines with "turns" or "examples" and "query"')
    return items


def read_episodes_jsonl(path: str | Path) -> list[Episode]:
    """All episodes of a ``.jsonl`` file or of a directory of them (formats in the module docstring).

    Raises:
        DataError: one line naming the file, the 1-based line number and the fix.
    """
    return [episode for _, episode in _read_items(path)]


# ---- built-in sources by name ----


def _source(module: str, function: str) -> Callable[[int], list[tuple[str, Episode]]]:
    # Imported on use: the source modules import this one for Episode and the formats.
    def load(seed: int) -> list[tuple[str, Episode]]:
        return getattr(importlib.import_module(f"{__package__}.{module}"), function)(seed)

    load.__name__ = function
    return load


# Each source maps a seed to (stable item id, episode) pairs for all splits.
EPISODE_SOURCES: dict[str, Callable[[int], list[tuple[str, Episode]]]] = {
    "chitchat": _source("chitchat", "chitchat_episodes"),
    "analogy": _source("tasks", "analogy_episodes"),
    "recall": _source("tasks", "recall_episodes"),
    "recall-quiz": _source("tasks", "recall_quiz_episodes"),
}
# Sources whose answers state facts of several chunks: an episode cut to its last t chunks (``truncated``) would
# ask for facts it no longer holds, so training does not cut them (``train --sample-chunks``).
UNCUT_SOURCES = frozenset({"recall-quiz"})


def _builtin_items(name: str, seed: int) -> list[tuple[str, Episode]]:
    cached = cache_dir() / "corpora" / f"episodes-v{CACHE_VERSION}-{name}-seed{seed}.json"
    if cached.exists():
        rows = json.loads(cached.read_text())
        return [
            (r.pop("id"), Episode(**{k: tuple(v) if isinstance(v, list) else v for k, v in r.items()})) for r in rows
        ]
    items = EPISODE_SOURCES[name](seed)
    write_text(cached, json.dumps([{"id": i, **asdict(e)} for i, e in items]))
    return items


def is_episode_data(name_or_path: str) -> bool:
    """Whether ``--data`` names online episodes (a built-in episode source, or .jsonl with turns/examples)."""
    if name_or_path in EPISODE_SOURCES:
        return True
    path = Path(name_or_path)
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files or files[0].suffix != ".jsonl" or not files[0].is_file():
        return False
    try:
        _, first = next(jsonl_records(files[0]), (0, None))
    except DataError:  # not JSON lines at all: the document reader reports it
        return False
    return isinstance(first, dict) and ("turns" in first or "examples" in first)


def load_episodes(name_or_path: str, split: str, seed: int = 0) -> list[Episode]:
    """The episodes of one split of a built-in source (cached after the first build) or of a user's ``.jsonl``.

    Args:
        name_or_path: a name in ``EPISODE_SOURCES`` or a path to a ``.jsonl`` file or a folder of them.
        split: ``train``, ``validation``, ``test`` or ``all`` (every episode: a file kept apart for evaluation).
        seed: picks the examples, facts and options of the built-in tasks; the split of an item never depends on it.

    Raises:
        DataError: unknown name or split, unreadable data, or an empty split.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {SPLITS}")
    if name_or_path in EPISODE_SOURCES:
        items = _builtin_items(name_or_path, seed)
    elif not Path(name_or_path).exists() and "/" not in name_or_path and "." not in name_or_path:
        raise DataError(
            f"unknown episode source {name_or_path!r}; choose one of: {', '.join(EPISODE_SOURCES)}, "
            "or pass a .jsonl file or folder"
        )
    else:
        items = _read_items(name_or_path)
    chosen = [episode for item_id, episode in items if split == "all" or item_split(item_id) == split]
    if not chosen:
        raise DataError(
            f"the {split} split of {name_or_path} is empty ({len(items)} episodes in all); give more episodes, or "
            "score a file kept apart whole (--split all)"
        )
    return chosen
