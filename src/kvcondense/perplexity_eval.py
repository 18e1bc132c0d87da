"""Held-out perplexity over text tokens under compression, with measured compression and stored KV.

Perplexity uses one parallel masked forward per batch of blocks (fast). The KV actually stored is measured by
running the first block through the evicting cache; ``verify`` also compares that run's logits with the
parallel forward. :func:`kvcondense.evaluate.run_eval` calls these for ``--task perplexity``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .engine import incremental_forward
from .forward import parallel_forward
from .layout import IGNORE, Kind
from .methods import Method, TokenizedText
from .scoring import method_layout
from .verify import max_abs_diff


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
        layouts = [
            method_layout(model, method, b, token_ids, seed=seed + lo + i)
            for i, b in enumerate(blocks[lo : lo + batch_size])
        ]
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
    layout = method_layout(model, method, block, token_ids, seed=seed)
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
