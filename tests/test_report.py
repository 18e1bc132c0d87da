"""kvcondense report on result directories written by eval and bench: a table and PNG plots; deterministic
result directories that a rerun skips unless --force."""

import json

import pytest

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
        "| method (perplexity, KV MiB) | t=1 | t=4 |" in text and "| ccm-merge | 9.000 (0.10) | 9.000 (0.10) |" in text
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


def test_a_preset_whose_defaults_change_gets_a_new_result(tmp_path, monkeypatch):
    """A cached result is found by its config, which names a preset, not its settings: changing the preset's
    defaults must not find the old result (for ``--method`` and for a checkpoint that stores no such field)."""
    import dataclasses

    from kvcondense import report
    from kvcondense.methods import METHODS

    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "kvcondense.json").write_text('{"method": {"name": "scored-heads", "params": {"ratio": 0.5}}}')
    configs = [{"method": "scored-heads", "task": "qa"}, {"checkpoint": str(ck), "task": "qa"}]
    before = [report.result_file(tmp_path, "eval-qa", c) for c in configs]
    changed = dataclasses.make_dataclass("Changed", [("replay", float, 0.25)], bases=(METHODS["scored-heads"],))
    monkeypatch.setitem(METHODS, "scored-heads", changed)
    after = [report.result_file(tmp_path, "eval-qa", c) for c in configs]
    assert all(a != b for a, b in zip(after, before, strict=True))
    (ck / "kvcondense.json").write_text('{"method": {"name": "scored-heads", "params": {"allocate": "layer"}}}')
    assert report.result_file(tmp_path, "eval-qa", configs[1]) != after[1]  # what the checkpoint loads as, too


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


def _bench(method, checkpoint=None, ms=(4.0, 5.0), contexts=(1024,), ratio=0.5):
    """A bench result as bench wrote it before it carried a label (old results in runs/ look like this)."""
    batches = [{"batch": 4, "compressed": {"decode_ms_per_step": ms[0]}, "full": {"decode_ms_per_step": ms[1]},
                "decode_speedup": ms[1] / ms[0]}]  # fmt: skip
    return {
        "kind": "bench", "decode_speedup": ms[1] / ms[0], "kv_ratio": 0.5, "device": "cpu", "dtype": "float32",
        "method": method, "params": {"ratio": ratio, "sinks": 4},
        "contexts": [{"context": c, "kv_ratio": 0.5, "batches": batches} for c in contexts],
        "config": {"method": "sentinel" if checkpoint else method, "ratio": ratio, "checkpoint": checkpoint,
                   "model": None, "data": "wiki", "contexts": list(contexts), "batches": [4], "decode_steps": 8},
    }  # fmt: skip


def _ppl(method, lab, checkpoint=None, ratio=0.5, ppl=20.0):
    return {"kind": "perplexity", "method": method, "label": lab, "params": {"ratio": ratio}, "perplexity": ppl,
            "compression_ratio": ratio, "tokens_scored": 4000,
            "config": {"checkpoint": checkpoint, "method": None if checkpoint else method, "model": None,
                       "data": "wiki", "split": "test", "max_tokens": 4096, "block_tokens": 256}}  # fmt: skip


def demo_like_results(root):
    """What the demo writes: eval and bench results of six compressed rows (trained and untrained sentinel share
    a method and its parameters), at one context; a memory-by-turn result and a memory table."""
    ck = root.parent / "ck"
    rows = [("sentinel", "sentinel (trained)", "sentinel-r0.5"), ("local", "local (trained)", "local-r0.5"),
            ("scattered", "scattered (trained)", "scattered-r0.5"), ("streaming", "streaming", None),
            ("sentinel", "sentinel (untrained tokens)", None), ("gist", "gist (trained)", "gist4")]  # fmt: skip
    for *_, name in rows:  # the checkpoints name their base model
        if name:
            (ck / name).mkdir(parents=True)
            (ck / name / "kvcondense.json").write_text(json.dumps({"base_model": {"name": "smollm2-135m"}}))
    rows = [(method, lab, name and str(ck / name)) for method, lab, name in rows]
    for i, (method, lab, path) in enumerate(rows):
        write = {"eval": [_ppl(method, lab, path, ppl=20.0 + i), _ppl(method, lab, path, ratio=0.25, ppl=25.0 + i)],
                 "bench": _bench(method, path, ms=(4.0 + i, 5.0))}  # fmt: skip
        for kind, payload in write.items():
            (root / f"{kind}-{i}").mkdir(parents=True)
            (root / f"{kind}-{i}" / "result.json").write_text(json.dumps(payload))
    full = _ppl("full", "full", ratio=1.0, ppl=19.0)
    (root / "full.json").write_text(json.dumps([full]))
    cont = {**_ppl("local", "local (trained)", str(ck / "local-r0.5")), "kind": "continuation", "rouge_l": 0.2,
            "kv_kept_generation": 0.5, "documents": 4}  # fmt: skip
    cont["config"] |= {"prefix_tokens": 384, "new_tokens": 32}
    for key in ("perplexity", "compression_ratio", "tokens_scored"):
        del cont[key]
    (root / "cont.json").write_text(json.dumps(cont))
    chat = {"kind": "memory_by_turn", "method": "ccm-merge", "label": "merge", "memory_by_turn": [2**20, 2**21],
            "config": {"model": None, "data": "chitchat", "split": "test"}}  # fmt: skip
    (root / "chat.json").write_text(json.dumps(chat))
    memory = [{"method": m, "label": m, "task": "memory", "metric": "accuracy", "t": t, "accuracy": 0.5,
               "kv_mb": 0.1 * t, "episodes": 3, "params": {}, "config": {"data": "recall", "model": None}}
              for m in ("ccm-concat", "full") for t in (1, 4)]  # fmt: skip
    (root / "memory.json").write_text(json.dumps({"results": memory}))


def test_every_plot_is_legible_and_names_methods_as_the_tables_do(tmp_path, monkeypatch):
    """Review of the demo's report: decode_speed.png had one context on a 980-1080 axis, 12 series in 10 repeating
    colours and two identical legend entries; continuation_quality.png had no y label; the legends named methods
    otherwise than the tables. Every figure now has both axis labels and a title, one legend entry per name beside
    the axes, no two lines drawn alike, and no axis zoomed onto a single x; the methods a plot names are the
    table's."""
    from report_figures import capture, check_legible

    from kvcondense.report import write_report

    demo_like_results(tmp_path / "runs")
    figures = capture(monkeypatch)
    table, pngs = write_report([tmp_path / "runs"], tmp_path / "rep")
    text = table.read_text()
    assert {p.name for p in pngs} == set(figures) >= {"decode_speed.png", "continuation_quality.png",
                                                      "perplexity_vs_kv.png", "kv_vs_turns.png"}  # fmt: skip
    for name, axes in figures.items():
        check_legible(name, axes)
    (decode,) = figures["decode_speed.png"]
    names = decode["ticks"]  # one context: bars per method, its label on the x axis
    assert len(names) == len(set(names)) == 6 and decode["bars"] >= 12
    assert "sentinel (trained)" in names and "sentinel (untrained tokens)" in names  # the eval rows' names
    (ppl,) = figures["perplexity_vs_kv.png"]
    for name in names + ppl["legend"]:
        assert f"| {name} |" in text, name
    # several contexts: a line per method against the context, full attention once in the legend
    for i, ck in enumerate((None, str(tmp_path / "ck" / "local-r0.5"))):
        (tmp_path / "more" / str(i)).mkdir(parents=True)
        payload = _bench("sentinel" if ck is None else "local", ck, contexts=(512, 1024, 2048))
        (tmp_path / "more" / str(i) / "result.json").write_text(json.dumps(payload))
    write_report([tmp_path / "more"], tmp_path / "rep2")
    (decode,) = figures["decode_speed.png"]
    check_legible("decode_speed.png", [decode])
    assert decode["xs"] == [512, 1024, 2048] and decode["legend"].count("full attention (dotted, paired run)") == 1
    assert {"sentinel", "local (trained)"} <= set(decode["legend"])


def test_report_sections_are_headed_in_words_and_state_their_setting(tmp_path):
    """report.md headed the bench sections by the params dict (``Bench: sentinel {'ratio': 0.5, ...}``), twice the
    same for trained and untrained sentinel. Each section now has a heading in words, none twice, and opens with its
    setting: model, data and tokens."""
    from kvcondense.report import write_report

    demo_like_results(tmp_path / "runs")
    lines = write_report([tmp_path / "runs"], tmp_path / "rep")[0].read_text().splitlines()
    headings = [line for line in lines if line.startswith("#")]
    sections = [line for line in headings if line.startswith("## ")]
    assert len(headings) == len(set(headings)) and len(sections) == 5
    assert "## Perplexity: wiki (test split), smollm2-135m" in sections
    assert "## Decode speed: wiki, smollm2-135m, cpu float32" in sections
    for line in headings:
        assert "{" not in line and "'" not in line, line
    for heading in sections:
        setting = lines[lines.index(heading) + 2]
        assert setting.startswith("Setting: model smollm2-135m; data "), (heading, setting)
        assert "token" in setting or "turns" in setting or "episodes" in setting, setting
    assert (
        "Setting: model smollm2-135m; data wiki (test split); up to 4096 tokens per run"
        in lines[lines.index("## Perplexity: wiki (test split), smollm2-135m") + 2]
    )


def test_memory_is_in_mib_everywhere(capsys):
    """Reports, tables and the CLI print memory in MiB (2**20 bytes, what the code divides by); --kv-budget-mb
    keeps its name and says it means MiB."""
    import re
    from pathlib import Path

    import kvcondense

    src = Path(kvcondense.__file__).parent
    for f in sorted(src.rglob("*.py")):
        for n, line in enumerate(f.read_text().splitlines(), 1):
            assert not re.search(r"\bMB\b", line), f"{f.name}:{n}: {line.strip()}"
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "fixed KV memory in MiB" in " ".join(capsys.readouterr().out.split())


def test_a_checkpoints_bench_is_named_after_it_and_an_old_name_is_adopted(tmp_path):
    """Bench's config carries method="sentinel" (its default) beside a checkpoint, which overrides it: the result of
    a local checkpoint was named bench-sentinel-*. It is named after the checkpoint now (as eval's results are), and
    a result stored under the old name is moved to the new one, not computed again."""
    from kvcondense.report import find_result_file, result_file, run_name

    config = {"method": "sentinel", "ratio": 0.5, "checkpoint": str(tmp_path / "ck" / "local-r0.5")}
    assert run_name("bench", config).startswith("bench-local-r0.5-")
    assert run_name("bench", {"method": "streaming", "checkpoint": None}).startswith("bench-streaming-")
    assert run_name("eval-perplexity", {"method": None, "checkpoint": "ck/gist4"}).startswith("eval-perplexity-gist4-")
    path = result_file(tmp_path / "out", "bench", config)
    old = path.parent.with_name(path.parent.name.replace("bench-local-r0.5-", "bench-sentinel-"))
    old.mkdir(parents=True)
    (old / "result.json").write_text("{}")
    assert find_result_file(tmp_path / "out", "bench", config) == path
    assert path.read_text() == "{}" and not old.exists()
