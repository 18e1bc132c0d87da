"""Exports load in stock peft / transformers with kvcondense's logits; what cannot be expressed is refused."""

import pytest
import torch

from kvcondense.cli import main
from kvcondense.forward import parallel_forward
from kvcondense.loader import export, load_checkpoint
from kvcondense.methods import tokenize

TEXT = "Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to do. " * 3


def _train(tiny_dir, sample_path, out, *extra):
    args = ["train", "--model", str(tiny_dir), "--data", str(sample_path), "--steps", "2", "--block-tokens", "64"]
    assert main([*args, *extra, "--lr", "1e-2", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def trained(tiny_dir, sample_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("ck") / "sentinel"
    return _train(tiny_dir, sample_path, out, "--method", "sentinel", "--ratio", "0.5", "--placement", "recent")


def _logits(model, tok, method, token_ids):
    layout = method.layout(tokenize(TEXT, tok), token_ids, seed=0)
    assert (layout.kinds != 0).any()  # the layout really holds special tokens
    with torch.no_grad():
        return parallel_forward(model, [layout]).logits


def test_peft_export_reloads_in_stock_peft_with_the_same_logits(trained, tiny_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export(trained, "peft", tmp_path / "peft")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    ours = load_checkpoint(trained, merge_lora=False)
    tok = AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    base.resize_token_embeddings(len(tok), mean_resizing=False)
    stock = PeftModel.from_pretrained(base, out).eval()
    want = _logits(ours.model, ours.tokenizer, ours.method, ours.token_ids)
    got = _logits(stock, tok, ours.method, ours.token_ids)
    assert torch.allclose(got, want, atol=1e-5)
    # and the adapter is not the identity: without it the logits differ
    with stock.disable_adapter():
        assert not torch.allclose(_logits(stock, tok, ours.method, ours.token_ids), want, atol=1e-3)


def test_merged_export_is_a_plain_model_with_the_same_logits(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvcondense.loader import Loaded

    out = Loaded.from_pretrained(trained).save_pretrained(tmp_path / "merged", format="merged")
    ours = load_checkpoint(trained)
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    want = _logits(ours.model, ours.tokenizer, ours.method, ours.token_ids)
    assert torch.allclose(_logits(plain, tok, ours.method, ours.token_ids), want, atol=1e-5)
    card = (out / "README.md").read_text()
    assert "sentinel" in card and "2 steps" in card and "from_pretrained" in card


def test_conditional_lora_is_refused_and_nothing_is_written(tiny_dir, sample_path, tmp_path, capsys):
    ck = _train(tiny_dir, sample_path, tmp_path / "gated", "--method", "sentinel", "--lora-scope", "special")
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(ck), "--to", "peft", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "only on its special tokens" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.export-*"))


def test_an_existing_folder_is_never_replaced(trained, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    assert main(["export", "--checkpoint", str(trained), "--to", "merged", str(tmp_path / "taken")]) == 2
    assert "exists" in capsys.readouterr().err and (tmp_path / "taken" / "mine.txt").read_text() == "keep"
    assert main(["export", "--checkpoint", str(trained), "--to", "onnx", str(tmp_path / "x")]) == 2
    assert "unknown export format" in capsys.readouterr().err


def test_every_checkpoint_gets_a_model_card(trained):
    card = (trained / "README.md").read_text()
    assert "kvcondense sentinel (checkpoint)" in card and "2 steps" in card and "load(checkpoint=DIR)" in card
