"""The argument types and shared flags of the command line (:mod:`kvcondense.cli`), and the method flags generated
from the method dataclasses. Nothing heavy at import, nor to build a parser: what the flags need of the methods comes
from :mod:`kvcondense.cli_specs`."""

from __future__ import annotations

import argparse

from .cli_specs import specs
from .defaults import DEFAULT_MODEL


def _memory_names() -> tuple:
    """(the memory baselines, the other-memory control's name), without importing them (see cli_specs)."""
    described = specs()
    return tuple(described["memory"]), described["other_memory"]


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


def _count_list(text: str) -> list[int]:
    """An argparse type: whole numbers >= 1 separated by commas (``1,2,4``)."""
    parse = _int_at_least(1)
    counts = [parse(part) for part in text.split(",") if part.strip()]
    if not counts:
        raise argparse.ArgumentTypeError(f"expected whole numbers >= 1 separated by commas, e.g. 1,2,4; got {text!r}")
    return counts


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
    names = specs()["methods"]
    if text not in names:
        raise argparse.ArgumentTypeError(f"unknown method {text!r}; choose one of: {', '.join(names)}")
    return text


TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _add_method_flags(p: argparse.ArgumentParser) -> None:
    """Every method hyperparameter but the ratio (each command gives that its own flag), as a flag saying which
    methods have it: the flags come from the method dataclasses (through :mod:`kvcondense.cli_specs`), so a new
    field is a new flag with no edit here."""
    for name, f in specs()["fields"].items():
        help_text = f"{', '.join(f['defaults'])}: {f['help']}"
        if f["type"] == "bool":  # --x turns on a default-off switch, --no-x turns off a default-on one
            p.add_argument(
                f["flag"], dest=name, action="store_const", const=not f["default"], default=None, help=help_text
            )
            continue
        defaults = f["defaults"]
        shown = (
            ", ".join(f"{m} {d}" for m, d in defaults.items())
            if len(set(map(str, defaults.values()))) > 1
            else f["default"]
        )
        p.add_argument(
            f["flag"],
            dest=name,
            type=TYPES[f["type"]],
            choices=f["choices"],
            default=None,
            help=f"{help_text} (default {shown})",
        )


def _method_params(args) -> dict:
    """The method hyperparameters typed on the command line (None: not typed)."""
    return {name: getattr(args, name) for name in specs()["fields"] if getattr(args, name, None) is not None}


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
