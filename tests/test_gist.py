"""Sentence-anchored gist tokens: the literal mask of SPEC section 2, sentence boundaries, decode-time eviction,
stage-1 freezing and bad input."""

import math

import pytest
import torch
from conftest import decode_with_policy, tiny_model

from kvcondense.forward import parallel_forward
from kvcondense.layout import IGNORE, NEVER, Kind
from kvcondense.masks import layout_visibility
from kvcondense.methods import Gist, TokenizedText, tokenize
from kvcondense.methods.base import sentence_ends
from kvcondense.methods.gist import gist_layout

G1, G2 = 90, 91


def rows(text: str) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in line.split()] for line in text.strip().splitlines()])


# A B . g1 g2 C D ? g1 g2 E F
SPEC_MASK = rows("""
1 0 0 0 0 0 0 0 0 0 0 0
1 1 0 0 0 0 0 0 0 0 0 0
1 1 1 0 0 0 0 0 0 0 0 0
1 1 1 1 0 0 0 0 0 0 0 0
1 1 1 1 1 0 0 0 0 0 0 0
0 0 0 1 1 1 0 0 0 0 0 0
0 0 0 1 1 1 1 0 0 0 0 0
0 0 0 1 1 1 1 1 0 0 0 0
0 0 0 1 1 1 1 1 1 0 0 0
0 0 0 1 1 1 1 1 1 1 0 0
0 0 0 1 1 0 0 0 1 1 1 0
0 0 0 1 1 0 0 0 1 1 1 1
""")


def spec_layout(bos_sink=False):
    # A B . C D ? E F  with sentence ends after "." (index 2) and "?" (index 5)
    return gist_layout(torch.tensor([1, 2, 3, 4, 5, 6, 7, 8]), [2, 5], [G1, G2], bos_sink)


def test_literal_mask_of_spec():
    lay = spec_layout()
    assert lay.input_ids.tolist() == [1, 2, 3, G1, G2, 4, 5, 6, G1, G2, 7, 8]
    assert torch.equal(layout_visibility(lay), SPEC_MASK)
    assert lay.position_ids.tolist() == list(range(12))  # gist tokens take positions
    assert lay.targets.tolist()[:4] == [2, 3, G1, G2]  # gist tokens are LM targets (the paper)


def test_bos_sink_option_keeps_first_token_visible():
    vis = layout_visibility(spec_layout(bos_sink=True))
    expected = SPEC_MASK.clone()
    expected[3:, 0] = True
    assert torch.equal(vis, expected)


def test_expiry_keeps_gists_and_current_sentence():
    lay = spec_layout()
    assert lay.expire.tolist()[:5] == [4, 4, 4, NEVER, NEVER]
    assert lay.kept_slots() == 4 + 2  # two gist blocks + E F


@pytest.mark.parametrize(
    ("text", "ends_after"),
    [
        ("It rains. It pours.", ["It rains. ", "It pours."]),
        ("Pi is 3.14 today. Yes", ["Pi is 3.14 today. "]),  # a decimal is no boundary
        ("Mr. Smith came.", ["Mr. ", "Smith came."]),  # abbreviations get gists too (as in the paper)
        ('He said "Stop!" and left. Then', ['He said "Stop!" ', "and left. "]),  # closing quote stays
        ("One?\nTwo!\n\nThree", ["One?\n", "Two!\n\n"]),  # newline forms: the block goes after the whitespace
        ("no punctuation at all", []),
    ],
)
def test_sentence_boundaries(text, ends_after):
    ends = sentence_ends(text)
    pieces = [text[a:b] for a, b in zip([0, *ends], ends, strict=False)]
    assert pieces == ends_after


def test_boundaries_map_to_tokens(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    text = 'Alice ran. "Oh dear!" she said.\nThe Rabbit'
    tt = tokenize(text, tok)
    cut = [i for i, e in enumerate(tt.sentence_end.tolist()) if e]
    sentences = [tok.decode(tt.ids[a + 1 : b + 1].tolist()) for a, b in zip([-1, *cut], cut, strict=False)]
    assert sentences == ["Alice ran.", ' "Oh dear!"', " she said.\n"]


def test_forced_block_after_k_regular_tokens_without_punctuation():
    text = TokenizedText.from_ids(torch.arange(20))
    lay = Gist(n_gist=2, max_sentence_tokens=6).layout(text, {"<GIST_0>": G1, "<GIST_1>": G2})
    gist_rows = (lay.kinds == Kind.GIST).nonzero().flatten().tolist()
    assert len(gist_rows) == 2 * 3  # after tokens 6, 12, 18
    regular_between = [b - a - 1 for a, b in zip([-1, *gist_rows[1::2]], gist_rows[::2], strict=False)]
    assert regular_between[0] == 6 and all(r == 6 for r in regular_between[1:] if r > 0)


def test_rc_roughly_halves_when_n_doubles(tiny_dir, sample_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tt = tokenize(sample_path.read_text(), tok)
    rc = {}
    for n in (1, 2, 4, 8):
        lay = Gist(n_gist=n).layout(tt, {f"<GIST_{i}>": 90 + i for i in range(n)})
        rc[n] = lay.n_text / (len(lay) - lay.n_text)
    for n in (1, 2, 4):
        assert rc[n] / rc[2 * n] == pytest.approx(2.0, rel=0.01)


def test_generation_evicts_a_finished_sentence_at_once():
    """The model emits g_1: g_2..g_N are forced, the sentence's regular tokens are freed right away, and the
    stored slots grow by N per sentence. Logits equal the parallel forward over the final layout."""
    model = tiny_model("llama")
    method = Gist(n_gist=2, max_sentence_tokens=50)
    ids = {"<GIST_0>": 96, "<GIST_1>": 97}
    prompt = method.layout(TokenizedText.from_ids(torch.arange(10)), ids)
    policy = method.decode_policy(prompt, ids)
    stream = [5, 6, 7, 96, 8, 9, 96, 10, 11, 12, 96]  # three sentences closed by the model's g_1
    full, got, rows, _, slots_each = decode_with_policy(model, prompt, policy, stream)
    slots = [n for n, tok in zip(slots_each, stream, strict=True) if tok == 96]
    with torch.no_grad():
        parallel = parallel_forward(model, [full]).logits[0]
    assert (parallel[rows] - got).abs().max() < 1e-4
    assert slots == [2, 4, 6]  # the prompt's unfinished sentence closes with the first block; N slots a sentence
    assert int((full.kinds == Kind.GIST).sum()) == 2 * 3
    assert full.targets[-1] == IGNORE


def test_bad_gist_count_and_k():
    with pytest.raises(ValueError, match="gist tokens must be in 1..8"):
        Gist(n_gist=9)
    with pytest.raises(ValueError, match="gist tokens must be in 1..8"):
        Gist(n_gist=0)
    with pytest.raises(ValueError, match="must be >= 1"):
        Gist(max_sentence_tokens=0)


def test_stage_rows_trains_only_the_gist_rows(tiny_dir, sample_path, tmp_path):
    from safetensors.torch import load_file

    from kvcondense.checkpoint import read_resume
    from kvcondense.train import TrainConfig, train

    cfg = TrainConfig(
        method="gist",
        method_params={"n_gist": 2},
        model=str(tiny_dir),
        data=str(sample_path),
        out=str(tmp_path / "ck"),
        steps=3,
        batch_size=2,
        block_tokens=64,
        lr=1e-2,
        stage="rows",
        save_every=0,
    )
    train(cfg)
    trained = read_resume(cfg.out)["trainable"]
    assert trained and all("trainable_tokens_delta" in name for name in trained)
    adapter = load_file(str(tmp_path / "ck" / "adapter.safetensors"))
    assert not any("lora_" in k for k in adapter)  # LoRA is untouched (B = 0): only the rows are stored
    from kvcondense.loader import load_checkpoint

    model = load_checkpoint(cfg.out, merge_lora=False).model  # loads with its LoRA at the identity init
    assert all(p.abs().max() == 0 for n, p in model.named_parameters() if "lora_B" in n)
    rows = [v for k, v in adapter.items() if "trainable_tokens_delta" in k]
    assert rows and rows[0].shape[0] == 2

    # stage 2 starts from stage 1's rows and trains LoRA too
    cfg2 = TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "ck2"), "stage": "lora", "init_from": cfg.out})
    train(cfg2)
    adapter2 = load_file(str(tmp_path / "ck2" / "adapter.safetensors"))
    assert any(v.abs().max() > 0 for k, v in adapter2.items() if "lora_B" in k)


def test_checkpoint_gist_count_must_agree_with_flags(capsys, tiny_dir, sample_path, tmp_path):
    from kvcondense.cli import main

    out = tmp_path / "gist"
    assert (
        main(
            [
                "train",
                "--method",
                "gist",
                "--gist-tokens",
                "2",
                "--model",
                str(tiny_dir),
                "--data",
                str(sample_path),
                "--steps",
                "1",
                "--block-tokens",
                "64",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    capsys.readouterr()
    rc = main(["eval", "--checkpoint", str(out), "--gist-tokens", "4", "--data", str(sample_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "trained with n_gist=2, not 4" in err
    rc = main(
        [
            "eval",
            "--checkpoint",
            str(out),
            "--data",
            str(sample_path),
            "--split",
            "train",
            "--max-tokens",
            "512",
            "--block-tokens",
            "64",
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    import json

    (res,) = json.loads((tmp_path / "r.json").read_text())["results"]
    assert rc == 0 and res["R_c"] > 1 and "perplexity_with_special_targets" in res
    rc = main(["train", "--method", "gist", "--gist-tokens", "9", "--out", str(tmp_path / "x")])
    assert rc == 2 and "gist tokens must be in 1..8" in capsys.readouterr().err


def test_empty_prompt_is_refused(capsys, tiny_dir):
    from kvcondense.cli import main

    rc = main(["generate", "--method", "gist", "--model", str(tiny_dir), "--prompt", ""])
    assert rc == 2 and "prompt is empty" in capsys.readouterr().err


def test_long_document_mode_reports_perplexity_against_prefix(capsys, tiny_dir, sample_path, tmp_path):
    import json

    from kvcondense.cli import main

    rc = main(
        [
            "eval",
            "--method",
            "gist",
            "--model",
            str(tiny_dir),
            "--data",
            str(sample_path),
            "--split",
            "train",
            "--long-doc",
            "--block-tokens",
            "600",
            "--max-tokens",
            "600",
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    (res,) = json.loads((tmp_path / "r.json").read_text())["results"]
    buckets = [b for b in res["perplexity_by_prefix"] if b["tokens"]]
    assert rc == 0 and [b["prefix_upto"] for b in buckets][:2] == [256, 512]
    assert sum(b["tokens"] for b in res["perplexity_by_prefix"]) == res["tokens_scored"]


def test_min_sentence_tokens_gathers_short_sentences_into_one_block():
    """Sentence ends after tokens 2, 5, 8, 11, 14, 17: with M = 0 every one closes a block; with M = 6 a sentence
    end closes one only once 6 regular tokens have gathered (after 5, 11, 17)."""
    ends = torch.zeros(20, dtype=torch.bool)
    ends[[2, 5, 8, 11, 14, 17]] = True
    text = TokenizedText(torch.arange(20), torch.arange(20), torch.zeros(20, dtype=torch.long), ends)
    assert Gist(n_gist=1).block_after(text) == [2, 5, 8, 11, 14, 17]
    assert Gist(n_gist=1, min_sentence_tokens=6).block_after(text) == [5, 11, 17]


@pytest.mark.parametrize("budget", [0.5, 0.25, 0.125, 0.05])
def test_kv_budget_sets_the_block_length(tiny_dir, sample_path, budget):
    """--kv-budget for gist: on the contexts it will compress, the block lengths that keep the most without passing
    the budget; without the contexts, blocks of at least n_gist / budget tokens."""
    from transformers import AutoTokenizer

    from kvcondense.prefix_task import budget_params

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    text = tokenize(sample_path.read_text(), tok)
    texts = [text[i : i + 512] for i in range(0, 2048, 512)]
    ids = {f"<GIST_{i}>": 90 + i for i in range(4)}
    method = Gist(**budget_params(Gist(n_gist=4), budget, texts))
    kept = sum(method.layout(t, ids).kept_slots() for t in texts) / 2048
    natural = sum(Gist(n_gist=4).layout(t, ids).kept_slots() for t in texts) / 2048
    assert budget - 0.05 < kept <= budget, (kept, method)
    assert (method.min_sentence_tokens, method.max_sentence_tokens) != (0, 128) or natural <= budget
    assert Gist(**budget_params(Gist(n_gist=4), budget)).min_sentence_tokens == math.ceil(4 / budget)
