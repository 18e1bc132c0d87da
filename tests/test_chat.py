"""CCM from the command line: train on dialogue .jsonl, the online-memory table with baselines, and chat with
piped stdin (memory statistics, save/load, bad input)."""

import json
import re

import pytest
from test_cli import one_line_error, run

from kvcondense.cli import main


@pytest.fixture(scope="module")
def dialogues(sample_path, tmp_path_factory):
    """Forty 6-turn dialogues made of the sample's sentences, and forty 4-option ICL episodes."""
    sample_text = sample_path.read_text()
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", sample_text) if 3 < len(s.split()) < 30]
    folder = tmp_path_factory.mktemp("episodes")
    with open(folder / "dialogue.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"turns": [sentences[(i * 6 + k) % len(sentences)] for k in range(6)]}) + "\n")
    words = sorted({w.lower() for w in re.findall(r"[A-Za-z]{4,}", sample_text)})
    with open(folder / "icl.jsonl", "w") as f:
        for i in range(40):
            pick = [words[(i * 7 + k * 13) % len(words)] for k in range(10)]
            examples = [{"input": pick[k], "output": pick[k][::-1]} for k in range(6)]
            options = [pick[6][::-1], pick[7], pick[8], pick[9]]
            f.write(
                json.dumps(
                    {"examples": examples, "query": {"input": pick[6], "options": options, "answer": options[0]}}
                )
                + "\n"
            )
    return folder


@pytest.fixture(scope="module")
def ccm_checkpoints(tiny_dir, dialogues, tmp_path_factory):
    out = {}
    for method in ("ccm-concat", "ccm-merge"):
        path = tmp_path_factory.mktemp("ccm") / method
        argv = [
            "train",
            "--method",
            method,
            "--comp-tokens",
            "2",
            "--model",
            tiny_dir,
            "--data",
            dialogues / "dialogue.jsonl",
            "--steps",
            "2",
            "--block-tokens",
            "128",
            "--out",
            path,
        ]
        assert main([str(a) for a in argv]) == 0
        out[method] = path
    return out


def chat(capsys, monkeypatch, checkpoint, tiny_dir, text, *extra):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    rc = main(
        ["chat", "--checkpoint", str(checkpoint), "--model", str(tiny_dir), "--max-new-tokens", "4", *map(str, extra)]
    )
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.parametrize("method", ["ccm-concat", "ccm-merge"])
def test_chat_piped_stdin_reports_memory(capsys, monkeypatch, ccm_checkpoints, tiny_dir, method):
    rc, out, _ = chat(
        capsys, monkeypatch, ccm_checkpoints[method], tiny_dir, "hello there\nhow is the weather\nfine\n", "--stats"
    )
    assert rc == 0
    stats = [line for line in out.splitlines() if line.startswith("memory:")]
    assert len(stats) == 3
    slots = [int(re.match(r"memory: (\d+) slots, (\d+) bytes", s).group(1)) for s in stats]
    nbytes = [int(re.match(r"memory: (\d+) slots, (\d+) bytes", s).group(2)) for s in stats]
    replies = [line for line in out.splitlines() if line.startswith("B:")]
    assert len(replies) == 3
    if method == "ccm-merge":
        assert slots == [2, 2, 2]  # constant n slots
    else:  # n slots per compressed turn: the user's line and the reply (when it is not empty)
        turns = [1 + bool(r[2:].strip()) for r in replies]
        assert slots == [2 * sum(turns[: i + 1]) for i in range(3)]
    assert all(b == nbytes[0] // slots[0] * s for b, s in zip(nbytes, slots, strict=True))


def test_chat_save_load_and_bad_input(capsys, monkeypatch, ccm_checkpoints, tiny_dir, tmp_path):
    memory = tmp_path / "memory.safetensors"
    rc, out, err = chat(capsys, monkeypatch, ccm_checkpoints["ccm-merge"], tiny_dir, "hi\n\nbye\n", "--save", memory)
    assert rc == 1 and "the turn is empty" in err  # piped input with a rejected turn is not a clean run
    assert memory.exists()
    rc, out, err = chat(
        capsys, monkeypatch, ccm_checkpoints["ccm-merge"], tiny_dir, "again\n", "--load", memory, "--stats"
    )
    assert rc == 0 and "memory: 2 slots" in out
    rc, _, err = chat(capsys, monkeypatch, ccm_checkpoints["ccm-concat"], tiny_dir, "x\n", "--load", memory)
    assert rc == 2 and "made with another checkpoint" in err and "Traceback" not in err


def test_memory_eval_with_baselines(capsys, ccm_checkpoints, tiny_dir, dialogues, tmp_path):
    out = tmp_path / "rows.json"
    rc, err = run(
        capsys,
        "eval",
        "--checkpoint",
        ccm_checkpoints["ccm-concat"],
        "--model",
        tiny_dir,
        "--data",
        dialogues / "dialogue.jsonl",
        "--split",
        "train",
        "--time-steps",
        "1",
        "4",
        "--episodes",
        "3",
        "--baselines",
        "--verify",
        "--json",
        out,
    )
    assert rc == 0, err
    rows = json.loads(out.read_text())["results"]
    other = {r["t"]: r for r in rows if r.get("other_memory")}
    by = {(r["method"], r["t"]): r for r in rows if not r.get("other_memory")}
    assert set(by) == {(m, t) for m in ("ccm-concat", "no-context", "full", "window") for t in (1, 4)}
    assert set(other) == {1, 4} and all(r["method"] == "ccm-concat" for r in other.values())
    assert other[4]["kv_slots"] == by[("ccm-concat", 4)]["kv_slots"]  # the same memory size, another episode's
    assert other[4]["perplexity"] != by[("ccm-concat", 4)]["perplexity"]
    assert by[("ccm-concat", 4)]["kv_slots"] == 8 and by[("window", 4)]["kv_slots"] == 8  # same budget
    assert by[("no-context", 1)]["kv_mb"] == 0 and by[("full", 4)]["kv_slots"] > by[("full", 1)]["kv_slots"]
    assert all(r["perplexity"] > 1 for r in rows)
    assert rows[0]["verify"]["max_abs_diff"] < 1e-4


def test_accuracy_on_icl_episodes(capsys, ccm_checkpoints, tiny_dir, dialogues, tmp_path):
    out = tmp_path / "acc.json"
    rc, err = run(
        capsys,
        "eval",
        "--checkpoint",
        ccm_checkpoints["ccm-merge"],
        "--model",
        tiny_dir,
        "--data",
        dialogues / "icl.jsonl",
        "--split",
        "train",
        "--time-steps",
        "2",
        "--episodes",
        "4",
        "--json",
        out,
    )
    assert rc == 0, err
    row = json.loads(out.read_text())
    assert row["metric"] == "accuracy" and 0 <= row["accuracy"] <= 1 and row["kv_slots"] == 2


def test_bad_ccm_input(capsys, tiny_dir, dialogues, tmp_path):
    one_line_error(
        capsys,
        "train",
        "--method",
        "ccm-merge",
        "--comp-tokens",
        "9",
        "--model",
        tiny_dir,
        "--data",
        dialogues / "dialogue.jsonl",
        "--out",
        tmp_path / "x",
        match="comp tokens must be in 1..8",
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"turns": ["a", "b"]}\n{"turns": ["a", \n')
    one_line_error(
        capsys,
        "train",
        "--method",
        "ccm-concat",
        "--model",
        tiny_dir,
        "--data",
        bad,
        "--out",
        tmp_path / "y",
        match=":2",
    )
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(
        '{"examples": [{"input": "a", "output": "b"}], "query": {"input": "c", "options": ["d"], "answer": "e"}}\n'
    )
    one_line_error(capsys, "eval", "--method", "full", "--data", wrong, "--model", tiny_dir, match="not")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_streaming_eval_applies_window_and_sinks_to_a_checkpoint(
    capsys, ccm_checkpoints, tiny_dir, sample_path, tmp_path
):
    out = tmp_path / "stream.json"
    argv = [
        "eval",
        "--checkpoint",
        ccm_checkpoints["ccm-merge"],
        "--model",
        tiny_dir,
        "--data",
        sample_path,
        "--block-tokens",
        "96",
        "--max-tokens",
        "192",
        "--window",
        "24",
        "--sinks",
        "2",
        "--verify",
        "--json",
        out,
    ]
    rc, err = run(capsys, *argv)
    assert rc == 0, err
    row = json.loads(out.read_text())
    assert row["params"]["window"] == 24 and row["params"]["sinks"] == 2
    assert row["verify"]["max_abs_diff"] < 1e-4


def test_other_memory_pairs_each_query_with_the_next_episodes_chunks():
    import torch

    from kvcondense.memory_eval import other_memory
    from kvcondense.methods import EpisodeTokens

    eps = [EpisodeTokens([torch.tensor([i, i])], torch.tensor([10 + i]), torch.tensor([20 + i])) for i in range(3)]
    got = other_memory(eps)
    assert [int(e.chunks[0][0]) for e in got] == [1, 2, 0]
    assert [int(e.query[0]) for e in got] == [10, 11, 12] and [int(e.answer[0]) for e in got] == [20, 21, 22]
