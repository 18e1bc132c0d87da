"""Shared fixtures: tiny random models built from configs (no downloads) and a small committed text."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

from kvcondense.engine import incremental_forward
from kvcondense.forward import parallel_forward
from kvcondense.layout import IGNORE
from kvcondense.lora import LoraSettings, attach_lora
from kvcondense.methods import EpisodeTokens, TokenizedText

DATA = Path(__file__).parent / "data"
VOCAB = 100

_DECODER = dict(  # the shape of the tiny RoPE models
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
_CONFIGS = {
    "llama": lambda: LlamaConfig(**_DECODER, tie_word_embeddings=True),
    "qwen2": lambda: Qwen2Config(**_DECODER, tie_word_embeddings=False),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=512),
    "mistral": lambda: MistralConfig(**_DECODER, sliding_window=16),  # a window kvcondense's masks do not apply
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


def build_tokenizer(text: str, vocab_size: int = 320):
    """A byte-level BPE trained on ``text``: real offsets, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]
    )
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def save_tiny_model(path: Path, seed: int = 0, family: str = "llama") -> Path:
    tokenizer = build_tokenizer((DATA / "sample.txt").read_text())
    cfg = _CONFIGS[family]()
    cfg.vocab_size = len(tokenizer)
    # A frozen random LM head with the default 0.02 init caps logits near uniform; larger weights let LoRA learn.
    cfg.initializer_range = 0.2
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with a BPE tokenizer, saved as a normal model directory."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def other_tiny_dir(tmp_path_factory) -> Path:
    """The same architecture with other random weights (a "different base model")."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny2") / "model", seed=1)


@pytest.fixture(scope="session")
def sample_path() -> Path:
    return DATA / "sample.txt"


def decode_with_policy(model, prompt, policy, tokens: list[int], slack: int = 0):
    """Prefill ``prompt`` through the library's engine (one chunk, cut where the layout asks), then feed ``tokens``
    one decode step at a time with ``policy`` (:meth:`kvcondense.engine.Stream.step`). Returns (final layout with
    the same expiry, incremental logits of each step's predicting row, those rows' indices in the final layout,
    the cache, stored slots after each step)."""
    from kvcondense.engine import Stream
    from kvcondense.layout import concat

    stream = Stream(model, None, {}, slack=slack, policy=policy)
    stream.prefill(prompt, chunk_tokens=len(prompt))
    pieces, rows, got, slots = [prompt], [], [], []
    for token in tokens:
        first = stream.seen[0]
        step = stream.step([token])
        piece = step.pieces[0]
        for logical, expire in piece.updates:
            offset = 0
            for p in pieces:  # the final layout carries the same expiry
                p.expire[torch.isin(torch.arange(offset, offset + len(p)), logical)] = expire
                offset += len(p)
        rows.append(first + piece.next_row)
        got.append(step.logits[0])
        pieces.append(piece.layout)
        slots.append(int(stream.cache.stored_slots()[0]))
    return concat(pieces), torch.stack(got), rows, stream.cache, slots


def save_tiny_encoder(path: Path) -> Path:
    """A tiny random BERT with a word-level vocabulary (a BERTScore encoder without a download)."""
    import re

    from transformers import BertConfig, BertModel, BertTokenizerFast

    text = (DATA / "sample.txt").read_text().lower() + " quarterly revenue grew while the central bank held rates"
    words = sorted(set(re.findall(r"[a-z]+", text)))
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", *words]))
    BertTokenizerFast(vocab_file=str(path / "vocab.txt"), model_max_length=128).save_pretrained(path)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(words) + 7, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    BertModel(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    return save_tiny_encoder(tmp_path_factory.mktemp("bert") / "encoder")


# ---------------------------------------------------------------- shared test helpers (imported by test files)
COMP = {f"<COMP_{i}>": 90 + i for i in range(8)}


def lora_model(family: str, method, n: int = 2):
    """A tiny model with conditional LoRA whose B matrices are random, so the gate visibly matters."""
    model = attach_lora(tiny_model(family), LoraSettings(r=4), list(COMP.values())[:n], method.lora_on)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    return model.eval()


def episode(seed=0, chunks=4) -> EpisodeTokens:
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, 90, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g) for _ in range(chunks)]
    return EpisodeTokens(ids, torch.randint(0, 90, (3,), generator=g), torch.randint(0, 90, (6,), generator=g))


def assert_equivalent(model, layout, chunk):
    with torch.no_grad():
        parallel = parallel_forward(model, [layout]).logits[0]
    incremental, stats = incremental_forward(model, layout, chunk)
    scored = layout.targets != IGNORE
    diff = (parallel[scored] - incremental[scored]).abs().max().item()
    assert diff < 1e-4, f"max abs diff {diff:.2e} (chunk {chunk})"
    assert stats.stored_slots == layout.kept_slots()
    return stats


TOKENS = {"<CL>": 94, "<CR>": 95, **{f"<GIST_{i}>": 96 + i for i in range(4)}}


class Tok:
    """Enough of a tokenizer for generate(): prompts are given as TokenizedText."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


def prompt(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 90, (n,), generator=g)
    return TokenizedText(ids, torch.arange(n), torch.zeros(n, dtype=torch.long), torch.rand(n, generator=g) < 0.15)
