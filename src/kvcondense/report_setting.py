"""What a report section measured: the model, the data and how many tokens, in words, read off its records.

Every section of ``report.md`` is headed by :func:`heading` (``Perplexity: wiki (test split), smollm2-135m``) and
starts with :func:`setting_line`; the plots put :func:`short` under their title. A value that differs between the
rows of a section is listed once per value (``contexts of 512, 1024 tokens``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .defaults import DEFAULT_MODEL


def config(r: dict) -> dict:
    return r["config"] if isinstance(r.get("config"), dict) else {}


def label(r: dict) -> str:
    """The one name that tables, headings and plot legends give a record's method: its ``label`` (eval writes the
    loader's, ``sentinel (trained)``), else its method (``method (trained)`` for a bench result of a checkpoint);
    rows of the kvpress peer say so (``kvpress-snapkv (kvpress)``)."""
    name = r.get("label") or r.get("method", "?")
    if not r.get("label") and config(r).get("checkpoint"):
        name = f"{name} (trained)"
    if str(r.get("harness", "")).startswith("kvpress"):
        tag = f" (kvpress{', masks only' if r.get('masks_only') else ''})"
        name = name if name.endswith(tag) else name + tag
    return name


def _short_path(x: str) -> str:
    """A model or data given as a path, by its last part (a cache folder, a test's file; with its parent where
    that part says nothing, ``tiny/model``); a name as it is."""
    if "/" not in x and "\\" not in x:
        return x
    p = Path(x)
    return f"{p.parent.name}/{p.name}" if p.name in ("model", "data", "checkpoint") else p.name or x


def model_name(r: dict) -> str:
    """The base model a record was measured on: the one it names, its checkpoint's, or the default model (a run
    that named none)."""
    model = config(r).get("model") or r.get("model")
    if isinstance(model, str) and model:
        return _short_path(model)
    if not config(r):
        return "model not recorded"
    checkpoint = config(r).get("checkpoint")
    if not checkpoint:
        return DEFAULT_MODEL
    from .checkpoint import META

    try:
        return str(json.loads((Path(checkpoint) / META).read_text(encoding="utf-8"))["base_model"]["name"])
    except (OSError, ValueError, KeyError, TypeError):  # the checkpoint is not here (results copied elsewhere)
        return "the base model of a checkpoint not found here"


def data_name(r: dict) -> str:
    """The data a record was measured on: eval's ``--data`` and split, or the kvpress runner's task name."""
    data = config(r).get("data")
    if isinstance(data, str) and data:
        split = config(r).get("split")
        return f"{_short_path(data)} ({split} split)" if isinstance(split, str) else _short_path(data)
    if isinstance(r.get("task_name"), str):
        return r["task_name"]
    return "data not recorded"


def _values(rows: list[dict], get) -> str:
    """The distinct values of ``get`` over ``rows``, in order, joined; "" when no row has one."""
    seen = []
    for r in rows:
        v = get(r)
        if v is not None and v != [] and v not in seen:
            seen.append(v)
    return ", ".join("/".join(map(str, v)) if isinstance(v, list) else str(v) for v in seen)


def _count(n: int, what: str) -> str:
    return f"{n} {what}s" if n != 1 else f"1 {what}"


UNKNOWN = ("not recorded", "not found here")


def short(rows: list[dict]) -> str:
    """Data and model in a few words (``wiki (test split), smollm2-135m``); a list beyond two becomes a count; a
    model not known (a checkpoint not here) is left to the setting line where others are known."""
    parts = []
    for get, what in ((data_name, "data set"), (model_name, "model")):
        names = list(dict.fromkeys(map(get, rows)))
        names = [n for n in names if not n.endswith(UNKNOWN)] or names
        parts.append(", ".join(names) if len(names) <= 2 else _count(len(names), what))
    return ", ".join(parts)


def heading(title: str, rows: list[dict]) -> str:
    """A markdown section heading: what is measured, on which data and model."""
    return f"## {title}: {short(rows)}"


def _tokens(rows: list[dict], kind: str) -> str:
    """How much each row measured, in the terms of its kind."""

    def cfg(key):
        return lambda r: config(r).get(key)

    def rec(*keys):
        return lambda r: next((r[k] for k in keys if r.get(k) is not None), None)

    parts: list[tuple[str, str]] = {
        "perplexity": [
            ("up to {} tokens per run", cfg("max_tokens")),
            ("blocks of {} tokens", cfg("block_tokens")),
            ("{} tokens scored", rec("tokens_scored")),
        ],
        "continuation": [
            ("{} documents", rec("documents")),
            ("a {}-token prefix", cfg("prefix_tokens")),
            ("{} new tokens", cfg("new_tokens")),
        ],
        "bench": [
            ("contexts of {} tokens", lambda r: [c["context"] for c in r["contexts"]]),
            ("batch {}", lambda r: [b["batch"] for b in r["contexts"][0]["batches"]]),
            ("{} timed decode steps", cfg("decode_steps")),
            ("on {}", lambda r: f"{r.get('device')} {r.get('dtype')}"),
        ],
        "memory": [("t = {} compressed chunks", rec("t")), ("{} episodes", rec("episodes"))],
        "memory_by_turn": [("{} turns", lambda r: len(r["memory_by_turn"]))],
        "prefix": [
            ("contexts of {} tokens", lambda r: r.get("context_tokens") or config(r).get("prefix_tokens")),
            ("{} tokens scored", rec("tokens_scored", "n_tokens")),
        ],
        "qa": [
            ("contexts of {} tokens on average", rec("context_tokens")),
            ("{} questions", rec("questions", "n_questions")),
        ],
        "needle": [
            ("contexts of {} tokens", cfg("needle_lengths")),
            ("needle depths {}", cfg("needle_depths")),
            ("{} questions", rec("questions", "n_questions")),
        ],
    }.get(kind, [])
    said = [(text, _values(rows, get)) for text, get in parts]
    return "; ".join(re.sub(r"^1 (\w+)s\b", r"1 \1", text.format(v)) for text, v in said if v)


def setting_line(rows: list[dict], kind: str) -> str:
    """The first line of a section: model, data and tokens of its rows."""
    line = f"Setting: model {_values(rows, model_name)}; data {_values(rows, data_name)}"
    tokens = _tokens(rows, kind)
    return f"{line}; {tokens}." if tokens else f"{line}."


def device_name(r: dict) -> str:
    """Where a result ran, as a table or plot names it (``cpu float32``)."""
    return f"{r['device']} {r['dtype']}"
