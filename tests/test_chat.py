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
    said = [line for line in out.splitlines() if line[:2] in ("A:", "B:")]  # piped lines echoed, each before its reply
    assert said[0::2] == ["A: hello there", "A: how is the weather", "A: fine"] and said[1::2] == replies
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
    (row,) = json.loads(out.read_text())["results"]
    assert (
        row["kind"] == "memory" and row["metric"] == "accuracy" and 0 <= row["accuracy"] <= 1 and row["kv_slots"] == 2
    )


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
    (row,) = json.loads(out.read_text())["results"]
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


def gpt2_session(method: str, n_positions: int = 48, **params):
    """A chat session on a tiny GPT-2 (learned positions: an index past n_positions crashes the embedding)."""
    import torch
    from conftest import DATA, build_tokenizer
    from transformers import AutoModelForCausalLM, GPT2Config

    from kvcondense.lora import LoraSettings, attach_lora
    from kvcondense.methods import build_method
    from kvcondense.models import add_special_tokens
    from kvcondense.session import MemorySession

    tokenizer = build_tokenizer((DATA / "sample.txt").read_text())
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=n_positions)
    model = AutoModelForCausalLM.from_config(cfg)
    m = build_method(method, comp_tokens=2, **params)
    token_ids = add_special_tokens(model, tokenizer, m.special_tokens)
    if m.lora_on is not None:
        model = attach_lora(model, LoraSettings(r=4), list(token_ids.values()), m.lora_on)
    return MemorySession(model.eval(), tokenizer, m, token_ids, name="tiny-gpt2")


@pytest.mark.parametrize("method", ["ccm-concat", "ccm-merge", "full"])
def test_chat_stops_before_the_models_context_and_keeps_the_memory(method, tmp_path):
    """A long chat on a model with 48 learned positions: the turn that would pass position 47 is refused with the
    position and the limit (it used to crash in the position embedding and lose the memory), and the memory is the
    one after the last whole turn, which can still be saved and loaded."""
    import io

    from kvcondense.chat_loop import chat
    from kvcondense.session import ContextFullError

    session = gpt2_session(method)
    out, err = io.StringIO(), io.StringIO()
    states = []

    class Lines:  # record the memory before each turn
        def __iter__(self):
            for i in range(40):
                states.append((session.writer.state(), session.memory_slots(), session.cache.seen))
                yield f"turn {i} says hello\n"

    with pytest.raises(ContextFullError, match=r"would reach position \d+, past the model's context of 48"):
        chat(session, Lines(), out, err, max_new_tokens=4)
    assert err.getvalue() == ""
    replies = [line for line in out.getvalue().splitlines() if line.startswith("B:")]
    assert 1 <= len(replies) == len(states) - 1  # the refused turn printed nothing
    assert (session.writer.state(), session.memory_slots(), session.cache.seen) == states[-1]
    assert session.writer.text_pos <= 48  # positions 0..47 used at most
    path = session.save(tmp_path / "memory.safetensors")
    again = gpt2_session(method)
    again.load(path)
    assert again.writer.state() == session.writer.state()


def test_a_failing_turn_is_undone_whole_and_named(tmp_path):
    """A turn that fails after its user line went into memory (here: while answering) leaves the memory as before
    the turn, says so in one line, and lets the error through."""
    import io

    from kvcondense.chat_loop import chat

    session = gpt2_session("ccm-merge", n_positions=256)
    chat(session, ["hello there\n"], io.StringIO(), io.StringIO(), max_new_tokens=3)
    before = session.save(tmp_path / "before.safetensors").read_bytes()
    calls = []

    def fail_on_answer(*args):
        calls.append(1)
        if len(calls) > 1:  # the user's line has been fed; the answer fails
            raise RuntimeError("device lost")

    handle = session.model.register_forward_pre_hook(fail_on_answer)
    err = io.StringIO()
    with pytest.raises(RuntimeError, match="device lost"):
        chat(session, ["and now?\n"], io.StringIO(), err, max_new_tokens=3)
    handle.remove()
    assert len(calls) == 2 and err.getvalue().count("\n") == 1 and "memory is as before" in err.getvalue()
    assert session.save(tmp_path / "after.safetensors").read_bytes() == before


def test_answer_that_would_pass_the_context_is_refused():
    from kvcondense.session import ContextFullError

    session = gpt2_session("full", n_positions=32)
    session.feed("one two three four five six")
    slots = session.memory_slots()
    with pytest.raises(ContextFullError, match="this answer would reach position"):
        session.answer("B:", max_new_tokens=40)
    assert session.memory_slots() == slots
    assert session.answer("B:", max_new_tokens=4) is not None
