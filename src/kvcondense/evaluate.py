"""``kvcondense eval``: what to evaluate (:class:`EvalConfig`) and each task run at every ratio or KV budget.

The scoring itself lives beside it: held-out perplexity and stored KV in :mod:`kvcondense.perplexity_eval`,
continuation in :mod:`kvcondense.continuation`, the prefix, QA and needle tasks in :mod:`kvcondense.prefix_task`
and :mod:`kvcondense.qa_task`, online memory in :mod:`kvcondense.memory_eval`; the printed table in
:mod:`kvcondense.eval_table`.

    kvcondense eval --checkpoint checkpoints/sentinel-r0.5 --json results.json
    kvcondense eval --method streaming --ratio 0.3 0.5 0.7
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from .continuation import continuation_quality, continuation_samples
from .data import load_split
from .errors import UsageError
from .eval_table import format_table
from .loader import load
from .methods import Method, TokenizedText, build_method, tokenize
from .metrics import BertScore
from .perplexity_eval import measured_kv, perplexity
from .train_data import text_blocks
from .verify import check_family

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
        questions: qa on recall episodes: questions asked of each compressed context (multi-query).
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
    questions: int = 1
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
        ints = ("max_tokens", "block_tokens", "batch_size", "seed", "prefix_tokens", "new_tokens", "docs", "episodes")
        if bad := [n for n in ints if not isinstance(getattr(self, n), int) or isinstance(getattr(self, n), bool)]:
            raise UsageError(f"{', '.join(bad)} must be whole numbers, got {[getattr(self, n) for n in bad]}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {self.batch_size}")
        self.ratios = tuple(dict.fromkeys(self.ratios))  # a ratio given twice is one result, not two rows
        self.kv_budgets = tuple(dict.fromkeys(self.kv_budgets))


def load_for_eval(cfg: EvalConfig):
    """(model, tokenizer, method, token_ids, label) for a checkpoint or for an untrained method (see
    :func:`kvcondense.loader.load` for which parameters may be set on a checkpoint)."""
    keep_base = cfg.reference and cfg.task == "prefix"  # the adapters apart: the prefix task's base reference
    got = load(cfg.checkpoint, cfg.method, cfg.method_params, cfg.model, cfg.device, cfg.dtype, not keep_base)
    return got.model, got.tokenizer, got.method, got.token_ids, got.label


def run_eval(cfg: EvalConfig) -> list[dict]:
    """Evaluate at every ratio of ``cfg``. Returns one JSON-ready dict per ratio (per method and t for memory)."""
    if cfg.task == "memory":
        return run_memory(cfg)
    if cfg.task == "qa":
        from .data.episodes import is_episode_data, load_episodes
        from .qa_task import episodes_as_qa, read_qa

        # bad data fails before the model is loaded
        if is_episode_data(cfg.data):
            items = episodes_as_qa(load_episodes(cfg.data, cfg.split), cfg.episodes, cfg.questions)
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
        if base_method.compresses_at_prompt_end():
            raise UsageError(
                f"{label} frees nothing until a prompt has been read whole, so perplexity over the text itself would "
                "be full attention's: score what reads the compressed prompt with --task prefix, qa or needle"
            )
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
        base_reference,
        budget_params,
        check_reachable,
        export_windows,
        full_reference,
        prefix_task,
        prefix_windows,
    )
    from .qa_task import export_qa, needle_grid, needle_items, qa_task
    from .scoring import with_scores

    name = f"{Path(cfg.data).stem}-{cfg.split}"
    if cfg.task == "prefix":
        windows = prefix_windows(docs, tokenizer, cfg.prefix_tokens, cfg.new_tokens, cfg.docs)
        windows = [(with_scores(model, base_method, ctx), nxt) for ctx, nxt in windows]  # one pass, every budget
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
    base = None  # prefix --reference: the base model's full attention (adapters off)
    for kind, value in points:
        params = base_method.params()
        if kind == "kv_budget":
            params = budget_params(base_method, value, contexts)
        elif has_ratio:
            params = {**params, "ratio": value}
        method = build_method(base_method.name, **params)
        check_reachable(model, method, token_ids, [(c, None) for c in contexts], value if kind == "kv_budget" else None)
        res = {"method": method.name, "label": label, "params": method.params(), "task": cfg.task, "kind": cfg.task}
        res["kv_budget"] = value if kind == "kv_budget" else None
        if cfg.task == "prefix":
            if reference is None and len(points) > 1:
                reference = full_reference(model, token_ids, windows)
            if cfg.reference and base is None:  # the model the checkpoint was trained from, once (None: no adapters)
                base = base_reference(model, token_ids, windows)
            res.update(prefix_task(model, method, token_ids, windows, cfg.seed, reference, base))
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
    if not method.reads_episodes():
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
            "thousand words), another --split, or a file kept apart scored whole (--data FILE --split all)"
        )
    return chosen


__all__ = ["EvalConfig", "run_eval", "perplexity", "format_table"]
