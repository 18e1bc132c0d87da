"""Experiment trackers for ``train --report-to``: Accelerate's (TensorBoard, Weights & Biases, MLflow, ...), each
checked before the run starts, so that a missing package is one line, not a silent run without its logs."""

from __future__ import annotations

import importlib.util

from .errors import UsageError


def check_trackers(names: list) -> None:
    """Refuse an unknown tracker name, or one whose package is not installed, in one line. Tracker objects
    (``accelerate.tracking.GeneralTracker`` instances, from the Python API) pass as they are."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS  # Accelerate's trackers; each is named after its package

    for name in names:
        if not isinstance(name, str):
            continue
        if name not in LOGGER_TYPE_TO_CLASS:
            raise UsageError(f"unknown tracker {name!r} for --report-to; choose from {', '.join(LOGGER_TYPE_TO_CLASS)}")
        if importlib.util.find_spec(name) is None:
            raise UsageError(f"--report-to {name} needs the {name} package: pip install {name}")


def tracker_names(names: list) -> list[str]:
    """What a checkpoint records of ``names``: the names (a tracker object by its ``name``)."""
    return [n if isinstance(n, str) else str(getattr(n, "name", type(n).__name__)) for n in names]


def tracker_config(cfg) -> dict:
    """The run's settings for a tracker's hyperparameter table: scalars as they are, anything else as JSON (what
    TensorBoard's hparams accept)."""
    import json

    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in cfg.to_dict().items()}
