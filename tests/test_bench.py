"""kvcondense bench on a tiny model: the JSON fields, kv_ratio equal to the measured stored-KV ratio, and the
fixed-budget search; bad input."""

import json

from kvcondense.cli import main


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr()


def test_bench_json_fields_and_kv_ratio(capsys, tiny_dir, sample_path, tmp_path):
    out = tmp_path / "b.json"
    rc, _ = run(
        capsys,
        "bench",
        "--method",
        "sentinel",
        "--ratio",
        "0.5",
        "--model",
        tiny_dir,
        "--data",
        sample_path,
        "--context",
        200,
        "--batch",
        1,
        3,
        "--steps",
        3,
        "--prefill-chunk",
        64,
        "--kv-budget-mb",
        0.05,
        "--json",
        out,
    )
    res = json.loads(out.read_text())
    assert rc == 0
    for key in ("decode_speedup", "kv_ratio", "contexts", "device"):
        assert key in res
    row = res["contexts"][0]
    assert res["kv_ratio"] == row["compressed"]["kv_bytes"] / row["full"]["kv_bytes"] < 0.9
    assert row["full"]["stored_slots"] == 200
    assert [b["batch"] for b in row["batches"]] == [1, 3]
    fb = row["fixed_budget"]
    assert fb["compressed"]["batch"] >= fb["full"]["batch"] >= 1
    per_token = row["full"]["kv_bytes"] / 200
    assert fb["full"]["batch"] == int(0.05 * 2**20 // (200 * per_token))


def test_budget_too_small_for_one_sequence(capsys, tiny_dir, sample_path):
    rc, cap = run(
        capsys,
        "bench",
        "--model",
        tiny_dir,
        "--data",
        sample_path,
        "--context",
        200,
        "--steps",
        1,
        "--kv-budget-mb",
        0.0001,
    )
    assert rc == 2 and "too small for even one sequence" in cap.err


def test_context_longer_than_the_model(capsys, tiny_dir, sample_path):
    rc, cap = run(capsys, "bench", "--model", tiny_dir, "--data", sample_path, "--context", 5000, "--steps", 1)
    assert rc == 2 and "longer than the model's context" in cap.err
