"""The GPU attention path: a flex_attention BlockMask built from the same expiry spec gives the sdpa logits.

flex_attention runs forward on CPU (no backward in torch 2.13), so the mask construction and the equivalence
are checked here on every machine; the CUDA test also runs the backward and the automatic switch."""

import pytest
import torch
from conftest import COMP, episode, lora_model, tiny_model

from kvcondense.forward import FLEX_MIN_TOKENS, choose_attention, parallel_forward
from kvcondense.methods import TokenizedText, build_method

TOKENS = {"<CL>": 94, "<CR>": 95, **{f"<GIST_{i}>": 96 + i for i in range(4)}}


def layouts(method: str, lengths=(150, 97)):
    m = build_method(method, ratio=0.5, min_line_words=1, max_span_words=8)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(0, 90, (n,), generator=torch.Generator().manual_seed(i))
        ends = torch.rand(n, generator=torch.Generator().manual_seed(i + 7)) < 0.12
        out.append(m.layout(TokenizedText(ids, torch.arange(n), torch.zeros(n, dtype=torch.long), ends), TOKENS, 1))
    return out


@pytest.mark.parametrize("method", ["sentinel", "gist", "streaming", "local"])
def test_flex_block_mask_equals_sdpa_on_padded_batches(method):
    model = tiny_model("llama")
    lays = layouts(method)
    with torch.no_grad():
        sdpa = parallel_forward(model, lays, attention="sdpa").logits
        flex = parallel_forward(model, lays, attention="flex").logits
    for b, lay in enumerate(lays):
        diff = (sdpa[b, : len(lay)] - flex[b, : len(lay)]).abs().max().item()
        assert diff < 1e-4, f"max abs diff {diff:.2e}"
    assert model.config._attn_implementation == "sdpa"  # restored


def test_flex_with_ccm_merge_and_conditional_lora():
    m = build_method("ccm-merge", comp_tokens=2)
    model = lora_model("llama", m)
    lays = [m.episode_layout(episode(seed=s, chunks=3), COMP) for s in (0, 1)]
    with torch.no_grad():
        sdpa = parallel_forward(model, lays, attention="sdpa").logits
        flex = parallel_forward(model, lays, attention="flex").logits
    assert (sdpa - flex).abs().max() < 1e-4


def test_flex_on_cpu_falls_back_for_training_with_a_warning():
    model = tiny_model("llama")
    with pytest.warns(UserWarning, match="no CPU backward"):
        assert choose_attention(model, 100, "flex") == "sdpa"
    with torch.no_grad():
        assert choose_attention(model, 100, "flex") == "flex_attention"
    assert choose_attention(model, FLEX_MIN_TOKENS * 2, "auto") == "sdpa"  # auto stays dense on CPU
    with pytest.raises(ValueError, match="unknown attention"):
        choose_attention(model, 10, "dense")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_training_on_cuda():
    model = tiny_model("llama").cuda()
    lays = layouts("sentinel", lengths=(FLEX_MIN_TOKENS + 64,))
    assert choose_attention(model, FLEX_MIN_TOKENS + 64, "auto") == "flex_attention"
    sdpa = parallel_forward(model, lays, attention="sdpa").logits
    flex = parallel_forward(model, lays, attention="auto").logits
    assert (sdpa - flex).abs().max() < 1e-3
    flex.float().pow(2).mean().backward()


@pytest.mark.parametrize("name", ["sentinel", "scored-heads"])
def test_a_model_loaded_with_flex_attention_decodes_through_the_cache_as_on_sdpa(name):
    """The engine's steps over the cache take sdpa's dense bool mask on a flex_attention model (the same weights as
    on sdpa): prefill and decode give the sdpa model's logits (this was refused with a message naming flex as
    supported)."""
    from test_equivalence import TOKENS, text

    from kvcondense.engine import Stream

    method = build_method(name, ratio=0.5)
    streams = [Stream(tiny_model("llama", attn=attn), method, TOKENS) for attn in ("sdpa", "flex_attention")]
    firsts = [s.prefill(text(40), chunk_tokens=16) for s in streams]
    torch.testing.assert_close(firsts[1], firsts[0], atol=1e-4, rtol=1e-4)
    for token in (5, 17, 42):
        a, b = (s.step([token]).logits for s in streams)
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
