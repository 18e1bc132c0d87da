"""The commands that run a model on text and measure or report it: eval, bench, generate, chat, report (with the
result-file helpers eval and bench share). Reached through :mod:`kvcondense.commands`, imported only when a command
runs, so that ``kvcondense --help`` loads nothing heavy.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

from .cli_args import _memory_names, _method_params
from .errors import UsageError


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
        questions=args.questions,
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
    from .chat_loop import chat
    from .session import MemorySession

    if args.save:
        from .atomic import check_writable
        from .memory_file import check_save_path

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
            session,
            sys.stdin,
            sys.stdout,
            sys.stderr,
            stats=args.stats,
            max_new_tokens=args.max_new_tokens,
            echo=not interactive,  # piped lines were never shown: the transcript reads as a dialogue
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
    """With --out-dir, the deterministic result file of this config; None when it exists and --force is off (its
    results then go to --json, as a run would have written them)."""
    from .report import find_result_file, read_result

    path = find_result_file(args.out_dir, kind, config)
    if path.exists() and not args.force:
        if (cached := read_result(path)) is not None:
            print(f"{path} exists; skipping (use --force to redo)")
            if args.json:
                _write_json(args.json, cached)
                print(f"its results written to {args.json}")
            return None
        print(f"{path} is torn or unreadable; computing it again", file=sys.stderr)
    return path
