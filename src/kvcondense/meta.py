"""The schema of ``kvcondense.json``: a checkpoint's config is untrusted input, checked field by field on load.

A checkpoint folder can come from anyone (shared, downloaded, edited by hand), so every field's type is checked
before any of it is used; the message names the field, so a mistyped edit is one line, not a traceback.
"""

from __future__ import annotations

import math

from .methods import METHODS

FORMAT = 1

_NUMBER = (int, float)
# field -> expected type(s); a tuple in a value means "any of"
_TOP = {"format": int, "method": dict, "special_tokens": dict, "base_model": dict, "lora": dict, "training": dict}
_BASE = {"name": str, "model_type": str, "fingerprint": str}
_LORA = {"r": int, "alpha": _NUMBER, "dropout": _NUMBER, "target_modules": list}
_TRAINING_OPTIONAL = {
    "method": str,
    "method_params": dict,
    "model": str,
    "data": str,
    "out": str,
    "steps": int,
    "steps_done": int,
    "batch_size": int,
    "grad_accum": int,
    "block_tokens": int,
    "lr": _NUMBER,
    "schedule": str,
    "warmup_steps": int,
    "seed": int,
    "log_every": int,
    "save_every": int,
    "stage": str,
    "init_from": (str, type(None)),
    "attention": str,
    "grad_checkpointing": bool,
    "objective": str,
    "kl_weight": _NUMBER,
    "temperature": _NUMBER,
    "teacher_dtype": str,
    "max_grad_norm": _NUMBER,
    "sample_ratios": list,
    "sample_chunks": list,
    "continuation_tokens": int,
    "report_to": list,
}


def _wrong(section: str, obj: dict, spec: dict, required: bool) -> str | None:
    for key, kind in spec.items():
        if key not in obj:
            if required:
                return f"field {section}{key} is missing"
            continue
        value = obj[key]
        if isinstance(value, bool) and kind in (int, _NUMBER):  # JSON true is not a number of steps
            return f"field {section}{key} must be a {'number' if kind is _NUMBER else 'whole number'}, got {value!r}"
        if not isinstance(value, kind):
            names = " or ".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
            hint = " (YAML reads 1e-3 as text: write 1.0e-3)" if isinstance(value, str) and kind is _NUMBER else ""
            return f"field {section}{key} must be {names}, got {type(value).__name__} {str(value)[:40]!r}{hint}"
        if kind is _NUMBER and not math.isfinite(value):
            return f"field {section}{key} must be a finite number, got {value!r}"
    return None


def _lora_problem(lora: dict, required: bool) -> str | None:
    if extra := sorted(set(lora) - set(_LORA)):
        return f"field lora has unknown settings {extra}; it takes {', '.join(_LORA)}"
    return _wrong("lora.", lora, _LORA, required)


def training_problem(training: dict, lora: dict | None = None) -> str | None:
    """The first problem of a set of training settings (``TrainConfig``'s fields, a ``--config`` file's) and of
    their LoRA settings: an unknown LoRA key, or a value of the wrong type; None when they are well-formed."""
    if lora is not None and (problem := _lora_problem(lora, required=False)) is not None:
        return problem
    return _wrong("", training, _TRAINING_OPTIONAL, required=False)


def validate_meta(meta) -> str | None:
    """The first problem of a checkpoint config, as a phrase naming the field; None when it is well-formed."""
    if not isinstance(meta, dict):
        return f"the config must be a JSON object, got {type(meta).__name__}"
    if (problem := _wrong("", meta, _TOP, required=True)) is not None:
        return problem
    if meta["format"] != FORMAT:
        return f"checkpoint format {meta['format']}, this version of kvcondense reads {FORMAT}"
    method = meta["method"]
    if not isinstance(method.get("name"), str) or method["name"] not in METHODS:
        return f"field method.name must be one of {', '.join(METHODS)}, got {method.get('name')!r}"
    if not isinstance(method.get("params"), dict):
        return "field method.params must be an object"
    bad = [v for v in method["params"].values() if not (v is None or isinstance(v, bool | int | float | str))]
    if bad:
        return f"field method.params holds a value of type {type(bad[0]).__name__}; parameters are plain values"
    tokens = meta["special_tokens"]
    if not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in tokens.items()):
        return "field special_tokens must map token strings to whole-number ids"
    if any(v < 0 for v in tokens.values()):
        return "field special_tokens holds a negative token id"
    for problem in (_wrong("base_model.", meta["base_model"], _BASE, True), _lora_problem(meta["lora"], True)):
        if problem is not None:
            return problem
    if not all(isinstance(m, str) for m in meta["lora"]["target_modules"]):
        return "field lora.target_modules must be a list of module names"
    return _wrong("training.", meta["training"], _TRAINING_OPTIONAL, required=False)
