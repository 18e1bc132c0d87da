"""What the command line needs to know of the methods (their names, and each hyperparameter's flag, type, help,
choices and defaults) without importing them: the method modules bring torch (seconds), and ``kvcondense train
--help`` should answer at once.

The description is computed from the registry (:data:`kvcondense.methods.METHODS`), the one source of truth, and
kept as JSON in the user cache under a name made of a hash of the method sources, so any edit of a method file is
a new name and a fresh description. In a process that has imported the registry already (a test adding a method,
a command running) it is read from the registry itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = ("methods/*.py", "memory_eval.py", "cli_specs.py")  # what the description is computed from


def describe() -> dict:
    """The description from the registry itself: ``{"methods": [names], "fields": {field: {...}}, "memory":
    [memory baselines], "other_memory": name}``; every method field but the ratio, with the methods having it."""
    from .memory_eval import MEMORY_BASELINES, OTHER_MEMORY
    from .methods import METHODS

    fields: dict[str, dict] = {}
    for name, cls in METHODS.items():
        for f in dataclasses.fields(cls):
            if f.name == "ratio":
                continue
            spec = fields.setdefault(
                f.name,
                {
                    "flag": f.metadata.get("flag") or "--" + f.name.replace("_", "-"),
                    "type": _type_name(f),
                    "help": f.metadata.get("help", f.name),
                    "choices": list(f.metadata["choices"]) if f.metadata.get("choices") else None,
                    "default": None if f.default is dataclasses.MISSING else f.default,
                    "defaults": {},
                },
            )
            spec["defaults"][name] = getattr(cls, f.name, f.default)
    return {"methods": list(METHODS), "fields": fields, "memory": list(MEMORY_BASELINES), "other_memory": OTHER_MEMORY}


def _type_name(f: dataclasses.Field) -> str:
    """The parse type of a field from its annotation (``int``, ``float | None``, ...)."""
    if isinstance(f.type, type):
        return f.type.__name__
    names = [part.strip() for part in str(f.type).split("|")]  # "float | None" (postponed annotations)
    return next(n for n in names if n in ("int", "float", "str", "bool"))


def source_hash() -> str:
    h = hashlib.sha256()
    for pattern in SOURCES:
        for path in sorted(HERE.glob(pattern)):
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def specs() -> dict:
    """The description: from the registry when it is imported already, else from the cache (computed and stored
    once per version of the method sources). A cache that cannot be read or written only costs the import."""
    if "kvcondense.methods" in sys.modules:
        return describe()
    try:
        from .fetch import cache_dir

        path = cache_dir() / f"cli-specs-{source_hash()}.json"
        if path.is_file():
            return json.loads(path.read_text())
    except Exception:  # noqa: BLE001 - an unusable cache is not the user's problem here: compute it
        return describe()
    described = describe()
    try:
        from .atomic import write_json

        write_json(path, described)
    except OSError:
        pass
    return described
