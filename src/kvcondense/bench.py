"""Throughput and memory, compressed against full attention, measured in one run as ratios.

For each context length: one real chunked prefill per variant (compressed with eviction, and full), which gives
the prefill time and the KV bytes each actually stores; then the stored history is repeated over a batch and
decode steps are timed, the compressed and the full stream stepped in turn so that each ratio is paired with its
reference (the method's decode policy keeps compressing what is generated); a ratio whose paired steps disagree
is flagged ``noisy``. With
``--kv-budget-mb``, the largest batch whose stored KV fits the budget is found for each variant and its
throughput measured: the paper's "system throughput at fixed memory".

    kvcondense bench --method sentinel --ratio 0.5 --context 4096 --batch 8 --json bench.json
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from .data import load_corpus
from .engine import Stream
from .errors import UsageError
from .methods import FullAttention, Method, TokenizedText, tokenize


@dataclass
class BenchConfig:
    """What to measure.

    Attributes:
        method, ratio, checkpoint: the compressed variant (a checkpoint gives the trained model; timing and memory
            do not depend on the weights, so an untrained method measures the same).
        model, data: base model and the corpus the contexts are cut from (test split).
        contexts: context lengths in text tokens.
        batches: batch sizes for the decode measurement.
        decode_steps: timed decode steps per measurement (the median is reported).
        chunk: prefill chunk size.
        kv_budget_mb: find the largest batch fitting this much stored KV (MiB, 2**20 bytes), per variant, and
            measure it.
        max_batch: cap on the batch searched for under the budget.
        slack: dead slots a row may hold before a decode-time compaction (see ``EvictingCache.evict``).
    """

    method: str = "sentinel"
    ratio: float = 0.5
    checkpoint: str | None = None
    model: str | None = None
    data: str = "wiki"
    contexts: list[int] = field(default_factory=lambda: [1024])
    batches: list[int] = field(default_factory=lambda: [1])
    decode_steps: int = 8
    chunk: int = 512
    kv_budget_mb: float | None = None
    max_batch: int = 64
    slack: int = 64
    device: str | None = None
    dtype: str | None = None

    def __post_init__(self) -> None:
        if min(self.contexts) < 8 or min(self.batches) < 1 or self.decode_steps < 1:
            raise UsageError("contexts must be >= 8 tokens, batches and --steps >= 1")
        if self.kv_budget_mb is not None and not 0 < self.kv_budget_mb < float("inf"):  # NaN and inf too
            raise UsageError(f"--kv-budget-mb must be a number > 0, got {self.kv_budget_mb}")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def context_text(tokenizer, data: str, n: int) -> TokenizedText:
    """The first ``n`` tokens of the corpus's documents, joined (timing and memory do not depend on the split)."""
    docs, text = load_corpus(data), None
    for k in range(1, len(docs) + 1):  # join just enough documents
        text = tokenize("\n".join(d.text for d in docs[:k]), tokenizer)
        if len(text) >= n:
            return text[:n]
    raise UsageError(f"{data} has only {len(text)} tokens, fewer than --context {n}")


NOISY_SPREAD = 0.25  # a paired ratio whose interquartile range exceeds this fraction of its median is flagged


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def _quartiles(xs: list[float]) -> tuple[float, float]:
    xs = sorted(xs)
    return xs[len(xs) // 4], xs[(3 * len(xs)) // 4]


@torch.no_grad()
def decode_step_times(streams: dict[str, Stream], steps: int) -> dict[str, list[float]]:
    """Wall time (ms) of each of ``steps`` decode steps of every stream, interleaved (step i of every stream, then
    step i + 1), so that a slow stretch of a busy machine hits every variant alike. Every row is fed the same
    tokens: 100, 101, ..."""
    cuda = next(iter(streams.values())).model.device.type == "cuda"
    times: dict[str, list[float]] = {name: [] for name in streams}
    for i in range(steps):
        for name, stream in streams.items():
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            stream.step([100 + i])
            if cuda:
                torch.cuda.synchronize()
            times[name].append(1e3 * (time.perf_counter() - t))
    return times


@torch.no_grad()
def timed_prefill(model, method: Method, text: TokenizedText, token_ids, chunk: int) -> tuple[Stream, dict]:
    """Prefill one row through the engine, timed. Returns the stream and what the cache held.

    Full attention reads its prompt in one causal pass (nothing to free between chunks), as transformers does, so
    its ``cuda_max_memory_allocated`` includes that pass's activations; a compressing method's is paced by
    ``chunk``. Compare stored KV with ``kv_bytes`` / ``peak_kv_bytes``."""
    stream = Stream(model, method, token_ids)
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    stream.prefill(text, chunk, seed=0)
    out = {
        "prefill_s": time.perf_counter() - t,
        "kv_bytes": stream.cache.kv_bytes(),
        "stored_slots": int(stream.cache.stored_slots()[0]),
        "peak_kv_bytes": stream.peak_kv_bytes,
    }
    if model.device.type == "cuda":
        out["cuda_max_memory_allocated"] = torch.cuda.max_memory_allocated()
    return stream, out


def measure_decode(variants: dict[str, Stream], batch: int, steps: int, slack: int = 0) -> dict:
    """Decode ``steps`` steps of ``batch`` identical rows from each prefilled stream (each from the same history:
    the streams are cloned, not grown), the variants' steps interleaved. Per variant: the median step time and
    every step's time (``step_ms``)."""
    streams = {}
    for name, prefilled in variants.items():
        streams[name] = stream = prefilled.clone()
        stream.slack = slack
        stream.repeat(batch)
    out = {}
    for name, ms in decode_step_times(streams, steps).items():
        median = _median(ms)
        out[name] = {"decode_ms_per_step": median, "decode_tokens_per_s": 1e3 * batch / median, "step_ms": ms}
    return out


def paired_speedup(full_ms: list[float], comp_ms: list[float]) -> dict:
    """The decode speedup (median full step / median compressed step) and its spread over the paired steps: the
    quartiles of step i's full / compressed ratio, and ``noisy`` when their range exceeds ``NOISY_SPREAD`` of the
    median ratio (a busy machine: rerun with more ``--steps``)."""
    ratios = [f / c for f, c in zip(full_ms, comp_ms, strict=True)]
    lo, hi = _quartiles(ratios)
    mid = _median(ratios)
    return {
        "decode_speedup": _median(full_ms) / _median(comp_ms),
        "decode_speedup_quartiles": [lo, hi],
        "noisy": (hi - lo) > NOISY_SPREAD * mid,
    }


def budget_batches(budget_mb: float, per_row: dict[str, int], cap: int) -> dict[str, int]:
    """Largest batch whose stored KV fits the budget, per variant. Refuses a budget that fits no row at all."""
    budget = budget_mb * 2**20
    fits = {name: min(cap, int(budget // max(b, 1))) for name, b in per_row.items()}
    if max(fits.values()) == 0:
        need = min(per_row.values()) / 2**20
        raise UsageError(
            f"--kv-budget-mb {budget_mb} is too small for even one sequence (the smallest needs "
            f"{need:.1f} MiB of KV); raise the budget or shorten --context"
        )
    return fits


def run_bench(cfg: BenchConfig) -> dict:
    """Measure every context and batch of ``cfg``. Returns a JSON-ready dict (see the module docstring)."""
    from .loader import placement

    device, dtype = placement(cfg.device, cfg.dtype)
    model, tokenizer, method, token_ids, label = _load(cfg, cfg.device, dtype)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max(cfg.contexts) + cfg.decode_steps * 2 > limit:
        raise UsageError(f"--context {max(cfg.contexts)} is longer than the model's context of {limit} tokens")
    warm = context_text(tokenizer, cfg.data, min(cfg.contexts))[:64]
    for variant in (method, FullAttention()):  # the first forward of a process pays one-time costs: not timed
        timed_prefill(model, variant, warm, token_ids, cfg.chunk)
    results = [
        _measure_context(cfg, model, method, token_ids, context, context_text(tokenizer, cfg.data, context))
        for context in tqdm(cfg.contexts, desc="bench contexts")
    ]
    last = results[-1]  # the summary is the last context at the last batch size (list them in rising order)
    summary = {
        "decode_speedup": last["batches"][-1]["decode_speedup"],
        "noisy": last["batches"][-1]["noisy"],
        "kv_ratio": last["kv_ratio"],
        "device": device.type,
        "dtype": str(dtype).removeprefix("torch."),
    }
    return {
        "kind": "bench",
        **summary,
        "method": method.name,
        "label": label,  # the loader's name for it, as eval's results give it (``sentinel (trained)``)
        "params": method.params(),
        "contexts": results,
        "config": asdict(cfg),
    }


def _load(cfg: BenchConfig, device: str | None, dtype: torch.dtype):
    """(model, tokenizer, method at ``cfg.ratio``, token ids, label): a trained checkpoint's, or the base model's."""
    from .loader import load

    method = None if cfg.checkpoint else cfg.method
    params = {"ratio": cfg.ratio} if cfg.ratio is not None else {}
    got = load(cfg.checkpoint, method, params, cfg.model, device=device, dtype=dtype)
    return got.model, got.tokenizer, got.method, got.token_ids, got.label


def _measure_context(cfg: BenchConfig, model, method: Method, token_ids, context: int, text: TokenizedText) -> dict:
    """One context: prefill both ways, decode at every batch size, and the fixed-budget profile if asked."""
    comp_stream, comp = timed_prefill(model, method, text, token_ids, cfg.chunk)
    comp["peak_rss_mb_after"] = peak_rss_mb()  # compressed first: its peak is not masked by the full run
    full_method = FullAttention()
    full_stream, full = timed_prefill(model, full_method, text, token_ids, cfg.chunk)
    full["peak_rss_mb_after"] = peak_rss_mb()
    variants = {"compressed": comp_stream, "full": full_stream}
    row = {
        "context": context,
        "compressed": comp,
        "full": full,
        "kv_ratio": comp["kv_bytes"] / full["kv_bytes"],
        "prefill_speedup": full["prefill_s"] / comp["prefill_s"],
        "batches": [],
    }
    for batch in cfg.batches:
        d = measure_decode(variants, batch, cfg.decode_steps, cfg.slack)
        paired = paired_speedup(d["full"]["step_ms"], d["compressed"]["step_ms"])
        row["batches"].append({"batch": batch, **d, **paired})
    if cfg.kv_budget_mb is not None:
        row["fixed_budget"] = _fixed_budget(cfg, variants, comp["kv_bytes"], full["kv_bytes"])
    return row


def _fixed_budget(cfg: BenchConfig, variants: dict, comp_bytes: int, full_bytes: int) -> dict:
    """The paper's profile: the largest batch each variant fits in ``cfg.kv_budget_mb`` and its decode throughput."""
    fits = budget_batches(cfg.kv_budget_mb, {"compressed": comp_bytes, "full": full_bytes}, cfg.max_batch)
    measured = {}
    for name, b in fits.items():
        if b == 0:
            measured[name] = {"batch": 0, "decode_tokens_per_s": 0.0}
            continue
        measured[name] = {"batch": b, **measure_decode({name: variants[name]}, b, cfg.decode_steps, cfg.slack)[name]}
    both = bool(fits["full"])
    return {
        "kv_budget_mb": cfg.kv_budget_mb,
        **measured,
        "sequences_ratio": fits["compressed"] / fits["full"] if both else None,
        "throughput_ratio": (
            measured["compressed"]["decode_tokens_per_s"] / measured["full"]["decode_tokens_per_s"] if both else None
        ),
    }


def format_bench(res: dict) -> str:
    lines = [f"{res['method']} {res['params']} on {res['device']} ({res['dtype']})"]
    for row in res["contexts"]:
        lines.append(
            f"context {row['context']}: KV stored {row['compressed']['kv_bytes'] / 2**20:.1f} MiB vs "
            f"{row['full']['kv_bytes'] / 2**20:.1f} MiB (kv_ratio {row['kv_ratio']:.3f}); prefill "
            f"{row['compressed']['prefill_s']:.1f} s vs {row['full']['prefill_s']:.1f} s"
        )
        for b in row["batches"]:
            lines.append(
                f"  batch {b['batch']}: decode {b['compressed']['decode_ms_per_step']:.1f} ms vs "
                f"{b['full']['decode_ms_per_step']:.1f} ms per step -> decode_speedup {b['decode_speedup']:.2f}"
                + (" (noisy: the paired steps disagree; rerun with more --steps)" if b.get("noisy") else "")
            )
        if "fixed_budget" in row:
            fb = row["fixed_budget"]
            lines.append(
                f"  KV budget {fb['kv_budget_mb']} MiB: compressed fits batch {fb['compressed']['batch']} "
                f"({fb['compressed']['decode_tokens_per_s']:.1f} tok/s), full fits {fb['full']['batch']} "
                f"({fb['full']['decode_tokens_per_s']:.1f} tok/s)"
            )
    return "\n".join(lines)
