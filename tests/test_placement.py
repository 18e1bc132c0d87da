"""--model takes a Hub id from the local Hugging Face cache (offline: one line); --device/--dtype choose where."""

import shutil

import pytest
import torch

from kvcondense.cli import main
from kvcondense.errors import UsageError
from kvcondense.loader import load, placement
from kvcondense.models import ModelError, resolve_model


def _hub_cache(root, repo_id, model_dir):
    """The layout huggingface_hub keeps on disk: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def test_a_hub_id_loads_from_the_local_cache_offline(tiny_dir, tmp_path, monkeypatch):
    snapshot = _hub_cache(tmp_path / "hub", "someorg/tiny-llama", tiny_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model("someorg/tiny-llama") == snapshot
    got = load(method="streaming", params={"ratio": 0.5}, model="someorg/tiny-llama")
    assert got.model.config.num_hidden_layers == 2 and got.model.device.type == "cpu"


def test_a_hub_id_not_in_the_cache_is_one_line(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="not in the local Hugging Face cache.*hf download someorg/absent"):
        resolve_model("someorg/absent")
    rc = main(["eval", "--method", "full", "--model", "someorg/absent", "--data", "wiki", "--max-tokens", "8"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "hf download" in err


def test_placement_defaults_and_refusals():
    cuda = torch.cuda.is_available()
    assert placement() == (torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32)
    assert placement("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(UsageError, match="not one of"):
        placement("cpu", "int4")
    with pytest.raises(UsageError, match="not a device"):
        placement("gpu0")
    if not cuda:
        with pytest.raises(UsageError, match="no CUDA GPU"):
            placement("cuda")


def test_dtype_flag_reaches_the_model(tiny_dir):
    got = load(method="full", model=str(tiny_dir), device="cpu", dtype="bfloat16")
    assert next(got.model.parameters()).dtype == torch.bfloat16


def test_device_auto_places_the_model_by_accelerate_with_the_same_logits(tiny_dir, sample_path, monkeypatch):
    """--device auto: the model is loaded with Accelerate's device_map="auto" (here every module lands on the CPU,
    the one device there is); the compressed generation is the one of a plain CPU load, token for token."""
    from kvcondense import models
    from kvcondense.generate import generate

    asked, real = [], models.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):  # the real loader, recording how it was asked
        asked.append(kwargs.get("device_map"))
        return real(*args, **kwargs)

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", spy)
    plain = load(method="sentinel", params={"ratio": 0.5}, model=str(tiny_dir), device="cpu")
    spread = load(method="sentinel", params={"ratio": 0.5}, model=str(tiny_dir), device="auto")
    assert asked == [None, "auto"] and spread.model.device == placement("auto")[0]
    prompt = sample_path.read_text()[:400]
    outs = [generate(g.model, g.tokenizer, g.method, g.token_ids, prompt, max_new_tokens=8) for g in (plain, spread)]
    assert outs[0].new_tokens == outs[1].new_tokens
    argv = ["-q", "generate", "--method", "streaming", "--model", str(tiny_dir), "--device", "auto"]
    assert main([*argv, "--prompt", prompt, "--max-new-tokens", "4"]) == 0
    assert asked[-1] == "auto"
