"""One loader: a trained checkpoint, or an untrained method on a base model, as one named bundle.

    from kvcondense import load
    bundle = load(checkpoint="checkpoints/sentinel-r0.5")                  # trained
    bundle = load(method="streaming", params={"ratio": 0.75})              # training-free, on the default model
    out = generate(bundle.model, bundle.tokenizer, bundle.method, bundle.token_ids, "a long document ...")

The override rules are decided here once: on a checkpoint, the ratio and the method's inference-time parameters
(:attr:`Method.inference_params`) may be set by the user; any other parameter that contradicts the checkpoint, a
parameter the method does not have, or another method's name is refused with one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import ADAPTER, CheckpointError, method_from_meta, read_adapter, read_meta
from .errors import UsageError
from .export import check_export, write_export
from .lora import LoraSettings, attach_lora, load_adapter_state
from .methods import Method, build_method, check_params, override
from .models import DEFAULT_MODEL, add_special_tokens, load_model, model_identity


@dataclass
class Loaded:
    """A model ready to compress with a method.

    Attributes:
        model: the model (a trained checkpoint's LoRA folded in, except conditional LoRA, which stays a peft model).
        tokenizer: its tokenizer, with the method's special tokens added.
        method: the method, with the user's inference-time parameters applied.
        token_ids: the special tokens' ids.
        label: how results name it (``sentinel (trained)``, ``gist (untrained tokens)``, ``streaming``).
        meta: the checkpoint's ``kvcondense.json`` (None for an untrained method).
        source: the checkpoint folder it was loaded from (None for an untrained method).
    """

    model: object
    tokenizer: object
    method: Method
    token_ids: dict[str, int]
    label: str
    meta: dict | None = None
    source: str | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> Loaded:
        """A kvcondense checkpoint folder (see :func:`load` for ``model``, ``params``, ``device``, ``dtype``)."""
        return load(checkpoint=path, **kwargs)

    def save_pretrained(self, path: str | Path, format: str = "peft") -> Path:
        """Write the checkpoint this was loaded from as a stock ``peft`` adapter or a ``merged`` model (see
        :func:`export`; a new folder, with a model card)."""
        if self.source is None:
            raise UsageError("an untrained method has nothing to save; train it first (kvcondense train)")
        return export(self.source, format, path)


def load_checkpoint(path: str | Path, model_name: str | None = None, merge_lora: bool = True, **model_kwargs) -> Loaded:
    """Load a checkpoint onto its base model.

    ``model_name`` overrides where the base model is loaded from; its weights must still be the ones the
    checkpoint was trained on, or this raises :class:`CheckpointError`.

    ``merge_lora``: when the LoRA acts on every token (every method but CCM and ``--lora-scope special``), fold it
    and the new token rows into the base weights once, so that inference runs the plain model (the same function
    up to float rounding, without the adapter's extra matmuls in every projection at every step). Conditional LoRA
    stays a peft model either way: its gate depends on each token. False keeps the peft model (to inspect or train
    it).
    """
    meta = read_meta(path)
    if not (Path(path) / ADAPTER).is_file():  # e.g. a committed run whose weights were left out for size
        command = meta.get("command") or "the training command in its kvcondense.json"
        raise CheckpointError(f"checkpoint {path} holds no {ADAPTER} (only its config and log); remake it: {command}")
    method = method_from_meta(meta)
    adapter = read_adapter(path)  # a damaged file fails before the model loads
    base = meta["base_model"]
    model, tokenizer = load_model(model_name or base["name"], **model_kwargs)
    ident = model_identity(model, model_name or base["name"])
    if (ident["model_type"], ident["fingerprint"]) != (base["model_type"], base["fingerprint"]):
        raise CheckpointError(
            f"checkpoint {path} was trained on {base['name']} ({base['model_type']}, weights {base['fingerprint']}), "
            f"not on {ident['name']} ({ident['model_type']}, weights {ident['fingerprint']}); "
            "load it with the model it was trained on"
        )
    token_ids = add_special_tokens(model, tokenizer, method.special_tokens)
    if token_ids != meta["special_tokens"]:
        raise CheckpointError(f"special token ids {token_ids} differ from the checkpoint's {meta['special_tokens']}")
    model = attach_lora(model, LoraSettings(**meta["lora"]), list(token_ids.values()), method.lora_on)
    stage = meta["training"].get("stage")
    load_adapter_state(
        model, adapter, full=stage == "full", rows_only=stage == "rows", source=str(Path(path) / ADAPTER)
    )
    model.eval()
    if merge_lora and method.lora_on is None:
        model = model.merge_and_unload()
    return Loaded(model, tokenizer, method, token_ids, f"{method.name} (trained)", meta, str(path))


AUTO = "auto"  # --device auto: Accelerate's device_map
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def placement(device: str | None = None, dtype: str | torch.dtype | None = None) -> tuple[torch.device, torch.dtype]:
    """Where and in what precision to run: by default CUDA in bfloat16 when a GPU is there, else CPU in float32.
    ``auto`` (a model spread over every device, see :func:`load`) is placed here as its first device would be."""
    if device is None or device == AUTO:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r} is not a device; give cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device} asked for, but torch sees no CUDA GPU here; use --device cpu")
    if dtype is None:
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UsageError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    return dev, dtype


def load(
    checkpoint: str | Path | None = None,
    method: str | None = None,
    params: dict | None = None,
    model: str | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    merge_lora: bool = True,
) -> Loaded:
    """A checkpoint (``checkpoint``) or an untrained method (``method``) on ``model`` (default: the checkpoint's
    base model, else the default model), with the user's ``params`` applied by the rules above, on ``device`` in
    ``dtype`` (see :func:`placement`). ``device="auto"`` loads a model too large for one device spread over every
    GPU (and the CPU) by Accelerate's ``device_map="auto"``; inputs go to its first device. ``merge_lora``: see
    :func:`load_checkpoint` (False keeps the adapters apart: the base model stays reachable)."""
    dev, dt = placement(device, dtype)
    if device == AUTO:
        return _load(checkpoint, method, params, model, merge_lora, dtype=dt, device_map=AUTO)
    got = _load(checkpoint, method, params, model, merge_lora, dtype=dt)
    got.model = got.model.to(dev)
    return got


def _load(checkpoint, method, params, model, merge_lora=True, **model_kwargs) -> Loaded:
    params = {k: v for k, v in (params or {}).items() if v is not None}
    if checkpoint is not None:
        trained = method_from_meta(read_meta(checkpoint))  # flags are checked before the model loads
        if method is not None and method != trained.name:
            raise UsageError(f"checkpoint {checkpoint} is a {trained.name} checkpoint, not {method}")
        chosen = override(trained, params, f"checkpoint {checkpoint}")
        loaded = load_checkpoint(checkpoint, model, merge_lora, **model_kwargs)
        loaded.method = chosen
        return loaded
    if method is None:
        raise UsageError("give --checkpoint DIR, or --method M to use a method without training")
    check_params(method, params)
    base, tokenizer = load_model(model or DEFAULT_MODEL, **model_kwargs)
    built = build_method(method, **params)
    token_ids = add_special_tokens(base, tokenizer, built.special_tokens)
    label = f"{built.name} (untrained tokens)" if built.special_tokens else built.name
    return Loaded(base, tokenizer, built, token_ids, label)


def export(checkpoint: str | Path, fmt: str, out: str | Path) -> Path:
    """Write ``checkpoint`` to the new folder ``out`` as ``fmt`` (``peft`` or ``merged``, see
    :mod:`kvcondense.export`): checked before the model is loaded, written atomically. Returns ``out``."""
    meta = check_export(checkpoint, fmt, out)
    loaded = load_checkpoint(checkpoint, merge_lora=fmt == "merged")
    return write_export(loaded.model, loaded.tokenizer, meta, fmt, out, str(checkpoint))
