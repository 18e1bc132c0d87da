"""The flags of the two largest subcommands, train and eval (the parsers are assembled in :mod:`kvcondense.cli`)."""

from __future__ import annotations

import argparse

from .cli_args import (
    _add_common,
    _add_device,
    _add_method_flags,
    _count_list,
    _memory_names,
    _method,
    _nonnegative_int,
    _positive_int,
    _ratio,
    _ratio_list,
)


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
        "--teacher-dtype",
        default=None,
        choices=["float32", "bfloat16"],
        help="the frozen teacher's forward: float32 (default, exact) or bfloat16 autocast (about 2x faster on GPUs "
        "and AMX CPUs, targets off by ~6e-4 nats per token)",
    )
    p.add_argument(
        "--max-grad-norm", type=float, default=None, help="clip the gradient norm to this (default 1.0; 0: off)"
    )
    p.add_argument(
        "--continuation-tokens",
        type=int,
        default=None,
        help="the last N tokens of each block are plain text reading the compressed rest (the prefix task's shape)",
    )
    p.add_argument(
        "--sample-ratios",
        type=_ratio_list,
        default=None,
        help="draw each block's ratio from these, e.g. 0.5,0.75,0.875 (one adapter for several KV budgets)",
    )
    p.add_argument(
        "--sample-chunks",
        type=_count_list,
        default=None,
        help="online episodes: cut each example to its last T chunks (the evidence kept), T drawn from these, "
        "e.g. 1,2,4,8 (a memory trained on fewer facts at a time)",
    )
    p.add_argument(
        "--report-to",
        nargs="+",
        default=None,
        metavar="TRACKER",
        help="also log to these experiment trackers (Accelerate's: tensorboard, wandb, mlflow, comet_ml, aim, "
        "clearml, dvclive, swanlab, trackio; the package must be installed), files under OUT/trackers",
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
    p.add_argument(
        "--split",
        default="test",
        choices=["train", "validation", "test", "all"],
        help="which documents to score (default test; all: every document of --data, e.g. a file kept apart)",
    )
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
        help="qa, needle: also score full attention with the same weights (what the checkpoint does uncompressed); "
        "prefix: also the KL to the base model (a checkpoint's adapters off) and its perplexity",
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
        "--questions",
        type=_positive_int,
        default=1,
        help="qa on recall episodes: questions per context, all reading one compressed context (multi-query)",
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
