"""Turn result directories into a markdown table and PNG plots.

    kvcondense report runs/demo [more run dirs] [--out runs/report]

Reads every ``*.json`` below the given directories that ``kvcondense eval`` or ``kvcondense bench`` wrote (read
and checked by :mod:`kvcondense.report_records`) and writes ``report.md``, a section per kind of result and
setting, headed in words (``## Perplexity: wiki (test split), smollm2-135m``) and opening with its setting (model,
data, tokens; :mod:`kvcondense.report_setting`); and draws (:mod:`kvcondense.report_plot`): perplexity against KV
kept, per method; ROUGE-L and BERTScore per method; decode time per method (bars at one context, lines against the
context length when there are several); stored KV against conversation turns (when a result carries
``memory_by_turn``). Tables and legends name a method by one function (:func:`label`); memory is in MiB (2**20
bytes) throughout.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

from . import atomic
from .checkpoint import ADAPTER, META, method_from_meta
from .data.episodes import CACHE_VERSION as EPISODES_VERSION
from .errors import optional
from .methods import METHODS
from .report_plot import bench_plot, finish, series_names, style
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
from .report_setting import data_name, device_name, heading, setting_line, short
from .report_tasks import TASK_KINDS, task_markdown, task_plots


def _pyplot():
    """matplotlib's pyplot on the file-only backend (an optional dependency: the [eval] extra)."""
    matplotlib = optional("matplotlib")
    matplotlib.use("Agg")  # files only, no display
    return optional("matplotlib.pyplot")


def run_name(kind: str, config: dict) -> str:
    """A deterministic directory name for a result: its kind, what was measured and a hash of its whole config.

    What was measured is the checkpoint when there is one (bench's config also carries a ``method``, its default,
    which a checkpoint overrides: naming by it called a local checkpoint's bench ``bench-sentinel-*``), else the
    method."""
    blob = json.dumps(config, sort_keys=True, default=str)
    checkpoint = config.get("checkpoint")
    what = Path(str(checkpoint)).name if checkpoint else config.get("method") or "run"
    return f"{kind}-{what}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def _inputs(config: dict) -> dict:
    """The config plus what it names but does not contain: the checkpoint's trained tensors, the defaults of the
    method it runs (a preset whose defaults change gets a new result) and the version of the built-in episode sets,
    so a retrained checkpoint, a changed preset or rebuilt task data gets a new result."""
    inputs = dict(config)
    adapter = Path(str(config.get("checkpoint") or "")) / ADAPTER
    if config.get("checkpoint") and adapter.is_file():
        inputs["checkpoint_sha256"] = hashlib.sha256(adapter.read_bytes()).hexdigest()
    if defaults := _method_defaults(config):
        inputs["method_defaults"] = defaults
    if config.get("task") == "memory":
        inputs["episodes_version"] = EPISODES_VERSION
    return inputs


def _method_defaults(config: dict) -> dict:
    """The parameters the method of a config starts from before the config's own: a checkpoint's as it loads them
    (fields it predates included), or the defaults of ``method``; {} for none."""
    meta = Path(str(config.get("checkpoint") or "")) / META
    if config.get("checkpoint") and meta.is_file():
        try:
            return method_from_meta(json.loads(meta.read_text())).params()
        except Exception:  # noqa: BLE001 - a damaged checkpoint fails with its own message when it is loaded
            return {}
    name = config.get("method")
    return METHODS[name]().params() if name in METHODS else {}


def result_file(out_dir: str | Path, kind: str, config: dict) -> Path:
    """Where the result of this config lives under ``out_dir`` (``<run name>/result.json``, see :func:`run_name`)."""
    return Path(out_dir) / run_name(kind, _inputs(config)) / "result.json"


def find_result_file(out_dir: str | Path, kind: str, config: dict) -> Path:
    """:func:`result_file`, after moving a result stored there under the name older versions gave it (a
    checkpoint's bench was named after the config's default method) to it, so that a rerun finds it."""
    inputs = _inputs(config)  # reads the checkpoint's adapter: once
    path = Path(out_dir) / run_name(kind, inputs) / "result.json"
    blob = json.dumps(inputs, sort_keys=True, default=str)
    method = inputs.get("method") or Path(str(inputs.get("checkpoint") or "run")).name
    old = Path(out_dir) / f"{kind}-{method}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"
    if old != path.parent and (old / "result.json").is_file() and not path.parent.exists():
        old.rename(path.parent)
    return path


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
    """CCM-style tables: one per metric and data, a row per method, a column per t (KV MiB in brackets)."""
    lines = []
    for (metric, data), chosen in memory_groups(rows).items():
        steps = sorted({r["t"] for r in chosen})
        title = f"{data}: {metric}" if data else metric
        lines += [heading(f"Online memory, {metric}", chosen), "", setting_line(chosen, "memory"), ""]
        lines += [f"| method ({title}, KV MiB) | " + " | ".join(f"t={t}" for t in steps) + " |"]
        lines += ["|---|" + "---|" * len(steps)]
        for name in dict.fromkeys(label(r) for r in chosen):
            cells = {r["t"]: f"{r[metric]:.3f} ({r['kv_mb']:.2f})" for r in chosen if label(r) == name}
            lines.append(f"| {name} | " + " | ".join(cells.get(t, "-") for t in steps) + " |")
        lines.append("")
    return lines


def by_setting(rows: list[dict], *more) -> dict[tuple, list[dict]]:
    """Rows by (data, *more(row)): one section of the report each (its setting line names the models)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((data_name(r), *(f(r) for f in more)), []).append(r)
    return groups


def unique_headings(lines: list[str]) -> list[str]:
    """A heading that comes again gets its count (`` (2)``): no two sections of a report share a heading."""
    seen: dict[str, int] = {}
    out = []
    for line in lines:
        if line.startswith("#"):
            seen[line] = seen.get(line, 0) + 1
            line = line if seen[line] == 1 else f"{line} ({seen[line]})"
        out.append(line)
    return out


def markdown(records: list[dict]) -> str:
    """``report.md``: a section per kind of result and setting, each headed by its data and model in words and
    opening with its setting (model, data, tokens)."""
    lines = ["# kvcondense report", ""]
    lines += memory_markdown([r for r in records if is_memory(r)]) + task_markdown(records)
    records = [r for r in records if r.get("kind") not in TASK_KINDS]
    for rows in by_setting([r for r in records if "perplexity" in r and not is_memory(r)]).values():
        lines += [heading("Perplexity", rows), "", setting_line(rows, "perplexity"), ""]
        lines += ["| method | ratio | KV kept (measured) | perplexity | tokens |", "|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: (label(r), r["compression_ratio"])):
            lines.append(
                f"| {label(r)} | {r['params'].get('ratio', '-')} | {r['compression_ratio']:.3f} | "
                f"{r['perplexity']:.2f} | {r['tokens_scored']} |"
            )
        lines.append("")
    for rows in by_setting([r for r in records if "rouge_l" in r]).values():
        lines += [heading("Continuation quality", rows), "", setting_line(rows, "continuation"), ""]
        lines += ["| method | ratio | KV kept | ROUGE-L | BERTScore F1 | documents |", "|---|---|---|---|---|---|"]
        for r in rows:
            bert = f"{r['bertscore_f1']:.4f}" if "bertscore_f1" in r else "-"
            lines.append(
                f"| {label(r)} | {r['params'].get('ratio', '-')} | {r['kv_kept_generation']:.3f} | "
                f"{r['rouge_l']:.4f} | {bert} | {r['documents']} |"
            )
        lines.append("")
    for (*_, device), rows in by_setting([r for r in records if "contexts" in r], device_name).items():
        lines += [heading("Decode speed", rows) + f", {device}", "", setting_line(rows, "bench"), ""]
        lines += [
            "| method | ratio | context | batch | decode ms/step (compressed) | (full) | decode_speedup | kv_ratio |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            for c in r["contexts"]:
                for b in c["batches"]:
                    lines.append(
                        f"| {label(r)} | {r['params'].get('ratio', '-')} | {c['context']} | {b['batch']} | "
                        f"{b['compressed']['decode_ms_per_step']:.1f} | {b['full']['decode_ms_per_step']:.1f} | "
                        f"{b['decode_speedup']:.2f} | {c['kv_ratio']:.3f} |"
                    )
        lines.append("")
    for rows in by_setting([r for r in records if "memory_by_turn" in r]).values():
        lines += [heading("Stored KV by conversation turn", rows), "", setting_line(rows, "memory_by_turn"), ""]
        lines += [
            "| method | turns | stored KV after the first turn (MiB) | after the last (MiB) |",
            "|---|---|---|---|",
        ]
        for r in rows:
            turns = r["memory_by_turn"]
            lines.append(f"| {label(r)} | {len(turns)} | {turns[0] / 2**20:.2f} | {turns[-1] / 2**20:.2f} |")
        lines.append("")
    return "\n".join(unique_headings(lines))


def _save(fig, path: Path) -> Path:
    """Render a figure to PNG and write it atomically."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")  # the legend beside the axes stays in the file
    _pyplot().close(fig)
    return atomic.write_bytes(path, buf.getvalue())


def plots(records: list[dict], out: Path) -> list[Path]:
    plt = _pyplot()
    made = task_plots(records, out, _save, plt)
    records = [r for r in records if r.get("kind") not in TASK_KINDS]
    for (metric, data), rows in memory_groups([r for r in records if is_memory(r)]).items():
        names = list(dict.fromkeys(label(r) for r in rows))
        fig, ax = plt.subplots(figsize=(10, 4.5))
        for i, name in enumerate(names):
            pts = sorted((r["t"], r[metric]) for r in rows if label(r) == name)
            ax.plot(*zip(*pts, strict=True), label=name, **style(i))
        ax.set_xscale("log")
        title = f"Online memory ({data}): {metric} vs t" if data else f"Online memory: {metric} vs t"
        finish(ax, "compressed chunks t", metric, f"{title}\n{short(rows)}")
        stem = f"memory_{Path(data).stem}_{metric}_vs_t" if data else f"memory_{metric}_vs_t"
        made.append(_save(fig, out / f"{stem}.png"))
    ppl = [r for r in records if "perplexity" in r and not is_memory(r)]
    if ppl:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for i, name in enumerate(sorted({label(r) for r in ppl})):
            pts = sorted((r["compression_ratio"], r["perplexity"]) for r in ppl if label(r) == name)
            ax.plot(*zip(*pts, strict=True), label=name, **style(i))
        ax.set_xlim(0, 1.05 * max(1.0, *(r["compression_ratio"] for r in ppl)))
        finish(ax, "KV kept (measured fraction)", "perplexity (text tokens)", f"Perplexity vs KV kept\n{short(ppl)}")
        made.append(_save(fig, out / "perplexity_vs_kv.png"))
    cont = [r for r in records if "rouge_l" in r]
    if cont:
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(cont) + 2), 4.5))
        names = series_names(cont, "ratio")
        x = range(len(cont))
        ax.bar([i - 0.2 for i in x], [r["rouge_l"] for r in cont], width=0.4, label="ROUGE-L")
        bert = [r.get("bertscore_f1", float("nan")) for r in cont]  # no bar where BERTScore was not computed
        ax.bar([i + 0.2 for i in x], bert, width=0.4, label="BERTScore F1")
        ax.set_xticks(list(x), [names[id(r)] for r in cont], rotation=30, ha="right", fontsize=7)
        finish(ax, "method", "score against the true continuation", f"Continuation quality\n{short(cont)}")
        made.append(_save(fig, out / "continuation_quality.png"))
    bench = [r for r in records if "contexts" in r]
    if bench:
        made.append(bench_plot(plt, bench, out, _save))
    memory = [r for r in records if "memory_by_turn" in r]
    if memory:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for i, r in enumerate(memory):
            turns = r["memory_by_turn"]
            ax.plot(range(1, len(turns) + 1), [m / 2**20 for m in turns], label=label(r), **style(i))
        finish(ax, "conversation turn", "stored KV (MiB)", f"KV memory vs turns\n{short(memory)}")
        made.append(_save(fig, out / "kv_vs_turns.png"))
    return made


def write_report(dirs: list[str | Path], out: str | Path) -> tuple[Path, list[Path]]:
    """Write ``report.md`` and the plots into ``out``. Returns their paths."""
    records = load_results(dirs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = atomic.write_text(out / "report.md", markdown(records) + "\n")
    return table, plots(records, out)
