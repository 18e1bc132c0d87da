"""Command line: thin argparse subcommands over the package modules.

    kvcondense train    --method M [--ratio R] [--model X] [--data D] [--steps S] --out DIR [--resume]
    kvcondense eval     (--checkpoint DIR | --method M) [--ratio R ...] [--model X] [--data D] [--json FILE]
    kvcondense generate --checkpoint DIR (--prompt TEXT | --prompt-file F) [--max-new-tokens N]
    kvcondense chat     --checkpoint DIR [--stats] [--save F] [--load F]   (online compressed memory, ccm checkpoints)
    kvcondense bench    [--method M | --checkpoint DIR] [--context N ...] [--batch B ...] [--kv-budget-mb MiB]
    kvcondense report   RUN_DIR [RUN_DIR ...] [--out DIR]
    kvcondense demo     [--quick] [--force]

A mistake of the user's (bad flag, missing file, wrong model) ends with one line on stderr and exit status 2.
Argument types and the generated method flags are in :mod:`kvcondense.cli_args`, the train and eval flags in
:mod:`kvcondense.cli_flags`, what each command does in :mod:`kvcondense.commands` (imported when one runs).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from contextlib import contextmanager, nullcontext

from .cli_args import _add_common, _add_device, _add_method_flags, _method, _method_params, _positive_int, _ratio
from .cli_flags import _eval_flags, _train_flags
from .errors import UsageError

USER_ERRORS = (UsageError,)
# what other code takes from here (tests read cli._method_params, which lives in cli_args)
__all__ = ("COMMANDS", "USER_ERRORS", "Parser", "_method_params", "build_parser", "main")


def _run(command: str):
    """The function that runs ``command`` (imported from :mod:`kvcondense.commands` when it runs)."""

    def run(args) -> int:
        from . import commands

        return getattr(commands, f"cmd_{command}")(args)

    return run


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line naming the problem (and exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _chat_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", required=True, help="a memory checkpoint: ccm-concat, ccm-merge (or full, window, no-context)"
    )
    p.add_argument("--model", default=None, help="where to load the checkpoint's base model from")
    p.add_argument("--stats", action="store_true", help="print 'memory: N slots, M bytes' after every turn")
    p.add_argument("--max-new-tokens", type=_positive_int, default=48)
    p.add_argument("--load", default=None, help="start from a memory file saved by --save")
    p.add_argument("--save", default=None, help="write the memory to this file at the end")
    _add_device(p)


def _generate_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="checkpoint directory (omit to use --method without training)")
    p.add_argument("--method", type=_method, default=None)
    p.add_argument("--ratio", type=_ratio, default=None)
    _add_method_flags(p)
    p.add_argument("--model", default=None)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt")
    group.add_argument("--prompt-file")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64)
    p.add_argument(
        "--prefill-chunk",
        type=_positive_int,
        default=512,
        help="prefill chunk size: tokens per forward; the peak KV is what is kept plus one chunk (default 512; full "
        "attention on sdpa reads the prompt in one causal pass, as transformers does)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for span placement and sampling (default 0)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (default 0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1: off)")
    p.add_argument("--stop", action="append", default=[], help="stop once the text contains this string (repeatable)")
    p.add_argument("--stream", action="store_true", help="print the tokens as they are generated")
    p.add_argument(
        "--chat",
        action="store_true",
        help="wrap the prompt in the model's chat template as a user turn (instruct models such as the default)",
    )
    p.add_argument("--json", default=None, help="also write the text and the cache statistics to this JSON file")
    p.add_argument(
        "--allow-long-context",
        action="store_true",
        help="let the prompt run past the model's trained context (positions extrapolate; use with care)",
    )
    _add_device(p)


def _bench_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", type=_method, default=None, help="method without training (default sentinel)")
    p.add_argument("--ratio", type=_ratio, default=None, help="compression ratio (default 0.5)")
    p.add_argument("--checkpoint", default=None, help="use a trained checkpoint's model and method")
    _add_common(p)
    p.add_argument("--context", type=_positive_int, nargs="+", default=[1024], help="context lengths in tokens")
    p.add_argument("--batch", type=_positive_int, nargs="+", default=[1], help="batch sizes for decoding")
    p.add_argument("--steps", type=_positive_int, default=8, help="timed decode steps (median reported)")
    p.add_argument(
        "--prefill-chunk",
        type=_positive_int,
        default=512,
        help="prefill chunk size (tokens per forward; full attention on sdpa: one pass)",
    )
    p.add_argument(
        "--kv-budget-mb", type=float, default=None, help="fixed KV memory in MiB (2**20 bytes): largest batch that fits"
    )
    p.add_argument("--max-batch", type=_positive_int, default=64, help="cap for the batch search under --kv-budget-mb")
    p.add_argument("--slack", type=int, default=64, help="dead slots a row may hold before a decode compaction")
    p.add_argument("--json", help="write the results as JSON to this file")
    p.add_argument("--out-dir", default=None, help="write result.json under a directory named from the config")
    p.add_argument("--force", action="store_true", help="with --out-dir: redo a result that exists")
    _add_device(p)


def _report_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("dirs", nargs="+", help="directories holding result JSON files")
    p.add_argument("--out", default=None, help="output directory (default: DIR/report of the first)")


def _demo_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a tiny budget (used by the test suite)")
    p.add_argument("--max-tokens", type=_positive_int, default=None, help="perplexity tokens per row (default 4096)")
    _add_common(p)
    p.add_argument("--checkpoints", default=None, help="folder of checkpoints (default: the committed ones)")
    p.add_argument("--out", default="runs/demo", help="where results, report and plots go")
    p.add_argument("--bertscore-encoder", default=None, help="local encoder dir (default MiniLM)")
    p.add_argument("--force", action="store_true", help="recompute results that exist")
    _add_device(p)


def _list_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoints", default="checkpoints", help="where to look for checkpoints (default checkpoints)")


def _export_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint directory made by train")
    p.add_argument("--to", nargs=2, required=True, metavar=("FORMAT", "DIR"), help="peft DIR or merged DIR (new)")


COMMANDS = {
    "train": ("train a method's LoRA and token rows; writes a checkpoint", _train_flags),
    "eval": ("held-out perplexity, measured compression and stored KV", _eval_flags),
    "chat": ("chat with a compressed memory (ccm checkpoints); reads stdin when piped", _chat_flags),
    "generate": ("generate from a compressed prompt and print cache statistics", _generate_flags),
    "bench": ("throughput and memory, compressed against full attention, as ratios", _bench_flags),
    "report": ("markdown table and PNG plots from result directories", _report_flags),
    "demo": ("the main job on the embedded defaults", _demo_flags),
    "list": ("the methods, corpora, default model and the checkpoints under a folder", _list_flags),
    "export": ("write a checkpoint as a peft adapter or a plain merged model, with a model card", _export_flags),
}  # name: (help line, the builder of its flags)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The command line. With ``argv``, only the command it names gets its flags (building the method flags
    imports torch: ``kvcondense --help`` answers at once); without, every command gets them."""
    chosen = next((a for a in argv if a in COMMANDS), None) if argv is not None else None
    parser = Parser(prog="kvcondense", description="Learned context compression for Hugging Face causal LMs.")
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("-v", "--verbose", action="store_true", help="debug lines, and transformers' own messages")
    noise.add_argument("-q", "--quiet", action="store_true", help="errors only, no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_line, add_flags) in COMMANDS.items():
        p = sub.add_parser(name, help=help_line)
        if argv is None or name == chosen:  # the others are listed in the top-level help only
            add_flags(p)
            p.set_defaults(func=_run(name))
    return parser


class _Stderr(logging.Handler):
    """kvcondense's log lines on whatever ``sys.stderr`` is at the time (tests swap it), message only."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr)


def _logging(verbose: bool, quiet: bool) -> None:
    """--quiet: errors only, no progress bars; default: kvcondense's notices and bars, transformers' errors;
    --verbose: debug lines and transformers' own messages and bars too."""
    from transformers.utils import logging as hf_logging

    root = logging.getLogger("kvcondense")
    if not any(isinstance(h, _Stderr) for h in root.handlers):
        root.addHandler(_Stderr())
    root.propagate = False
    root.setLevel(logging.ERROR if quiet else logging.DEBUG if verbose else logging.INFO)
    if verbose:
        hf_logging.set_verbosity_info()
        hf_logging.enable_progress_bar()
    else:
        hf_logging.set_verbosity_error()  # our own progress bars and messages are enough
        hf_logging.disable_progress_bar()


@contextmanager
def _no_progress_bars():
    """--quiet: every tqdm bar is created disabled while the command runs (put back after)."""
    from tqdm import std

    init = std.tqdm.__init__

    def disabled(self, *args, **kwargs):
        init(self, *args, **{**kwargs, "disable": True})

    std.tqdm.__init__ = disabled
    try:
        yield
    finally:
        std.tqdm.__init__ = init


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser(sys.argv[1:] if argv is None else argv).parse_args(argv)
    _logging(args.verbose, args.quiet)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft calls a deprecated name
    try:
        with _no_progress_bars() if args.quiet else nullcontext():
            return args.func(args)
    except USER_ERRORS as e:
        print(f"kvcondense {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
