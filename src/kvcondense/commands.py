"""What each subcommand does, given its parsed arguments (the parsers are in :mod:`kvcondense.cli`).

Imported only when a command runs, so that ``kvcondense --help`` loads nothing heavy.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import asdict
from pathlib import Path

from .cli import _memory_names, _method_params, _methods
from .defaults import DEFAULT_MODEL
from .errors import UsageError

# train flags stored in TrainConfig: argparse leaves them None unless typed, so a resumed run can tell which ones
# the user gave (and must agree with the stored run) from the ones it should take from the run itself
TRAIN_FLAGS = (
    "model", "data", "batch_size", "grad_accum", "block_tokens", "lr", "schedule", "warmup_steps", "attention",
    "seed", "save_every", "stage", "init_from", "objective", "kl_weight", "temperature", "sample_ratios",
    "max_grad_norm",
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


def cmd_eval(args) -> int:
    from .data.episodes import is_episode_data
    from .evaluate import EvalConfig, format_table, run_eval

    cfg = EvalConfig(
        checkpoint=args.checkpoint,
        method=args.method,
        device=args.device,
        dtype=args.dtype,
        ratios=tuple(args.ratio or ()),
        method_params=_method_params(args),
        model=args.model,
        data=args.data,
        split=args.split,
        max_tokens=args.max_tokens,
        block_tokens=args.block_tokens or (4096 if args.long_doc else 256),
        batch_size=1 if args.long_doc else args.batch_size,
        verify=args.verify,
        prefix_buckets=(256, 512, 1024, 2048, 4096, 8192, 16384) if args.long_doc else (),
        task="memory" if is_episode_data(args.data) and args.task == "perplexity" else args.task,
        prefix_tokens=args.prefix_tokens,
        new_tokens=args.new_tokens,
        docs=args.docs,
        bertscore=not args.no_bertscore,
        bertscore_encoder=args.bertscore_encoder,
        seed=args.seed,
        time_steps=tuple(args.time_steps),
        episodes=args.episodes,
        baselines=() if args.baselines is None else tuple(args.baselines or _memory_names()[0]),
        kv_budgets=tuple(args.kv_budget or ()),
        export_tasks=args.export_tasks,
        answer_tokens=args.answer_tokens,
        needle_lengths=tuple(args.needle_lengths),
        needle_depths=tuple(args.needle_depths),
        reference=args.reference,
    )
    _check_outputs(args)
    target = _results_path(args, f"eval-{cfg.task}", asdict(cfg)) if args.out_dir else None
    if args.out_dir and target is None:
        return 0
    results = run_eval(cfg)
    print(format_table(results))
    if target is not None:
        _write_json(target, {"results": results})
    if args.json:  # always one shape: {"results": [record, ...]}, each record with its "kind"
        _write_json(args.json, {"results": results})
    return 0


def cmd_chat(args) -> int:
    from .session import MemorySession, chat

    if args.save:
        from .atomic import check_writable
        from .session import check_save_path

        check_writable(args.save, "--save")
        check_save_path(args.save)
    session = MemorySession.from_checkpoint(args.checkpoint, args.model, device=args.device, dtype=args.dtype)
    if args.load:
        session.load(args.load)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chat with {args.checkpoint}: one message per line, Ctrl-D to end", file=sys.stderr)
    try:
        rejected = chat(
            session, sys.stdin, sys.stdout, sys.stderr, stats=args.stats, max_new_tokens=args.max_new_tokens
        )
    except BaseException:  # whatever ends the chat, the memory kept so far (the last complete turn) is not lost
        if args.save:
            session.save(args.save)  # quietly: the error that ended the chat stays its one line
        raise
    if args.save:
        print(f"memory saved to {session.save(args.save)}", file=sys.stderr)
    return 1 if rejected and not interactive else 0


def cmd_generate(args) -> int:
    from .generate import generate_cli

    prompt = args.prompt if args.prompt is not None else _read_prompt(args.prompt_file)
    return generate_cli(args, prompt, _method_params(args))


def _read_prompt(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"prompt file {p} does not exist; check the path")
    return p.read_bytes().decode("utf-8", errors="replace")


def cmd_bench(args) -> int:
    from .bench import BenchConfig, format_bench, run_bench

    if args.checkpoint:
        from .checkpoint import read_meta
        from .methods import check_params

        trained = read_meta(args.checkpoint)["method"]["name"]
        if args.method is not None and args.method != trained:
            raise UsageError(f"checkpoint {args.checkpoint} is a {trained} checkpoint, not {args.method}")
        check_params(trained, {"ratio": args.ratio}, f" (checkpoint {args.checkpoint})")
    cfg = BenchConfig(
        method=args.method or "sentinel",
        ratio=0.5 if args.ratio is None else args.ratio,
        checkpoint=args.checkpoint,
        model=args.model,
        data=args.data,
        contexts=args.context,
        batches=args.batch,
        decode_steps=args.steps,
        chunk=args.prefill_chunk,
        kv_budget_mb=args.kv_budget_mb,
        max_batch=args.max_batch,
        slack=args.slack,
        device=args.device,
        dtype=args.dtype,
    )
    _check_outputs(args)
    target = _results_path(args, "bench", asdict(cfg)) if args.out_dir else None
    if args.out_dir and target is None:
        return 0
    res = run_bench(cfg)
    print(format_bench(res))
    if target is not None:
        _write_json(target, res)
    if args.json:
        _write_json(args.json, res)
    return 0


def _check_outputs(args) -> None:
    """--json and --out-dir are checked before the work starts, not after an hour of it."""
    from .atomic import check_writable

    if getattr(args, "json", None):
        check_writable(args.json, "--json")
    if getattr(args, "out_dir", None):
        check_writable(args.out_dir, "--out-dir", folder=True)


def _write_json(path: str | Path, payload) -> None:
    from .report import write_json

    write_json(path, payload)
    print(f"results written to {path}")


def cmd_report(args) -> int:
    from .atomic import check_writable
    from .report import write_report

    out = check_writable(args.out or Path(args.dirs[0]) / "report", "--out", folder=True)
    table, pngs = write_report(args.dirs, out)
    print(table.read_text())
    print(f"report written to {table}" + (f"; plots: {', '.join(map(str, pngs))}" if pngs else ""))
    return 0


def _results_path(args, kind: str, config: dict) -> Path | None:
    """With --out-dir, the deterministic result file of this config; None when it exists and --force is off."""
    from .report import read_result, result_file

    path = result_file(args.out_dir, kind, config)
    if path.exists() and not args.force:
        if read_result(path) is not None:
            print(f"{path} exists; skipping (use --force to redo)")
            return None
        print(f"{path} is torn or unreadable; computing it again", file=sys.stderr)
    return path


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
    for ck in found:
        try:
            meta = read_meta(ck)
        except UsageError as e:
            print(f"  {ck.name:28s} unreadable: {e}")
            continue
        t = meta["training"]
        weights = "" if (ck / ADAPTER).is_file() else "  (config and log only: no weights)"
        print(
            f"  {ck.name:28s} {meta['method']['name']:10s} {t.get('steps_done', t['steps'])} steps, "
            f"objective {t.get('objective', 'lm')}, data {t['data']}{weights}"
        )
    return 0


def cmd_export(args) -> int:
    from .atomic import check_writable
    from .export import export

    fmt, out = args.to
    if Path(out).exists():
        raise UsageError(f"--to {fmt} {out} exists; give a new folder (an export never replaces one)")
    check_writable(Path(out).parent / f".{Path(out).name}.probe", f"--to {fmt}")  # the folder that will hold it
    print(f"exported to {export(args.checkpoint, fmt, out)}")
    return 0
