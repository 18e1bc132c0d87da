"""QA over a compressed context: the .jsonl format, one compression per context whatever its questions, option
scoring equal to a plain full-context forward, the needle generator and grid, and the CLI."""

import json

import pytest
import torch

import kvcondense.qa_task as qa
from kvcondense.cli import main
from kvcondense.data import load_split
from kvcondense.data.documents import DataError
from kvcondense.methods import build_method, tokenize
from kvcondense.models import load_model

LITERAL = [
    {
        "context": "Alice lives in Paris. Bob lives in Rome. The cat is black.",
        "questions": [
            {"question": "Where does Alice live?", "answer": "Paris", "options": ["Paris", "Rome"]},
            {"question": "What colour is the cat?", "answer": "black"},
        ],
    },
    {"context": "The meeting is on Tuesday in room 4.", "question": "Which room?", "answer": "room 4",
     "options": ["room 4", "room 7", "room 9"]},
]  # fmt: skip


@pytest.fixture
def qa_file(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(o) + "\n" for o in LITERAL))
    return path


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model(str(tiny_dir))


def test_both_line_formats_are_read(qa_file):
    items = qa.read_qa(qa_file)
    assert [len(i.questions) for i in items] == [2, 1]
    assert items[0].questions[0].options == ("Paris", "Rome") and items[0].questions[1].options == ()
    assert items[1].questions[0].answer == "room 4"


@pytest.mark.parametrize(
    "line, match",
    [
        ('{"question": "q", "answer": "a"}', '"context"'),
        ('{"context": "c", "questions": []}', "non-empty list"),
        ('{"context": "c", "question": "q"}', '"answer"'),
        ('{"context": "c", "question": "q", "answer": "a", "options": ["b", "c"]}', "not one of its options"),
        ('{"context": "c", "question": "q", "answer": "a", "options": ["a"]}', "one option"),
    ],
)
def test_malformed_lines_name_the_line(tmp_path, line, match):
    (f := tmp_path / "bad.jsonl").write_text(json.dumps(LITERAL[1]) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=match) as e:
        qa.read_qa(f)
    assert "bad.jsonl:2" in str(e.value)


def test_every_context_is_compressed_once_whatever_its_questions(tiny, qa_file, monkeypatch):
    model, tok = tiny
    calls = []
    real = qa.Stream.prefill

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(qa.Stream, "prefill", counting)
    items = qa.read_qa(qa_file) * 3
    res = qa_task = qa.qa_task(model, tok, build_method("streaming", ratio=0.5), {}, items)
    assert len(calls) == len(items) == res["compressions"] and res["questions"] == 9
    assert 0 <= qa_task["accuracy"] <= 1 and res["kv_kept"] == pytest.approx(0.5, abs=0.1)


def test_option_scores_equal_a_plain_forward_and_leave_the_cache_alone(tiny, qa_file):
    model, tok = tiny
    item = qa.read_qa(qa_file)[0]
    q = item.questions[0]
    ctx = tokenize(item.context, tok)
    stream = qa.Stream(model, build_method("full"), {})
    stream.prefill(ctx, chunk_tokens=512)
    layout, cache = stream.layouts[0], stream.cache
    cache.freeze()
    before = int(cache.stored_slots()[0])
    _, pick = qa.answer(model, tok, cache, len(layout), len(layout), q, 8)
    assert int(cache.stored_slots()[0]) == before  # every option read a copy
    prompt = tok(qa.PROMPT.format(question=q.question), add_special_tokens=False)["input_ids"]
    scores = []
    for option in q.options:
        opt = tok(" " + option, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ctx.ids.tolist() + prompt + opt])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        start = ids.shape[1] - len(opt)
        scores.append(float(logp[torch.arange(start - 1, ids.shape[1] - 1), torch.tensor(opt)].sum()))
    assert pick == q.options[max(range(len(scores)), key=scores.__getitem__)]


def test_normalised_exact_match():
    assert qa.normalise("The  Room 4!") == qa.normalise("room 4") == "room 4"


def test_needle_sits_at_its_depth_and_the_grid_counts_every_cell(tiny, sample_path):
    model, tok = tiny
    docs = load_split(str(sample_path), "train")
    items = qa.needle_items(docs, tok, (128, 256), (0.0, 0.5, 1.0), per_cell=2, seed=0)
    assert len(items) == 12
    for item in items:
        key = item.questions[0].answer
        needle = f" The passkey is {key}. Remember it: {key}. "
        at = item.context.index(needle)
        hay = len(item.context) - len(needle)
        assert abs(at / hay - item.tags["depth"]) < 0.1, (at, hay, item.tags)
        assert item.questions[0].options and not item.questions[1].options
        assert abs(len(tokenize(item.context, tok)) - item.tags["length"]) <= 8
    res = qa.qa_task(model, tok, build_method("full"), {}, items[:4])
    grid = qa.needle_grid(res["rows"])
    assert sum(c["n"] for c in grid) == 8 and {c["mode"] for c in grid} == {"options", "generate"}


def test_cli_qa_writes_accuracy_kv_kept_and_tasks(capsys, tiny_dir, qa_file, tmp_path):
    out, tasks = tmp_path / "r.json", tmp_path / "t.json"
    argv = ["eval", "--task", "qa", "--data", qa_file, "--method", "streaming", "--kv-budget", "0.5", "--model",
            tiny_dir, "--json", out, "--export-tasks", tasks, "--reference"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert 0 <= row["full_accuracy"] <= 1  # the same model with nothing compressed
    assert row["kind"] == "qa" and row["questions"] == 3 and row["contexts"] == 2 and row["kv_budget"] == 0.5
    exported = json.loads(tasks.read_text())
    assert exported["task"] == "qa" and exported["items"][0]["questions"][0]["answer_index"] == 0
    assert "options" not in exported["items"][0]["questions"][1]


def test_cli_qa_bad_file_is_one_line(capsys, tiny_dir, tmp_path):
    (f := tmp_path / "q.jsonl").write_text('{"context": "c"}\n')
    assert main(["eval", "--task", "qa", "--data", str(f), "--method", "full", "--model", str(tiny_dir)]) == 2
    assert "q.jsonl:1" in capsys.readouterr().err


def test_episodes_with_options_are_asked_verbatim(tiny, tmp_path):
    from kvcondense.data.episodes import Episode

    ep = Episode(("The code for A is x.\n", "The code for B is y.\n"), "The code for A is", " x", (" x", " y"))
    (item,) = qa.episodes_as_qa([ep, Episode(("c\n",), "q", " a")], limit=5)  # the one without options is left out
    q = item.questions[0]
    assert item.context == "The code for A is x.\nThe code for B is y.\n"
    assert q.prompt() == "The code for A is" and q.option_text(" y") == " y"
    model, tok = tiny
    res = qa.qa_task(model, tok, build_method("full"), {}, [item])
    assert res["questions"] == 1 and res["rows"][0]["prediction"] in (" x", " y")


def test_cli_qa_on_built_in_recall_data(capsys, tiny_dir, tmp_path, monkeypatch):
    from kvcondense.data import episodes
    from kvcondense.data.episodes import Episode

    ep = Episode(("The code for A is x.\n",) * 3, "The code for A is", " x", (" x", " y"))
    monkeypatch.setattr(episodes, "load_episodes", lambda name, split, seed=0: [ep] * 4)
    monkeypatch.setattr(episodes, "is_episode_data", lambda name: True)
    out = tmp_path / "r.json"
    argv = ["eval", "--task", "qa", "--data", "recall", "--method", "full", "--model", tiny_dir, "--episodes", "3",
            "--json", out]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    assert json.loads(out.read_text())["results"][0]["questions"] == 3


def test_recall_multi_query_asks_more_facts_of_one_compressed_context(tiny, monkeypatch):
    """--questions 4: the episode's own question first, then three more about other facts, each with four options
    drawn from the episode's values, the right one among them; every question reads the one compressed context."""
    from kvcondense.data.episodes import recall_episode

    facts = [(f"City{i}", f"word{i}") for i in range(16)]
    ep = recall_episode(facts, 5, ["word5", "word1", "word2", "word3"])
    (item,) = qa.episodes_as_qa([ep], limit=1, questions=4)
    first, *more = item.questions
    assert first.prompt() == "The code word for City5 is" and first.answer == " word5"
    subjects = {q.prompt().removeprefix("The code word for ").removesuffix(" is") for q in more}
    assert len(subjects) == 3 and "City5" not in subjects
    for q in more:
        i = int(q.prompt().split("City")[1].split()[0])
        assert q.answer == f" word{i}" and q.answer in q.options and len(set(q.options)) == 4
    assert qa.episodes_as_qa([ep], 1, 4) == [item]  # the same questions every time
    calls = []
    real = qa.Stream.prefill
    monkeypatch.setattr(qa.Stream, "prefill", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    model, tok = tiny
    res = qa.qa_task(model, tok, build_method("streaming", ratio=0.5), {}, [item])
    assert res["questions"] == 4 and res["contexts"] == 1 and len(calls) == 1


def test_multi_query_needs_recall_facts():
    from kvcondense.data.episodes import Episode

    ep = Episode(("x is 1.\n", "y is 2.\n"), "x is", " 1", (" 1", " 2"))
    with pytest.raises(DataError, match="--questions > 1 needs --data recall"):
        qa.episodes_as_qa([ep], 1, questions=2)
