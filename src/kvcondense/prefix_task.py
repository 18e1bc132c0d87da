"""The prefix task: compress a context, then score what follows over the compressed cache, against full attention.

For each held-out window of ``P + S + 1`` tokens, the first ``P`` (the context) are laid out by the method and fed
through the library's own prefill with real eviction; then the next ``S`` tokens are fed as plain text over what
the cache kept (no further compression) and each predicts its successor, teacher-forced. The same is done with full
attention *on the same model* (same weights: a checkpoint's LoRA included), which gives the reference perplexity and
``kl_to_full``, the mean per-token KL(p_full || p_method). ``kv_kept`` is measured: slots the cache stored after
the context / context tokens. This is kvpress's setting (context compressed question-agnostically, then queried),
so its presses are scored on exactly these token ids by ``benchmarks/peers/kvpress`` (see :func:`export_windows`).

    kvcondense eval --task prefix --method streaming --kv-budget 0.25 --prefix-tokens 1024 --new-tokens 128
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .atomic import write_json
from .engine import Stream
from .errors import UsageError
from .forward import feed_text
from .methods import FullAttention, Method, TokenizedText, tokenize
from .scoring import method_layout

Window = tuple[TokenizedText, torch.Tensor]  # (context of P tokens, the S + 1 tokens that follow)


def prefix_windows(docs, tokenizer, prefix_tokens: int, score_tokens: int, n: int) -> list[Window]:
    """Up to ``n`` non-overlapping windows of ``prefix_tokens + score_tokens + 1`` tokens from ``docs``, in order."""
    size = prefix_tokens + score_tokens + 1
    windows: list[Window] = []
    for doc in docs:
        toks = tokenize(doc.text, tokenizer)
        for lo in range(0, len(toks) - size + 1, size):
            windows.append((toks[lo : lo + prefix_tokens], toks.ids[lo + prefix_tokens : lo + size].clone()))
            if len(windows) == n:
                return windows
    if not windows:
        raise UsageError(
            f"no held-out document has {size} tokens for a window of --prefix-tokens {prefix_tokens} + --new-tokens "
            f"{score_tokens} + 1; lower them or give longer documents"
        )
    return windows


@torch.no_grad()
def score_after_prefix(
    model, method: Method, token_ids: dict, context: TokenizedText, following: torch.Tensor, seed: int = 0
) -> tuple[torch.Tensor, int]:
    """Log-probabilities (S, V) of ``following[1:]`` given the compressed ``context`` and ``following[:-1]``, and
    the slots the cache stored after the context."""
    stream = Stream(model, method, token_ids)
    stream.prefill(context, chunk_tokens=512, seed=seed)
    layout, cache = stream.layouts[0], stream.cache
    kept = int(cache.stored_slots().max())
    cache.freeze()
    # logical indices and positions go on after the compressed context's
    logits = feed_text(model, cache, following[:-1], len(layout), int(layout.position_ids.max()) + 1)  # (S, V)
    return torch.log_softmax(logits.float(), dim=-1).cpu(), kept


def budget_params(method: Method, kv_budget: float | None, texts=()) -> dict:
    """The method's parameters that keep ``kv_budget`` of the contexts ``texts`` (:meth:`Method.params_for_budget`)."""
    if kv_budget is None:
        return method.params()
    if not 0 < kv_budget < 1:
        raise UsageError(f"--kv-budget must be a fraction of the context in (0, 1), got {kv_budget}")
    return method.params_for_budget(kv_budget, texts)


def check_reachable(model, method: Method, token_ids: dict, windows: list[Window], kv_budget: float | None) -> None:
    """A budget the method cannot reach on this text is one line, not a silently different point (a method whose
    layout keeps its budget on any text is not laid out: a scored method's layout costs a scoring pass)."""
    if kv_budget is None or method.exact_budget:
        return
    kept = sum(method_layout(model, method, ctx, token_ids, seed=i).kept_slots() for i, (ctx, _) in enumerate(windows))
    kept /= sum(len(ctx) for ctx, _ in windows)
    if kept > kv_budget + 0.02:
        raise UsageError(
            f"method {method.name} keeps {kept:.3f} of the context at --kv-budget {kv_budget} on this text (its "
            "spans cannot cover more of it); this budget is out of its reach"
        )


def full_reference(model, token_ids: dict, windows: list[Window]) -> list[torch.Tensor]:
    """Log-probabilities (S, V) of every window with full attention on ``model``: the reference of
    :func:`prefix_task`, computed once when several methods or budgets are scored on the same model."""
    full = FullAttention()
    return [score_after_prefix(model, full, token_ids, ctx, nxt)[0] for ctx, nxt in windows]


def base_reference(model, token_ids: dict, windows: list[Window]) -> list[torch.Tensor] | None:
    """:func:`full_reference` of the base model under a checkpoint's adapters (peft's ``disable_adapter``: LoRA and
    new token rows off, exactly the model it was trained from), or None for a model without adapters (there the
    base is the model itself)."""
    if not hasattr(model, "disable_adapter"):
        return None
    with model.disable_adapter():
        return full_reference(model, token_ids, windows)


def prefix_task(
    model,
    method: Method,
    token_ids: dict,
    windows: list[Window],
    seed: int = 0,
    reference: list[torch.Tensor] | None = None,
    base: list[torch.Tensor] | None = None,
) -> dict:
    """Perplexity of the scored tokens over the compressed cache, the same with full attention on the same model,
    the mean KL(p_full || p_method) per token, and the KV kept (measured). Prints nothing; returns a dict.
    ``reference``: :func:`full_reference` of the same model and windows, if already computed. ``base``: the same of
    the base model (a checkpoint's adapters off, :func:`base_reference`): adds ``kl_to_base`` (how far the
    compressed checkpoint is from the model it was trained from) and ``base_perplexity``."""
    t0 = time.perf_counter()
    nll, nll_full, kl, n, kept, ctx_tokens = 0.0, 0.0, 0.0, 0, 0, 0
    nll_base, kl_base = 0.0, 0.0
    full = FullAttention()
    for i, (context, following) in enumerate(tqdm(windows, desc=f"prefix {method.name}", leave=False)):
        targets = following[1:].unsqueeze(-1)
        logp, slots = score_after_prefix(model, method, token_ids, context, following, seed=seed + i)
        if reference is not None:
            logp_full = reference[i]
        else:
            logp_full, _ = score_after_prefix(model, full, token_ids, context, following)
        nll -= float(logp.gather(-1, targets).sum())
        nll_full -= float(logp_full.gather(-1, targets).sum())
        kl += float((logp_full.exp() * (logp_full - logp)).sum())
        if base is not None:
            nll_base -= float(base[i].gather(-1, targets).sum())
            kl_base += float((base[i].exp() * (base[i] - logp)).sum())
        n += targets.shape[0]
        kept += slots
        ctx_tokens += len(context)
    out = {
        "perplexity": math.exp(nll / n),
        "full_perplexity": math.exp(nll_full / n),
        "kl_to_full": kl / n,
        "kv_kept": kept / ctx_tokens,
        "tokens_scored": n,
        "windows": len(windows),
        "context_tokens": ctx_tokens // len(windows),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if base is not None:
        out.update(kl_to_base=kl_base / n, base_perplexity=math.exp(nll_base / n))
    return out


def export_windows(windows: list[Window], path: str | Path, name: str) -> Path:
    """Write the windows' token ids as a tasks file for the kvpress peer runner (``benchmarks/peers/kvpress``)."""
    payload = {
        "task": "prefix",
        "name": name,
        "windows": [{"context": ctx.ids.tolist(), "continuation": nxt.tolist()} for ctx, nxt in windows],
    }
    return write_json(path, payload, indent=None)


def read_windows(path: str | Path) -> dict:
    """A tasks file written by :func:`export_windows` (used by tests and the comparison script)."""
    return json.loads(Path(path).read_text())
