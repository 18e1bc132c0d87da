"""Untrusted input through the command line: crafted, damaged and foreign memory files for ``chat --load``,
unwritable ``chat --save`` paths, and unreadable result files for ``report``. Each is refused with exit status 2
and one stderr line naming the file and the problem (never a traceback, never a silent run), and every user file
is byte for byte what it was."""

import io
import json
import os
import re

import pytest
import torch
from conftest import DATA, build_tokenizer
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from kvcondense.cli import main


# ---------------------------------------------------------------------------------------------------------- helpers
def cli(capsys, monkeypatch, *argv, stdin=""):
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(capsys, monkeypatch, folder, *argv, match, stdin="hello\n"):
    """Run the CLI; assert exit 2, one stderr line with ``match`` (a regex), no traceback, ``folder`` unchanged."""
    before = files(folder)
    rc, _, err = cli(capsys, monkeypatch, *argv, stdin=stdin)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert re.search(match, lines[0]) and "error:" in lines[0] and "Traceback" not in err, lines[0]
    assert files(folder) == before
    return lines[0]


def sentences() -> list[str]:
    text = (DATA / "sample.txt").read_text()
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 3 < len(s.split()) < 20]


@pytest.fixture(scope="module")
def dialogues(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "dialogue.jsonl"
    said = sentences()
    path.write_text(
        "".join(json.dumps({"turns": [said[(i * 4 + k) % len(said)] for k in range(4)]}) + "\n" for i in range(12))
    )
    return path


def train(out, method, model, data, *extra):
    argv = ["train", "--method", method, "--model", model, "--data", data, "--steps", "1", "--out", out, *extra]
    assert main([str(a) for a in argv]) == 0
    return out


@pytest.fixture(scope="module")
def merge_ck(tiny_dir, dialogues, tmp_path_factory):
    out = tmp_path_factory.mktemp("ck") / "merge"
    return train(out, "ccm-merge", tiny_dir, dialogues, "--comp-tokens", "2", "--block-tokens", "128")


@pytest.fixture(scope="module")
def real_memory(merge_ck, tiny_dir, tmp_path_factory):
    """A memory saved by ``chat --save`` (bytes), and its tensors and bookkeeping to craft others from."""
    path = tmp_path_factory.mktemp("mem") / "memory.safetensors"
    argv = ["chat", "--checkpoint", merge_ck, "--model", tiny_dir, "--max-new-tokens", "3", "--save", path]
    mp = pytest.MonkeyPatch()
    mp.setattr("sys.stdin", io.StringIO("hello there\nhow are you\n"))
    try:
        assert main([str(a) for a in argv]) == 0
    finally:
        mp.undo()
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    info = json.loads(json.loads(data[8 : 8 + n])["__metadata__"]["kvcondense"])
    return data, load_tensors(data), info


def craft(real, tensors=None, info=None, metadata=None) -> bytes:
    """A memory file from the real one's tensors and bookkeeping, changed by ``tensors`` and ``info``."""
    _, t, i = real
    t = {k: v.clone() for k, v in t.items()}
    i = json.loads(json.dumps(i))
    if tensors:
        tensors(t)
    if info:
        info(i)
    return save_tensors(t, metadata=metadata if metadata is not None else {"kvcondense": json.dumps(i)})


def raw_header(header: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header


def _set(d, key, value):
    d[key] = value


def _writer(key, value):
    return lambda i: _set(i["writer"], key, value)


DEEP = "[" * 50_000 + "]" * 50_000

# (case, file bytes from the real memory, what the error line says)
BAD_MEMORY = [
    ("empty", lambda r: b"", "is empty"),
    ("too-short", lambda r: b"abc", "not a safetensors memory file"),
    ("text-file", lambda r: b"hello, I am not a memory file at all\n" * 4, "truncated or not a safetensors"),
    ("half", lambda r: r[0][: len(r[0]) // 2], "truncated"),
    ("last-bytes-cut", lambda r: r[0][:-3], "truncated"),
    ("trailing-bytes", lambda r: r[0] + b"\0\0", "trailing bytes"),
    ("header-not-json", lambda r: raw_header(b"{not json"), "header is not JSON"),
    ("header-not-utf8", lambda r: raw_header(b'{"\xff\xfe": 1}'), "not UTF-8"),
    ("header-nested", lambda r: raw_header(DEEP.encode()), "nested too deeply"),
    ("metadata-nested", lambda r: craft(r, metadata={"kvcondense": DEEP}), "nested too deeply"),
    ("metadata-not-json", lambda r: craft(r, metadata={"kvcondense": "{'python': 'dict'}"}), "metadata is not JSON"),
    ("no-metadata", lambda r: craft(r, metadata={}), "no kvcondense metadata"),
    ("other-format", lambda r: craft(r, info=lambda i: _set(i, "format", "kvcondense-memory/0")), "not a kvcondense"),
    ("other-checkpoint", lambda r: craft(r, info=lambda i: _set(i, "identity", "0" * 16)), "another checkpoint"),
    ("extra-field", lambda r: craft(r, info=lambda i: _set(i, "eval", "__import__('os')")), "unexpected field"),
    ("no-seen", lambda r: craft(r, info=lambda i: i.pop("seen")), "missing field"),
    ("steps+1", lambda r: craft(r, info=_writer("steps", r[2]["writer"]["steps"] + 1)), "inconsistent counters"),
    ("next+1", lambda r: craft(r, info=_writer("next", r[2]["writer"]["next"] + 1)), "inconsistent counters|seen="),
    ("text_pos-1", lambda r: craft(r, info=_writer("text_pos", r[2]["writer"]["text_pos"] - 1)), "inconsistent"),
    ("seen+5", lambda r: craft(r, info=lambda i: _set(i, "seen", i["seen"] + 5)), "seen="),
    ("negative-steps", lambda r: craft(r, info=_writer("steps", -1)), r"steps=-1, not a count"),
    ("bool-steps", lambda r: craft(r, info=_writer("steps", True)), "not a count"),
    ("string-next", lambda r: craft(r, info=_writer("next", "12")), "not a count"),
    ("huge-next", lambda r: craft(r, info=_writer("next", 10**30)), "not a count"),
    ("writer-not-object", lambda r: craft(r, info=lambda i: _set(i, "writer", [1, 2])), "malformed writer"),
    ("memory-shifted", lambda r: craft(r, info=_writer("memory", [m - 1 for m in r[2]["writer"]["memory"]])), "memory"),
    ("slot-index-moved", lambda r: craft(r, tensors=lambda t: t["slot_idx"].sub_(1)), "slot bookkeeping"),
    ("slot-expires", lambda r: craft(r, tensors=lambda t: t["slot_expire"].fill_(3)), "slot bookkeeping"),
    (
        "an-extra-slot",
        lambda r: craft(r, tensors=lambda t: _set(t, "keys.0", torch.cat([t["keys.0"], t["keys.0"][:, :, :1]], 2))),
        r"keys\.0 of shape",
    ),
    ("keys-float64", lambda r: craft(r, tensors=lambda t: _set(t, "keys.1", t["keys.1"].double())), "dtype"),
    ("keys-int", lambda r: craft(r, tensors=lambda t: _set(t, "keys.1", t["keys.1"].long())), "dtype"),
    ("slots-int32", lambda r: craft(r, tensors=lambda t: _set(t, "slot_idx", t["slot_idx"].int())), "dtype"),
    ("missing-values", lambda r: craft(r, tensors=lambda t: t.pop("values.1")), "has no tensor 'values.1'"),
    ("extra-tensor", lambda r: craft(r, tensors=lambda t: _set(t, "payload", torch.zeros(3))), "unexpected tensor"),
    ("nan-keys", lambda r: craft(r, tensors=lambda t: t["keys.0"].view(-1)[5:7].fill_(float("nan"))), "NaN"),
    ("inf-values", lambda r: craft(r, tensors=lambda t: t["values.1"].view(-1)[0:1].fill_(float("inf"))), "infinite"),
]


def past_the_context(r):
    """Consistent counters and slots, but 600 positions used of the tiny model's 512."""

    def info(i):
        w = i["writer"]
        n = len(w["memory"])
        w["text_pos"] = 600
        w["next"] = i["seen"] = 600 + w["steps"] * 2 * n
        w["memory"] = list(range(w["next"] - n, w["next"]))

    return craft(r, info=info, tensors=lambda t: t["slot_idx"].copy_(torch.arange(t["slot_idx"].shape[1]) + 600))


def overlapping_offsets(r):
    """A header whose values.1 points at the bytes of keys.1 (safetensors must refuse the layout)."""
    data = r[0]
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["values.1"]["data_offsets"] = header["keys.1"]["data_offsets"]
    return raw_header(json.dumps(header).encode()) + data[8 + n :]


BAD_MEMORY += [
    ("past-the-context", past_the_context, "more than the model's context of 512"),
    ("overlapping-offsets", overlapping_offsets, "truncated|damaged"),
    ("identity-with-newline", lambda r: craft(r, info=lambda i: _set(i, "identity", "x\nsecond line")), "another"),
]


# ---------------------------------------------------------------------------------------------------- chat --load
@pytest.mark.parametrize("case, make, match", BAD_MEMORY, ids=[c[0] for c in BAD_MEMORY])
def test_crafted_memory_file_is_refused(
    capsys, monkeypatch, tmp_path, merge_ck, tiny_dir, real_memory, case, make, match
):
    bad = tmp_path / f"{case}.safetensors"
    bad.write_bytes(make(real_memory))
    line = refused(
        capsys, monkeypatch, tmp_path, "chat", "--checkpoint", merge_ck, "--model", tiny_dir, "--load", bad, match=match
    )
    assert str(bad) in line


def test_the_real_memory_loads(capsys, monkeypatch, tmp_path, merge_ck, tiny_dir, real_memory):
    """The control: the file the crafted ones are made from, and one re-saved from its parsed parts, load."""
    for name, data in (("real", real_memory[0]), ("resaved", craft(real_memory))):
        (tmp_path / name).write_bytes(data)
        rc, out, err = cli(
            capsys, monkeypatch, "chat", "--checkpoint", merge_ck, "--model", tiny_dir, "--max-new-tokens", "2",
            "--load", tmp_path / name, "--stats", stdin="again\n",
        )  # fmt: skip
        assert rc == 0 and "memory: 2 slots" in out, err


def test_memory_paths_that_are_not_files(capsys, monkeypatch, tmp_path, merge_ck, tiny_dir):
    (tmp_path / "folder").mkdir()
    common = ("chat", "--checkpoint", merge_ck, "--model", tiny_dir, "--load")
    refused(capsys, monkeypatch, tmp_path, *common, tmp_path / "folder", match="folder is not a file")
    refused(capsys, monkeypatch, tmp_path, *common, tmp_path / "none.safetensors", match="none.safetensors does not")
    adapter = merge_ck / "adapter.safetensors"  # a real safetensors file, but no memory
    line = refused(capsys, monkeypatch, merge_ck, *common, adapter, match="no kvcondense metadata")
    assert str(adapter) in line


# ---------------------------------------------------------------------------------------------------- chat --save
def test_unwritable_save_paths(capsys, monkeypatch, tmp_path, merge_ck, tiny_dir):
    (tmp_path / "a-file").write_text("keep me")
    (tmp_path / "a-folder").mkdir()
    common = ("chat", "--checkpoint", merge_ck, "--model", tiny_dir, "--max-new-tokens", "2", "--save")
    refused(capsys, monkeypatch, tmp_path, *common, tmp_path / "a-file" / "m.safetensors", match="a-file is a file")
    refused(
        capsys, monkeypatch, tmp_path, *common, tmp_path / "a-folder", match=r"a-folder\b.* is a (directory|folder)"
    )
    assert (tmp_path / "a-file").read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_save_folder(capsys, monkeypatch, tmp_path, merge_ck, tiny_dir):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        argv = ("chat", "--checkpoint", merge_ck, "--model", tiny_dir, "--save", folder / "m.safetensors")
        refused(capsys, monkeypatch, tmp_path, *argv, match="writ")
    finally:
        folder.chmod(0o755)


# ------------------------------------------------------------------ chat with a baseline and a small learned context
@pytest.fixture(scope="module")
def small_gpt2_full(dialogues, tmp_path_factory):
    """``train --method full`` on dialogues, on a tiny GPT-2 whose 64 learned positions are its whole context."""
    from transformers import AutoModelForCausalLM, GPT2Config

    folder = tmp_path_factory.mktemp("gpt2")
    tokenizer = build_tokenizer((DATA / "sample.txt").read_text())
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    ck = train(folder / "full", "full", folder / "model", DATA / "sample.txt", "--block-tokens", "32")
    return folder / "model", ck


def test_full_checkpoint_chats_until_its_context_is_full(capsys, monkeypatch, tmp_path, small_gpt2_full):
    """A full-attention checkpoint keeps every turn (it raised AttributeError); the turn that would pass position
    63 is refused with the position and the limit, instead of crashing in the position table."""
    model, ck = small_gpt2_full
    rc, out, err = cli(
        capsys, monkeypatch, "chat", "--checkpoint", ck, "--model", model, "--max-new-tokens", "3", "--stats",
        stdin="hello there\nhow are you\n",
    )  # fmt: skip
    slots = [int(s) for s in re.findall(r"memory: (\d+) slots", out)]
    assert rc == 0 and len(slots) == 2 and 0 < slots[0] < slots[1], err
    line = refused(
        capsys, monkeypatch, tmp_path, "chat", "--checkpoint", ck, "--model", model, "--max-new-tokens", "3",
        stdin="".join(f"this is line number {i} of a long chat\n" for i in range(40)),
        match=r"would reach position \d+, past the model's context of 64 positions",
    )  # fmt: skip
    assert "new chat" in line


# ---------------------------------------------------------------------------------------------------------- report
GOOD = {"method": "full", "label": "full", "params": {}, "perplexity": 9.5, "compression_ratio": 1.0,
        "tokens_scored": 64}  # fmt: skip

BAD_RESULTS = [
    ("torn.json", json.dumps(GOOD)[:-9].encode(), "torn or invalid JSON"),
    ("latin1.json", json.dumps({**GOOD, "label": "caf\xe9"}, ensure_ascii=False).encode("latin-1"), "not UTF-8"),
    ("empty.json", b"", "empty"),
    ("no-method.json", json.dumps({k: v for k, v in GOOD.items() if k != "method"}).encode(), "no 'method'"),
    ("no-metric.json", json.dumps({"method": "full", "params": {}}).encode(), "reports no metric"),
    ("no-tokens.json", json.dumps({k: v for k, v in GOOD.items() if k != "tokens_scored"}).encode(), "tokens_scored"),
    ("string-metric.json", json.dumps({**GOOD, "perplexity": "9.5"}).encode(), "'perplexity' is not a number"),
    ("garbage-list.json", json.dumps([1, "two", None, [3]]).encode(), "not an object"),
    ("nested.json", DEEP.encode(), "nested too deeply"),
    ("number.json", b"42", "not a result object"),
    ("bad-results.json", json.dumps({"results": [GOOD, {"method": "x"}]}).encode(), r"record 2 of 2"),
    (
        "memory-no-t.json",
        json.dumps({"method": "m", "task": "memory", "metric": "accuracy", "accuracy": 0.5, "kv_mb": 1.0}).encode(),
        "has no 't'",
    ),  # fmt: skip
    (
        "bench-no-batches.json",
        json.dumps(
            {
                "method": "sentinel",
                "params": {},
                "device": "cpu",
                "dtype": "float32",
                "contexts": [{"context": 64, "kv_ratio": 0.5}],
            }
        ).encode(),
        "batches",
    ),  # fmt: skip
]


@pytest.mark.parametrize("name, data, match", BAD_RESULTS, ids=[c[0] for c in BAD_RESULTS])
def test_unreadable_result_alone_is_named(capsys, monkeypatch, tmp_path, name, data, match):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / name).write_bytes(data)
    line = refused(capsys, monkeypatch, tmp_path, "report", tmp_path / "run", match=match)
    assert str(tmp_path / "run" / name) in line and "no readable kvcondense results" in line


def test_report_names_each_unreadable_file_and_goes_on(capsys, monkeypatch, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "good.json").write_text(json.dumps({"results": [GOOD, {**GOOD, "method": "local", "label": "local"}]}))
    for name, data, _ in BAD_RESULTS:
        (run / name).write_bytes(data)
    before = files(run)
    rc, out, err = cli(capsys, monkeypatch, "report", run, "--out", tmp_path / "rep")
    assert rc == 0, err
    warnings = err.strip().splitlines()
    assert len(warnings) == len(BAD_RESULTS) and all("warning:" in w for w in warnings)
    for (name, _, match), line in zip(sorted(BAD_RESULTS), sorted(warnings), strict=True):
        assert str(run / name) in line and re.search(match, line), line
    table = (tmp_path / "rep" / "report.md").read_text()
    assert "| full |" in table and "| local |" in table
    assert files(run) == before
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == ["perplexity_vs_kv.png", "report.md"]  # no temp
