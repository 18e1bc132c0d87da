"""Held-out perplexity over text tokens under compression, with measured compression and stored KV.

Perplexity uses one parallel masked forward per batch of blocks (fast). The KV actually stored is measured by
running the first block through the evicting cache; ``verify`` also compares that run's logits with the
parallel forward.

    kvcondense eval --checkpoint checkpoints/sentinel-r0.5 --json results.json
    kvcondense eval --method streaming --ratio 0.3 0.5 0.7
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .continuation import continuation_quality, continuation_samples
from .data import load_split
from .engine import incremental_forward
from .errors import UsageError
from .forward import parallel_forward
from .layout import IGNORE, Kind
from .loader import load
from .methods import Method, TokenizedText, build_method, tokenize
from .metrics import BertScore
from .train import text_blocks
from .verify import check_family, max_abs_diff

TASKS = ("perplexity", "continuation", "memory", "prefix", "qa", "needle")


@dataclass
class EvalConfig:
    """What to evaluate and on which text.

    Attributes:
        checkpoint: checkpoint directory (trained method), or None to evaluate ``method`` untrained.
        method: method name when no checkpoint is given (baselines, untrained ablations).
        ratios: compression ratios to evaluate; each gives one result (methods without a ratio give one). Empty:
            the method's own ratio (a checkpoint's trained one; 0.5 for an untrained method).
        method_params: other method hyperparameters (e.g. ``{"n_gist": 4}``); with a checkpoint they must agree
            with it.
        model: base model (default: the checkpoint's, or the embedded default).
        data: corpus name or path; its ``split`` is scored.
        split: train, validation or test.
        max_tokens: text tokens to score at most.
        block_tokens: text tokens per block (each block is compressed and scored independently).
        batch_size: blocks per forward pass.
        verify: compare the parallel and the incremental forward on the first block.
        seed: seed for span placement and scattered keys (the same for every method).
        prefix_buckets: also report perplexity against prefix length, in buckets with these upper bounds (text
            tokens); use with long blocks (the long-document mode).
        task: ``perplexity`` or ``continuation`` (generate after a compressed prefix; ROUGE-L and BERTScore).
        prefix_tokens, new_tokens, docs: continuation: prefix length, generated length, number of documents.
        bertscore: continuation: also compute BERTScore (``bertscore_encoder``: a local encoder directory, default
            the embedded MiniLM).
        time_steps, episodes, baselines: memory (online episodes, chosen automatically for episode data): the
            numbers of compressed chunks t, the episodes scored at every t, and whether the no-context, full and
            sliding-window baselines (those named) are scored beside the method (see :mod:`kvcondense.memory_eval`).
    """

    checkpoint: str | None = None
    method: str | None = None
    device: str | None = None
    dtype: str | None = None
    ratios: tuple[float, ...] = ()
    method_params: dict = field(default_factory=dict)
    model: str | None = None
    data: str = "wiki"
    split: str = "test"
    max_tokens: int = 8192
    block_tokens: int = 256
    batch_size: int = 4
    verify: bool = False
    seed: int = 1234
    prefix_buckets: tuple[int, ...] = ()
    task: str = "perplexity"
    prefix_tokens: int = 512
    new_tokens: int = 64
    docs: int = 8
    bertscore: bool = True
    bertscore_encoder: str | None = None
    time_steps: tuple[int, ...] = (1, 2, 4, 8, 16)
    episodes: int = 40
    baselines: tuple[str, ...] = ()
    kv_budgets: tuple[float, ...] = ()
    export_tasks: str | None = None
    answer_tokens: int = 16
    needle_lengths: tuple[int, ...] = (512, 1024, 2048, 4096)
    needle_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    reference: bool = False

    def __post_init__(self) -> None:
        if (self.checkpoint is None) == (self.method is None):
            raise UsageError("give exactly one of --checkpoint or --method")
        if self.max_tokens < 2 or self.block_tokens < 2:
            raise UsageError("--max-tokens and --block-tokens must be >= 2")
        if self.task not in TASKS:
            raise UsageError(f"unknown task {self.task!r}; choose one of {TASKS}")
        if any(not 0 <= d <= 1 for d in self.needle_depths):
            raise UsageError(f"--needle-depths are fractions in [0, 1], got {list(self.needle_depths)}")
        if min(self.prefix_tokens, self.new_tokens, self.docs) < 1:
            raise UsageError("--prefix-tokens, --new-tokens and --docs must be >= 1")


def load_for_eval(cfg: EvalConfig):
    """(model, tokenizer, method, token_ids, label) for a checkpoint or for an untrained method (see
    :func:`kvcondense.loader.load` for which parameters may be set on a checkpoint)."""
    got = load(cfg.checkpoint, cfg.method, cfg.method_params, cfg.model, device=cfg.device, dtype=cfg.dtype)
    return got.model, got.tokenizer, got.method, got.token_ids, got.label


@torch.no_grad()
def perplexity(
    model,
    method: Method,
    blocks: list[TokenizedText],
    token_ids: dict,
    batch_size: int,
    seed: int,
    prefix_buckets: tuple[int, ...] = (),
) -> dict:
    """Perplexity over regular (text) targets and the measured compression, for one method on fixed blocks.

    Methods whose special tokens are LM targets (gist) also get ``perplexity_with_special_targets``: easy
    targets flatter it, so it is reported apart and never as ``perplexity``. With ``prefix_buckets`` (upper
    bounds in text tokens) the regular-token perplexity is also given against prefix length.
    """
    bounds = torch.tensor(sorted(prefix_buckets), dtype=torch.long)
    bucket_nll, bucket_n = torch.zeros(len(bounds), dtype=torch.float64), torch.zeros(len(bounds), dtype=torch.long)
    special = torch.tensor(sorted(token_ids.values()), dtype=torch.long)
    nll, n_scored, nll_all, n_all, kept, n_text, n_special = 0.0, 0, 0.0, 0, 0, 0, 0
    for lo in tqdm(range(0, len(blocks), batch_size), desc=f"eval {method.name}", leave=False):
        layouts = [method.layout(b, token_ids, seed=seed + lo + i) for i, b in enumerate(blocks[lo : lo + batch_size])]
        logits = parallel_forward(model, layouts).logits.float().cpu()  # scored on the CPU, whatever the device
        for b, lay in enumerate(layouts):
            scored = lay.targets != IGNORE
            losses = F.cross_entropy(logits[b, : len(lay)][scored].float(), lay.targets[scored], reduction="none")
            regular = ~torch.isin(lay.targets[scored], special)
            if len(bounds):  # text tokens seen before each scored target = its prefix length
                prefix = torch.cumsum((lay.kinds == Kind.TEXT).long(), 0)[scored][regular]
                which = torch.searchsorted(bounds, prefix, right=False).clamp(max=len(bounds) - 1)
                bucket_nll.index_add_(0, which, losses[regular].double())
                bucket_n.index_add_(0, which, torch.ones_like(which))
            nll += losses[regular].sum().item()
            n_scored += int(regular.sum())
            nll_all += losses.sum().item()
            n_all += losses.numel()
            kept += lay.kept_slots()
            n_text += lay.n_text
            n_special += len(lay) - lay.n_text
    out = {
        "perplexity": math.exp(nll / max(n_scored, 1)),
        "nll": nll / max(n_scored, 1),
        "tokens_scored": n_scored,
        "compression_ratio": kept / max(n_text, 1),
        "kv_slots_kept": kept,
        "kv_slots_full": n_text,
        "special_tokens_inserted": n_special,
    }
    if n_all > n_scored:
        out["perplexity_with_special_targets"] = math.exp(nll_all / n_all)
    if n_special:
        out["R_c"] = n_text / n_special  # regular tokens per inserted special token
    if len(bounds):
        out["perplexity_by_prefix"] = [
            {"prefix_upto": int(b), "perplexity": math.exp(s / n) if n else None, "tokens": int(n)}
            for b, s, n in zip(bounds.tolist(), bucket_nll.tolist(), bucket_n.tolist(), strict=True)
        ]
    return out


def measured_kv(model, method: Method, block: TokenizedText, token_ids: dict, seed: int, verify: bool) -> dict:
    """Run one block through the evicting cache: bytes stored with compression, and without (full attention)."""
    layout = method.layout(block, token_ids, seed=seed)
    _, stats = incremental_forward(model, layout)
    per_slot = stats.kv_bytes / max(stats.stored_slots, 1)
    out = {
        "kv_bytes": stats.kv_bytes,
        "kv_bytes_full": int(per_slot * layout.n_text),
        "kv_peak_bytes": stats.peak_kv_bytes,
        "kv_measured_on": f"first block ({layout.n_text} text tokens)",
    }
    if verify:
        out["verify"] = {"max_abs_diff": max_abs_diff(model, layout), "block_text_tokens": layout.n_text}
    return out


def run_eval(cfg: EvalConfig) -> list[dict]:
    """Evaluate at every ratio of ``cfg``. Returns one JSON-ready dict per ratio (per method and t for memory)."""
    if cfg.task == "memory":
        return run_memory(cfg)
    if cfg.task == "qa":
        from .data.episodes import is_episode_data, load_episodes
        from .qa_task import episodes_as_qa, read_qa

        # bad data fails before the model is loaded
        if is_episode_data(cfg.data):
            items = episodes_as_qa(load_episodes(cfg.data, cfg.split), cfg.episodes)
        else:
            items = read_qa(cfg.data)
        return run_budgets(cfg, *load_for_eval(cfg), qa_items=items)
    docs = load_split(cfg.data, cfg.split)  # bad data fails before the model is loaded
    model, tokenizer, base_method, token_ids, label = load_for_eval(cfg)
    check_family(model)
    if cfg.task in ("prefix", "needle"):
        return run_budgets(cfg, model, tokenizer, base_method, token_ids, label, docs=docs)
    if cfg.task == "continuation":
        samples = continuation_samples(docs, tokenizer, cfg.prefix_tokens, cfg.new_tokens, cfg.docs)
        scorer = BertScore(cfg.bertscore_encoder) if cfg.bertscore else None
    else:
        chosen = scored_blocks(docs, tokenizer, cfg)
    results = []
    has_ratio = "ratio" in base_method.params()
    for ratio in own_ratios(cfg, base_method):
        params = {**base_method.params(), "ratio": ratio} if has_ratio else base_method.params()
        method = build_method(base_method.name, **params)
        res = {"method": method.name, "label": label, "params": method.params(), "task": cfg.task, "kind": cfg.task}
        if cfg.task == "continuation":
            res.update(continuation_quality(model, tokenizer, method, token_ids, samples, cfg.new_tokens, scorer))
        else:
            res.update(perplexity(model, method, chosen, token_ids, cfg.batch_size, cfg.seed, cfg.prefix_buckets))
            res.update(measured_kv(model, method, chosen[0], token_ids, cfg.seed, cfg.verify))
        res["config"] = asdict(cfg)
        results.append(res)
    return results


def own_ratios(cfg: EvalConfig, method: Method) -> tuple:
    """The ratios to evaluate: those asked for, else the method's own (None for a method without a ratio)."""
    if "ratio" not in method.params():
        return (None,)
    return tuple(cfg.ratios) or (method.params()["ratio"],)


def run_budgets(cfg: EvalConfig, model, tokenizer, base_method, token_ids, label, docs=None, qa_items=None):
    """The prefix, qa and needle tasks (a compressed context, then read) at every --kv-budget (or ratio)."""
    from .prefix_task import (
        budget_params,
        check_reachable,
        export_windows,
        full_reference,
        prefix_task,
        prefix_windows,
    )
    from .qa_task import export_qa, needle_grid, needle_items, qa_task

    name = f"{Path(cfg.data).stem}-{cfg.split}"
    if cfg.task == "prefix":
        windows = prefix_windows(docs, tokenizer, cfg.prefix_tokens, cfg.new_tokens, cfg.docs)
        contexts = [ctx for ctx, _ in windows]
        if cfg.export_tasks:
            export_windows(windows, cfg.export_tasks, f"{name}-P{cfg.prefix_tokens}-S{cfg.new_tokens}")
    else:
        if cfg.task == "needle":
            qa_items = needle_items(docs, tokenizer, cfg.needle_lengths, cfg.needle_depths, cfg.docs, cfg.seed)
        contexts = [tokenize(item.context, tokenizer) for item in qa_items]
        if cfg.export_tasks:
            export_qa(qa_items, tokenizer, cfg.export_tasks, f"{cfg.task}-{name}")
    has_ratio = "ratio" in base_method.params()
    points = [("kv_budget", b) for b in cfg.kv_budgets] or [("ratio", r) for r in own_ratios(cfg, base_method)]
    results, reference, full_accuracy = [], None, None  # the full-attention reference: once per model, not per point
    for kind, value in points:
        params = base_method.params()
        if kind == "kv_budget":
            params = budget_params(base_method.name, params, value)
        elif has_ratio:
            params = {**params, "ratio": value}
        method = build_method(base_method.name, **params)
        check_reachable(method, token_ids, [(c, None) for c in contexts], value if kind == "kv_budget" else None)
        res = {"method": method.name, "label": label, "params": method.params(), "task": cfg.task, "kind": cfg.task}
        res["kv_budget"] = value if kind == "kv_budget" else None
        if cfg.task == "prefix":
            if reference is None and len(points) > 1:
                reference = full_reference(model, token_ids, windows)
            res.update(prefix_task(model, method, token_ids, windows, seed=cfg.seed, reference=reference))
        else:
            res.update(qa_task(model, tokenizer, method, token_ids, qa_items, cfg.answer_tokens, seed=cfg.seed))
            if cfg.reference and method.name != "full":  # nothing compressed, the same weights (LoRA included)
                if full_accuracy is None:
                    full = qa_task(model, tokenizer, build_method("full"), token_ids, qa_items, cfg.answer_tokens)
                    full_accuracy = full["accuracy"]
                res["full_accuracy"] = full_accuracy
            if cfg.task == "needle":
                res["grid"] = needle_grid(res["rows"])
        res["compression_ratio_kvpress"] = 1 - res["kv_kept"]  # kvpress's convention: the fraction pruned
        res["config"] = asdict(cfg)
        results.append(res)
    return results


def run_memory(cfg: EvalConfig) -> list[dict]:
    """The online-memory table (CCM) on an episode source."""
    from .data.episodes import load_episodes
    from .memory_eval import run_memory_eval

    episodes = load_episodes(cfg.data, cfg.split)  # bad data fails before the model is loaded
    if min(cfg.time_steps) < 1 or cfg.episodes < 1:
        raise UsageError("--time-steps must be >= 1 and --episodes >= 1")
    model, tokenizer, method, token_ids, _ = load_for_eval(cfg)
    if not method.episodic:
        raise UsageError(f"method {method.name!r} does not take online episodes; use a ccm method or a baseline")
    rows = run_memory_eval(
        model,
        tokenizer,
        method,
        token_ids,
        episodes,
        steps=tuple(cfg.time_steps),
        max_episodes=cfg.episodes,
        batch_size=cfg.batch_size,
        baselines=tuple(cfg.baselines),
        verify=cfg.verify,
    )
    for row in rows:
        row["config"] = asdict(cfg)
    return rows


def scored_blocks(docs, tokenizer, cfg: EvalConfig) -> list[TokenizedText]:
    """The blocks to score: ``block_tokens`` text tokens each, ``max_tokens`` in all."""
    budget, chosen = cfg.max_tokens, []
    for b in text_blocks(docs, tokenizer, cfg.block_tokens):
        if budget <= 0:
            break
        chosen.append(b[:budget])
        budget -= len(chosen[-1])
    chosen = [b for b in chosen if len(b) >= 2]
    if not chosen:
        raise UsageError(
            f"the {cfg.split} split of {cfg.data} has no block of 2+ tokens to score; give more text (a few "
            "thousand words) or evaluate another --split"
        )
    return chosen


def format_table(results: list[dict]) -> str:
    """A plain-text table of results (one row each)."""
    if results and results[0].get("task") == "memory":
        from .memory_eval import format_memory_table

        return format_memory_table(results)
    if results and results[0].get("task") == "prefix":
        head = (
            f"{'method':<28} {'budget':>6} {'KV kept':>8} {'ppl':>8} {'full ppl':>8} {'KL to full':>10} {'tokens':>7}"
        )
        rows = [head, "-" * len(head)]
        for r in results:
            budget = "-" if r.get("kv_budget") is None else f"{r['kv_budget']:.3f}"
            rows.append(
                f"{r['label']:<28} {budget:>6} {r['kv_kept']:>8.3f} {r['perplexity']:>8.3f} "
                f"{r['full_perplexity']:>8.3f} {r['kl_to_full']:>10.4f} {r['tokens_scored']:>7}"
            )
        rows.append(f"({results[0]['windows']} windows, {results[0]['seconds']} s for the first row)")
        return "\n".join(rows)
    if results and results[0].get("task") in ("qa", "needle"):
        head = f"{'method':<28} {'budget':>6} {'KV kept':>8} {'accuracy':>8} {'options':>8} {'generate':>8}"
        head += f" {'questions':>9}"
        rows = [head, "-" * len(head)]
        for r in results:
            budget = "-" if r.get("kv_budget") is None else f"{r['kv_budget']:.3f}"
            opt, gen = (f"{r[k]:.3f}" if k in r else "-" for k in ("accuracy_options", "accuracy_generate"))
            rows.append(
                f"{r['label']:<28} {budget:>6} {r['kv_kept']:>8.3f} {r['accuracy']:>8.3f} {opt:>8} {gen:>8} "
                f"{r['questions']:>9}"
            )
        rows.append(f"({results[0]['contexts']} contexts, each compressed once; {results[0]['seconds']} s per row)")
        return "\n".join(rows)
    if results and results[0].get("task") == "continuation":
        head = f"{'method':<28} {'ratio':>5} {'KV kept':>8} {'ROUGE-L':>8} {'BERTScore':>9} {'docs':>5}"
        rows = [head, "-" * len(head)]
        for r in results:
            bert = f"{r['bertscore_f1']:.4f}" if "bertscore_f1" in r else "-"
            rows.append(
                f"{r['label']:<28} {r['params'].get('ratio', '-')!s:>5} {r['kv_kept_generation']:>8.3f} "
                f"{r['rouge_l']:>8.4f} {bert:>9} {r['documents']:>5}"
            )
        return "\n".join(rows)
    head = f"{'method':<28} {'ratio':>5} {'KV kept':>8} {'perplexity':>10} {'tokens':>7} {'KV bytes':>10}"
    rows = [head, "-" * len(head)]
    for r in results:
        ratio = r["params"].get("ratio", "-")
        rows.append(
            f"{r['label']:<28} {ratio!s:>5} {r['compression_ratio']:>8.3f} {r['perplexity']:>10.3f} "
            f"{r['tokens_scored']:>7} {r['kv_bytes']:>10}"
        )
        if "perplexity_with_special_targets" in r:
            rows.append(
                f"  perplexity with special-token targets (easier, not comparable): "
                f"{r['perplexity_with_special_targets']:.3f}; R_c {r.get('R_c', 0):.2f} regular tokens per special"
            )
        for b in r.get("perplexity_by_prefix", []):
            if b["tokens"]:
                rows.append(
                    f"  prefix <= {b['prefix_upto']:>6}: perplexity {b['perplexity']:.3f} ({b['tokens']} tokens)"
                )
        if "verify" in r:
            rows.append(f"  verify: max_abs_diff {r['verify']['max_abs_diff']:.2e}")
    return "\n".join(rows)


__all__ = ["EvalConfig", "run_eval", "perplexity", "format_table"]
