"""Turn result directories into a markdown table and PNG plots.

    kvcondense report runs/demo [more run dirs] [--out runs/report]

Reads every ``*.json`` below the given directories that ``kvcondense eval`` or ``kvcondense bench`` wrote (read
and checked by :mod:`kvcondense.report_records`) and draws: perplexity against KV kept, per method; ROUGE-L and
BERTScore per method; decode time against context length; stored KV against conversation turns (when a result
carries ``memory_by_turn``).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

from . import atomic
from .checkpoint import ADAPTER
from .data.episodes import CACHE_VERSION as EPISODES_VERSION
from .errors import optional
from .report_records import (  # noqa: F401  (re-exported: these lived here before)
    KINDS,
    MAX_RESULT_BYTES,
    label,
    load_results,
    name_checkpoints,
    read_result,
    record_kind,
    record_problem,
)
from .report_tasks import TASK_KINDS, task_markdown, task_plots


def _pyplot():
    """matplotlib's pyplot on the file-only backend (an optional dependency: the [eval] extra)."""
    matplotlib = optional("matplotlib")
    matplotlib.use("Agg")  # files only, no display
    return optional("matplotlib.pyplot")


def run_name(kind: str, config: dict) -> str:
    """A deterministic directory name for a result: its kind, method and a hash of its whole config."""
    blob = json.dumps(config, sort_keys=True, default=str)
    method = config.get("method") or Path(str(config.get("checkpoint") or "run")).name
    return f"{kind}-{method}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def result_file(out_dir: str | Path, kind: str, config: dict) -> Path:
    """Where the result of this config lives under ``out_dir`` (``<run name>/result.json``).

    The name also hashes what the config names but does not contain: the checkpoint's trained tensors and the
    version of the built-in episode sets, so a retrained checkpoint or rebuilt task data gets a new result.
    """
    inputs = dict(config)
    adapter = Path(str(config.get("checkpoint") or "")) / ADAPTER
    if config.get("checkpoint") and adapter.is_file():
        inputs["checkpoint_sha256"] = hashlib.sha256(adapter.read_bytes()).hexdigest()
    if config.get("task") == "memory":
        inputs["episodes_version"] = EPISODES_VERSION
    return Path(out_dir) / run_name(kind, inputs) / "result.json"


def write_json(path: str | Path, payload) -> None:
    """Write JSON atomically (see :func:`kvcondense.atomic.write_json`)."""
    atomic.write_json(path, payload)


def is_memory(r: dict) -> bool:
    return r.get("task") == "memory"


def memory_label(r: dict, rows: list[dict]) -> str:
    """A row name that is the same at every t: the window's slot budget follows the method it is matched to."""
    if r.get("params", {}).get("recurrent") is False:  # ccm-concat --no-recurrent is the Gisting-online baseline
        return f"Gisting-online: {label(r)}, no recurrence"
    if r.get("method") != "window":
        return label(r)
    owner = next((label(o) for o in rows if o.get("_source") == r.get("_source") and o.get("method") != "window"), "")
    return f"window + sinks, same KV as {owner}" if owner else label(r)


def memory_groups(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Memory rows by (metric, data): one table and one plot per task."""
    rows = [{**r, "label": memory_label(r, rows)} for r in rows]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r.get("metric", "perplexity"), str(r.get("config", {}).get("data", ""))), []).append(r)
    return groups


def memory_markdown(rows: list[dict]) -> list[str]:
    """CCM-style tables: one per metric and data, a row per method, a column per t (KV MB in brackets)."""
    lines = []
    for (metric, data), chosen in memory_groups(rows).items():
        steps = sorted({r["t"] for r in chosen})
        title = f"{data}: {metric}" if data else metric
        lines += [f"| method ({title}, KV MB) | " + " | ".join(f"t={t}" for t in steps) + " |"]
        lines += ["|---|" + "---|" * len(steps)]
        for name in dict.fromkeys(label(r) for r in chosen):
            cells = {r["t"]: f"{r[metric]:.3f} ({r['kv_mb']:.2f})" for r in chosen if label(r) == name}
            lines.append(f"| {name} | " + " | ".join(cells.get(t, "-") for t in steps) + " |")
        lines.append("")
    return lines


def markdown(records: list[dict]) -> str:
    lines = memory_markdown([r for r in records if is_memory(r)]) + task_markdown(records)
    records = [r for r in records if r.get("kind") not in TASK_KINDS]
    ppl = [r for r in records if "perplexity" in r and not is_memory(r)]
    if ppl:
        lines += ["| method | ratio | KV kept (measured) | perplexity | tokens |", "|---|---|---|---|---|"]
        for r in sorted(ppl, key=lambda r: (label(r), r["compression_ratio"])):
            lines.append(
                f"| {label(r)} | {r['params'].get('ratio', '-')} | {r['compression_ratio']:.3f} | "
                f"{r['perplexity']:.2f} | {r['tokens_scored']} |"
            )
        lines.append("")
    cont = [r for r in records if "rouge_l" in r]
    if cont:
        lines += ["| method | ratio | KV kept | ROUGE-L | BERTScore F1 | documents |", "|---|---|---|---|---|---|"]
        for r in cont:
            bert = f"{r['bertscore_f1']:.4f}" if "bertscore_f1" in r else "-"
            lines.append(
                f"| {label(r)} | {r['params'].get('ratio', '-')} | {r['kv_kept_generation']:.3f} | "
                f"{r['rouge_l']:.4f} | {bert} | {r['documents']} |"
            )
        lines.append("")
    for r in (r for r in records if "contexts" in r):
        lines += [
            f"Bench: {r['method']} {r['params']} on {r['device']} ({r['dtype']})",
            "",
            "| context | batch | decode ms/step (compressed) | (full) | decode_speedup | kv_ratio |",
            "|---|---|---|---|---|---|",
        ]
        for c in r["contexts"]:
            for b in c["batches"]:
                lines.append(
                    f"| {c['context']} | {b['batch']} | {b['compressed']['decode_ms_per_step']:.1f} | "
                    f"{b['full']['decode_ms_per_step']:.1f} | {b['decode_speedup']:.2f} | "
                    f"{c['kv_ratio']:.3f} |"
                )
        lines.append("")
    return "\n".join(lines)


def _save(fig, path: Path) -> Path:
    """Render a figure to PNG and write it atomically."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    _pyplot().close(fig)
    return atomic.write_bytes(path, buf.getvalue())


def plots(records: list[dict], out: Path) -> list[Path]:
    plt = _pyplot()
    made = task_plots(records, out, _save, plt)
    records = [r for r in records if r.get("kind") not in TASK_KINDS]
    for (metric, data), rows in memory_groups([r for r in records if is_memory(r)]).items():
        names = list(dict.fromkeys(label(r) for r in rows))
        crowded = len(names) > 6  # then the legend goes beside the axes, not over the lines
        fig, ax = plt.subplots(figsize=(10, 4.5) if crowded else (6, 4))
        for i, name in enumerate(names):
            pts = sorted((r["t"], r[metric]) for r in rows if label(r) == name)
            style = ("-", "--", ":", "-.")[i // 10 % 4]  # the colour cycle repeats after 10 lines
            ax.plot(*zip(*pts, strict=True), marker="o", linestyle=style, label=name)
        title = f"Online memory ({data}): {metric} vs t" if data else f"Online memory: {metric} vs t"
        ax.set(xscale="log", xlabel="compressed chunks t", ylabel=metric, title=title)
        ax.legend(fontsize=7, **({"loc": "upper left", "bbox_to_anchor": (1.01, 1)} if crowded else {}))
        stem = f"memory_{Path(data).stem}_{metric}_vs_t" if data else f"memory_{metric}_vs_t"
        made.append(_save(fig, out / f"{stem}.png"))
    ppl = [r for r in records if "perplexity" in r and not is_memory(r)]
    if ppl:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in sorted({label(r) for r in ppl}):
            pts = sorted((r["compression_ratio"], r["perplexity"]) for r in ppl if label(r) == name)
            ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        ax.set(xlabel="KV kept (measured fraction)", ylabel="perplexity (text tokens)", title="Perplexity vs KV kept")
        ax.legend(fontsize=7)
        made.append(_save(fig, out / "perplexity_vs_kv.png"))
    cont = [r for r in records if "rouge_l" in r]
    if cont:
        fig, ax = plt.subplots(figsize=(6, 4))
        names = [label(r) for r in cont]
        x = range(len(cont))
        ax.bar([i - 0.2 for i in x], [r["rouge_l"] for r in cont], width=0.4, label="ROUGE-L")
        ax.bar([i + 0.2 for i in x], [r.get("bertscore_f1", 0) for r in cont], width=0.4, label="BERTScore F1")
        ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=7)
        ax.set(title="Continuation quality")
        ax.legend(fontsize=7)
        made.append(_save(fig, out / "continuation_quality.png"))
    bench = [r for r in records if "contexts" in r]
    if bench:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in bench:
            for variant in ("compressed", "full"):
                pts = [(c["context"], c["batches"][-1][variant]["decode_ms_per_step"]) for c in r["contexts"]]
                batch = r["contexts"][0]["batches"][-1]["batch"]
                ax.plot(*zip(*pts, strict=True), marker="o", label=f"{r['method']} {variant} (batch {batch})")
        ax.set(xlabel="context (tokens)", ylabel="decode ms per step", title="Decode speed vs context")
        ax.legend(fontsize=7)
        made.append(_save(fig, out / "decode_speed.png"))
    memory = [r for r in records if "memory_by_turn" in r]
    if memory:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in memory:
            turns = r["memory_by_turn"]
            ax.plot(range(1, len(turns) + 1), [m / 2**20 for m in turns], marker=".", label=label(r))
        ax.set(xlabel="conversation turn", ylabel="stored KV (MiB)", title="KV memory vs turns")
        ax.legend(fontsize=7)
        made.append(_save(fig, out / "kv_vs_turns.png"))
    return made


def write_report(dirs: list[str | Path], out: str | Path) -> tuple[Path, list[Path]]:
    """Write ``report.md`` and the plots into ``out``. Returns their paths."""
    records = load_results(dirs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = atomic.write_text(out / "report.md", markdown(records) + "\n")
    return table, plots(records, out)
