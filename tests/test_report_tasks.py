"""Report of the compressed-context tasks: kvcondense's and the kvpress peer's rows in one table per task."""

import json

from kvcondense.report import load_results, write_report
from kvcondense.report_tasks import nearest_budget


def rows():
    ours = {"kind": "prefix", "method": "streaming", "label": "streaming", "kv_budget": 0.25, "kv_kept": 0.25,
            "perplexity": 20.0, "full_perplexity": 18.0, "kl_to_full": 0.1, "tokens_scored": 512}  # fmt: skip
    peer = {"kind": "prefix", "method": "kvpress-kvzip", "harness": "kvpress-0.5.5", "masks_only": True,
            "kept_nominal": 0.25, "kv_kept": 0.25, "perplexity": 18.5, "full_perplexity": 18.0, "kl_to_full": 0.02,
            "n_tokens": 512}  # fmt: skip
    cell = {"mode": "options", "length": 512, "depth": 0.5, "accuracy": 1.0, "n": 2}
    needle = {"kind": "needle", "method": "full", "kv_kept": 1.0, "accuracy": 0.9, "accuracy_options": 1.0,
              "questions": 4, "grid": [cell]}  # fmt: skip
    return ours, peer, needle


def test_one_table_per_task_with_both_harnesses_and_plots(tmp_path):
    ours, peer, needle = rows()
    (tmp_path / "ours.json").write_text(json.dumps({"results": [ours, needle]}))
    (tmp_path / "peer.json").write_text(json.dumps({"results": [peer]}))
    assert len(load_results([tmp_path])) == 3
    table, pngs = write_report([tmp_path], tmp_path / "out")
    text = table.read_text()
    assert "| 0.250 | kvpress-kvzip (kvpress, masks only) | 0.250 |" in text
    assert text.index("kvpress-kvzip") < text.index("| 0.250 | streaming")  # sorted by KL within a budget
    assert "Needle (passkey)" in text and "| 1.000 | full | 1.000 | 0.900 | 1.000 | - | - |" in text
    assert {p.name for p in pngs} >= {"prefix_kl_to_full_vs_kv.png", "needle_grid_full_1_000.png"}


def test_kvpress_needle_rows_join_the_needle_table(tmp_path):
    _, _, needle = rows()
    peer = {"kind": "qa", "task_name": "needle-wiki-test", "method": "kvpress-snapkv", "harness": "kvpress-0.5.5",
            "kept_nominal": 0.5, "kv_kept": 0.5, "accuracy": 0.33, "n_questions": 24}  # fmt: skip
    (tmp_path / "r.json").write_text(json.dumps({"results": [needle, peer]}))
    text = write_report([tmp_path], tmp_path / "out")[0].read_text()
    assert "QA over" not in text and "| 0.500 | kvpress-snapkv (kvpress) | 0.500 | 0.330 |" in text


def test_budget_of_a_row():
    ours, peer, needle = rows()
    assert nearest_budget(ours) == nearest_budget(peer) == 0.25
    assert nearest_budget({"kv_kept": 0.58}) == 0.5 and nearest_budget(needle) == 1.0


def test_a_task_row_without_its_metric_is_named(tmp_path, capsys):
    ours, _, _ = rows()
    del ours["kl_to_full"]
    (tmp_path / "bad.json").write_text(json.dumps(ours))
    (tmp_path / "good.json").write_text(json.dumps(rows()[1]))
    assert len(load_results([tmp_path])) == 1
    assert "bad.json" in capsys.readouterr().err
