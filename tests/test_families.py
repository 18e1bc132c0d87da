"""Model families: the ones in the suite pass; one that cannot honour the masks is refused with a clear line."""

import pytest
import torch
from conftest import tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

from kvcondense.verify import UnsupportedModelError, check_family


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_verified_families_pass(family):
    check_family(tiny_model(family))


def test_probe_passes_an_unlisted_family_that_works():
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "gpt_neox", vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    check_family(AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval())


def test_a_sliding_window_model_loads_with_a_warning_that_names_the_window(tmp_path):
    from conftest import save_tiny_model

    from kvcondense.models import load_model

    path = save_tiny_model(tmp_path / "mistral", family="mistral")
    with pytest.warns(UserWarning, match="window of 16 tokens"):
        model, _ = load_model(str(path))
    check_family(model)  # the probe passes: both of kvcondense's paths ignore the window alike


def test_alibi_family_is_refused():
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("mpt", vocab_size=96, d_model=32, n_heads=4, n_layers=2)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with pytest.raises(UnsupportedModelError, match="not supported"):
        check_family(model)


def test_unsupported_attention_backend_is_refused():
    model = tiny_model("llama")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UnsupportedModelError, match="attn_implementation='sdpa'"):
        check_family(model)
