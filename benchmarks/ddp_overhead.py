"""Training-step overhead of 2-process data parallel (DDP, gloo) on CPU against 1 process at the same per-process
batch: what gradient all-reduce and synchronisation cost on top of the computation.

    .venv/bin/python benchmarks/ddp_overhead.py [--model smollm2-135m] [--steps 6] [--batch-size 2] [--threads 1]

All runs are the real recipe (`kvcondense train`, sentinel r = 0.5, LoRA + token rows, blocks of 256 tokens) and
every process gets the same CPU share (``--threads`` per process: 1 thread, against 2 processes x 1 thread on a
2-core machine), so a perfect data-parallel run has ratio 1.00 at twice the blocks per second. Three runs:

- 1 process alone (the reference);
- 2 independent 1-process runs at the same time: no communication, only the two processes sharing the machine
  (memory bandwidth, caches), which a 2-process run pays whatever it does;
- 2-process DDP (``accelerate launch --multi_gpu --num_processes 2``, gloo on CPU).

DDP / 1 process is the overhead the issue asks for; DDP / independent is the part due to DDP itself (gradient
all-reduce, the loss's token-count all-reduce, synchronisation). The gradient all-reduce is also timed on its own
(gloo, 2 processes, a tensor of the trainable parameter count): the communication floor of a step, which does not
depend on what else the machine runs as much as whole-step times do. A step's time is read from the run's log
(``elapsed_s`` after every step, 0.1 s resolution): (last - first) / (steps - 1), which leaves the first step
(warm-up, lazy initialisation, DDP's first bucket rebuild) out. All runs are measured in one invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch


def step_time(out: Path) -> float:
    """Mean step time of a finished run in seconds, first step excluded, from its log."""
    elapsed = [json.loads(line)["elapsed_s"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    return (elapsed[-1] - elapsed[0]) / (len(elapsed) - 1)


def run(cmds: list[list[str]], threads: int, logs: Path) -> list[str]:
    """Run commands at the same time and wait for all of them (output to files: a full pipe would stall them).
    Returns their standard outputs."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    files = [(logs / f"stdout{i}.txt", logs / f"stderr{i}.txt") for i in range(len(cmds))]
    procs = []
    for cmd, (out, err) in zip(cmds, files, strict=True):
        with out.open("w") as fo, err.open("w") as fe:
            procs.append(subprocess.Popen(cmd, env=env, stdout=fo, stderr=fe))
    for cmd, (_, err), proc in zip(cmds, files, procs, strict=True):
        if proc.wait() != 0:
            raise SystemExit(f"{' '.join(cmd[:8])} ... failed:\n{err.read_text()[-3000:]}")
    return [out.read_text() for out, _ in files]


def trainable_count(model: str) -> int:
    """Number of trainable parameters of the recipe (LoRA + new token rows): what DDP all-reduces every step."""
    from kvcondense.methods import build_method
    from kvcondense.train import TrainConfig, prepare_model

    peft, *_ = prepare_model(TrainConfig(model=model), build_method("sentinel", ratio=0.5))
    return sum(p.numel() for p in peft.parameters() if p.requires_grad)


def allreduce_worker(numel: int, repeats: int = 20) -> None:
    """Inside a 2-process launch: median time of a gloo all-reduce of ``numel`` float32 gradients."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    grad, times = torch.randn(numel), []
    for _ in range(repeats + 2):
        dist.barrier()
        t = time.perf_counter()
        dist.all_reduce(grad)
        times.append(time.perf_counter() - t)
    if dist.get_rank() == 0:
        print(f"{1e3 * median(times[2:]):.3f}")
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="wiki")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=2, help="blocks per process per step")
    ap.add_argument("--block-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per process (all runs)")
    ap.add_argument("--allreduce-worker", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.allreduce_worker is not None:
        return allreduce_worker(args.allreduce_worker)
    train = ["train", "--method", "sentinel", "--ratio", "0.5", "--model", args.model, "--data", args.data]
    train += [
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--block-tokens",
        str(args.block_tokens),
    ]
    train += ["--save-every", "0"]
    launcher = str(Path(sys.executable).parent / "accelerate")
    single = [sys.executable, "-m", "kvcondense", *train]
    ddp = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "-m", "kvcondense", *train]
    with tempfile.TemporaryDirectory() as tmp:
        out = {name: Path(tmp, name) for name in ("one", "ind_a", "ind_b", "ddp")}
        run([[*single, "--out", str(out["one"])]], args.threads, Path(tmp))
        run([[*single, "--out", str(out["ind_a"])], [*single, "--out", str(out["ind_b"])]], args.threads, Path(tmp))
        run([[*ddp, "--out", str(out["ddp"])]], args.threads, Path(tmp))
        t_one, t_ddp = step_time(out["one"]), step_time(out["ddp"])
        t_ind = (step_time(out["ind_a"]) + step_time(out["ind_b"])) / 2
        numel = trainable_count(args.model)
        worker = [launcher, "launch", "--multi_gpu", "--num_processes", "2", __file__, "--allreduce-worker", str(numel)]
        t_comm = float(run([worker], args.threads, Path(tmp))[0].split()[-1]) / 1e3
    b = args.batch_size
    print(
        f"model {args.model}, {b} x {args.block_tokens}-token blocks per process, {args.threads} thread(s) per "
        f"process, {args.steps} steps (first excluded)"
    )
    print(f"1 process alone              : {t_one:.2f} s/step, {b / t_one:.2f} blocks/s")
    print(f"2 independent processes      : {t_ind:.2f} s/step, {2 * b / t_ind:.2f} blocks/s (no communication)")
    print(f"2-process DDP (gloo)         : {t_ddp:.2f} s/step, {2 * b / t_ddp:.2f} blocks/s")
    print(f"DDP / 1 process              : {t_ddp / t_one:.3f} (step overhead {100 * (t_ddp / t_one - 1):+.1f} %)")
    print(f"DDP / 2 independent processes: {t_ddp / t_ind:.3f} (due to DDP itself {100 * (t_ddp / t_ind - 1):+.1f} %)")
    print(
        f"gradient all-reduce alone ({numel / 1e6:.2f} M trainable float32, gloo): {1e3 * t_comm:.1f} ms = "
        f"{100 * t_comm / t_one:.2f} % of the 1-process step"
    )


if __name__ == "__main__":
    main()
