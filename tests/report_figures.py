"""What the report's figures show, read off matplotlib just before each is saved (used by test_report*.py)."""

from __future__ import annotations


def capture(monkeypatch) -> dict[str, list[dict]]:
    """Record, for every PNG the report writes, what each of its axes shows (colour bars left out)."""
    from kvcondense import report

    seen: dict[str, list[dict]] = {}
    real = report._save

    def save(fig, path):
        fig.canvas.draw()
        seen[path.name] = [_axes(fig, ax) for ax in fig.axes if ax.get_label() != "<colorbar>"]
        return real(fig, path)

    monkeypatch.setattr(report, "_save", save)
    return seen


def _axes(fig, ax) -> dict:
    renderer = fig.canvas.get_renderer()
    legend = ax.get_legend()
    lines = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
    suptitle = fig._suptitle.get_text() if fig._suptitle is not None else ""
    return {
        "xlabel": ax.get_xlabel(),
        "ylabel": ax.get_ylabel(),
        "title": ax.get_title() or suptitle,
        "legend": [t.get_text() for t in legend.get_texts()] if legend else [],
        "legend_outside": legend is None
        or legend.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1 - 1,
        "styles": [(line.get_color(), line.get_marker(), line.get_linestyle()) for line in lines],
        "xs": sorted({float(x) for line in ax.get_lines() for x in line.get_xdata()}),
        "xlim": ax.get_xlim(),
        "ticks": [t.get_text() for t in ax.get_xticklabels()],
        "bars": len(ax.patches),
    }


def check_legible(name: str, axes: list[dict]) -> None:
    """Both axis labels and a title; one legend entry per name, beside the axes; no two lines drawn alike; an x
    axis whose points share one value is not zoomed onto it."""
    for ax in axes:
        assert ax["xlabel"] and ax["ylabel"] and ax["title"], (name, ax)
        assert len(set(ax["legend"])) == len(ax["legend"]), (name, ax["legend"])
        assert ax["legend_outside"], name
        assert len(set(ax["styles"])) == len(ax["styles"]), (name, ax["styles"])
        if len(ax["xs"]) == 1:
            lo, hi = ax["xlim"]
            assert hi - lo >= abs(ax["xs"][0]), (name, ax["xs"], ax["xlim"])
