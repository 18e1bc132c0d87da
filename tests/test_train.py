"""Training recipe: the loss goes down, checkpoints round-trip exactly, --resume continues the same run, and a
failed write leaves nothing half-written."""

import json

import pytest
import torch

from kvcondense import checkpoint as ckpt
from kvcondense.checkpoint import read_log, read_meta, write_checkpoint
from kvcondense.data import load_split
from kvcondense.errors import UsageError
from kvcondense.evaluate import perplexity
from kvcondense.forward import parallel_forward
from kvcondense.loader import load_checkpoint
from kvcondense.lora import adapter_state
from kvcondense.methods import build_method
from kvcondense.train import TrainConfig, checkpoint_meta, prepare_model, text_blocks, train


def config(tiny_dir, sample_path, out, **kw):
    base = dict(
        method="sentinel",
        method_params={"ratio": 0.5},
        model=str(tiny_dir),
        data=str(sample_path),
        out=str(out),
        steps=6,
        batch_size=2,
        block_tokens=64,
        lr=3e-3,
        save_every=0,
        log_every=1,
    )
    return TrainConfig(**{**base, **kw})


def test_training_lowers_the_loss(tiny_dir, sample_path, tmp_path):
    cfg = config(tiny_dir, sample_path, tmp_path / "ck", steps=40, lr=1e-2, schedule="constant")
    method = build_method("sentinel", ratio=0.5)
    model, tok, token_ids, _ = prepare_model(cfg, method)
    blocks = text_blocks(load_split(str(sample_path), "train"), tok, 64)
    model.eval()
    before = perplexity(model, method, blocks, token_ids, 4, seed=99)["perplexity"]
    train(cfg)
    got = load_checkpoint(cfg.out)
    model, tok, method, token_ids, meta = got.model, got.tokenizer, got.method, got.token_ids, got.meta
    after = perplexity(model, method, blocks, token_ids, 4, seed=99)["perplexity"]
    assert after < 0.9 * before, (before, after)
    assert meta["training"]["steps_done"] == 40
    assert meta["base_model"]["model_type"] == "llama" and len(meta["base_model"]["fingerprint"]) == 16


def test_checkpoint_round_trip_is_exact(tiny_dir, sample_path, tmp_path):
    cfg = config(tiny_dir, sample_path, tmp_path / "ck")
    method = build_method("sentinel", ratio=0.5)
    model, tok, token_ids, identity = prepare_model(cfg, method)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # bf16-representable values, so storage in bf16 is lossless
                p.copy_((torch.randn_like(p) * 0.1).bfloat16().float())
    model.eval()
    layout = method.layout(text_blocks(load_split(str(sample_path), "train"), tok, 64)[0], token_ids, seed=0)
    with torch.no_grad():
        expected = parallel_forward(model, [layout]).logits
    write_checkpoint(cfg.out, checkpoint_meta(cfg, method, token_ids, identity, 0), adapter_state(model), [])
    for merge_lora in (False, True):  # the peft model as trained, and LoRA + rows folded into the weights
        loaded = load_checkpoint(cfg.out, merge_lora=merge_lora).model
        assert any("lora_" in name for name, _ in loaded.named_parameters()) != merge_lora
        with torch.no_grad():
            got = parallel_forward(loaded, [layout]).logits
        assert (got - expected).abs().max() < 1e-5
    assert (tmp_path / "ck" / "adapter.safetensors").stat().st_size < 200_000  # adapter and rows only


def test_resume_continues_the_same_run(tiny_dir, sample_path, tmp_path, monkeypatch):
    import kvcondense.train as train_module

    full = config(tiny_dir, sample_path, tmp_path / "full", steps=6)
    train(full)
    part = config(tiny_dir, sample_path, tmp_path / "part", steps=6, save_every=3)
    real_write = train_module.write_checkpoint

    def write_then_die(*args, **kwargs):  # the run is killed right after its step-3 checkpoint
        real_write(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "write_checkpoint", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(part)
    assert read_meta(part.out)["training"]["steps_done"] == 3
    monkeypatch.setattr(train_module, "write_checkpoint", real_write)
    train(part, resume=True)
    a, b = read_log(full.out), read_log(part.out)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-4), (ra, rb)
    assert read_meta(part.out)["training"]["steps_done"] == 6


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    out = tmp_path / "ck"
    write_checkpoint(out, {"x": 1}, {"w": torch.zeros(2)}, [])

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(ckpt.CheckpointError, match="disk full"):
        write_checkpoint(out, {"x": 2}, {"w": torch.ones(2)}, [])
    assert json.loads((out / "kvcondense.json").read_text())["x"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temp dirs left behind


def test_gradient_checkpointing_trains_the_same(tiny_dir, sample_path, tmp_path):
    """Non-reentrant checkpointing recomputes activations (dropout RNG included): the same losses."""
    plain = train(config(tiny_dir, sample_path, tmp_path / "a", steps=3))
    ckpointed = train(config(tiny_dir, sample_path, tmp_path / "b", steps=3, grad_checkpointing=True))
    a, b = [[row["loss"] for row in read_log(p)] for p in (plain, ckpointed)]
    assert a == pytest.approx(b, abs=1e-4)
    assert read_meta(ckpointed)["training"]["grad_checkpointing"] is True


@pytest.mark.parametrize(
    ("method", "params", "why"),
    [
        ("scored-heads", {"ratio": 0.5}, "per head"),
        ("ccm-merge", {}, "merged inside attention"),
        ("sentinel", {"ratio": 0.5, "lora_scope": "special"}, "gated by token kind"),
    ],
)
def test_gradient_checkpointing_is_refused_where_the_recompute_would_miss_a_switch(
    tiny_dir, sample_path, tmp_path, method, params, why
):
    """The backward recomputes a checkpointed layer after kvcondense's forward-time switches (token gate, merging
    attention, per-head expiry) are undone: it would crash or train another forward (per-head on eager: silently
    wrong gradients). Refused in one line, before any work."""
    cfg = config(tiny_dir, sample_path, tmp_path / "ck", method=method, method_params=params, grad_checkpointing=True,
                 continuation_tokens=16)  # fmt: skip
    with pytest.raises(UsageError, match=f"--grad-checkpointing.*{why}"):
        train(cfg)
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("norm", [0.0, 0.5])
def test_gradients_are_clipped_to_max_grad_norm(tiny_dir, sample_path, tmp_path, monkeypatch, norm):
    """Every optimizer step clips the LoRA gradients to the norm asked for (0: no clipping at all)."""
    from accelerate import Accelerator

    seen = []
    real = Accelerator.clip_grad_norm_

    def spy(self, parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        total = real(self, parameters, max_norm, *args, **kwargs)
        after = torch.norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None]))
        seen.append((max_norm, float(total), float(after)))
        return total

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", spy)
    train(config(tiny_dir, sample_path, tmp_path / "ck", steps=3, max_grad_norm=norm))
    if norm == 0:
        assert seen == []
    else:
        assert len(seen) == 3 and all(m == norm and after <= norm * 1.001 for m, _, after in seen)
        assert any(total > norm for _, total, _ in seen)  # the clipping really bit (the test can fail)
    assert read_meta(tmp_path / "ck")["training"]["max_grad_norm"] == norm


def test_train_config_file_with_flags_on_top(tiny_dir, sample_path, tmp_path):
    """--config takes YAML or JSON (a checkpoint's own kvcondense.json included); typed flags override it."""
    from kvcondense.cli import main

    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        f"method: sentinel\nmethod_params: {{ratio: 0.5, placement: recent}}\nmodel: {tiny_dir}\n"
        f"data: {sample_path}\nsteps: 2\nblock_tokens: 64\nlr: 0.002\nlora: {{r: 4, alpha: 8, dropout: 0.0}}\n"
    )
    out = tmp_path / "a"
    assert main(["train", "--config", str(yaml_file), "--out", str(out), "--lr", "0.001"]) == 0
    meta = read_meta(out)
    assert meta["training"]["lr"] == 0.001 and meta["training"]["steps"] == 2 and meta["lora"]["r"] == 4
    assert meta["method"]["params"]["placement"] == "recent"
    # the stored config is a valid config: the same run again, elsewhere
    again = tmp_path / "b"
    assert main(["train", "--config", str(out / "kvcondense.json"), "--out", str(again)]) == 0
    redo = read_meta(again)
    assert {k: v for k, v in redo["training"].items() if k != "out"} == {
        k: v for k, v in meta["training"].items() if k != "out"
    }
    assert redo["lora"] == meta["lora"] and redo["method"] == meta["method"]


@pytest.mark.parametrize(
    ("text", "match"),
    [("steps: [1\n", "not valid YAML"), ("- 1\n", "must hold a mapping"), ("stepz: 3\n", "unknown settings")],
)
def test_bad_config_files_are_one_line(tmp_path, capsys, text, match):
    from kvcondense.cli import main

    f = tmp_path / "bad.yaml"
    f.write_text(text)
    assert main(["train", "--config", str(f), "--method", "sentinel", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err and not (tmp_path / "o").exists()


def test_report_to_sends_every_log_line_to_the_trackers(tiny_dir, sample_path, tmp_path):
    """--report-to: Accelerate's trackers get the run's settings once and each log line at its step (here a tracker
    object from the Python API, which Accelerate takes as it takes its own); the checkpoint records its name."""
    from accelerate.tracking import GeneralTracker

    class Memory(GeneralTracker):
        name = "memory"
        requires_logging_directory = False

        def __init__(self):
            super().__init__()
            self.config, self.rows, self.finished = None, [], False

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            self.config = values

        def log(self, values, step=None, **kwargs):
            self.rows.append((step, dict(values)))

        def finish(self):
            self.finished = True

    mem = Memory()
    out = tmp_path / "ck"
    train(config(tiny_dir, sample_path, out, steps=3, report_to=[mem]))
    assert mem.config["method"] == "sentinel" and mem.config["steps"] == 3 and mem.finished
    assert [step for step, _ in mem.rows] == [1, 2, 3]
    assert [row["loss"] for _, row in mem.rows] == [r["loss"] for r in read_log(out)]
    assert read_meta(out)["training"]["report_to"] == ["memory"]


@pytest.mark.parametrize(
    "tracker, match",
    [("tensorbored", "unknown tracker 'tensorbored'"), ("tensorboard", "needs the tensorboard package")],
)
def test_report_to_a_tracker_that_cannot_run_is_one_line(capsys, tiny_dir, sample_path, tmp_path, tracker, match):
    import importlib.util

    from kvcondense.cli import main

    if tracker == "tensorboard" and importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    argv = ["train", "--method", "sentinel", "--model", str(tiny_dir), "--data", str(sample_path), "--steps", "1"]
    rc = main([*argv, "--out", str(tmp_path / "ck"), "--report-to", tracker])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and match in err[0]
    assert not (tmp_path / "ck" / "adapter.safetensors").exists()


def test_a_checkpoint_is_readable_by_others_as_the_umask_allows(tiny_dir, sample_path, tmp_path):
    """Every folder and file of a checkpoint gets the mode the user's umask gives new files (the adapter was 0600:
    safetensors writes through a private temp file)."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        out = train(config(tiny_dir, sample_path, tmp_path / "ck", steps=1, save_every=1))
    finally:
        os.umask(old)
    paths = [out, *out.rglob("*")]
    assert any(p.name == "adapter.safetensors" for p in paths) and any(p.is_dir() for p in paths[1:])
    for p in paths:
        assert stat.S_IMODE(p.stat().st_mode) == (0o755 if p.is_dir() else 0o644), p


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"steps": 2.5}, "steps must be int"),  # the final save never fired: "written" and no checkpoint
        ({"lr": "1e-3"}, "YAML reads 1e-3 as text"),
        ({"lr": float("nan")}, "lr must be a finite number"),
        ({"max_grad_norm": float("inf")}, "max_grad_norm must be a finite number"),
        ({"seed": None}, "seed must be int"),
        ({"steps": True}, "steps must be a whole number"),
        ({"schedule": "reduce_lr_on_plateau"}, "unknown schedule"),
        ({"log_every": 0}, "log_every must be >= 1"),
        ({"report_to": "tensorboard"}, "report_to must be a list"),
        ({"lora": {"r": 8, "extra": 1}}, "lora has unknown settings"),
        ({"lora": {"r": "8"}}, "lora.r must be int"),
    ],
)
def test_training_settings_of_the_wrong_type_are_one_line(tiny_dir, sample_path, tmp_path, bad, match):
    """Python callers and --config files (YAML reads 1e-3 as a string) are checked like a checkpoint's config."""
    with pytest.raises(UsageError, match=match):
        config(tiny_dir, sample_path, tmp_path / "out", **bad)


def test_a_diverged_adapter_is_never_saved(tiny_dir, sample_path, tmp_path, monkeypatch):
    import kvcondense.train as train_module

    real = train_module.checkpoint_tensors

    def poisoned(*args, **kwargs):
        adapter, trainable, optimizer = real(*args, **kwargs)
        name = next(iter(adapter))
        return {**adapter, name: torch.full_like(adapter[name], float("nan"))}, trainable, optimizer

    monkeypatch.setattr(train_module, "checkpoint_tensors", poisoned)
    out = tmp_path / "diverged"
    with pytest.raises(UsageError, match="training diverged: .* holds NaN or inf"):
        train(config(tiny_dir, sample_path, out, steps=2))
    assert not out.exists()


def test_a_run_whose_blocks_compress_nothing_says_so(tiny_dir, sample_path, tmp_path, caplog):
    """Sentinel spans need room: blocks of 16 tokens hold none, and the run warns instead of training a
    compression method on uncompressed text; blocks of 64 compress, and it stays quiet."""
    with caplog.at_level("WARNING", logger="kvcondense.train"):
        train(config(tiny_dir, sample_path, tmp_path / "short", steps=1, block_tokens=16))
    assert "compressed nothing" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="kvcondense.train"):
        train(config(tiny_dir, sample_path, tmp_path / "long", steps=1, block_tokens=256))
    assert "compressed nothing" not in caplog.text


def test_paths_from_python_are_the_paths_they_name(tiny_dir, sample_path, tmp_path):
    cfg = config(tiny_dir, sample_path, tmp_path / "out", data=sample_path, model=tiny_dir)
    assert (cfg.out, cfg.data, cfg.model) == (str(tmp_path / "out"), str(sample_path), str(tiny_dir))
