"""Bad input gets one clear line on stderr and exit status 2, and leaves nothing half-written."""

import json

import pytest

from kvcondense.cli import main


@pytest.fixture(scope="module")
def trained(tiny_dir, sample_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("ck") / "sentinel"
    rc = main(
        [
            "train",
            "--method",
            "sentinel",
            "--ratio",
            "0.5",
            "--model",
            str(tiny_dir),
            "--data",
            str(sample_path),
            "--steps",
            "2",
            "--block-tokens",
            "64",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    return out


def run(capsys, *argv):
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    err = capsys.readouterr().err.strip()
    return rc, err


def one_line_error(capsys, *argv, match):
    rc, err = run(capsys, *argv)
    assert rc == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and match in errors[0], err


def test_unknown_method(capsys, tmp_path):
    one_line_error(capsys, "train", "--method", "nope", "--out", tmp_path / "x", match="unknown method 'nope'")


@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.2", "abc"])
def test_ratio_out_of_range(capsys, tmp_path, ratio):
    one_line_error(capsys, "train", "--method", "sentinel", "--ratio", ratio, "--out", tmp_path / "x", match="ratio")


def test_missing_data_path(capsys, tiny_dir, tmp_path):
    one_line_error(
        capsys,
        "train",
        "--method",
        "sentinel",
        "--model",
        tiny_dir,
        "--data",
        tmp_path / "none.txt",
        "--out",
        tmp_path / "x",
        match="does not exist",
    )
    assert not (tmp_path / "x").exists()


def test_empty_data_path(capsys, tiny_dir, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    one_line_error(
        capsys,
        "train",
        "--method",
        "sentinel",
        "--model",
        tiny_dir,
        "--data",
        tmp_path / "empty.txt",
        "--out",
        tmp_path / "x",
        match="holds no text",
    )


def test_model_dir_that_is_not_a_causal_lm(capsys, tmp_path, sample_path):
    from transformers import BertConfig

    BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        architectures=["BertForMaskedLM"],
    ).save_pretrained(tmp_path / "bert")
    one_line_error(
        capsys, "eval", "--method", "full", "--model", tmp_path / "bert", "--data", sample_path, match="not a causal LM"
    )


def test_model_path_that_is_not_a_model(capsys, tmp_path):
    one_line_error(capsys, "eval", "--method", "full", "--model", tmp_path, match="neither a registered name")


def test_checkpoint_on_another_base_model(capsys, trained, other_tiny_dir, sample_path):
    one_line_error(
        capsys,
        "eval",
        "--checkpoint",
        trained,
        "--model",
        other_tiny_dir,
        "--data",
        sample_path,
        match="load it with the model it was trained on",
    )


def test_negative_steps(capsys, tiny_dir, sample_path, tmp_path):
    one_line_error(
        capsys,
        "train",
        "--method",
        "sentinel",
        "--model",
        tiny_dir,
        "--data",
        sample_path,
        "--steps",
        "-3",
        "--out",
        tmp_path / "x",
        match="--steps: expected a whole number >= 1, got -3",
    )


def test_output_path_is_a_file(capsys, tiny_dir, sample_path, tmp_path):
    (tmp_path / "file").write_text("keep me")
    one_line_error(
        capsys,
        "train",
        "--method",
        "sentinel",
        "--model",
        tiny_dir,
        "--data",
        sample_path,
        "--out",
        tmp_path / "file",
        match="is an existing file",
    )
    assert (tmp_path / "file").read_text() == "keep me"


def test_training_free_method_cannot_be_trained(capsys, tiny_dir, sample_path, tmp_path):
    one_line_error(
        capsys,
        "train",
        "--method",
        "streaming",
        "--model",
        tiny_dir,
        "--data",
        sample_path,
        "--out",
        tmp_path / "x",
        match="training-free",
    )


def test_prompt_longer_than_context(capsys, trained):
    one_line_error(
        capsys, "generate", "--checkpoint", trained, "--prompt", "word " * 600, match="exceeds the model's context"
    )


def test_not_a_checkpoint(capsys, tmp_path):
    one_line_error(capsys, "eval", "--checkpoint", tmp_path, match="not a kvcondense checkpoint")


def test_non_utf8_text_is_decoded_with_replacement(tmp_path):
    from kvcondense.data import read_path

    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait ".encode("latin-1") * 5)
    with pytest.warns(UserWarning, match="not valid UTF-8"):
        docs = read_path(tmp_path / "latin1.txt")
    assert "caf\ufffd" in docs[0].text


def test_malformed_jsonl_names_the_line(capsys, tiny_dir, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "fine"}\n{not json}\n')
    one_line_error(
        capsys, "eval", "--method", "full", "--model", tiny_dir, "--data", tmp_path / "d.jsonl", match="d.jsonl:2"
    )


def test_eval_json_and_verify(capsys, trained, sample_path, tmp_path):
    out = tmp_path / "r.json"
    rc = main(
        [
            "eval",
            "--checkpoint",
            str(trained),
            "--data",
            str(sample_path),
            "--split",
            "train",
            "--max-tokens",
            "256",
            "--block-tokens",
            "128",
            "--verify",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    (res,) = json.loads(out.read_text())["results"]
    assert res["kind"] == "perplexity"
    for key in ("perplexity", "tokens_scored", "compression_ratio", "kv_bytes", "config"):
        assert key in res
    assert res["verify"]["max_abs_diff"] < 1e-4
    assert 0 < res["compression_ratio"] < 1


def test_eval_ratio_list_prints_table(capsys, tiny_dir, sample_path):
    rc = main(
        [
            "eval",
            "--method",
            "local",
            "--ratio",
            "0.3",
            "0.6",
            "--model",
            str(tiny_dir),
            "--data",
            str(sample_path),
            "--max-tokens",
            "128",
            "--block-tokens",
            "64",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "0.3" in out and "0.6" in out


def test_generate_prints_stats(capsys, trained):
    rc = main(
        [
            "generate",
            "--checkpoint",
            str(trained),
            "--prompt",
            "Alice was beginning to get very tired " * 8,
            "--max-new-tokens",
            "12",
            "--prefill-chunk",
            "16",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0
    assert "logical tokens" in captured.err and "stored slots" in captured.err and "KV bytes" in captured.err
    assert "stored slots" not in captured.out  # stdout holds the text alone


def test_long_context_needs_the_explicit_flag(capsys, trained):
    prompt = "Alice was beginning to get very tired of sitting by her sister " * 60
    one_line_error(
        capsys,
        "generate",
        "--checkpoint",
        trained,
        "--prompt",
        prompt,
        "--max-new-tokens",
        "4",
        match="--allow-long-context",
    )
    rc = main(
        [
            "generate",
            "--checkpoint",
            str(trained),
            "--prompt",
            prompt,
            "--max-new-tokens",
            "4",
            "--allow-long-context",
            "--prefill-chunk",
            "128",
        ]
    )
    assert rc == 0 and "stored slots" in capsys.readouterr().err


def test_lora_rank_flags_shape_the_adapter(tiny_dir, sample_path, tmp_path, trained):
    from safetensors.torch import load_file

    from kvcondense.checkpoint import read_meta

    common = ["--model", tiny_dir, "--data", sample_path, "--steps", "1", "--block-tokens", "32"]
    out = tmp_path / "r4"
    assert main([str(a) for a in ["train", "--method", "sentinel", *common, "--lora-rank", "4", "--out", out]]) == 0
    assert read_meta(out)["lora"] | {"target_modules": []} == {
        "r": 4,
        "alpha": 8,
        "dropout": 0.05,
        "target_modules": [],
    }
    ranks = {t.shape[0] for k, t in load_file(out / "adapter.safetensors").items() if "lora_A" in k}
    assert ranks == {4}
    # A later stage keeps the earlier stage's LoRA unless told otherwise.
    later = tmp_path / "later"
    assert main([str(a) for a in ["train", "--method", "sentinel", *common, "--init-from", out, "--out", later]]) == 0
    assert read_meta(later)["lora"]["r"] == 4
    assert read_meta(trained)["lora"]["r"] == 16  # the default recipe


@pytest.mark.parametrize(
    "flag,value,match",
    [
        ("--lora-rank", "0", "whole number >= 1"),
        ("--lora-dropout", "1", "dropout"),
        ("--steps", "0", "--steps: expected a whole number >= 1, got 0"),
        ("--batch-size", "two", "--batch-size: expected a whole number >= 1, got 'two'"),
    ],
)
def test_bad_training_numbers(capsys, tiny_dir, sample_path, tmp_path, flag, value, match):
    argv = ["train", "--method", "sentinel", "--model", tiny_dir, "--data", sample_path, flag, value]
    one_line_error(capsys, *argv, "--out", tmp_path / "x", match=match)
    assert not (tmp_path / "x").exists()


def test_init_from_with_another_rank(capsys, tiny_dir, sample_path, tmp_path, trained):
    argv = ["train", "--method", "sentinel", "--model", tiny_dir, "--data", sample_path, "--init-from", trained]
    one_line_error(capsys, *argv, "--lora-rank", "4", "--out", tmp_path / "x", match="--lora-rank 16")


def test_checkpoint_without_its_weights(capsys, trained, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(trained, bare)
    (bare / "adapter.safetensors").unlink()
    one_line_error(capsys, "eval", "--checkpoint", bare, "--max-tokens", "32", match="holds no adapter.safetensors")


def test_method_flags_come_from_the_method_fields(monkeypatch):
    """Adding a method is one class and one registry line: its fields become flags of train, eval and generate."""
    from dataclasses import dataclass

    from kvcondense import cli
    from kvcondense.layout import text_layout
    from kvcondense.methods import METHODS, Method, param

    @dataclass
    class Toy(Method):
        name = "toy"
        stride: int = param(3, "keep every stride-th token")
        strict: bool = param(False, "refuse odd strides")

        def layout(self, text, token_ids, seed=0):
            return text_layout(text.ids)

    monkeypatch.setitem(METHODS, "toy", Toy)
    parser = cli.build_parser()
    for command in ("train", "eval", "generate"):
        args = parser.parse_args([command, "--method", "toy", "--stride", "5", "--strict", *_required(command)])
        assert cli._method_params(args) == {"stride": 5, "strict": True}
    args = parser.parse_args(["eval", "--method", "toy"])
    assert cli._method_params(args) == {}  # nothing typed: the method's defaults apply
    for f in __import__("dataclasses").fields(METHODS["sentinel"]):  # every real field has a flag too
        assert f.name == "ratio" or f.name in vars(parser.parse_args(["eval", "--method", "sentinel"]))


def _required(command):
    return {"train": ["--out", "x"], "eval": [], "generate": ["--prompt", "p"]}[command]


def test_quiet_silences_bars_and_notices_and_verbose_is_accepted(tiny_dir, sample_path, capsys):
    args = ["eval", "--method", "streaming", "--ratio", "0.5", "--model", str(tiny_dir), "--data", str(sample_path)]
    args += ["--split", "train", "--max-tokens", "64", "--block-tokens", "32"]
    assert main(["-q", *args]) == 0
    quiet = capsys.readouterr()
    assert quiet.err == "" and "streaming" in quiet.out
    assert main(args) == 0
    assert "eval streaming" in capsys.readouterr().err  # the progress bar, by default
    assert main(["--verbose", *args]) == 0
    with pytest.raises(SystemExit) as exit_:
        main(["-q", "eval", "--method", "streaming", "--ratio", "2"])
    assert exit_.value.code == 2 and "ratio" in capsys.readouterr().err  # errors still show


def test_list_names_methods_corpora_and_checkpoints(trained, capsys):
    assert main(["list", "--checkpoints", str(trained.parent)]) == 0
    out = capsys.readouterr().out
    assert "sentinel" in out and "ccm-merge" in out and "wiki" in out and "recall" in out
    assert f"{trained.name}" in out and "2 steps" in out


def test_generate_chat_wraps_the_prompt_in_the_template_or_says_there_is_none(trained, tiny_dir, capsys):
    from transformers import AutoTokenizer

    from kvcondense.generate import chat_prompt

    argv = ["generate", "--checkpoint", str(trained), "--prompt", "hello there", "--chat", "--max-new-tokens", "2"]
    assert main(argv) == 2 and "no chat template" in capsys.readouterr().err  # the tiny test tokenizer has none
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    tok.chat_template += "{% if add_generation_prompt %}<assistant>{% endif %}"
    assert chat_prompt(tok, "hi") == "<user>hi<assistant>"


def test_top_level_help_imports_no_torch():
    """`kvcondense --help` answers at once: neither the package nor the parser imports torch for it."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom kvcondense.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\nprint('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout and "train" in out.stdout, out.stderr[-500:]


def test_subcommand_help_imports_no_torch_once_the_methods_are_described(tmp_path):
    """`kvcondense train --help` (every subcommand's) answers at once too: the method flags come from a description
    of the registry cached by the hash of the method sources; the first call computes it (importing the methods),
    the next ones import no torch and print the same help. An edit of a method file is a new hash."""
    import os
    import subprocess
    import sys

    from kvcondense import cli_specs

    env = {**os.environ, "KVCONDENSE_CACHE": str(tmp_path)}
    code = (
        "import sys\nfrom kvcondense.cli import main\n"
        "for cmd in ('train', 'eval', 'generate', 'bench', 'chat'):\n"
        "    try:\n        main([cmd, '--help'])\n    except SystemExit:\n        pass\n"
        "print('torch' in sys.modules)"
    )

    def run():
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 0, out.stderr[-500:]
        return out.stdout

    first, second = run(), run()
    assert first.rstrip().endswith("True") and second.rstrip().endswith("False")  # computed once, then read
    assert first.rsplit("\n", 2)[0] == second.rsplit("\n", 2)[0] and "--placement" in second
    assert [p.name for p in tmp_path.glob("cli-specs-*.json")] == [f"cli-specs-{cli_specs.source_hash()}.json"]
    assert cli_specs.describe() == json.loads(next(tmp_path.glob("cli-specs-*.json")).read_text())
