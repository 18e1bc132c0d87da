"""The argument types and shared flags of the command line (:mod:`kvcondense.cli`), and the method flags generated
from the method dataclasses. Nothing heavy at import: the method registry is imported when a flag is built."""

from __future__ import annotations

import argparse
import dataclasses

from .defaults import DEFAULT_MODEL


def _memory_names() -> tuple:
    from .memory_eval import MEMORY_BASELINES, OTHER_MEMORY

    return MEMORY_BASELINES, OTHER_MEMORY


def _methods() -> dict:
    """The method registry, imported when a command needs it (it brings torch; --help does not)."""
    from .methods import METHODS

    return METHODS


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratio must be a number in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"ratio must be in (0, 1), got {value}")
    return value


def _ratio_list(text: str) -> list[float]:
    return [_ratio(part) for part in text.split(",") if part.strip()]


def _int_at_least(low: int):
    """An argparse type: a whole number >= ``low``, or one line saying what was expected."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_nonnegative_int = _int_at_least(0)


def _method(text: str) -> str:
    if text not in _methods():
        raise argparse.ArgumentTypeError(f"unknown method {text!r}; choose one of: {', '.join(_methods())}")
    return text


def _method_fields() -> dict[str, tuple[dataclasses.Field, list[str]]]:
    """Every method hyperparameter but the ratio (each command gives that its own flag), with the methods that
    have it: the flags come from the method dataclasses, so a new field is a new flag with no edit here."""
    fields: dict[str, tuple[dataclasses.Field, list[str]]] = {}
    for name, cls in _methods().items():
        for f in dataclasses.fields(cls):
            if f.name != "ratio":
                fields.setdefault(f.name, (f, []))[1].append(name)
    return fields


def _field_type(f: dataclasses.Field):
    """The parse type of a field from its annotation (``int``, ``float | None``, ...)."""
    kinds = {"int": int, "float": float, "str": str, "bool": bool}
    if isinstance(f.type, type):
        return f.type
    names = [part.strip() for part in str(f.type).split("|")]  # "float | None" (postponed annotations)
    return next(kinds[n] for n in names if n in kinds)


def _add_method_flags(p: argparse.ArgumentParser) -> None:
    for name, (f, methods) in _method_fields().items():
        meta = f.metadata
        flag = meta.get("flag") or "--" + name.replace("_", "-")
        defaults = {m: getattr(_methods()[m], name, f.default) for m in methods}
        help_text = f"{', '.join(methods)}: {meta.get('help', name)}"
        if _field_type(f) is bool:  # --x turns on a default-off switch, --no-x turns off a default-on one
            p.add_argument(flag, dest=name, action="store_const", const=not f.default, default=None, help=help_text)
            continue
        shown = ", ".join(f"{m} {d}" for m, d in defaults.items()) if len(set(defaults.values())) > 1 else f.default
        p.add_argument(
            flag,
            dest=name,
            type=_field_type(f),
            choices=meta.get("choices"),
            default=None,
            help=f"{help_text} (default {shown})",
        )


def _method_params(args) -> dict:
    """The method hyperparameters typed on the command line (None: not typed)."""
    return {name: getattr(args, name) for name in _method_fields() if getattr(args, name, None) is not None}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help=f"registered name, local HF directory, or Hub id (org/name, from the local HF cache) "
        f"(default {DEFAULT_MODEL})",
    )
    p.add_argument("--data", default="wiki", help="built-in corpus (wiki) or .txt/.jsonl file or folder")


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:N, or auto: a model too large for one device spread over every GPU (and the CPU) "
        "by Accelerate's device_map (default: cuda when a GPU is there, else cpu)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="weights and activations (default: bfloat16 on a GPU, float32 on the CPU)",
    )
