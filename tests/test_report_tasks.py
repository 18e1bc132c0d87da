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


def test_a_task_row_without_its_metric_is_named(tmp_path):
    ours, _, _ = rows()
    del ours["kl_to_full"]
    (tmp_path / "bad.json").write_text(json.dumps(ours))
    (tmp_path / "good.json").write_text(json.dumps(rows()[1]))
    warned = []
    assert len(load_results([tmp_path], warn=warned.append)) == 1
    assert len(warned) == 1 and "bad.json" in warned[0]


def test_a_crowded_task_plot_keeps_every_line_visible(tmp_path, monkeypatch):
    """The recall plot drew 13 lines in one axes: full (ours) under full (kvpress), streaming over
    kvpress-streaming_llm, and three runs of one checkpoint with different --window-share as one zigzag line under
    one name. kvcondense's and kvpress's rows are now two panels; runs that differ in a method flag are separate
    lines, named by it in the legend and in the table; no two lines are drawn alike; the legends are beside the
    axes; and the section states its setting."""
    from report_figures import capture, check_legible

    def ours(method, lab, kept, acc, ck=None, **given):
        params = {"ratio": 1 - kept, "window_share": 0.5, **given}
        return {"kind": "qa", "method": method, "label": lab, "params": params,
                "kv_budget": kept, "kv_kept": kept, "accuracy": acc, "questions": 30, "context_tokens": 156,
                "config": {"checkpoint": ck, "method": None if ck else method, "model": None, "data": "recall",
                           "split": "test", "method_params": given}}  # fmt: skip

    def peer(method, kept, acc):
        return {"kind": "qa", "method": method, "harness": "kvpress-0.5.5", "kept_nominal": kept, "kv_kept": kept,
                "accuracy": acc, "n_questions": 30, "task_name": "qa-recall-test",
                "model": "/cache/models/smollm2-135m"}  # fmt: skip

    budgets = (0.5, 0.25, 0.125)
    records = [ours("full", "full", 1.0, 0.93), peer("full", 1.0, 0.93)]
    for i, ck in enumerate(("kl-step40", "lm-step40", "r0.5")):
        records.append(ours("sentinel", "sentinel (trained)", 1.0, 0.8 - i / 10, ck=f"runs/{ck}"))
    for kept in budgets:
        records.append(ours("streaming", "streaming", kept, kept))
        records.append(peer("kvpress-streaming_llm", kept, kept))
        for press in ("kvzip", "snapkv", "expected_attention"):
            records.append(peer(f"kvpress-{press}", kept, kept + 0.1))
        for share in (None, 0.75, 0.9):  # one checkpoint, three --window-share runs
            given = {} if share is None else {"window_share": share}
            records.append(ours("sentinel", "sentinel (trained)", kept, kept / 2, ck="runs/special-240", **given))
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "r.json").write_text(json.dumps({"results": records}))
    figures = capture(monkeypatch)
    text = write_report([tmp_path / "runs"], tmp_path / "out")[0].read_text()
    ours_panel, peer_panel = figures["qa_accuracy_vs_kv.png"]
    for panel in (ours_panel, peer_panel):
        check_legible("qa_accuracy_vs_kv.png", [panel])
    assert all("kvpress" in name for name in peer_panel["legend"]) and len(peer_panel["legend"]) == 5
    assert not any("kvpress" in name for name in ours_panel["legend"]) and len(ours_panel["legend"]) == 8
    for share in (0.5, 0.75, 0.9):
        name = f"sentinel (trained: special-240, window_share={share})"
        assert name in ours_panel["legend"] and f"| 0.250 | {name} | 0.250 |" in text
    heading = "## QA over a compressed context: recall (test split), qa-recall-test, smollm2-135m"
    lines = text.splitlines()
    assert lines[lines.index(heading) + 2] == (
        "Setting: model smollm2-135m, the base model of a checkpoint not found here; data recall (test split), "
        "qa-recall-test; contexts of 156 tokens on average; 30 questions."
    )
