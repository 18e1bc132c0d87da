"""Read and check result files that ``kvcondense eval`` and ``kvcondense bench`` wrote.

A result file is JSON: one record, ``{"results": [records]}``, or a bare list of records. Each record has a
``method`` and reports one kind of metric (:data:`KINDS`); :func:`record_problem` names what keeps a record out
of the report (a missing or mistyped field), :func:`read_result` reads one file and :func:`load_results` every
file below some folders, naming the files it cannot use. Tables and plots are in :mod:`kvcondense.report`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .errors import UsageError
from .report_setting import config as _config
from .report_setting import label
from .report_tasks import TASK_KINDS

KINDS = ("memory", "perplexity", "continuation", "bench", "memory_by_turn", *TASK_KINDS)
"""What a result record reports; each kind has the fields its table and plot read (:func:`record_problem`)."""


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def record_kind(r: dict) -> str | None:
    """The kind of a result record (one of :data:`KINDS`), or None when it reports no metric we know."""
    if r.get("kind") in KINDS:  # every record written by this version says what it is
        return r["kind"]
    if r.get("task") == "memory":  # results written before records carried "kind"
        return "memory"
    for key, kind in (
        ("contexts", "bench"),
        ("rouge_l", "continuation"),
        ("perplexity", "perplexity"),
        ("memory_by_turn", "memory_by_turn"),
    ):
        if key in r:
            return kind
    return None


def _bench_problem(r: dict) -> str | None:
    contexts = r["contexts"]
    if not isinstance(contexts, list) or not contexts:
        return "'contexts' is not a non-empty list"
    for c in contexts:
        if not isinstance(c, dict) or not _is_number(c.get("context")) or not _is_number(c.get("kv_ratio")):
            return "a context has no numeric 'context' and 'kv_ratio'"
        batches = c.get("batches")
        if not isinstance(batches, list) or not batches:
            return "a context has no list of 'batches'"
        for b in batches:
            timed = isinstance(b, dict) and all(
                isinstance(b.get(v), dict) and _is_number(b[v].get("decode_ms_per_step"))
                for v in ("compressed", "full")
            )
            if not (timed and _is_int(b.get("batch")) and _is_number(b.get("decode_speedup"))):
                return "a batch lacks 'batch', 'decode_speedup' or the decode_ms_per_step of 'compressed' and 'full'"
    return None


_REQUIRED = {  # kind: (field, check, what it must be)
    "perplexity": (
        ("perplexity", _is_number, "a number"),
        ("compression_ratio", _is_number, "a number"),
        ("tokens_scored", _is_int, "an integer"),
        ("params", lambda x: isinstance(x, dict), "an object"),
    ),
    "continuation": (
        ("rouge_l", _is_number, "a number"),
        ("kv_kept_generation", _is_number, "a number"),
        ("documents", _is_int, "an integer"),
        ("params", lambda x: isinstance(x, dict), "an object"),
    ),
    "bench": (
        ("device", lambda x: isinstance(x, str), "a string"),
        ("dtype", lambda x: isinstance(x, str), "a string"),
        ("params", lambda x: isinstance(x, dict), "an object"),
    ),
    "memory": (
        ("metric", lambda x: x in ("perplexity", "accuracy"), "'perplexity' or 'accuracy'"),
        ("t", _is_int, "an integer"),
        ("kv_mb", _is_number, "a number"),
    ),
    "prefix": (
        ("kv_kept", _is_number, "a number"),
        ("perplexity", _is_number, "a number"),
        ("kl_to_full", _is_number, "a number"),
    ),
    "qa": (("kv_kept", _is_number, "a number"), ("accuracy", _is_number, "a number")),
    "needle": (("kv_kept", _is_number, "a number"), ("accuracy", _is_number, "a number")),
    "memory_by_turn": (
        ("memory_by_turn", lambda x: isinstance(x, list) and x and all(map(_is_number, x)), "a list of numbers"),
    ),
}


def record_problem(r) -> str | None:
    """What keeps a result record out of the report (None: it can be used): a missing or mistyped field."""
    if not isinstance(r, dict):
        return f"a record is a {type(r).__name__}, not an object"
    if not isinstance(r.get("method"), str):
        return "a record has no 'method'"
    kind = record_kind(r)
    if kind is None:
        return f"record of {r['method']!r} reports no metric (none of perplexity, rouge_l, contexts, memory rows)"
    for field, ok, what in _REQUIRED[kind]:
        if field not in r:
            return f"{kind} record of {r['method']!r} has no {field!r}"
        if not ok(r[field]):
            return f"{kind} record of {r['method']!r}: {field!r} is not {what}"
    if kind == "memory" and not _is_number(r.get(r["metric"])):
        return f"memory record of {r['method']!r} has no numeric {r['metric']!r}"
    if kind == "bench" and (problem := _bench_problem(r)) is not None:
        return f"bench record of {r['method']!r}: {problem}"
    if "label" in r and not isinstance(r["label"], str):
        return f"record of {r['method']!r}: 'label' is not a string"
    for field in ("params", "config"):
        if field in r and not isinstance(r[field], dict):
            return f"record of {r['method']!r}: {field!r} is not an object"
    if "bertscore_f1" in r and not _is_number(r["bertscore_f1"]):
        return f"record of {r['method']!r}: 'bertscore_f1' is not a number"
    return None


MAX_RESULT_BYTES = 64 * 2**20  # far above any result kvcondense writes


def _read(path: Path) -> tuple[dict | None, str]:
    """(the result as ``{"results": [records]}`` or as written, "") or (None, why it cannot be read)."""
    try:
        if path.stat().st_size > MAX_RESULT_BYTES:
            return None, f"larger than {MAX_RESULT_BYTES // 2**20} MiB, not a result"
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    except OSError as e:
        return None, f"cannot be read ({e.strerror or e})"
    if not text.strip():
        return None, "empty"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"torn or invalid JSON ({e.msg} at line {e.lineno})"
    except RecursionError:
        return None, "JSON nested too deeply"
    if isinstance(data, list):  # a list of records (e.g. the demo's cached eval results)
        data = {"results": data}
    if not isinstance(data, dict):
        return None, f"a JSON {type(data).__name__}, not a result object"
    records = data["results"] if "results" in data else [data]
    if not isinstance(records, list) or not records:
        return None, "'results' is not a non-empty list of records"
    for i, item in enumerate(records):
        problem = record_problem(item)
        if problem is not None:
            return None, problem if len(records) == 1 else f"{problem} (record {i + 1} of {len(records)})"
    return data, ""


def read_result(path: str | Path) -> dict | None:
    """A result file written by eval or bench, validated; None if it is torn, not JSON, or not a result.

    Returns the JSON object as written (one record, or ``{"results": [records]}``); a file holding a bare list of
    records comes back as ``{"results": [...]}``. Every record has a ``method`` and the fields its kind needs.
    """
    return _read(Path(path))[0]


def _stderr(line: str) -> None:
    logging.getLogger(__name__).warning(line)


def load_results(dirs: list[str | Path], warn=None) -> list[dict]:
    """Every result record below ``dirs`` (eval lists are flattened).

    A ``*.json`` that cannot be used (torn, not UTF-8, not a result, a record missing a field) is named in one
    warning line each (``warn``, default: stderr) and the others are read; when none can be used this raises
    :class:`UsageError` naming them (and prints no warnings, so the error is the one line).
    """
    records, bad = [], []
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            raise UsageError(f"{d} is not a directory of results; pass folders written by eval or bench --out-dir")
        for f in sorted(d.rglob("*.json")):
            if not f.is_file():
                continue
            data, why = _read(f)
            if data is None:
                bad.append((f, why))
                continue
            records += [{**item, "_source": str(f)} for item in data.get("results", [data])]
    if not records:
        where = ", ".join(map(str, dirs))
        if bad:
            named = "; ".join(f"{f} ({why})" for f, why in bad)
            raise UsageError(f"no readable kvcondense results in {where}: {named}; rerun eval or bench for them")
        raise UsageError(f"no kvcondense results found in {where}; run eval or bench with --out-dir first")
    for f, why in bad:
        (warn or _stderr)(f"kvcondense report: warning: skipped {f}: {why}")
    return name_settings(name_checkpoints(name_bench_rows(records)))


def name_bench_rows(records: list[dict]) -> list[dict]:
    """Give a bench result written without a label (before bench wrote one) the label eval gave the same untrained
    method (``sentinel (untrained tokens)``), so that its rows and the eval rows share one name."""
    untrained = {}
    for r in records:
        if r.get("label") and not _config(r).get("checkpoint") and record_kind(r) != "bench":
            untrained.setdefault(r.get("method"), r["label"])
    return [
        {**r, "label": untrained[r["method"]]}
        if record_kind(r) == "bench" and not r.get("label") and not _config(r).get("checkpoint")
        and str(untrained.get(r["method"], "")).startswith(r["method"])
        else r
        for r in records
    ]  # fmt: skip


def name_settings(records: list[dict]) -> list[dict]:
    """Put the method settings that tell runs apart into their label (``sentinel (trained: s, window_share=0.9)``)
    where one label covers runs with different ``--window-share`` or other method flags, so that they are not
    drawn as one zigzag line nor listed under one name."""

    def given(r: dict) -> dict:
        return _config(r).get("method_params") or {}

    groups: dict[str, list[dict]] = {}
    for r in records:
        if _config(r):
            groups.setdefault(label(r), []).append(r)
    extra: dict[int, str] = {}
    for rows in groups.values():
        keys = sorted({k for r in rows for k in given(r)})
        values = {id(r): {k: given(r).get(k, (r.get("params") or {}).get(k, "default")) for k in keys} for r in rows}
        differ = [k for k in keys if len({repr(v[k]) for v in values.values()}) > 1]
        for r in rows if differ else ():
            extra[id(r)] = ", ".join(f"{k}={values[id(r)][k]}" for k in differ)

    def named(r: dict) -> str:
        name = label(r)
        return f"{name[:-1]}, {extra[id(r)]})" if name.endswith(")") else f"{name} ({extra[id(r)]})"

    return [{**r, "label": named(r)} if id(r) in extra else r for r in records]


def name_checkpoints(records: list[dict]) -> list[dict]:
    """Put the checkpoint's name into a trained row's label (``gist (trained: gist8)``) where one label covers
    several checkpoints, so that their rows stay apart in tables and plots."""

    def checkpoint(r: dict) -> str:
        return Path(str(r.get("config", {}).get("checkpoint") or "")).name

    shared: dict[str, set[str]] = {}
    for r in records:
        if "(trained" in label(r):
            shared.setdefault(label(r), set()).add(checkpoint(r))
    return [
        {**r, "label": label(r).replace("(trained", f"(trained: {checkpoint(r)}", 1)}
        if len(shared.get(label(r), ())) > 1
        else r
        for r in records
    ]
