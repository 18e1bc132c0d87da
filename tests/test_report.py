"""kvcondense report on result directories written by eval and bench: a table and PNG plots; deterministic
result directories that a rerun skips unless --force."""

import json

from kvcondense.cli import main


def test_report_from_real_result_dirs(capsys, tiny_dir, sample_path, tmp_path):
    runs = tmp_path / "runs"
    common = ["--model", str(tiny_dir), "--data", str(sample_path), "--out-dir", str(runs)]
    for method in ("full", "sentinel", "local"):
        assert (
            main(
                [
                    "eval",
                    "--method",
                    method,
                    "--ratio",
                    "0.3",
                    "0.6",
                    "--split",
                    "train",
                    "--max-tokens",
                    "256",
                    "--block-tokens",
                    "128",
                    *common,
                ]
            )
            == 0
        )
    assert (
        main(["bench", "--context", "100", "150", "--batch", "2", "--steps", "2", "--prefill-chunk", "64", *common])
        == 0
    )
    capsys.readouterr()
    assert main(["report", str(runs), "--out", str(tmp_path / "rep")]) == 0
    table = (tmp_path / "rep" / "report.md").read_text()
    assert "| sentinel (untrained tokens) | 0.3 |" in table and "| local | 0.6 |" in table and "decode_speedup" in table
    for png in ("perplexity_vs_kv.png", "decode_speed.png"):
        assert (tmp_path / "rep" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_skips_existing_result_unless_forced(capsys, tiny_dir, sample_path, tmp_path):
    argv = [
        "eval",
        "--method",
        "full",
        "--model",
        str(tiny_dir),
        "--data",
        str(sample_path),
        "--split",
        "train",
        "--max-tokens",
        "64",
        "--block-tokens",
        "64",
        "--out-dir",
        str(tmp_path),
    ]
    assert main(argv) == 0
    (result,) = tmp_path.rglob("result.json")
    assert result.parent.name.startswith("eval-perplexity-full-")
    capsys.readouterr()
    assert main(argv) == 0
    assert "skipping" in capsys.readouterr().out
    assert main([*argv, "--force"]) == 0
    assert "skipping" not in capsys.readouterr().out


def test_report_on_a_directory_without_results(capsys, tmp_path):
    assert main(["report", str(tmp_path)]) == 2
    assert "no kvcondense results found" in capsys.readouterr().err


def test_memory_by_turn_records_get_their_plot(tmp_path):
    """Online-memory results (one stored-KV figure per conversation turn) are drawn against turns."""
    import json

    from kvcondense.report import write_report

    (tmp_path / "run").mkdir()
    record = {"method": "ccm-merge", "label": "ccm-merge", "memory_by_turn": [4096 * 8] * 10}
    (tmp_path / "run" / "result.json").write_text(json.dumps(record))
    _, pngs = write_report([tmp_path / "run"], tmp_path / "rep")
    assert [p.name for p in pngs] == ["kv_vs_turns.png"]


def test_memory_rows_get_a_table_per_t_and_a_plot(tmp_path):
    from kvcondense.report import write_report

    rows = [
        {
            "method": m,
            "label": m,
            "task": "memory",
            "metric": "perplexity",
            "t": t,
            "perplexity": p,
            "kv_mb": mb,
            "kv_slots": 1,
            "episodes": 3,
            "params": {},
        }
        for m, p, mb in (("ccm-merge", 9.0, 0.1), ("full", 8.0, 1.0))
        for t in (1, 4)
    ]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "result.json").write_text(json.dumps({"results": rows}))
    table, made = write_report([tmp_path / "run"], tmp_path / "out")
    text = table.read_text()
    assert (
        "| method (perplexity, KV MB) | t=1 | t=4 |" in text and "| ccm-merge | 9.000 (0.10) | 9.000 (0.10) |" in text
    )
    assert any(p.name == "memory_perplexity_vs_t.png" and p.stat().st_size > 0 for p in made)


def test_result_names_follow_the_checkpoint_and_the_episode_data(tmp_path, monkeypatch):
    from kvcondense import report

    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "adapter.safetensors").write_bytes(b"trained once")
    config = {"checkpoint": str(ck), "task": "memory", "data": "recall"}
    first = report.result_file(tmp_path, "eval-memory", config)
    assert report.result_file(tmp_path, "eval-memory", dict(config)) == first  # deterministic
    (ck / "adapter.safetensors").write_bytes(b"trained again")  # retrained at the same path: a new result
    second = report.result_file(tmp_path, "eval-memory", config)
    assert second != first
    monkeypatch.setattr(report, "EPISODES_VERSION", report.EPISODES_VERSION + 1)  # rebuilt task data: new result
    assert report.result_file(tmp_path, "eval-memory", config) != second
    assert report.result_file(tmp_path, "eval-ppl", {"method": "full"}).parent.name.startswith("eval-ppl-full-")


def test_rows_of_different_checkpoints_stay_apart(tmp_path):
    from kvcondense.report import markdown, name_checkpoints

    def row(checkpoint, lab, value):
        config = {"checkpoint": checkpoint, "data": "recall"}
        return {"label": lab, "method": "m", "task": "memory", "metric": "accuracy", "t": 1, "accuracy": value,
                "kv_mb": 0.1, "config": config, "_source": checkpoint}  # fmt: skip

    records = [
        row("ck/a", "m (trained)", 0.5),
        row("ck/a", "full", 0.9),
        row("ck/b", "m (trained)", 0.3),
        row("ck/b", "full", 0.9),
        row("ck/c", "m (trained), another episode's memory", 0.2),
    ]
    labels = [r["label"] for r in name_checkpoints(records)]
    assert labels == ["m (trained: a)", "full", "m (trained: b)", "full", "m (trained), another episode's memory"]
    table = markdown(name_checkpoints(records))
    assert "| m (trained: a) | 0.500 (0.10) |" in table and "| m (trained: b) | 0.300 (0.10) |" in table
    # One checkpoint in several runs keeps its plain label (its rows are one row of the table).
    assert [r["label"] for r in name_checkpoints(records[:2])] == ["m (trained)", "full"]


def test_writers_use_unique_temp_names(tmp_path):
    """write_json and the report table go through a unique temp file beside the target (they used a fixed
    ``.tmp`` name: a second writer, or anything at that name, broke them)."""
    from kvcondense.report import write_json, write_report

    run = tmp_path / "run"
    (run / "result.tmp").mkdir(parents=True)  # where the old writer put its temp file
    write_json(run / "result.json", {"method": "full", "perplexity": 3.0, "compression_ratio": 1.0,
                                     "tokens_scored": 8, "params": {}})  # fmt: skip
    (tmp_path / "rep" / "report.tmp").mkdir(parents=True)
    table, pngs = write_report([run], tmp_path / "rep")
    assert "| full |" in table.read_text() and [p.name for p in pngs] == ["perplexity_vs_kv.png"]
    assert sorted(p.name for p in run.iterdir()) == ["result.json", "result.tmp"]
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == ["perplexity_vs_kv.png", "report.md", "report.tmp"]


def test_read_result_validates_or_returns_none(tmp_path):
    from kvcondense.report import read_result

    good = {"method": "full", "perplexity": 3.0, "compression_ratio": 1.0, "tokens_scored": 8, "params": {}}
    cases = {
        "one.json": (json.dumps(good), good),
        "many.json": (json.dumps({"results": [good, good]}), {"results": [good, good]}),
        "list.json": (json.dumps([good]), {"results": [good]}),  # the demo caches eval results as a list
        "torn.json": (json.dumps(good)[:-5], None),
        "garbage.json": (json.dumps([1, 2, "x"]), None),
        "partly.json": (json.dumps({"results": [good, {"method": "full"}]}), None),
        "nan-string.json": (json.dumps({**good, "perplexity": "nan"}), None),
    }
    for name, (text, expected) in cases.items():
        (tmp_path / name).write_text(text)
        assert read_result(tmp_path / name) == expected, name
    (tmp_path / "bytes.json").write_bytes(b"\xff\xfe{}")
    assert read_result(tmp_path / "bytes.json") is None
    assert read_result(tmp_path / "missing.json") is None
    assert read_result(tmp_path) is None  # a folder
