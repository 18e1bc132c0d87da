"""Memory recall against training steps: the accuracy of each saved snapshot at each number of facts in memory t,
one panel per learning rate, beside full attention and no context (horizontal lines), from the memory results.

    .venv/bin/python scripts/plot_memory_steps.py --curve runs/ccm-chunks/curve --out docs/ccm_recall_vs_steps.png

``--curve`` holds one folder per run (``lr1e-3/stepN.json``, written by ``kvcondense eval --data recall ... --json``
on each snapshot; scripts/ccm_recall_curve.sh) and ``baselines.json`` (the same eval with ``--baselines no-context
full``). Prints the table it plots.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def results(path: Path) -> list[dict]:
    return [r for r in json.loads(path.read_text())["results"] if r.get("kind") == "memory"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--curve", default="runs/ccm-chunks/curve")
    ap.add_argument("--out", default="docs/ccm_recall_vs_steps.png")
    args = ap.parse_args()
    root = Path(args.curve)
    runs: dict[str, dict[int, dict[int, float]]] = {}  # run -> t -> step -> accuracy
    for f in sorted(root.glob("*/step*.json")):
        m = re.fullmatch(r"step(\d+)", f.stem)
        if not m:
            continue
        step = int(m.group(1))
        for r in results(f):
            if r["label"].endswith("(trained)"):
                runs.setdefault(f.parent.name, {}).setdefault(r["t"], {})[step] = r["accuracy"]
    refs: dict[str, dict[int, float]] = {}  # baseline -> t -> accuracy
    for r in results(root / "baselines.json"):
        if not r["label"].endswith("(trained)"):
            refs.setdefault(r["label"], {})[r["t"]] = r["accuracy"]
    if not runs:
        raise SystemExit(f"no stepN.json results under {root}/*/: run scripts/ccm_recall_curve.sh first")
    ts = sorted({t for run in runs.values() for t in run})
    all_steps = sorted({s for run in runs.values() for points in run.values() for s in points})
    print(f"{'run':<10} {'t':>3} " + " ".join(f"step {s:>4}" for s in all_steps))
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.8), sharey=True, squeeze=False)
    colours = {t: plt.get_cmap("tab10")(i % 10) for i, t in enumerate(ts)}
    for ax, (name, run) in zip(axes[0], sorted(runs.items()), strict=True):
        for t in ts:
            points = run.get(t, {})
            steps = sorted(points)
            row = (f"{points[s]:>9.3f}" if s in points else f"{'-':>9}" for s in all_steps)
            print(f"{name:<10} {t:>3} " + " ".join(row))
            ax.plot(steps, [points[s] for s in steps], "o-", color=colours[t], label=f"memory, t = {t}")
        for label, style in (("full", "--"), ("no-context", ":")):
            points = next((v for k, v in refs.items() if k.startswith(label)), {})
            for t, acc in points.items():
                if t in colours:
                    ax.axhline(acc, color=colours[t], ls=style, lw=1)
        ax.set_title(f"ccm-concat, {name} (dashed: full attention; dotted: no context)", fontsize=8)
        ax.set_xlabel("training steps (8 episodes each)")
        ax.set_ylim(0, 1.05)
    axes[0][0].set_ylabel("recall accuracy (30 validation episodes)")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"plot written to {args.out}")


if __name__ == "__main__":
    main()
