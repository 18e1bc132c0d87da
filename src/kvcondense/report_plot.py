"""How every report plot draws its series and finishes its axes, so that all of them read alike.

:func:`style` gives series i a colour, a marker and a line style that no other of the first twenty shares (two
lines over the same points stay visible: one is dashed); :func:`finish` sets both axis labels and the title, keeps
one legend entry per name, beside the axes, and gives an axis whose points all share one x a sensible range
instead of matplotlib's zoom onto that value. :func:`bench_plot` draws the decode-speed figure.
"""

from __future__ import annotations

from pathlib import Path

from .report_setting import device_name, label, short

COLOURS = 10  # matplotlib's default cycle, C0..C9
MARKERS = "os^Dv<>PX"  # 9, prime to the 10 colours: a (colour, marker) pair repeats only after 90 series
LINESTYLES = ("-", "--", "-.", ":")


def style(i: int, linestyles: tuple[str, ...] = LINESTYLES) -> dict:
    """Colour, marker and line style of series ``i``."""
    return {
        "color": f"C{i % COLOURS}",
        "marker": MARKERS[i % len(MARKERS)],
        "linestyle": linestyles[i % len(linestyles)],
    }


def legend(ax) -> None:
    """One entry per name (the first series of that name), beside the axes so that it covers no line."""
    handles, labels = ax.get_legend_handles_labels()
    first: dict[str, object] = {}
    for h, name in zip(handles, labels, strict=True):
        first.setdefault(name, h)
    if first:
        ax.legend(list(first.values()), list(first), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1),
                  borderaxespad=0)  # fmt: skip


def _one_x(ax) -> None:
    """All points at one x: show that x in the middle of a range from 0 (a log axis: a factor of 2 each way)."""
    xs = {float(x) for line in ax.get_lines() for x in line.get_xdata()}
    if len(xs) != 1:
        return
    (x,) = xs
    if ax.get_xscale() == "log":
        ax.set_xlim(x / 2, x * 2)
    elif x > 0:
        ax.set_xlim(0, 2 * x)
    elif x < 0:
        ax.set_xlim(2 * x, 0)
    else:
        ax.set_xlim(-1, 1)


def finish(ax, xlabel: str, ylabel: str, title: str, with_legend: bool = True) -> None:
    """Both axis labels, the title, a sensible x range and the legend."""
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    _one_x(ax)
    if with_legend:
        legend(ax)


def series_names(rows: list[dict], key: str) -> dict[int, str]:
    """Each row's name on a categorical axis: its label, with ``key`` (ratio) added where labels repeat."""
    count: dict[str, int] = {}
    for r in rows:
        count[label(r)] = count.get(label(r), 0) + 1
    return {id(r): f"{label(r)}, {key} {r['params'].get(key, '-')}" if count[label(r)] > 1 else label(r) for r in rows}


def bench_plot(plt, bench: list[dict], out: Path, save) -> Path:
    """Decode ms per step, compressed against its paired full-attention run: bars per method at one context; a
    line per method against the context when there are several (full attention dotted, in the method's colour).
    ``save(fig, path)`` writes the figure (the report's own, so that every PNG goes through one function)."""
    contexts = sorted({c["context"] for r in bench for c in r["contexts"]})
    batches = ", ".join(map(str, dict.fromkeys(c["batches"][-1]["batch"] for r in bench for c in r["contexts"])))
    ylabel = f"decode ms per step (batch {batches})"
    if len(contexts) == 1:
        series = series_names(bench, "ratio")
        names = {series[id(r)]: r for r in bench}  # the last run of each name
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names) + 2), 4.5))
        x = range(len(names))
        comp = [r["contexts"][0]["batches"][-1]["compressed"]["decode_ms_per_step"] for r in names.values()]
        full = [r["contexts"][0]["batches"][-1]["full"]["decode_ms_per_step"] for r in names.values()]
        bars = ax.bar([i - 0.2 for i in x], comp, width=0.4, color="C0", label="compressed")
        ax.bar([i + 0.2 for i in x], full, width=0.4, color="C7", label="full attention (paired run)")
        speedups = [r["contexts"][0]["batches"][-1]["decode_speedup"] for r in names.values()]
        ax.bar_label(bars, [f"x{s:.2f}" for s in speedups], fontsize=7)
        ax.set_xticks(list(x), list(names), rotation=30, ha="right", fontsize=7)
        xlabel, title = "method (bar label: decode speedup)", f"Decode speed at a {contexts[0]}-token context"
    else:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        names = series_names(bench, "ratio")
        for i, name in enumerate(dict.fromkeys(names.values())):
            rows = [r for r in bench if names[id(r)] == name]
            look = style(i, ("-", "--", "-."))
            for variant, extra in (("compressed", {"label": name, **look}), ("full", {"color": look["color"]})):
                pts = sorted((c["context"], c["batches"][-1][variant]["decode_ms_per_step"]) for r in rows
                             for c in r["contexts"])  # fmt: skip
                if variant == "full":  # in the method's colour; one legend entry for them all, below
                    extra |= {"linestyle": ":", "linewidth": 1, "label": "_full attention"}
                ax.plot(*zip(*pts, strict=True), **extra)
        ax.plot([], [], color="C7", linestyle=":", linewidth=1, label="full attention (dotted, paired run)")
        xlabel, title = "context (tokens)", "Decode speed vs context"
    finish(ax, xlabel, ylabel, f"{title}\n{short(bench)}, {', '.join(dict.fromkeys(map(device_name, bench)))}")
    return save(fig, out / "decode_speed.png")
