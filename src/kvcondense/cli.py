"""Command line: thin argparse subcommands over the package modules.

    kvcondense train    --method M [--ratio R] [--model X] [--data D] [--steps S] --out DIR [--resume]
    kvcondense eval     (--checkpoint DIR | --method M) [--ratio R ...] [--model X] [--data D] [--json FILE]
    kvcondense generate --checkpoint DIR (--prompt TEXT | --prompt-file F) [--max-new-tokens N]
    kvcondense chat     --checkpoint DIR [--stats] [--save F] [--load F]   (online compressed memory, ccm checkpoints)
    kvcondense bench    [--method M | --checkpoint DIR] [--context N ...] [--batch B ...] [--kv-budget-mb MB]
    kvcondense report   RUN_DIR [RUN_DIR ...] [--out DIR]
    kvcondense demo     [--quick] [--force]

A mistake of the user's (bad flag, missing file, wrong model) ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import warnings
from contextlib import contextmanager, nullcontext

from .defaults import DEFAULT_MODEL
from .errors import UsageError

USER_ERRORS = (UsageError,)


def _memory_names() -> tuple:
    from .memory_eval import MEMORY_BASELINES, OTHER_MEMORY

    return MEMORY_BASELINES, OTHER_MEMORY


def _methods() -> dict:
    """The method registry, imported when a command needs it (it brings torch; --help does not)."""
    from .methods import METHODS

    return METHODS


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratio must be a number in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"ratio must be in (0, 1), got {value}")
    return value


def _ratio_list(text: str) -> list[float]:
    return [_ratio(part) for part in text.split(",") if part.strip()]


def _int_at_least(low: int):
    """An argparse type: a whole number >= ``low``, or one line saying what was expected."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_nonnegative_int = _int_at_least(0)


def _method(text: str) -> str:
    if text not in _methods():
        raise argparse.ArgumentTypeError(f"unknown method {text!r}; choose one of: {', '.join(_methods())}")
    return text


def _method_fields() -> dict[str, tuple[dataclasses.Field, list[str]]]:
    """Every method hyperparameter but the ratio (each command gives that its own flag), with the methods that
    have it: the flags come from the method dataclasses, so a new field is a new flag with no edit here."""
    fields: dict[str, tuple[dataclasses.Field, list[str]]] = {}
    for name, cls in _methods().items():
        for f in dataclasses.fields(cls):
            if f.name != "ratio":
                fields.setdefault(f.name, (f, []))[1].append(name)
    return fields


def _field_type(f: dataclasses.Field):
    """The parse type of a field from its annotation (``int``, ``float | None``, ...)."""
    kinds = {"int": int, "float": float, "str": str, "bool": bool}
    if isinstance(f.type, type):
        return f.type
    names = [part.strip() for part in str(f.type).split("|")]  # "float | None" (postponed annotations)
    return next(kinds[n] for n in names if n in kinds)


def _add_method_flags(p: argparse.ArgumentParser) -> None:
    for name, (f, methods) in _method_fields().items():
        meta = f.metadata
        flag = meta.get("flag") or "--" + name.replace("_", "-")
        defaults = {m: getattr(_methods()[m], name, f.default) for m in methods}
        help_text = f"{', '.join(methods)}: {meta.get('help', name)}"
        if _field_type(f) is bool:  # --x turns on a default-off switch, --no-x turns off a default-on one
            p.add_argument(flag, dest=name, action="store_const", const=not f.default, default=None, help=help_text)
            continue
        shown = ", ".join(f"{m} {d}" for m, d in defaults.items()) if len(set(defaults.values())) > 1 else f.default
        p.add_argument(
            flag,
            dest=name,
            type=_field_type(f),
            choices=meta.get("choices"),
            default=None,
            help=f"{help_text} (default {shown})",
        )


def _method_params(args) -> dict:
    """The method hyperparameters typed on the command line (None: not typed)."""
    return {name: getattr(args, name) for name in _method_fields() if getattr(args, name, None) is not None}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help=f"registered name, local HF directory, or Hub id (org/name, from the local HF cache) "
        f"(default {DEFAULT_MODEL})",
    )
    p.add_argument("--data", default="wiki", help="built-in corpus (wiki) or .txt/.jsonl file or folder")


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when a GPU is there, else cpu)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="weights and activations (default: bfloat16 on a GPU, float32 on the CPU)",
    )


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


def _train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", type=_method, default=None, help="the method to train (or from --config)")
    p.add_argument(
        "--config",
        default=None,
        help="a JSON or YAML file of training settings (TrainConfig's fields, or a checkpoint's kvcondense.json); "
        "flags typed on the command line override it",
    )
    p.add_argument("--ratio", type=_ratio, default=None, help="compression ratio in (0, 1) (default 0.5)")
    _add_method_flags(p)
    p.add_argument(
        "--stage",
        default=None,
        choices=["rows", "lora", "full"],
        help="what trains: new token rows only, LoRA + rows (default), or every weight",
    )
    p.add_argument("--init-from", default=None, help="start from this checkpoint's trained tensors (stage 1 -> 2)")
    p.add_argument("--lora-rank", type=_positive_int, default=None, help="LoRA rank (default 16)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scaling numerator (default 2 x rank)")
    p.add_argument("--lora-dropout", type=float, default=None, help="dropout on the LoRA input (default 0.05)")
    _add_common(p)
    p.set_defaults(data=None)  # None: not typed (a resumed run keeps its own); a new run takes wiki
    p.add_argument("--steps", type=_positive_int, default=None, help="optimizer steps (default 300)")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="blocks per step (default 2)")
    p.add_argument("--grad-accum", type=_positive_int, default=None, help="micro-batches per step (default 1)")
    p.add_argument("--block-tokens", type=_positive_int, default=None, help="text tokens per block (default 256)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 3e-4)")
    p.add_argument("--schedule", default=None, help="learning-rate schedule: linear (default), cosine, constant")
    p.add_argument("--warmup-steps", type=_nonnegative_int, default=None, help="linear warm-up steps (default 0)")
    p.add_argument(
        "--attention",
        default=None,
        choices=["auto", "sdpa", "flex"],
        help="auto (default): sdpa on CPU, flex_attention (block-sparse) on CUDA for blocks of 2048+ tokens",
    )
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations (longer blocks)")
    p.add_argument(
        "--objective",
        default=None,
        choices=["lm", "kl", "lm+kl"],
        help="lm: next-token loss (default); kl: match the frozen uncompressed model on every text prediction; "
        "lm+kl: both",
    )
    p.add_argument("--kl-weight", type=float, default=None, help="weight of the KL term (default 1.0)")
    p.add_argument("--temperature", type=float, default=None, help="KL temperature (default 1.0)")
    p.add_argument(
        "--max-grad-norm", type=float, default=None, help="clip the gradient norm to this (default 1.0; 0: off)"
    )
    p.add_argument(
        "--sample-ratios",
        type=_ratio_list,
        default=None,
        help="draw each block's ratio from these, e.g. 0.5,0.75,0.875 (one adapter for several KV budgets)",
    )
    p.add_argument("--seed", type=int, default=None, help="seed for data order, spans and init (default 0)")
    p.add_argument(
        "--save-every",
        type=_nonnegative_int,
        default=None,
        help="steps between saves, 0: at the end (default 50)",
    )
    p.add_argument("--out", default=None, help="checkpoint folder (written atomically; or from --config)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out (its settings are kept)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace another kvcondense checkpoint at --out (a folder that is not one is never replaced)",
    )


def _eval_flags(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint directory made by train")
    src.add_argument("--method", type=_method, help="evaluate a method without training (baselines, ablations)")
    p.add_argument(
        "--ratio",
        type=_ratio,
        nargs="+",
        default=None,
        help="one or more ratios (default: a checkpoint's trained ratio, else 0.5)",
    )
    _add_method_flags(p)
    _add_common(p)
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--max-tokens", type=_positive_int, default=8192, help="text tokens to score (default 8192)")
    p.add_argument("--block-tokens", type=_positive_int, default=None, help="text tokens per block (default 256)")
    p.add_argument("--batch-size", type=_positive_int, default=4)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--verify", action="store_true", help="also run the evicting cache and report max_abs_diff")
    p.add_argument(
        "--long-doc",
        action="store_true",
        help="long-document mode: blocks of 4096 tokens (unless --block-tokens) and perplexity against prefix length",
    )
    p.add_argument(
        "--task",
        default="perplexity",
        choices=["perplexity", "continuation", "prefix", "qa", "needle"],
        help="perplexity (default); continuation: generate after a compressed prefix (ROUGE-L, BERTScore); prefix: "
        "score --new-tokens over a compressed --prefix-tokens context, with KL to full attention; qa: questions "
        "over compressed contexts from --data FILE.jsonl; needle: a passkey hidden in held-out text",
    )
    p.add_argument(
        "--answer-tokens", type=_positive_int, default=16, help="qa, needle: most tokens of a generated answer"
    )
    p.add_argument(
        "--needle-lengths",
        type=_positive_int,
        nargs="+",
        default=[512, 1024, 2048, 4096],
        help="needle: context tokens",
    )
    p.add_argument(
        "--needle-depths",
        type=float,
        nargs="+",
        default=[0.0, 0.25, 0.5, 0.75, 1.0],
        help="needle: where the passkey sits (fraction of the context before it); --docs: contexts per cell",
    )
    p.add_argument(
        "--kv-budget",
        type=_ratio,
        nargs="+",
        default=None,
        help="prefix: fraction of the context's KV kept, e.g. 0.5 0.25 0.125 (sets the ratio of methods that have one)",
    )
    p.add_argument(
        "--export-tasks", default=None, help="prefix, qa, needle: also write the token ids (for the kvpress runner)"
    )
    p.add_argument(
        "--reference",
        action="store_true",
        help="qa, needle: also score full attention with the same weights (what the checkpoint does uncompressed)",
    )
    p.add_argument(
        "--prefix-tokens", type=_positive_int, default=512, help="continuation, prefix: tokens of the compressed prefix"
    )
    p.add_argument(
        "--new-tokens", type=_positive_int, default=64, help="continuation, prefix: tokens generated / scored"
    )
    p.add_argument("--docs", type=_positive_int, default=8, help="continuation: documents; prefix: windows")
    p.add_argument("--no-bertscore", action="store_true", help="continuation: ROUGE-L only")
    p.add_argument("--bertscore-encoder", default=None, help="continuation: local encoder dir (default MiniLM)")
    p.add_argument(
        "--time-steps", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="memory: compressed chunks t to score"
    )
    p.add_argument(
        "--episodes",
        type=_positive_int,
        default=40,
        help="memory: episodes scored at every t; qa on episodes: episodes asked",
    )
    p.add_argument(
        "--baselines",
        nargs="*",
        choices=_memory_names()[0],
        default=None,
        help="memory: also score these baselines (no names: all four; the window at the method's KV budget; "
        f"{_memory_names()[1]}: the method reading another episode's memory, the control)",
    )
    p.add_argument("--json", help="write the results as JSON to this file")
    p.add_argument("--out-dir", default=None, help="write result.json under a directory named from the config")
    p.add_argument("--force", action="store_true", help="with --out-dir: redo a result that exists")
    _add_device(p)


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
    p.add_argument("--prefill-chunk", type=_positive_int, default=64, help="prefill chunk size (tokens per forward)")
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
    p.add_argument("--prefill-chunk", type=_positive_int, default=512, help="prefill chunk size (tokens per forward)")
    p.add_argument("--kv-budget-mb", type=float, default=None, help="fixed KV memory: largest batch that fits")
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
