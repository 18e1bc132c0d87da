"""Report tables and plots of the compressed-context tasks (prefix, qa, needle), kvcondense's rows and the kvpress
peer's (``benchmarks/peers/kvpress``) side by side: one table per task and budget, one plot per task.

Records of either harness carry ``kind`` (``prefix``, ``qa`` or ``needle``), ``method``, ``kv_kept`` (measured)
and the task's metrics; kvpress rows also carry ``press`` and ``masks_only`` (their memory is not freed).
"""

from __future__ import annotations

from pathlib import Path

from .report_plot import finish, style
from .report_setting import heading, label, setting_line, short

TASK_KINDS = ("prefix", "qa", "needle")
BUDGETS = (0.5, 0.25, 0.125)


def task_kind(r: dict) -> str | None:
    """prefix, qa or needle; the kvpress runner writes needle questions as qa rows of a task named needle-*."""
    kind = r.get("kind")
    if kind == "qa" and str(r.get("task_name", "")).startswith("needle"):
        return "needle"
    return kind


task_label = label  # one name for a method in tables and legends (it lived here before)


def is_peer(r: dict) -> bool:
    """A row of the kvpress peer harness."""
    return str(r.get("harness", "")).startswith("kvpress")


def nearest_budget(r: dict) -> float | None:
    """The budget a row belongs to: its --kv-budget, its press's kept fraction, or its measured KV kept rounded to
    the nearest of 50/25/12.5 % (full attention: 1.0)."""
    for key in ("kv_budget", "kept_nominal"):
        if isinstance(r.get(key), int | float):
            return float(r[key])
    kept = r.get("kv_kept")
    if not isinstance(kept, int | float):
        return None
    return 1.0 if kept > 0.95 else min(BUDGETS, key=lambda b: abs(b - kept))


def _fmt(x, spec: str) -> str:
    return format(x, spec) if isinstance(x, int | float) else "-"


def task_markdown(records: list[dict]) -> list[str]:
    """Markdown tables: per task, rows grouped by budget (full attention first), then by quality."""
    lines: list[str] = []
    for kind in TASK_KINDS:
        rows = [r for r in records if task_kind(r) == kind]
        if not rows:
            continue
        title = {"prefix": "Prefix task, KL to full attention", "qa": "QA over a compressed context",
                 "needle": "Needle (passkey)"}[kind]  # fmt: skip
        lines += [heading(title, rows), "", setting_line(rows, kind), ""]
        if kind == "prefix":
            lines += [
                "The context compressed, the next tokens scored over what was kept "
                "(KL to full attention with the same weights; lower is better)",
                "",
                "| budget | method | KV kept (measured) | perplexity | same-weights full ppl | KL to full | tokens |",
                "|---|---|---|---|---|---|---|",
            ]
            for r in sorted(rows, key=lambda r: (-(nearest_budget(r) or 0), r.get("kl_to_full", 0))):
                tokens = r.get("tokens_scored", r.get("n_tokens"))
                lines.append(
                    f"| {_fmt(nearest_budget(r), '.3f')} | {label(r)} | {_fmt(r.get('kv_kept'), '.3f')} | "
                    f"{_fmt(r.get('perplexity'), '.3f')} | {_fmt(r.get('full_perplexity'), '.3f')} | "
                    f"{_fmt(r.get('kl_to_full'), '.4f')} | {_fmt(tokens, 'd')} |"
                )
        else:
            lines += [
                "Accuracy (higher is better); the context is compressed once, before the questions",
                "",
                "| budget | method | KV kept (measured) | accuracy | by options | by generation | same weights, full "
                "| questions |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for r in sorted(rows, key=lambda r: (-(nearest_budget(r) or 0), -r.get("accuracy", 0))):
                n = r.get("questions", r.get("n_questions"))
                lines.append(
                    f"| {_fmt(nearest_budget(r), '.3f')} | {label(r)} | {_fmt(r.get('kv_kept'), '.3f')} | "
                    f"{_fmt(r.get('accuracy'), '.3f')} | {_fmt(r.get('accuracy_options'), '.3f')} | "
                    f"{_fmt(r.get('accuracy_generate'), '.3f')} | {_fmt(r.get('full_accuracy'), '.3f')} | "
                    f"{_fmt(n, 'd')} |"
                )
        lines.append("")
    return lines


def task_plots(records: list[dict], out: Path, save, plt) -> list[Path]:
    """KL to full (prefix) or accuracy (qa, needle) against KV kept, a line per method; kvcondense's rows and the
    kvpress peer's in two panels (one method of either would hide the other's line); a needle heat map per row."""
    made = []
    for kind, metric, ylabel in (
        ("prefix", "kl_to_full", "KL to full attention (nats/token)"),
        ("qa", "accuracy", "accuracy"),
        ("needle", "accuracy", "accuracy"),
    ):
        rows = [r for r in records if task_kind(r) == kind and isinstance(r.get(metric), int | float)]
        if metric == "kl_to_full":  # full attention is 0 by definition: nothing to draw on a log axis
            rows = [r for r in rows if r[metric] > 0]
        if not rows:
            continue
        ours, peers = [r for r in rows if not is_peer(r)], [r for r in rows if is_peer(r)]
        panels = [(what, part) for what, part in (("kvcondense", ours), ("kvpress (peer)", peers)) if part]
        fig, axes = plt.subplots(len(panels), 1, figsize=(9, 4 * len(panels)), sharex=True, sharey=True, squeeze=False)
        for ax, (what, part) in zip(axes[:, 0], panels, strict=True):
            for i, name in enumerate(sorted({label(r) for r in part})):
                pts = sorted((r["kv_kept"], r[metric]) for r in part if label(r) == name)
                ax.plot(*zip(*pts, strict=True), label=name, **style(i))
            if metric == "kl_to_full":
                ax.set_yscale("log")
            ax.set_xlim(0, 1.05 * max(1.0, *(r["kv_kept"] for r in rows)))
            ax.tick_params(labelbottom=True)
            title = f"{kind}: {ylabel} vs KV kept, {what}"
            finish(ax, "KV kept (measured fraction of the context)", ylabel, title)
        fig.suptitle(short(rows), fontsize=9)
        made.append(save(fig, out / f"{kind}_{metric}_vs_kv.png"))
    for r in (r for r in records if r.get("kind") == "needle" and isinstance(r.get("grid"), list)):
        cells = [c for c in r["grid"] if c.get("mode") == "options"]
        if not cells:
            continue
        lengths = sorted({c["length"] for c in cells})
        depths = sorted({c["depth"] for c in cells})
        grid = [[next((c["accuracy"] for c in cells if c["length"] == n and c["depth"] == d), float("nan"))
                 for n in lengths] for d in depths]  # fmt: skip
        fig, ax = plt.subplots(figsize=(5, 4))
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(lengths)), lengths)
        ax.set_yticks(range(len(depths)), depths)
        ax.set(xlabel="context (tokens)", ylabel="needle depth", title=f"needle: {label(r)}, KV {r['kv_kept']:.2f}")
        fig.colorbar(im, ax=ax, label="accuracy (options)")
        stem = "".join(ch if ch.isalnum() else "_" for ch in f"{label(r)}_{r['kv_kept']:.3f}")
        made.append(save(fig, out / f"needle_grid_{stem}.png"))
    return made
