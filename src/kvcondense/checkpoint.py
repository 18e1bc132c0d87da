"""Self-describing checkpoints: the adapter, the new token rows and a JSON config, written atomically.

Layout of a checkpoint directory::

    kvcondense.json        method + params, special tokens, base model identity, LoRA settings, training setup
    adapter.safetensors    LoRA matrices and new token rows (bf16)
    train_log.jsonl        one JSON line per logged step
    resume/state.pt        optimizer, scheduler, step and RNG state (only needed for --resume)
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import UsageError
from .lora import LoraSettings, attach_lora, load_adapter_state
from .methods import Method, build_method
from .models import add_special_tokens, load_model, model_identity

META = "kvcondense.json"
ADAPTER = "adapter.safetensors"
LOG = "train_log.jsonl"
RESUME = "resume/state.pt"
FORMAT = 1


class CheckpointError(UsageError):
    """A checkpoint is missing, malformed, or does not fit the model it is loaded onto."""


def check_output_dir(out: str | Path) -> Path:
    """Refuse an output path that is an existing file (a directory is replaced atomically on save)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output path {out} is an existing file; choose a directory path")
    return out


def write_checkpoint(
    out: str | Path, meta: dict, adapter: dict[str, torch.Tensor], log: list[dict], resume: dict | None = None
) -> Path:
    """Write a complete checkpoint to a temp dir beside ``out``, then swap it in: never a half-written ``out``."""
    out = check_output_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / META).write_text(json.dumps({"format": FORMAT, **meta}, indent=2) + "\n")
        save_file(adapter, str(tmp / ADAPTER))
        (tmp / LOG).write_text("".join(json.dumps(row, separators=(",", ":")) + "\n" for row in log))
        if resume is not None:
            (tmp / RESUME).parent.mkdir()
            torch.save(resume, tmp / RESUME)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_meta(path: str | Path) -> dict:
    """The JSON config of a checkpoint, with a clear error if it is not one."""
    meta_file = Path(path) / META
    if not meta_file.exists():
        raise CheckpointError(f"{path} is not a kvcondense checkpoint (no {META}); pass a directory made by train")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {meta.get('format')}, this version reads {FORMAT}")
    return meta


def read_log(path: str | Path) -> list[dict]:
    log = Path(path) / LOG
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def read_resume(path: str | Path) -> dict | None:
    f = Path(path) / RESUME
    return torch.load(f, weights_only=False) if f.exists() else None


def method_from_meta(meta: dict) -> Method:
    params = {k: v for k, v in meta["method"]["params"].items() if k != "name"}
    return build_method(meta["method"]["name"], **params)


def load_checkpoint(path: str | Path, model_name: str | None = None, merge_lora: bool = True, **model_kwargs):
    """Load a checkpoint onto its base model. Returns (model, tokenizer, method, token_ids, meta).

    ``model_name`` overrides where the base model is loaded from; its weights must still be the ones the
    checkpoint was trained on, or this raises :class:`CheckpointError`.

    ``merge_lora``: when the LoRA acts on every token (every method but CCM), fold it and the new token rows into
    the base weights once, so that inference runs the plain model (the same function up to float rounding,
    without the adapter's extra matmuls in every projection at every step). Conditional LoRA (CCM) stays a peft
    model either way: its gate depends on each token. False keeps the peft model (to inspect or train it).
    """
    meta = read_meta(path)
    if not (Path(path) / ADAPTER).is_file():  # e.g. a committed run whose weights were left out for size
        command = meta.get("command") or "the training command in its kvcondense.json"
        raise CheckpointError(f"checkpoint {path} holds no {ADAPTER} (only its config and log); remake it: {command}")
    base = meta["base_model"]
    model, tokenizer = load_model(model_name or base["name"], **model_kwargs)
    ident = model_identity(model, model_name or base["name"])
    if (ident["model_type"], ident["fingerprint"]) != (base["model_type"], base["fingerprint"]):
        raise CheckpointError(
            f"checkpoint {path} was trained on {base['name']} ({base['model_type']}, weights {base['fingerprint']}), "
            f"not on {ident['name']} ({ident['model_type']}, weights {ident['fingerprint']}); "
            "load it with the model it was trained on"
        )
    method = method_from_meta(meta)
    token_ids = add_special_tokens(model, tokenizer, method.special_tokens)
    if token_ids != meta["special_tokens"]:
        raise CheckpointError(f"special token ids {token_ids} differ from the checkpoint's {meta['special_tokens']}")
    model = attach_lora(model, LoraSettings(**meta["lora"]), list(token_ids.values()), method.lora_on)
    full = meta["training"].get("stage") == "full"
    load_adapter_state(model, load_file(str(Path(path) / ADAPTER)), full=full)
    model.eval()
    if merge_lora and method.lora_on is None:
        model = model.merge_and_unload()
    return model, tokenizer, method, token_ids, meta
