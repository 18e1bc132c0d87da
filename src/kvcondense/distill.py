"""Distillation from the uncompressed model: the KL objective of ``kvcondense train --objective kl``.

The teacher is the frozen base model itself, free here: the same network with the adapters switched off, reading
the raw text (no special tokens, plain positions) with a plain causal mask. The student is the compressed forward
under the method's mask. Every prediction of a text token is compared, aligned by the text token predicted:
the student's prediction of text token ``j`` (made wherever the layout puts it: the previous text token, a
``<CR>``, the last gist token) against the teacher's (made by text token ``j - 1``). This is what KV-Distill and the
other learned methods that beat training-free eviction train against; it also keeps the adapter from learning the
corpus itself, since the teacher already knows it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import IGNORE, Kind, Layout

KL_CHUNK = 256  # rows of (rows, vocabulary) float32 log-softmax at a time: ~48 MiB each with a 49k vocabulary


def aligned_rows(layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """(student positions, teacher positions) of every text-token prediction of ``layout``.

    A student position is kept when its target is the next text token of the layout; the teacher position is the
    raw-text index of the token before it.
    """
    text = layout.kinds == Kind.TEXT
    ordinal = torch.cumsum(text.long(), 0) - 1  # raw-text index of each text position
    text_pos = torch.nonzero(text).flatten()
    positions = torch.arange(len(layout))
    nxt = torch.searchsorted(text_pos, positions, right=True)  # index into text_pos of the next text position
    has_next = nxt < len(text_pos)
    q = text_pos[nxt.clamp(max=max(len(text_pos) - 1, 0))]
    keep = has_next & (layout.targets != IGNORE) & (layout.targets == layout.input_ids[q])
    student = positions[keep]
    teacher = ordinal[q[keep]] - 1
    return student, teacher


@torch.no_grad()
def teacher_logits(model, layouts: list[Layout], dtype: str = "float32") -> torch.Tensor:
    """Logits (B, T, V) of the frozen base model on each layout's raw text (right-padded to the longest);
    ``dtype="bfloat16"`` runs it under bf16 autocast (``TrainConfig.teacher_dtype``)."""
    inner = getattr(model, "module", model)
    raws = [lay.input_ids[lay.kinds == Kind.TEXT] for lay in layouts]
    length = max(len(r) for r in raws)
    ids = torch.zeros(len(raws), length, dtype=torch.long)
    mask = torch.zeros(len(raws), length, dtype=torch.long)
    for b, r in enumerate(raws):
        ids[b, : len(r)] = r
        mask[b, : len(r)] = 1
    padded = bool((mask == 0).any())  # without padding no mask is passed: the causal kernel's fast path
    autocast = torch.autocast(inner.device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    with inner.disable_adapter(), autocast:  # LoRA and the new token rows off: exactly the base model
        out = inner(
            input_ids=ids.to(inner.device), attention_mask=mask.to(inner.device) if padded else None, use_cache=False
        )
    return out.logits


class _ChunkedKL(torch.autograd.Function):
    """Summed KL(p_teacher || p_student) over chosen rows of the student's logits, with its gradient computed in
    the same pass, chunk by chunk: autograd would keep every chunk's (rows, vocabulary) log-softmax for the
    backward and then walk through it again; here each chunk's gradient, ``T * (q - p)`` for the rows it holds,
    is written straight into one buffer the size of the logits (what any loss over them hands back anyway)."""

    @staticmethod
    def forward(ctx, student, rows, teacher_rows, temperature):
        flat = student.detach().flatten(0, 1)
        want_grad = ctx.needs_input_grad[0]  # not under no_grad (an evaluation of the loss)
        grad = torch.zeros_like(flat, dtype=torch.float32) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for lo in range(0, rows.shape[0], KL_CHUNK):  # in place where a chunk's buffer is ours alone
            idx = rows[lo : lo + KL_CHUNK]
            s, t = flat[idx].float(), teacher_rows[lo : lo + KL_CHUNK].float()
            log_q = F.log_softmax(s if temperature == 1 else s / temperature, dim=-1)
            log_p = F.log_softmax(t if temperature == 1 else t / temperature, dim=-1)
            p = log_p.exp()
            total += log_p.sub_(log_q).mul_(p).sum()  # sum of p (log p - log q)
            if want_grad:
                q_minus_p = log_q.exp_().sub_(p)
                grad[idx] = q_minus_p if temperature == 1 else q_minus_p.mul_(temperature)  # d/ds T^2 KL(p||q(s/T))
        if want_grad:
            ctx.save_for_backward(grad)
        ctx.shape, ctx.dtype = student.shape, student.dtype
        return total * temperature**2

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return (grad * grad_out).to(ctx.dtype).view(ctx.shape), None, None, None


def kl_to_teacher(
    student: torch.Tensor, teacher: torch.Tensor, layouts: list[Layout], temperature: float = 1.0
) -> tuple[torch.Tensor, int]:
    """Summed KL(p_teacher || p_student) over every aligned text prediction, and their number.

    Args:
        student: (B, L, V) logits of the compressed forward (with grad).
        teacher: (B, T, V) logits of :func:`teacher_logits`.
        temperature: both distributions are softened by it; the sum is scaled by T^2 (Hinton et al.) so the
            gradient scale does not depend on it.
    """
    length = student.shape[1]
    rows, t_rows = [], []
    for b, lay in enumerate(layouts):
        s, t = aligned_rows(lay)
        rows.append(s + b * length)  # rows of the (B * L, V) logits
        t_rows.append(teacher[b, t.to(teacher.device)])
    rows_all = torch.cat(rows).to(student.device)
    return _ChunkedKL.apply(student, rows_all, torch.cat(t_rows), temperature), rows_all.shape[0]
