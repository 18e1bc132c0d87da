"""LoRA on the attention projections plus trainable rows for the new tokens, on peft (no fork, no patching)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

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
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.r}")


def attention_modules(model) -> list[str]:
    """The attention projection names of ``model``'s family."""
    if model.config.model_type in ATTENTION_MODULES:
        return ATTENTION_MODULES[model.config.model_type]
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    if set(LLAMA_STYLE) <= names:
        return LLAMA_STYLE
    raise ValueError(
        f"do not know the attention projections of {model.config.model_type!r}; pass target modules explicitly"
    )


def attach_lora(model, settings: LoraSettings, token_ids: list[int]) -> PeftModel:
    """Freeze the base model and add LoRA plus trainable rows for ``token_ids`` (tied LM heads follow)."""
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules or attention_modules(model),
        trainable_token_indices=list(token_ids) or None,
    )
    return get_peft_model(model, config)


def adapter_state(model: PeftModel, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The trained tensors only (LoRA matrices and new token rows), cast for storage."""
    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    return {k: v.detach().to(dtype).contiguous() for k, v in state.items()}


def load_adapter_state(model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    """Load tensors saved by :func:`adapter_state` (cast back to the model's dtype); every key must be used."""
    dtype = next(model.parameters()).dtype
    result = set_peft_model_state_dict(model, {k: v.to(dtype) for k, v in state.items()})
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter holds {len(unexpected)} tensors this model has no place for (e.g. {unexpected[0]})")


def settings_dict(settings: LoraSettings) -> dict:
    return asdict(settings)
