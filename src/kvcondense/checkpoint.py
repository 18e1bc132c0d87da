"""Self-describing checkpoints: the adapter, the new token rows and a JSON config, written atomically.

Layout of a checkpoint directory::

    kvcondense.json        method + params, special tokens, base model identity, LoRA settings, training setup
    adapter.safetensors    LoRA matrices and new token rows (bf16)
    train_log.jsonl        one JSON line per logged step
    resume/                optimizer, scheduler, step and RNG state (safetensors + JSON; only for --resume)

Safety rules: a checkpoint is written complete into a fresh hidden folder beside ``out`` (``kvcondense.json``
last, so a folder holding it is complete) and then swapped in; a save replaces only a checkpoint of the same run
(or the one ``--overwrite`` named); a folder that is not a kvcondense checkpoint is never deleted; a kill between
the two renames of a swap is recovered by :func:`recover` on the next start.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import check_writable, current_umask
from .errors import UsageError
from .meta import FORMAT, validate_meta
from .methods import METHODS, Method, build_method
from .model_card import model_card
from .state_io import load_state, save_state

META = "kvcondense.json"
ADAPTER = "adapter.safetensors"
LOG = "train_log.jsonl"
RESUME = "resume"
LEGACY_RESUME = "resume/state.pt"
OURS = {META, ADAPTER, LOG, RESUME, "README.md"}  # what a checkpoint folder holds; nothing else is deleted


class CheckpointError(UsageError):
    """A checkpoint is missing, malformed, or does not fit the model it is loaded onto."""


# ------------------------------------------------------------------------------------------------------------- writing
def check_output_dir(out: str | Path, overwrite: bool = False, resume: bool = False) -> Path:
    """Check ``--out`` before any work: a writable place for a checkpoint that replaces nothing it should not.

    Allowed: a missing path, an empty folder, this run's own checkpoint (``resume``), or another kvcondense
    checkpoint when ``overwrite``. A folder that is not a kvcondense checkpoint is refused even with ``overwrite``.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output path {out} is an existing file; choose a folder path for --out")
    if out.is_dir() and any(out.iterdir()):
        if not (out / META).is_file():
            raise CheckpointError(
                f"--out {out} is a folder that is not a kvcondense checkpoint; kvcondense never deletes it: "
                "choose another --out"
            )
        if not (resume or overwrite):
            raise CheckpointError(
                f"--out {out} already holds a checkpoint; pass --resume to continue it, --overwrite to replace it, "
                "or choose another --out"
            )
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CheckpointError(f"--out {out}: {parent} is a file, not a folder; choose another path")
            break
    check_writable(out.parent, "--out", folder=True)  # the folder that will hold it; out itself is made at the save
    return out


def write_checkpoint(
    out: str | Path,
    meta: dict,
    adapter: dict[str, torch.Tensor],
    log: list[dict],
    resume: dict | None = None,
    replaces: tuple[str | None, ...] = (),
) -> Path:
    """Write a complete checkpoint beside ``out``, then swap it in: never a half-written ``out``.

    A checkpoint already at ``out`` is replaced only when it belongs to the same run (``meta["run_id"]``) or to
    a run named in ``replaces`` (the previous run's, when ``--overwrite`` was given). Anything else at ``out`` is
    refused, and is never deleted; files of the user's inside a replaced checkpoint move into the new one.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.ck-", dir=out.parent))
    try:
        save_file(adapter, str(tmp / ADAPTER))
        (tmp / LOG).write_text("".join(json.dumps(row, separators=(",", ":")) + "\n" for row in log))
        if resume is not None:
            (tmp / RESUME).mkdir()
            save_state(resume, tmp / RESUME)
        full = {"format": FORMAT, **meta}
        if validate_meta(full) is None and "steps" in full["training"]:  # a model card for a complete config
            (tmp / "README.md").write_text(model_card(full, "kvcondense", str(out)))
        (tmp / META).write_text(json.dumps({"format": FORMAT, **meta}, indent=2) + "\n")  # last: marks it complete
        make_readable(tmp)
        old = None
        if out.exists():
            _check_replaceable(out, (meta.get("run_id"), *replaces))
            old = out.with_name(f".{out.name}.old-{secrets.token_hex(4)}")
            out.rename(old)
        tmp.rename(out)  # a kill between the two renames is recovered by recover()
        if old is not None:
            for entry in old.iterdir():  # what else is in the folder (results, notes, an export) is the user's
                if entry.name not in OURS:
                    entry.rename(out / entry.name)
            shutil.rmtree(old)
    except (OSError, SafetensorError) as e:  # a full disk, a quota: the previous checkpoint is still whole
        raise CheckpointError(f"could not write the checkpoint {out} ({_reason(e)}); the previous one is intact") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _reason(e: BaseException) -> str:
    return getattr(e, "strerror", None) or " ".join(str(e).split())[-80:]


def make_readable(folder: Path) -> None:
    """mkdtemp makes 0700 and safetensors writes its file through a 0600 temp file: give the folder, its subfolders
    and every file the permissions any the user creates would get (umask), so colleagues can read a checkpoint."""
    mask = current_umask()
    for path in (folder, *folder.rglob("*")):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _check_replaceable(out: Path, replaces: tuple[str | None, ...]) -> None:
    if not (out / META).is_file():
        if not out.is_dir() or any(out.iterdir()):
            raise CheckpointError(
                f"{out} changed during training and is no longer a kvcondense checkpoint; not replaced"
            )
        return
    run_id = _run_id(out)
    if run_id not in replaces:
        raise CheckpointError(f"{out} now holds another run's checkpoint (run {run_id}); not replaced")


def _run_id(folder: Path) -> str | None:
    try:
        return json.loads((folder / META).read_text()).get("run_id")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None


def recover(out: str | Path) -> Path | None:
    """Bring back the newest complete checkpoint of ``out`` after a kill mid-save, and remove dead temp folders.

    A save writes ``.<name>.ck-*`` and swaps it in by renaming ``out`` to ``.<name>.old-*``; a kill in between
    leaves no ``out`` but a complete copy in one of them. Call it while holding the run's lock (no writer is
    alive). Only folders whose files are all a checkpoint's are removed. Returns the recovered path or None.
    """
    out = Path(out)
    if not out.parent.is_dir():
        return None
    leftovers = [p for p in out.parent.glob(f".{out.name}.*") if p.is_dir() and _only_ours(p)]
    recovered = None
    if not (out / META).is_file() and not (out.exists() and any(out.iterdir())):
        complete = [p for p in leftovers if _steps_done(p) is not None]
        if complete:
            best = max(complete, key=_steps_done)
            if out.exists():
                out.rmdir()  # an empty folder
            best.rename(out)
            leftovers.remove(best)
            recovered = out
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True)
    return recovered


def _only_ours(folder: Path) -> bool:
    return all(p.name in OURS for p in folder.iterdir())


def _steps_done(folder: Path) -> int | None:
    """Steps of a complete checkpoint folder (config readable, adapter present); None if incomplete."""
    try:
        meta = json.loads((folder / META).read_text())
        steps = meta["training"]["steps_done"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return None
    return steps if isinstance(steps, int) and (folder / ADAPTER).is_file() else None


# ------------------------------------------------------------------------------------------------------------- reading
def read_meta(path: str | Path) -> dict:
    """The JSON config of a checkpoint, validated, with a clear error if it is not one."""
    meta_file = Path(path) / META
    if not meta_file.is_file():
        raise CheckpointError(f"{path} is not a kvcondense checkpoint (no {META}); pass a directory made by train")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(
            f"{meta_file} is not valid JSON ({type(e).__name__}); the checkpoint is damaged"
        ) from None
    problem = validate_meta(meta)
    if problem:
        raise CheckpointError(f"{meta_file}: {problem}")
    return meta


def read_log(path: str | Path) -> list[dict]:
    log = Path(path) / LOG
    if not log.exists():
        return []
    try:
        rows = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{log} is damaged ({type(e).__name__}); it cannot be continued") from None
    if not all(isinstance(r, dict) for r in rows):
        raise CheckpointError(f"{log} holds lines that are not JSON objects; it cannot be continued")
    return rows


def read_resume(path: str | Path) -> dict | None:
    """The resume state of a checkpoint (None if it has none): safetensors + JSON only, no file can run code."""
    folder = Path(path) / RESUME
    if (Path(path) / LEGACY_RESUME).exists():
        raise CheckpointError(
            f"{path} stores its resume state in the old resume/state.pt format, which kvcondense no longer loads "
            f"(loading it can run code); start a new run from its weights with --init-from {path}"
        )
    if not folder.is_dir():
        return None
    state = load_state(folder)
    keys = {"trainable": dict, "optimizer": dict, "scheduler": dict, "step": int, "torch_rng": torch.Tensor}
    if not isinstance(state, dict) or any(not isinstance(state.get(k), t) for k, t in keys.items()):
        raise CheckpointError(f"resume state in {folder} lacks fields or has wrong types; it cannot be continued")
    return state


def read_adapter(path: str | Path) -> dict[str, torch.Tensor]:
    """The adapter tensors of a checkpoint; a damaged file is a :class:`CheckpointError` naming it."""
    f = Path(path) / ADAPTER
    try:
        return load_file(str(f))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"{f} is not a readable safetensors file ({str(e)[:100]}); the checkpoint is damaged"
        ) from None


def method_from_meta(meta: dict) -> Method:
    """The method a checkpoint was trained with; a field it predates takes the value it had then (``param``'s
    ``before``), not a newer default."""
    params = {k: v for k, v in meta["method"]["params"].items() if k != "name"}
    cls = METHODS.get(meta["method"]["name"])
    for f in dataclasses.fields(cls) if cls is not None else ():
        if f.name not in params and f.metadata.get("before") is not None:
            params[f.name] = f.metadata["before"]
    try:
        return build_method(meta["method"]["name"], **params)
    except TypeError as e:  # a parameter of the wrong type reached the dataclass
        raise CheckpointError(f"method parameters {params} of the checkpoint are invalid ({e})") from None
