"""LM against KL training, step by step: the prefix task's KL of every saved snapshot of two runs that differ only
in their objective, against the base model's full attention (``kl_to_base``: the reference both runs share) and
against each snapshot's own full attention (``kl_to_full``), beside StreamingLLM and the best kvpress press at the
same KV, from the prefix-task results.

    .venv/bin/python scripts/plot_objectives.py --curve runs/kl-retrain/curve --press runs/press-plot \
        --run LM=runs/kl-retrain/sentinel-r0.5-lm-snaps --run KL=runs/kl-retrain/sentinel-r0.5-kl-snaps \
        --out docs/sentinel_lm_vs_kl_steps.png

``--curve`` holds the results of ``kvcondense eval --checkpoint <run>-snaps/stepN --task prefix ... --reference``
(scripts/kl_retrain_rows.sh); each ``--run NAME=FOLDER`` picks the snapshots under FOLDER. ``--press`` is
scripts/press_table.sh's result folder (``OUT=runs/press-plot``: kvpress's rows and StreamingLLM). Prints the
table it plots; the KV budget is the runs' own (one ratio).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def results(folder: str) -> list[dict]:
    """Every prefix-task record under ``folder``, with the checkpoint it scored (``checkpoint``, from its config)."""
    out = []
    for f in sorted(Path(folder).rglob("result.json")):
        data = json.loads(f.read_text())
        for r in data["results"] if isinstance(data, dict) and "results" in data else [data]:
            if r.get("kind") == "prefix":
                out.append(r | {"checkpoint": str(r.get("config", {}).get("checkpoint") or "")})
    return out


def references(press: list[dict], kept: float) -> dict[str, float]:
    """StreamingLLM's and each kvpress press's KL to full at the KV budget nearest ``kept`` (within 0.03)."""
    refs: dict[str, float] = {}
    for r in press:
        budget = r["kv_kept"] if r.get("harness", "").startswith("kvpress") else r.get("kv_budget")
        if budget is None or abs(budget - kept) > 0.03:
            continue
        if r.get("harness", "").startswith("kvpress") and r.get("press"):
            refs[r["press"]] = r["kl_to_full"]
        elif r.get("method") == "streaming" and not r.get("harness"):
            refs["StreamingLLM"] = r["kl_to_full"]
    return refs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--curve", default="runs/kl-retrain/curve")
    ap.add_argument("--press", default="runs/press-plot")
    ap.add_argument("--run", action="append", required=True, help="NAME=FOLDER of stepN snapshots")
    ap.add_argument("--title", default="Sentinel r = 0.5 (the committed recipe), prefix task")
    ap.add_argument("--out", default="docs/sentinel_lm_vs_kl_steps.png")
    args = ap.parse_args()
    curve = results(args.curve)
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    kept = []
    for i, spec in enumerate(args.run):
        name, folder = spec.split("=", 1)
        points = {}
        for r in curve:
            m = re.fullmatch(r"step(\d+)", Path(r["checkpoint"]).name)
            if m and Path(r["checkpoint"]).parent == Path(folder):
                points[int(m.group(1))] = r
        if not points:
            raise SystemExit(f"no prefix results for {folder}/stepN under {args.curve}; run scripts/kl_retrain_rows.sh")
        steps = sorted(points)
        kept += [points[s]["kv_kept"] for s in steps]
        colour = f"C{i}"
        to_base = [points[s]["kl_to_base"] for s in steps]
        ax.plot(steps, to_base, "o-", color=colour, label=f"{name}: KL to the base model")
        to_own = [points[s]["kl_to_full"] for s in steps]
        ax.plot(steps, to_own, "s--", color=colour, lw=1, label=f"{name}: KL to its own full attention")
        for s in steps:
            r = points[s]
            print(f"{name} step {s:4d}  kv {r['kv_kept']:.3f}  KL to base {r['kl_to_base']:.4f}  "
                  f"KL to own full {r['kl_to_full']:.4f}  own full ppl {r['full_perplexity']:.3f}")  # fmt: skip
    budget = sum(kept) / len(kept)
    refs = references(results(args.press), budget)
    best = min((v, k) for k, v in refs.items() if k != "StreamingLLM") if len(refs) > 1 else None
    if best:
        ax.axhline(best[0], color="C7", ls="--", lw=1, label=f"best kvpress press ({best[1]})")
    if "StreamingLLM" in refs:
        ax.axhline(refs["StreamingLLM"], color="C7", ls=":", lw=1, label="StreamingLLM")
    print(f"references at {budget:.3f} KV kept: best press {best}, StreamingLLM {refs.get('StreamingLLM')}")
    ax.set_yscale("log")
    ax.set_xlabel("training steps (4 x 256 tokens each)")
    ax.set_ylabel("KL (nats / token), log scale")
    ax.set_title(f"{args.title}, {budget:.1%} KV kept")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110, bbox_inches="tight")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
