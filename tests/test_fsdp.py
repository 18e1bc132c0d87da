"""FSDP: the documented config, the refusal of configs that cannot train our adapters, and a 2-process FSDP run on
CPU that trains, checkpoints and resumes exactly like one process.

accelerate 1.15 enables FSDP only on GPUs: on CPU it silently runs DDP (checked below, and refused by
``check_distributed``). torch's FSDP itself runs on CPU with gloo, so the training test switches accelerate's state
to FSDP in the launched processes (``FORCE_FSDP_ON_CPU``) to run our FSDP code paths (sharded forward/backward,
collective checkpoint gather, sharded resume) without a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_multi_gpu_env
from safetensors.torch import load_file

from kvcondense.checkpoint import read_log
from kvcondense.distributed import check_distributed
from kvcondense.lora import LoraSettings
from kvcondense.train import TrainConfig, train

CONFIGS = Path(__file__).parent.parent / "configs" / "accelerate"
LAUNCHER = Path(sys.executable).parent / "accelerate"


def launch_env(config: Path) -> dict[str, str]:
    """The FSDP_* / ACCELERATE_* variables `accelerate launch --config_file config` gives its processes."""
    parsed = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(config), "x.py"]))
    args = parsed[0] if isinstance(parsed, tuple) else parsed
    return {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith(("FSDP_", "ACCELERATE_USE_FSDP"))}


def fake_accelerator(plugin=None, distributed_type=DistributedType.FSDP, processes: int = 2):
    return SimpleNamespace(
        distributed_type=distributed_type, num_processes=processes, state=SimpleNamespace(fsdp_plugin=plugin)
    )


# -------------------------------------------------------------------------------------------------------------- config
def test_configs_are_valid_accelerate_launch_configs():
    assert launch_env(CONFIGS / "ddp.yaml") == {}  # plain data parallel
    env = launch_env(CONFIGS / "fsdp.yaml")
    assert env["ACCELERATE_USE_FSDP"] == "true"
    assert env["FSDP_USE_ORIG_PARAMS"] == "true"
    assert env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"


def test_documented_fsdp_config_passes_the_check(monkeypatch):
    for key, value in launch_env(CONFIGS / "fsdp.yaml").items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()  # built from the launch environment, as the Accelerator does
    assert plugin.fsdp_version == 1 and plugin.use_orig_params
    check_distributed(fake_accelerator(plugin))


def test_fsdp_without_use_orig_params_is_refused_in_one_line(monkeypatch):
    for key, value in launch_env(CONFIGS / "fsdp.yaml").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FSDP_USE_ORIG_PARAMS", "false")
    with pytest.raises(ValueError, match="use_orig_params") as err:
        check_distributed(fake_accelerator(FullyShardedDataParallelPlugin()))
    assert "\n" not in str(err.value) and "fsdp_use_orig_params: true" in str(err.value)


def test_fsdp2_and_ddp_need_nothing(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    check_distributed(fake_accelerator(FullyShardedDataParallelPlugin(fsdp_version=2)))  # always original params
    check_distributed(fake_accelerator(distributed_type=DistributedType.MULTI_GPU))
    check_distributed(fake_accelerator(distributed_type=DistributedType.NO, processes=1))


PROBE = """
import os
from accelerate import Accelerator
accelerator = Accelerator(cpu=True)  # as train.py creates it without a GPU
os.write(1, f"chose {accelerator.distributed_type.value} {os.environ.get('ACCELERATE_USE_FSDP')}\\n".encode())
"""


def test_fsdp_config_on_cpu_is_refused_not_run_as_ddp(tmp_path, monkeypatch):
    """The real launcher with the real config: accelerate turns FSDP into DDP on CPU; the check refuses that."""
    (tmp_path / "probe.py").write_text(PROBE)  # only accelerate inside: kvcondense would double the start-up time
    run = subprocess.run(
        [str(LAUNCHER), "launch", "--config_file", str(CONFIGS / "fsdp.yaml"), str(tmp_path / "probe.py")],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[:3000]
    assert run.stdout.count("MULTI_CPU true") == 2, run.stdout  # two processes, FSDP asked for, DDP chosen
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="FSDP was requested but accelerate runs it only on GPUs"):
        check_distributed(fake_accelerator(distributed_type=DistributedType.MULTI_CPU))


# ------------------------------------------------------------------------------------------------------------ training
FORCE_FSDP_ON_CPU = """
import json, os, sys
import torch
import accelerate
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
import kvcondense.train as train_module


class CpuFSDPAccelerator(accelerate.Accelerator):
    # accelerate 1.15 keeps FSDP for GPUs and runs DDP on CPU; switch the state to FSDP. The device must be plain
    # "cpu": FSDP checks its device_id against torch.cpu.current_device(), and accelerate's "cpu:0" fails that.
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        forced = {"distributed_type": DistributedType.FSDP, "device": torch.device("cpu")}
        PartialState._shared_state.update(forced)  # every AcceleratorState() copies these from here
        self.state.__dict__.update(forced)
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin()


train_module.Accelerator = CpuFSDPAccelerator
if os.environ.get("DIE_AFTER_CHECKPOINT"):  # a run killed right after its first checkpoint
    write = train_module.write_checkpoint

    def write_then_die(*args, **kwargs):
        write(*args, **kwargs)
        raise SystemExit(3)

    train_module.write_checkpoint = write_then_die
train_module.train(train_module.TrainConfig(**json.loads(sys.argv[1])), resume=sys.argv[2:] == ["--resume"])
"""


def fsdp_train(script: Path, cfg: TrainConfig, resume: bool = False, die: bool = False) -> subprocess.CompletedProcess:
    cfg_json = json.dumps({**vars(cfg), "lora": vars(cfg.lora)})
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"DIE_AFTER_CHECKPOINT": "1"} if die else {})}
    cmd = [str(LAUNCHER), "launch", "--config_file", str(CONFIGS / "fsdp.yaml"), str(script), cfg_json]
    return subprocess.run(cmd + (["--resume"] if resume else []), capture_output=True, text=True, env=env, timeout=300)


# uses the FSDP parts of train.py (check_distributed, the collective checkpoint gather, resume) and one scheduler
# step per optimizer step
def test_two_process_fsdp_trains_saves_and_resumes_like_one_process(tiny_dir, sample_path, tmp_path):
    common = dict(
        method="sentinel",
        model=str(tiny_dir),
        data=str(sample_path),
        steps=4,
        block_tokens=64,
        lr=1e-2,
        lora=LoraSettings(dropout=0.0),  # no dropout: 2 x 1 block and 1 x 2 blocks are the same computation
    )
    one = TrainConfig(**common, batch_size=2, save_every=0, out=str(tmp_path / "one"))
    train(one)
    two = TrainConfig(**common, batch_size=1, save_every=2, out=str(tmp_path / "two"))
    (script := tmp_path / "fsdp_train.py").write_text(FORCE_FSDP_ON_CPU)
    killed = fsdp_train(script, two, die=True)
    assert killed.returncode != 0 and read_log(two.out)[-1]["step"] == 2, killed.stderr[:3000]
    resumed = fsdp_train(script, two, resume=True)
    assert resumed.returncode == 0, resumed.stderr[:3000]

    a, b = read_log(one.out), read_log(two.out)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):  # steps 1-2 from the killed run, 3-4 after resuming its checkpoint
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-4), (ra, rb)
        assert ra["lr"] == pytest.approx(rb["lr"]), (ra, rb)
    want, got = (
        load_file(str(Path(one.out) / "adapter.safetensors")),
        load_file(str(Path(two.out) / "adapter.safetensors")),
    )
    assert sorted(got) == sorted(want)  # gathered from the shards: every LoRA matrix and the new token rows
    for key in want:
        diff = (got[key].float() - want[key].float()).abs().max().item()
        assert torch.allclose(got[key].float(), want[key].float(), atol=2e-2, rtol=2e-2), f"{key}: max diff {diff}"
