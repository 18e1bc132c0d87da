"""Shared fixtures: tiny random models built from configs (no downloads) and a small committed text."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

DATA = Path(__file__).parent / "data"
VOCAB = 96

_CONFIGS = {
    "llama": lambda: LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    ),
    "qwen2": lambda: Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
    ),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=512),
}


def tiny_model(family: str = "llama", attn: str = "sdpa", seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_CONFIGS[family](), attn_implementation=attn)
    return model.eval()


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture
def sample_text() -> str:
    return (DATA / "sample.txt").read_text()
