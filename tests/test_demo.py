"""`kvcondense demo --quick` end to end on a tiny model, tiny checkpoints and the committed sample text."""

import json

from kvcondense.cli import main


def test_demo_quick(capsys, tiny_dir, sample_path, tiny_encoder, tmp_path):
    ck = tmp_path / "checkpoints"
    for method in ("sentinel", "local"):
        assert (
            main(
                [
                    "train",
                    "--method",
                    method,
                    "--ratio",
                    "0.5",
                    "--model",
                    str(tiny_dir),
                    "--data",
                    str(sample_path),
                    "--steps",
                    "1",
                    "--block-tokens",
                    "64",
                    "--out",
                    str(ck / f"{method}-r0.5"),
                ]
            )
            == 0
        )
    # a gist checkpoint: no ratio (its compression is set by the sentences), so the demo must not pass one
    gist = ["--method", "gist", "--gist-tokens", "4", "--model", str(tiny_dir), "--data", str(sample_path)]
    assert main(["train", *gist, "--steps", "1", "--block-tokens", "64", "--out", str(ck / "gist4")]) == 0
    out = tmp_path / "demo"
    argv = [
        "demo",
        "--quick",
        "--model",
        str(tiny_dir),
        "--data",
        str(sample_path),
        "--checkpoints",
        str(ck),
        "--out",
        str(out),
        "--bertscore-encoder",
        str(tiny_encoder),
        "--device",
        "cpu",
        "--dtype",
        "float32",
    ]
    capsys.readouterr()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for label in (
        "full attention",
        "sentinel (trained)",
        "local (trained)",
        "StreamingLLM",
        "untrained tokens",
        "gist N=4",
    ):
        assert label in printed
    assert "| method | KV kept | perplexity | ROUGE-L | BERTScore | decode speedup |" in printed
    assert (out / "table.md").exists() and (out / "generation.txt").exists()
    assert (out / "report" / "perplexity_vs_kv.png").exists()
    # each bench result is named after what it measured: the checkpoint, else the method (the local checkpoint's
    # bench was bench-sentinel-*, after the config's default method)
    benches = sorted(p.parent.name.rsplit("-", 1)[0] for p in out.glob("bench-*/result.json"))
    assert benches == ["bench-gist4", "bench-local-r0.5", "bench-sentinel", "bench-sentinel-r0.5", "bench-streaming"]
    report = (out / "report" / "report.md").read_text()
    assert "| local (trained) | 0.5 | 128 |" in report and "| sentinel (untrained tokens) | 0.5 | 128 |" in report
    # --device/--dtype reach every measurement the demo stores
    configs = [json.loads(p.read_text()) for p in out.glob("*/result.json")]
    records = [r for c in configs for r in (c if isinstance(c, list) else c.get("results", [c]))]
    placed = [r.get("config", {}) for r in records]
    assert placed and all((p.get("device"), p.get("dtype")) == ("cpu", "float32") for p in placed if "device" in p)
    assert sum("device" in p for p in placed) >= 4
    # a rerun reuses every stored result
    n_results = len(list(out.rglob("result.json")))
    assert main(argv) == 0 and len(list(out.rglob("result.json"))) == n_results


def test_demo_table_marks_a_noisy_speedup():
    from kvcondense.demo import table

    row = {"label": "x", "kv_kept": 0.5, "perplexity": 10.0, "rouge_l": 0.1, "bertscore_f1": None}
    quiet = table([{**row, "decode_speedup": 1.2, "noisy": False}])
    noisy = table([{**row, "decode_speedup": 1.2, "noisy": True}])
    assert "1.20x |" in quiet and "noisy" not in quiet
    assert "1.20x (noisy) |" in noisy and "rerun" in noisy


def test_demo_rows_skip_a_checkpoint_committed_without_its_adapter(tmp_path, capsys):
    """A checkpoint folder holding only its config and log (an adapter left out of the repository) is skipped
    with a note naming what is missing; the KL retrains get rows of their own."""
    from kvcondense.demo import demo_rows

    for name, files in {
        "sentinel-r0.5": ("kvcondense.json", "adapter.safetensors"),
        "sentinel-r0.5-kl": ("kvcondense.json", "adapter.safetensors"),
        "local-r0.5": ("kvcondense.json", "train_log.jsonl"),  # committed without its adapter
        "gist4-kl": ("kvcondense.json", "adapter.safetensors"),
    }.items():
        (tmp_path / name).mkdir()
        for f in files:
            (tmp_path / name / f).write_text("{}")
    rows = demo_rows(tmp_path, 0.5)
    labels = [label for label, _ in rows]
    assert labels == [
        "full attention",
        "sentinel (trained)",
        "sentinel (trained, KL to the frozen model)",
        "StreamingLLM (4 sinks)",
        "sentinel (untrained tokens)",
        "gist N=4 (trained, KL; KV set by sentences)",
    ]
    assert dict(rows)["sentinel (trained, KL to the frozen model)"] == {
        "checkpoint": str(tmp_path / "sentinel-r0.5-kl")
    }
    printed = capsys.readouterr().out
    assert f"note: {tmp_path / 'local-r0.5'} holds no adapter.safetensors" in printed
    assert f"note: no checkpoint at {tmp_path / 'scattered-r0.5'}" in printed
