"""What each subcommand does, given its parsed arguments (the parsers are in :mod:`kvcondense.cli`).

Here: train, export, list and demo; the commands that run and measure a model (eval, bench, generate, chat, report)
are in :mod:`kvcondense.commands_eval`, imported here so that every ``cmd_<name>`` is found in this module.
Imported only when a command runs, so that ``kvcondense --help`` loads nothing heavy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict
from pathlib import Path

from .cli_args import _method_params, _methods
from .commands_eval import cmd_bench, cmd_chat, cmd_eval, cmd_generate, cmd_report
from .defaults import DEFAULT_MODEL
from .errors import UsageError

__all__ = (
    "TRAIN_FLAGS", "cmd_bench", "cmd_chat", "cmd_demo", "cmd_eval", "cmd_export", "cmd_generate", "cmd_list",
    "cmd_report", "cmd_train",
)  # fmt: skip

# train flags stored in TrainConfig: argparse leaves them None unless typed, so a resumed run can tell which ones
# the user gave (and must agree with the stored run) from the ones it should take from the run itself
TRAIN_FLAGS = (
    "model", "data", "batch_size", "grad_accum", "block_tokens", "lr", "schedule", "warmup_steps", "attention",
    "seed", "save_every", "stage", "init_from", "objective", "kl_weight", "temperature", "teacher_dtype",
    "sample_ratios", "sample_chunks", "continuation_tokens", "max_grad_norm", "report_to",
)  # fmt: skip


def cmd_train(args) -> int:
    from .train import TrainConfig, config_from_checkpoint, train

    given = {k: getattr(args, k) for k in TRAIN_FLAGS if getattr(args, k) is not None}
    if args.grad_checkpointing:
        given["grad_checkpointing"] = True
    params = {"ratio": args.ratio, **_method_params(args)}
    params = {k: v for k, v in params.items() if v is not None}
    if args.config:
        from .train import read_config

        # the file's settings, with every typed flag on top
        base = read_config(args.config)
        args.method = args.method or base.pop("method", None)
        args.out = args.out or base.pop("out", None)
        params = {**base.pop("method_params", {}), **params}
        lora_typed = any(getattr(args, k) is not None for k in ("lora_rank", "lora_alpha", "lora_dropout"))
        if "lora" in base and not lora_typed:
            args.lora_config = base.pop("lora")
        base.pop("lora", None)
        if args.steps is None and "steps" in base:
            args.steps = base.pop("steps")
        given = {**{k: v for k, v in base.items() if k not in ("method", "out", "steps")}, **given}
    if args.method is None or args.out is None:
        raise UsageError("train needs --method and --out (on the command line or in --config)")
    if args.method not in _methods():
        raise UsageError(f"unknown method {args.method!r}; choose one of: {', '.join(_methods())}")
    if args.resume and Path(args.out, "kvcondense.json").is_file():
        # the run's own settings, with the typed flags on top: train() refuses any that contradicts the run
        stored = config_from_checkpoint(args.out)
        lora_given = any(getattr(args, k) is not None for k in ("lora_rank", "lora_alpha", "lora_dropout"))
        fields = {**asdict(stored), **given}
        fields.update(
            method=args.method,
            out=args.out,
            method_params={**stored.method_params, **params},
            steps=stored.steps if args.steps is None else args.steps,
            lora=_lora_settings(args) if lora_given else stored.lora,
        )
        cfg = TrainConfig(**fields)
    else:
        cfg = TrainConfig(
            method=args.method,
            method_params=params,
            out=args.out,
            steps=300 if args.steps is None else args.steps,
            lora=getattr(args, "lora_config", None) or _lora_settings(args),
            **{"model": DEFAULT_MODEL, **given},
        )
    out = train(cfg, resume=args.resume, overwrite=args.overwrite)
    print(f"checkpoint written to {out}")
    return 0


def _lora_settings(args):
    from .checkpoint import read_meta
    from .lora import LoraSettings

    if args.init_from and args.lora_rank is None and args.lora_alpha is None and args.lora_dropout is None:
        return LoraSettings(**read_meta(args.init_from)["lora"])  # a later stage keeps the earlier stage's LoRA
    rank = args.lora_rank or LoraSettings.r
    # alpha = 2 x rank in both papers' recipes (sentinel r=16/32, CCM r=8/16), so it follows the rank by default.
    alpha = args.lora_alpha if args.lora_alpha is not None else 2 * rank
    dropout = args.lora_dropout if args.lora_dropout is not None else LoraSettings.dropout
    return LoraSettings(r=rank, alpha=alpha, dropout=dropout)


def cmd_demo(args) -> int:
    from .atomic import check_writable
    from .demo import run_demo

    check_writable(args.out, "--out", folder=True)
    return run_demo(
        quick=args.quick,
        max_tokens=args.max_tokens,
        model=args.model,
        data=args.data,
        checkpoints=args.checkpoints,
        out=args.out,
        bertscore_encoder=args.bertscore_encoder,
        force=args.force,
        device=args.device,
        dtype=args.dtype,
    )


def cmd_list(args) -> int:
    from .checkpoint import ADAPTER, META, read_meta
    from .data import CORPORA
    from .data.episodes import EPISODE_SOURCES

    print(f"default model: {DEFAULT_MODEL}  (--model also takes a local folder or a cached Hub id)")
    print("methods:")
    for name, cls in _methods().items():
        fields = ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(cls))
        kind = "trainable" if cls.trainable else "training-free"
        print(f"  {name:12s} {kind:14s} {fields}")
    print(f"corpora: {', '.join(CORPORA)}; online episodes: {', '.join(EPISODE_SOURCES)}; or a .txt/.jsonl path")
    root = Path(args.checkpoints)
    found = sorted(p.parent for p in root.glob("*/" + META)) if root.is_dir() else []
    print(f"checkpoints under {root}:" + ("" if found else " none"))
    width = max([28, *(len(ck.name) for ck in found)])  # the columns line up whatever the names
    for ck in found:
        try:
            meta = read_meta(ck)
        except UsageError as e:
            print(f"  {ck.name:{width}s} unreadable: {e}")
            continue
        t = meta["training"]
        weights = "" if (ck / ADAPTER).is_file() else "  (config and log only: no weights)"
        print(
            f"  {ck.name:{width}s} {meta['method']['name']:12s} {t.get('steps_done', t.get('steps', '?'))} steps, "
            f"objective {t.get('objective', 'lm')}, data {t.get('data', '?')}{weights}"
        )
    return 0


def cmd_export(args) -> int:
    from .atomic import check_writable
    from .loader import export

    fmt, out = args.to
    if Path(out).exists():
        raise UsageError(f"--to {fmt} {out} exists; give a new folder (an export never replaces one)")
    check_writable(Path(out).parent / f".{Path(out).name}.probe", f"--to {fmt}")  # the folder that will hold it
    print(f"exported to {export(args.checkpoint, fmt, out)}")
    return 0
