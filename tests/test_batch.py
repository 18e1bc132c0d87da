"""Batched generation with ragged eviction equals decoding each row alone."""

import pytest
import torch
from conftest import COMP, TOKENS, Tok, prompt, tiny_model

from kvcondense.batch import generate_batch
from kvcondense.generate import generate
from kvcondense.methods import build_method


@pytest.mark.parametrize("method", ["sentinel", "gist", "local", "streaming", "full"])
def test_batch_equals_rows_alone(method):
    model = tiny_model("llama")
    m = build_method(method, ratio=0.5, min_line_words=1, max_span_words=6, max_sentence_tokens=7)
    prompts = [prompt(n, s) for n, s in ((50, 1), (23, 2), (37, 3))]
    new, cache = generate_batch(model, Tok(), m, TOKENS, prompts, max_new_tokens=20, chunk_tokens=16)
    for b, p in enumerate(prompts):
        alone = generate(model, Tok(), m, TOKENS, p, 20, chunk_tokens=16, seed=b, progress=False)
        assert new[b] == alone.new_tokens, f"row {b}"
        assert int(cache.stored_slots()[b]) == alone.stored_slots, f"row {b}"
    if method != "full":
        assert len(set(cache.stored_slots().tolist())) > 1  # rows really compressed different amounts


def test_rows_beyond_the_context_are_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate_batch(model, Tok(), build_method("full"), {}, [prompt(10, 1), prompt(500, 2)], max_new_tokens=20)


def ccm_model(method):
    """A tiny Llama with weights large enough that greedy decoding varies, and conditional LoRA whose random B
    matrices change the COMP (and SUM) tokens' keys and values."""

    from kvcondense.lora import LoraSettings, attach_lora

    base = tiny_model("llama")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.2)
    model = attach_lora(base, LoraSettings(r=4), list(COMP.values())[:2], method.lora_on)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.eval(), COMP


@pytest.mark.parametrize("method", ["ccm-concat", "ccm-merge"])
def test_ccm_batch_equals_rows_alone(method):
    """The batched decode step gates the conditional LoRA per token, as the single-row step does."""
    m = build_method(method, comp_tokens=2, chunk_tokens=16)
    model, comp = ccm_model(m)
    prompts = [prompt(n, s) for n, s in ((50, 1), (23, 2), (37, 3))]
    new, cache = generate_batch(model, Tok(), m, comp, prompts, max_new_tokens=12, chunk_tokens=16)
    for b, p in enumerate(prompts):
        alone = generate(model, Tok(), m, comp, p, 12, chunk_tokens=16, seed=b, progress=False)
        assert new[b] == alone.new_tokens, f"row {b}"
        assert int(cache.stored_slots()[b]) == alone.stored_slots, f"row {b}"
    assert len({tuple(n) for n in new}) == len(new) and any(len(set(n)) > 2 for n in new)  # rows really differ
    with model.disable_adapter():  # the LoRA matters here: without it the rows decode otherwise
        base = [generate(model, Tok(), m, comp, p, 12, chunk_tokens=16, progress=False).new_tokens for p in prompts]
    assert base != new


def test_a_one_token_prompt_of_a_per_head_method_joins_a_batch():
    """Its per-head expiry equals the per-slot one (nothing pending per head), so its cache stacks with the others."""
    model, method = tiny_model("llama"), build_method("scored-heads")
    prompts = [prompt(1, 0), prompt(40, 1)]
    rows, _ = generate_batch(model, Tok(), method, TOKENS, prompts, 5)
    assert rows == [generate(model, Tok(), method, TOKENS, p, 5, progress=False).new_tokens for p in prompts]
