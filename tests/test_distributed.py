"""Data-parallel training on CPU: two processes (gloo) under `accelerate launch` give the loss of one process
with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvcondense.cli import main


def log(path: Path, key: str = "loss") -> list[float]:
    return [json.loads(line)[key] for line in (path / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective", ["lm", "lm+kl"])
def test_two_process_ddp_matches_one_process(tiny_dir, sample_path, tmp_path, objective):
    common = [
        "--objective",
        objective,
        "--method",
        "sentinel",
        "--model",
        str(tiny_dir),
        "--data",
        str(sample_path),
        "--steps",
        "4",
        "--block-tokens",
        "64",
        "--lr",
        "1e-2",
        "--save-every",
        "0",
    ]
    assert main(["train", *common, "--batch-size", "2", "--out", str(tmp_path / "one")]) == 0
    launcher = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [
            str(launcher),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "-m",
            "kvcondense",
            "train",
            *common,
            "--batch-size",
            "1",
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    one, two = log(tmp_path / "one"), log(tmp_path / "two")
    assert one[0] == pytest.approx(two[0], abs=1e-4)  # same global batch, same weights: same loss
    for a, b in zip(one, two, strict=True):  # later steps differ only by LoRA dropout draws
        assert a == pytest.approx(b, rel=0.01)
    # one scheduler step per optimizer step, whatever the number of processes (accelerate would step it per process)
    assert log(tmp_path / "one", "lr") == pytest.approx(log(tmp_path / "two", "lr"), abs=1e-9)
