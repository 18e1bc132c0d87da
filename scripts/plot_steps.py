"""Quality against training steps: KL to full attention of each saved snapshot at each KV budget, beside the best
kvpress press and StreamingLLM at the same budget (horizontal lines), from the prefix-task results.

    .venv/bin/python scripts/plot_steps.py --curve runs/curve --press runs/press --out docs/beacon_kl_vs_steps.png

``--curve`` holds ``stepN.json`` files written by ``kvcondense eval --task prefix ... --json`` on each snapshot
(scripts/beacon_distill.sh); ``--press`` is scripts/press_table.sh's result folder (kvpress rows and StreamingLLM).
Prints the table it plots.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def records(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    return data["results"] if isinstance(data, dict) and "results" in data else [data]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--curve", default="runs/curve")
    ap.add_argument("--press", default="runs/press")
    ap.add_argument("--out", default="docs/beacon_kl_vs_steps.png")
    args = ap.parse_args()
    curve: dict[float, dict[int, float]] = {}
    for f in sorted(Path(args.curve).glob("step*.json")):
        m = re.fullmatch(r"step(\d+)", f.stem)
        if not m:
            continue  # other settings of a step (window shares) are not the curve
        for r in records(f):
            curve.setdefault(r["kv_budget"], {})[int(m.group(1))] = r["kl_to_full"]
    refs: dict[float, dict[str, float]] = {}
    for f in Path(args.press).rglob("result.json"):
        for r in records(f):
            if r.get("kind") != "prefix":
                continue
            if r.get("harness", "").startswith("kvpress") and r.get("press"):
                refs.setdefault(round(r["kv_kept"], 3), {})[r["press"]] = r["kl_to_full"]
            elif r.get("method") == "streaming" and r.get("kv_budget"):
                refs.setdefault(r["kv_budget"], {})["StreamingLLM"] = r["kl_to_full"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colours = {0.5: "tab:blue", 0.25: "tab:orange", 0.125: "tab:green"}
    for budget, points in sorted(curve.items(), reverse=True):
        steps = sorted(points)
        c = colours.get(budget, "tab:gray")
        ax.plot(steps, [points[s] for s in steps], "o-", color=c, label=f"kvcondense, {budget:.1%} KV kept")
        press = refs.get(budget, {})
        best = min((v, k) for k, v in press.items() if k != "StreamingLLM") if len(press) > 1 else None
        if best:
            ax.axhline(best[0], color=c, ls="--", lw=1, label=f"best press ({best[1]}), {budget:.1%}")
        if "StreamingLLM" in press:
            ax.axhline(press["StreamingLLM"], color=c, ls=":", lw=1, label=f"StreamingLLM, {budget:.1%}")
        row = " ".join(f"{s}:{points[s]:.4f}" for s in steps)
        print(f"{budget:.3f}  {row}  | best press {best}  streaming {press.get('StreamingLLM')}")
    ax.set_xlabel("training steps (4 x 256 tokens each)")
    ax.set_ylabel("KL to full attention (nats / token)")
    ax.set_title("Distilled sentinel (recent placement, LoRA on <CL>/<CR>), prefix task")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
