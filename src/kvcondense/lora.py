"""LoRA on the attention projections plus trainable rows for the new tokens, on peft (no fork, no patching)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer

from .errors import UsageError

# Attention projections per family; anything else falls back to the Llama-style names if the model has them.
ATTENTION_MODULES: dict[str, list[str]] = {
    "gpt2": ["c_attn", "attn.c_proj"],
}
LLAMA_STYLE = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass
class LoraSettings:
    """LoRA hyperparameters (the sentinel paper's recipe by default).

    Attributes:
        r: rank of the update.
        alpha: scaling numerator (the update is scaled by alpha / r).
        dropout: dropout on the LoRA input.
        target_modules: module names to adapt; empty means the model family's attention projections.
    """

    r: int = 16
    alpha: float = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.r < 1:
            raise UsageError(f"LoRA rank must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise UsageError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise UsageError(f"LoRA dropout must be in [0, 1), got {self.dropout}")


def attention_modules(model) -> list[str]:
    """The attention projection names of ``model``'s family."""
    if model.config.model_type in ATTENTION_MODULES:
        return ATTENTION_MODULES[model.config.model_type]
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    if set(LLAMA_STYLE) <= names:
        return LLAMA_STYLE
    raise UsageError(
        f"do not know the attention projections of {model.config.model_type!r}; pass target modules explicitly"
    )


def attach_lora(
    model, settings: LoraSettings, token_ids: list[int], lora_on: tuple[int, ...] | None = None
) -> PeftModel:
    """Freeze the base model and add LoRA plus trainable rows for ``token_ids`` (tied LM heads follow).

    ``lora_on``: token kinds on which LoRA is active (conditional LoRA, see :func:`make_conditional`); None: all.
    """
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules or attention_modules(model),
        trainable_token_indices=list(token_ids) or None,
    )
    peft_model = get_peft_model(model, config)
    if lora_on is not None:
        make_conditional(peft_model, lora_on)
    return peft_model


STAGES = ("rows", "lora", "full")


def set_stage(model: PeftModel, stage: str) -> None:
    """Choose what trains: ``rows`` (the new token rows only), ``lora`` (LoRA + rows, the default) or ``full``
    (every weight: full fine-tuning, for GPU users; the checkpoint then holds the whole model)."""
    if stage not in STAGES:
        raise UsageError(f"unknown stage {stage!r}; choose one of {STAGES}")
    for name, p in model.named_parameters():
        is_row = "trainable_tokens_delta" in name
        is_lora = "lora_" in name
        p.requires_grad_(stage == "full" or is_row or (stage == "lora" and is_lora))


def adapter_state(
    model: PeftModel, dtype: torch.dtype = torch.bfloat16, full: bool = False, rows_only: bool = False
) -> dict[str, torch.Tensor]:
    """The trained tensors (LoRA matrices and new token rows; every weight when ``full``; the rows alone when
    ``rows_only``, for the ``rows`` stage, whose LoRA is still its identity init, B = 0), cast for storage."""
    state = model.state_dict() if full else get_peft_model_state_dict(model, save_embedding_layers=False)
    if rows_only:
        state = {k: v for k, v in state.items() if "lora_" not in k}
    return {k: v.detach().to(dtype).contiguous() for k, v in state.items()}


def load_adapter_state(
    model: PeftModel, state: dict[str, torch.Tensor], full: bool = False, rows_only: bool = False, source: str = ""
) -> None:
    """Load tensors saved by :func:`adapter_state` (cast back to the model's dtype).

    The file is checked first, as untrusted input: every tensor the model expects is there with its shape, nothing
    else is, and every value is finite. A failed check is a :class:`UsageError` naming ``source``, never a model
    left half-loaded or silently untrained.
    """
    where = source or "the adapter"
    expected = model.state_dict() if full else get_peft_model_state_dict(model, save_embedding_layers=False)
    if rows_only:
        expected = {k: v for k, v in expected.items() if "lora_" not in k}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise UsageError(
            f"{where} lacks {len(missing)} of the {len(expected)} tensors this model needs (e.g. {missing[0]})"
        )
    if unexpected:
        raise UsageError(f"{where} holds {len(unexpected)} tensors this model has no place for (e.g. {unexpected[0]})")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise UsageError(
                f"{where}: {key} has shape {tuple(tensor.shape)}, the model needs {tuple(expected[key].shape)} "
                "(another LoRA rank or base model?)"
            )
        if not tensor.is_floating_point():
            raise UsageError(f"{where}: {key} has dtype {tensor.dtype}, expected a floating-point tensor")
        if not bool(torch.isfinite(tensor).all()):
            raise UsageError(f"{where}: {key} holds NaN or infinite values; the run that wrote it diverged")
    dtype = next(model.parameters()).dtype
    state = {k: v.to(dtype) for k, v in state.items()}
    if full:
        model.load_state_dict(state, strict=False)
    else:
        set_peft_model_state_dict(model, state)


# ---------------------------------------------------------------------------------------------------------------- gate
class _Gate:
    """Per-token LoRA gate shared by the hooks of one model: ``kinds`` on which LoRA is active, the current gate."""

    def __init__(self, kinds: tuple[int, ...]):
        self.kinds = torch.tensor(sorted(int(k) for k in kinds))
        self.gate: torch.Tensor | None = None  # (B, L, 1) while a kvcondense forward runs

    def __call__(self, module, inputs, output: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
            raise RuntimeError("a conditional-LoRA model ran without a token gate; call it through kvcondense.forward")
        return output * self.gate.to(device=output.device, dtype=output.dtype)


def make_conditional(model, kinds: tuple[int, ...]) -> None:
    """Conditional LoRA (CCM): the LoRA update is applied only on tokens of the given kinds.

    A forward hook on every ``lora_B`` multiplies its output by a per-token gate (1 on those kinds, 0 elsewhere),
    so gated-off tokens run exactly the base model: ``W x + 0``. The gate is set per forward by :func:`lora_gate`.
    """
    gate = _Gate(kinds)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for lora_b in module.lora_B.values():
                lora_b.register_forward_hook(gate)
    model._kvcondense_gate = gate


@contextmanager
def lora_gate(model, kinds: torch.Tensor):
    """Gate a conditional-LoRA model by the token kinds (B, L) of the forward run inside the block. A no-op for
    models without conditional LoRA."""
    gate = getattr(getattr(model, "module", model), "_kvcondense_gate", None)
    if gate is None:
        yield
        return
    gate.gate = torch.isin(kinds, gate.kinds).unsqueeze(-1)
    try:
        yield
    finally:
        gate.gate = None


def settings_dict(settings: LoraSettings) -> dict:
    return asdict(settings)
