"""ROUGE-L and BERTScore on hand-made pairs: identical text scores about 1, unrelated text scores low."""

import pytest

from kvcondense.metrics import BertScore, rouge_l

SAME = "Alice was beginning to get very tired of sitting by her sister on the bank."
OTHER = "Quarterly revenue grew while the central bank held interest rates steady."


def test_rouge_l_identical_and_unrelated():
    same, other, partial = rouge_l([SAME, OTHER, "Alice was tired of sitting"], [SAME, SAME, SAME])
    assert same == pytest.approx(1.0)
    assert other < 0.2
    assert other < partial < same


def test_bertscore_wiring_with_a_local_encoder(tiny_encoder):
    """A random encoder cannot tell meaning apart (that is the slow test's job), but identical text must score 1
    and anything else less."""
    scores = BertScore(tiny_encoder, num_layers=2)([SAME, OTHER, SAME], [SAME, SAME, OTHER])
    assert scores[0] == pytest.approx(1.0, abs=1e-4)
    assert scores[1] < scores[0] and scores[2] < scores[0]


@pytest.mark.slow
def test_bertscore_with_the_embedded_minilm():
    scores = BertScore()([SAME, OTHER], [SAME, SAME])
    assert scores[0] == pytest.approx(1.0, abs=1e-4) and scores[1] < 0.5


def test_continuation_task_scores_generations(tiny_encoder, tiny_dir, sample_path, tmp_path):
    import json

    from kvcondense.cli import main

    out = tmp_path / "c.json"
    rc = main(
        [
            "eval",
            "--task",
            "continuation",
            "--method",
            "sentinel",
            "--ratio",
            "0.5",
            "--model",
            str(tiny_dir),
            "--data",
            str(sample_path),
            "--split",
            "train",
            "--prefix-tokens",
            "96",
            "--new-tokens",
            "8",
            "--docs",
            "2",
            "--bertscore-encoder",
            str(tiny_encoder),
            "--json",
            str(out),
        ]
    )
    (res,) = json.loads(out.read_text())["results"]
    assert rc == 0 and res["kind"] == "continuation" and res["documents"] == 2
    assert 0 <= res["rouge_l"] <= 1 and 0 < res["bertscore_f1"] <= 1
    assert 0 < res["kv_kept_generation"] < 1
