"""Online episodes (CCM): the .jsonl reader and its errors, truncation, splits, and the built-in sources (slow)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DATA

from kvcondense.data import EPISODE_SOURCES, DataError, Episode, load_episodes, read_episodes_jsonl
from kvcondense.data import episodes as episodes_module


def test_dialogue_jsonl_format():
    first, second = read_episodes_jsonl(DATA / "dialogue.jsonl")  # the blank line between them is skipped
    assert first == Episode(
        chunks=("A: Did you water the tomatoes?\n", "B: Yes, this morning.\n"),
        query="A:",
        answer=" Good, it will be hot today.\n",
    )
    assert second == Episode(("A: Is the bakery open on Sunday?\n",), "B:", " Only until noon.\n")


def test_icl_jsonl_format():
    first, second = read_episodes_jsonl(DATA / "icl.jsonl")
    assert first == Episode(
        chunks=("Input: cold\nOutput: hot\n", "Input: up\nOutput: down\n"),
        query="Input: early\nOutput:",
        answer=" late",
        options=(" late", " soon", " never"),
    )
    assert second == Episode(("Input: two plus two\nOutput: four\n",), "Input: one plus two\nOutput:", " three")


def test_icl_jsonl_evidence(tmp_path):
    path = tmp_path / "facts.jsonl"
    examples = ", ".join(f'{{"input": "{k}", "output": "{v}"}}' for k, v in [("a", "1"), ("b", "2"), ("c", "3")])
    path.write_text(f'{{"examples": [{examples}], "query": {{"input": "a", "answer": "1", "evidence": 1}}}}\n')
    (episode,) = read_episodes_jsonl(path)
    assert episode.evidence == 0
    assert episode.truncated(1).chunks == ("Input: a\nOutput: 1\n",)  # the one example the answer needs


def test_directory_reads_every_jsonl(tmp_path):
    for name in ("dialogue.jsonl", "icl.jsonl"):
        (tmp_path / name).write_text((DATA / name).read_text())
    assert len(read_episodes_jsonl(tmp_path)) == 4


GOOD = '{"turns": ["hi", "hello"]}'
ICL = '{{"examples": [{{"input": "a", "output": "b"}}], "query": {query}}}'


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"turns": ["hi", "hello"', "not valid JSON"),
        ("[1, 2]", 'expected an object with "turns"'),
        ('{"text": "hi"}', 'expected an object with "turns"'),
        ('{"turns": ["only one"]}', "at least 2"),
        ('{"turns": ["hi", ""]}', "turn 2 is empty"),
        ('{"turns": ["hi", "  "]}', "turn 2 is empty"),
        ('{"turns": ["hi", 3]}', "turn 2 must be a string"),
        ('{"examples": [], "query": {"input": "x", "answer": "y"}}', '"examples" must be a non-empty list'),
        ('{"examples": [{"input": "a"}], "query": {"input": "x", "answer": "y"}}', "example 1 must be an object"),
        ('{"examples": [{"input": "a", "output": "b"}]}', '"query" must be an object'),
        (ICL.format(query='{"input": "x"}'), '"query" must be an object with "input", "answer"'),
        (ICL.format(query='{"input": "x", "options": ["y", "z"], "answer": "w"}'), "not one of the options"),
        (ICL.format(query='{"input": "x", "options": ["y", "y"], "answer": "y"}'), "options repeat"),
        (ICL.format(query='{"input": "x", "options": "y", "answer": "y"}'), '"options" must be a list'),
        (ICL.format(query='{"input": "", "answer": "y"}'), "query input is empty"),
        (ICL.format(query='{"input": "x", "answer": "y", "evidence": 2}'), '"evidence" must be the number (1..1)'),
        (ICL.format(query='{"input": "x", "answer": "y", "evidence": true}'), '"evidence" must be the number'),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{GOOD}\n\n{line}\n{GOOD}\n")  # the bad line is line 3 (blank lines still count)
    with pytest.raises(DataError) as err:
        read_episodes_jsonl(path)
    text = str(err.value)
    assert f"{path}:3: " in text and message in text and "\n" not in text


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_no_episodes(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match="no episodes"):
        read_episodes_jsonl(path)


def test_bad_paths(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_episodes_jsonl(tmp_path / "missing.jsonl")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="not .jsonl"):
        read_episodes_jsonl(tmp_path / "notes.txt")
    with pytest.raises(DataError, match="chitchat, analogy, recall"):
        load_episodes("nosuchsource", "train")
    with pytest.raises(DataError, match="unknown split"):
        load_episodes(str(DATA / "dialogue.jsonl"), "dev")


def test_truncated_keeps_last_chunks():
    episode = Episode(("a\n", "b\n", "c\n"), "q", " x", (" x", " y"))
    assert episode.truncated(2) == Episode(("b\n", "c\n"), "q", " x", (" x", " y"))
    assert episode.truncated(3) == episode
    for t in (0, 4):
        with pytest.raises(DataError, match="3 chunks"):
            episode.truncated(t)


def test_truncated_keeps_the_evidence_chunk():
    chunks = tuple(f"{c}\n" for c in "abcdefgh")
    # The evidence is among the last t: plain truncation, the evidence index shifts.
    assert Episode(chunks, "q", " x", evidence=6).truncated(3) == Episode(chunks[5:], "q", " x", evidence=1)
    # Older than the last t: it replaces the kept chunk at position evidence % t.
    assert Episode(chunks, "q", " x", evidence=1).truncated(3) == Episode(("f\n", "b\n", "h\n"), "q", " x", evidence=1)
    assert Episode(chunks, "q", " x", evidence=0).truncated(1) == Episode(("a\n",), "q", " x", evidence=0)
    assert Episode(chunks, "q", " x", evidence=2).truncated(8).chunks == chunks
    # Every position of a kept window is used as t varies (no fixed place for the evidence).
    assert {Episode(chunks, "q", " x", evidence=e).truncated(4).evidence for e in range(8)} == {0, 1, 2, 3}
    with pytest.raises(DataError, match="evidence chunk 8"):
        Episode(chunks, "q", " x", evidence=8)


def test_tokenized_truncation_matches_text_truncation():
    from kvcondense.methods import tokenize_episode

    class CharTokenizer:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    episode = Episode(tuple(f"{c}\n" for c in "abcdef"), "q", " x", evidence=1)
    tokens = tokenize_episode(episode, CharTokenizer())
    for t in range(1, 7):
        want = tokenize_episode(episode.truncated(t), CharTokenizer())
        got = tokens.truncated(t)
        assert got.evidence == want.evidence and all(map(torch.equal, got.chunks, want.chunks))
    assert tokens.truncated(0).chunks == [] and tokens.truncated(0).evidence is None
    with pytest.raises(DataError, match="not one of the options"):
        Episode(("a\n",), "q", " z", (" x", " y"))


def _conversations(path, n: int, reverse: bool = False):
    lines = [json.dumps({"turns": [f"hello number {i}", f"reply {i}", f"bye {i}"]}) for i in range(n)]
    path.write_text("\n".join(reversed(lines) if reverse else lines))
    return path


def test_splits_disjoint_complete_and_order_free(tmp_path):
    path = _conversations(tmp_path / "a.jsonl", 200)
    splits = {s: load_episodes(str(path), s) for s in ("train", "validation", "test")}
    answers = {s: {e.answer for e in eps} for s, eps in splits.items()}
    assert sum(map(len, answers.values())) == len(set().union(*answers.values())) == 200
    assert 120 < len(answers["train"]) < 190 and answers["validation"] and answers["test"]
    # Same split for the same lines in another order and on a second load.
    reordered = _conversations(tmp_path / "b.jsonl", 200, reverse=True)
    for s, eps in splits.items():
        assert {e.answer for e in load_episodes(str(reordered), s)} == answers[s]
        assert load_episodes(str(path), s) == eps


def test_builtin_sources_are_cached_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCONDENSE_CACHE", str(tmp_path))
    calls = []

    def fake(seed: int) -> list[tuple[str, Episode]]:
        calls.append(seed)
        return [(f"fake:{i}", Episode((f"c{i}\n",), "q", f" {i + seed}")) for i in range(50)]

    monkeypatch.setitem(EPISODE_SOURCES, "fake", fake)
    first = load_episodes("fake", "train", seed=1)
    assert load_episodes("fake", "train", seed=1) == first and calls == [1]  # second load from the cache
    assert load_episodes("fake", "train", seed=2) != first and calls == [1, 2]
    files = sorted(p.name for p in (tmp_path / "corpora").iterdir())
    assert files == [f"episodes-v{episodes_module.CACHE_VERSION}-fake-seed{s}.json" for s in (1, 2)]


# ---- built-in sources: need the chitchat-dataset and gensim wheels ----


@pytest.mark.slow
@pytest.mark.parametrize("name", ["chitchat", "analogy", "recall"])
def test_builtin_source(name):
    items = EPISODE_SOURCES[name](0)
    ids = [i for i, _ in items]
    # An analogy pair may belong to two relations (the 23 common capitals are also world capitals): two episodes.
    assert len(ids) >= 500 and len(set(ids)) == len(ids) - (23 if name == "analogy" else 0)
    splits = {s: load_episodes(name, s) for s in ("train", "validation", "test")}
    assert sum(map(len, splits.values())) == len(items) and all(len(v) >= 40 for v in splits.values())
    assert load_episodes(name, "test") == splits["test"]  # deterministic
    for episode in splits["test"]:
        assert episode.chunks and all(c.endswith("\n") for c in episode.chunks)
        if name != "chitchat":
            assert len(episode.chunks) == 16 and len(set(episode.options)) == 4 and episode.answer in episode.options
            assert all(o.startswith(" ") for o in episode.options)
    for t in (1, 2, 4, 8, 16):
        assert sum(len(e.chunks) >= t for e in splits["test"]) >= 40


@pytest.mark.slow
def test_analogy_held_out_queries_never_appear_as_examples():
    train_chunks = {c for e in load_episodes("analogy", "train") for c in e.chunks}
    for split in ("validation", "test"):
        for e in load_episodes("analogy", split):
            held_out = e.query.replace("Input: ", "").replace("\nOutput:", "")
            assert f"Input: {held_out}\nOutput:{e.answer}\n" not in train_chunks
            assert all(not c.startswith(f"Input: {held_out}\n") for c in e.chunks)


@pytest.mark.slow
def test_recall_facts_are_distinct_and_seeded():
    for e in load_episodes("recall", "validation"):
        subjects = [c.split(" is ")[0] for c in e.chunks]
        values = [c.split(" is ")[1] for c in e.chunks]
        assert len(set(subjects)) == len(set(values)) == 16
        assert f"{e.query}{e.answer}.\n" in e.chunks
        for t in (1, 2, 4, 8, 16):  # the asked fact survives every cut
            cut = e.truncated(t)
            assert len(cut.chunks) == t and cut.chunks[cut.evidence] == f"{e.query}{e.answer}.\n"
    assert load_episodes("recall", "validation", seed=1) != load_episodes("recall", "validation", seed=0)


@pytest.mark.slow
def test_recall_quiz_states_four_facts_of_the_same_episodes():
    recall, quiz = load_episodes("recall", "validation"), load_episodes("recall-quiz", "validation")
    assert len(recall) == len(quiz)
    for r, q in zip(recall, quiz, strict=True):
        assert q.chunks == r.chunks and q.query == r.query and not q.options
        assert q.answer.startswith(f"{r.answer}.\n")
        stated = f"{q.query}{q.answer}".splitlines(keepends=True)
        assert len(stated) == 4 and len(set(stated)) == 4 and set(stated) <= set(q.chunks)


def test_quiz_episode_format():
    from kvcondense.data.episodes import recall_quiz_episode

    facts = [("Athens", "banana"), ("Oslo", "red"), ("Lima", "cat")]
    e = recall_quiz_episode(facts, [2, 0])
    assert e.query == "The code word for Lima is"
    assert e.answer == " cat.\nThe code word for Athens is banana.\n"
    assert len(e.chunks) == 3 and e.chunks[1] == "The code word for Oslo is red.\n"
