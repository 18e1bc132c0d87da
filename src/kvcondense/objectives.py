"""The training objectives (``TrainConfig.objective``): the causal LM loss under the method's mask, the KL to the
frozen uncompressed model (computed in chunks by :mod:`kvcondense.distill`), or their sum.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .distill import kl_to_teacher, teacher_logits
from .forward import parallel_forward
from .layout import IGNORE, Layout

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .train_config import TrainConfig


def lm_loss(logits: torch.Tensor, layouts: list[Layout], reduction: str = "mean") -> tuple[torch.Tensor, int]:
    """Cross-entropy over the layouts' targets (right-padded), mean or sum. Returns (loss, number of targets)."""
    targets = torch.full(logits.shape[:2], IGNORE, dtype=torch.long, device=logits.device)
    for b, lay in enumerate(layouts):
        targets[b, : len(lay)] = lay.targets.to(logits.device)
    n = int((targets != IGNORE).sum())
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    return (loss if reduction == "sum" else loss / max(n, 1)), n


def objective_loss(model, layouts: list[Layout], cfg: TrainConfig, accelerator: Accelerator):
    """The training objective on one micro-batch: LM loss, KL to the frozen uncompressed model, or both.

    Each term is a token-weighted mean over the global batch: DDP averages gradients over processes, so each
    process scales its sum by world / global count (exactly the 1-process loss at any world size). Returns the loss
    to back-propagate and the global values of every term (``loss``, ``loss_lm`` and ``loss_kl``) for the log.
    """
    logits = parallel_forward(model, layouts, attention=cfg.attention).logits
    world = accelerator.num_processes
    with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.objective != "kl"):  # "kl" logs it, no gradient
        lm_sum, n = lm_loss(logits, layouts, reduction="sum")
    sums, counts = {"loss_lm": lm_sum}, {"loss_lm": n}
    if cfg.objective != "lm":
        teacher = teacher_logits(model, layouts, cfg.teacher_dtype)
        sums["loss_kl"], counts["loss_kl"] = kl_to_teacher(logits, teacher, layouts, cfg.temperature)
    weights = {"loss_lm": 0.0 if cfg.objective == "kl" else 1.0, "loss_kl": cfg.kl_weight}
    loss, parts = logits.new_zeros((), dtype=torch.float32), {"loss": 0.0}
    for key, value in sums.items():
        total = accelerator.reduce(torch.tensor(float(counts[key]), device=value.device), reduction="sum").clamp(min=1)
        loss = loss + weights[key] * value * world / total
        parts[key] = (accelerator.reduce(value.detach(), reduction="sum") / total).item()
        parts["loss"] += weights[key] * parts[key]
    return loss, parts
