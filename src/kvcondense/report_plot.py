"""How every report plot draws its series and finishes its axes, so that all of them read alike.

:func:`style` gives series i a colour, a marker and a line style that no other of the first twenty shares (two
lines over the same points stay visible: one is dashed); :func:`finish` sets both axis labels and the title, keeps
one legend entry per name, beside the axes, and gives an axis whose points all share one x a sensible range
instead of matplotlib's zoom onto that value.
"""

from __future__ import annotations

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
