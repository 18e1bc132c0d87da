"""Built-in episode tasks made from the Google analogy set (``questions-words.txt`` in the ``gensim==4.4.0`` wheel).

- ``analogy`` (in-context learning, one relation per episode): the 573 word pairs of 14 relations
  (``capital-world``: Athens -> Greece, ``gram8-plural``: banana -> bananas, ...; 550 distinct, as the 23 common
  capitals are also world capitals; a pair is one item with one split). Every pair is the query of one episode;
  its chunks are up to ``MAX_CHUNKS`` example pairs of the same relation, drawn from the relation's *training*
  pairs only, so no validation or test query ever appears in any episode as an example. Options: the answer and
  3 other outputs of the relation that are not right for the query's input.
- ``recall`` (memory of arbitrary facts): ``MAX_CHUNKS`` facts "The code word for <Subject> is <value>." per
  episode, subjects drawn from the set's capitalised words (cities, countries, ...), values from its lowercase
  words, both distinct within an episode; world knowledge cannot answer. The question is about one fact chosen
  uniformly; options are the values of 4 facts of the episode, the answer among them.

Sizes (seed 0): analogy 455 train / 62 validation / 56 test episodes, recall 4817 / 601 / 582 (recall episodes are
cheap to make; the first 600 are the set of the first sessions, whose held-out episodes come first and are unchanged).
Every recall episode and every held-out analogy episode has 16 chunks; 32 training analogy episodes have 15
(``capital-common-countries`` and ``family`` keep 16 training pairs, one of which is the query), so callers can
truncate to t = 1, 2, 4, 8, 16 (in general, t = 16 only on episodes with >= 16 chunks). A recall episode marks the
asked fact as its ``evidence``: ``Episode.truncated(t)`` keeps it among the t chunks, so every t can be answered
and what grows with t is how much else memory must hold.
Everything is deterministic from the seed (``random.Random`` seeded by a string).
"""

from __future__ import annotations

import random
import zipfile

from ..fetch import fetch_package
from .episodes import Episode, icl_episode, item_split, recall_episode, recall_quiz_episode

PACKAGE, VERSION = "gensim", "4.4.0"
MEMBER = "gensim/test/test_data/questions-words.txt"
MAX_CHUNKS = 16
N_OPTIONS = 4
RECALL_EPISODES = 6000
QUIZ_QUESTIONS = 4


def load_relations() -> dict[str, list[tuple[str, str]]]:
    """Relation name -> its distinct (input, output) word pairs, in the file's order.

    Sections start with ``: name``; each line ``a b c d`` holds two pairs (a, b) and (c, d) of that relation.
    """
    with zipfile.ZipFile(fetch_package(PACKAGE, VERSION)) as zf:
        text = zf.read(MEMBER).decode("utf-8")
    relations: dict[str, dict[tuple[str, str], None]] = {}
    name = None
    for line in text.splitlines():
        if line.startswith(":"):
            name = line[1:].strip()
            relations[name] = {}
        elif name is not None and len(words := line.split()) == 4:
            relations[name].update({(words[0], words[1]): None, (words[2], words[3]): None})
    return {name: list(pairs) for name, pairs in relations.items()}


def _analogy_item(relation: str, pairs: list[tuple[str, str]], query: tuple[str, str], seed: int) -> Episode:
    rng = random.Random(f"analogy:{seed}:{relation}:{query}")
    q, answer = query
    # Examples come from training pairs only; a pair with the query's input would give its answer away.
    pool = [p for p in pairs if p[0] != q and item_split(_analogy_id(p)) == "train"]
    examples = rng.sample(pool, min(MAX_CHUNKS, len(pool)))
    right = {b for a, b in pairs if a == q}  # an input may have two right outputs (a city name in two states)
    wrong = sorted({b for _, b in pairs} - right)
    options = [answer, *rng.sample(wrong, N_OPTIONS - 1)]
    rng.shuffle(options)
    return icl_episode(examples, q, answer, options)


def _analogy_id(pair: tuple[str, str]) -> str:
    # The pair, not the relation, is the item: Bangkok -> Thailand is in two relations and must keep one split.
    return f"analogy:{pair[0]}:{pair[1]}"


def analogy_episodes(seed: int = 0) -> list[tuple[str, Episode]]:
    """(``analogy:<input>:<output>``, episode) for every pair of every relation, as the query."""
    return [
        (_analogy_id(query), _analogy_item(relation, pairs, query, seed))
        for relation, pairs in load_relations().items()
        for query in pairs
    ]


def recall_vocabulary() -> tuple[list[str], list[str]]:
    """(subjects, values): the analogy set's capitalised words and its lowercase words, sorted, no multi-word."""
    words = sorted({w for pairs in load_relations().values() for pair in pairs for w in pair})
    subjects = [w for w in words if w[0].isupper() and w.isalpha()]
    values = [w for w in words if w.islower() and w.isalpha()]
    return subjects, values


def recall_episodes(seed: int = 0) -> list[tuple[str, Episode]]:
    """(``recall:<index>``, episode) for ``RECALL_EPISODES`` episodes of ``MAX_CHUNKS`` random facts each."""
    items = []
    for i, (rng, facts, asked) in enumerate(_recall_facts(seed)):
        others = [v for j, (_, v) in enumerate(facts) if j != asked]
        options = [facts[asked][1], *rng.sample(others, N_OPTIONS - 1)]
        rng.shuffle(options)
        items.append((f"recall:{i}", recall_episode(facts, asked, options)))
    return items


def recall_quiz_episodes(seed: int = 0) -> list[tuple[str, Episode]]:
    """The recall episodes (same ids, facts and splits) with ``QUIZ_QUESTIONS`` facts stated in the answer, the
    recall question's first: a denser training signal (``recall-quiz``; score it by perplexity)."""
    items = []
    for i, (rng, facts, asked) in enumerate(_recall_facts(seed)):
        rng.random()  # a discarded draw, kept so that this stays the set concat-quiz was trained on
        more = rng.sample([j for j in range(MAX_CHUNKS) if j != asked], QUIZ_QUESTIONS - 1)
        items.append((f"recall:{i}", recall_quiz_episode(facts, [asked, *more])))
    return items


def _recall_facts(seed: int):
    """Per recall episode: its random generator (after the facts are drawn), facts and the asked fact's index."""
    subjects, values = recall_vocabulary()
    for i in range(RECALL_EPISODES):
        rng = random.Random(f"recall:{seed}:{i}")
        facts = list(zip(rng.sample(subjects, MAX_CHUNKS), rng.sample(values, MAX_CHUNKS), strict=True))
        yield rng, facts, rng.randrange(MAX_CHUNKS)
