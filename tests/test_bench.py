"""kvcondense bench on a tiny model: the JSON fields, kv_ratio equal to the measured stored-KV ratio, and the
fixed-budget search; bad input."""

import json

from kvcondense.cli import main


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr()


def test_bench_json_fields_and_kv_ratio(capsys, tiny_dir, sample_path, tmp_path):
    out = tmp_path / "b.json"
    rc, cap = run(
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
    for b in row["batches"]:  # the speedup is the ratio of the medians of the paired, interleaved steps
        full, comp = b["full"]["step_ms"], b["compressed"]["step_ms"]
        assert len(full) == len(comp) == 3
        assert b["decode_speedup"] == sorted(full)[1] / sorted(comp)[1]
        assert isinstance(b["noisy"], bool) and len(b["decode_speedup_quartiles"]) == 2
    fb = row["fixed_budget"]
    assert fb["compressed"]["batch"] >= fb["full"]["batch"] >= 1
    assert "KV budget 0.05 MiB: compressed fits batch" in cap.out  # one unit, MiB, everywhere (it printed MB)
    assert res["label"] == "sentinel (untrained tokens)"  # the name eval's results give it
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
    assert rc == 2 and "too small for even one sequence" in cap.err and "MiB of KV" in cap.err


def test_context_longer_than_the_model(capsys, tiny_dir, sample_path):
    rc, cap = run(capsys, "bench", "--model", tiny_dir, "--data", sample_path, "--context", 5000, "--steps", 1)
    assert rc == 2 and "longer than the model's context" in cap.err


def test_paired_speedup_flags_disagreeing_steps():
    from kvcondense.bench import paired_speedup

    steady = paired_speedup([10.0, 10.2, 9.9, 10.1], [5.0, 5.1, 5.0, 5.0])
    assert abs(steady["decode_speedup"] - 2.0) < 0.05 and not steady["noisy"]
    busy = paired_speedup([10.0, 30.0, 9.0, 10.0], [5.0, 5.0, 15.0, 5.0])  # a stall hit one variant, then the other
    assert busy["noisy"]


def test_decode_steps_are_interleaved(tiny_dir):
    """Step i of every variant before step i + 1 of any: a slow stretch of the machine hits both alike."""
    import torch
    from transformers import AutoModelForCausalLM

    from kvcondense.bench import decode_step_times
    from kvcondense.engine import Stream
    from kvcondense.methods import TokenizedText, build_method

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()  # its vocabulary holds the fed ids 100, 101, ...
    order = []
    streams = {}
    for name in ("compressed", "full"):
        s = Stream(model, build_method("streaming" if name == "compressed" else "full"), {})
        s.prefill(TokenizedText.from_ids(torch.arange(10)), 8)
        step = s.step
        s.step = lambda tokens, step=step, name=name: order.append(name) or step(tokens)
        streams[name] = s
    times = decode_step_times(streams, 3)
    assert order == ["compressed", "full"] * 3
    assert all(len(t) == 3 and min(t) > 0 for t in times.values())
