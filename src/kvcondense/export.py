"""Export a checkpoint to the formats the user's stack already loads, each with a model card.

    kvcondense export --checkpoint checkpoints/sentinel-r0.5 --to peft exported/sentinel-peft
    kvcondense export --checkpoint checkpoints/sentinel-r0.5 --to merged exported/sentinel-merged

- ``peft``: ``adapter_config.json`` + ``adapter_model.safetensors`` (the LoRA and the new token rows, peft's own
  names) + the tokenizer with the added tokens: ``PeftModel.from_pretrained(base, DIR)`` on the base model resized
  to the tokenizer gives kvcondense's logits.
- ``merged``: a plain Hugging Face model folder (LoRA and rows folded into the weights):
  ``AutoModelForCausalLM.from_pretrained(DIR)``.

Either way the special tokens only compress when the layout puts them in and the cache frees what they condense:
run the exported model through kvcondense (``--model DIR`` for a merged export) to get the compression. A method
whose LoRA acts only on its own tokens (CCM, sentinel ``--lora-scope special``) cannot be expressed in a stock
model or in stock peft (the per-token gate is kvcondense's), so its export is refused rather than silently wrong.
Written atomically: a temp folder beside ``DIR``, renamed at the end; an existing ``DIR`` is never replaced.

This module checks and writes; :func:`kvcondense.loader.export` (and ``Loaded.save_pretrained``) loads the
checkpoint in between, so that the loader is the only module that loads.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from .checkpoint import make_readable, method_from_meta, read_meta
from .errors import UsageError
from .model_card import model_card

FORMATS = ("peft", "merged")


def check_export(checkpoint: str | Path, fmt: str, out: str | Path) -> dict:
    """Refuse, before anything is loaded, an export that cannot be written or would be wrong: an unknown format,
    an existing ``out``, a LoRA gated to special tokens, a full-weight checkpoint as ``peft``. Returns the
    checkpoint's ``kvcondense.json``."""
    out = Path(out)
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if out.exists():
        raise UsageError(f"--to {fmt} {out} exists; give a new folder (an export never replaces one)")
    meta = read_meta(checkpoint)
    method = method_from_meta(meta)
    if method.lora_on is not None:
        raise UsageError(
            f"{checkpoint} is a {method.name} checkpoint whose LoRA acts only on its special tokens: stock peft and "
            "plain models apply LoRA to every token, so they would give wrong logits; load it with kvcondense"
        )
    stage = meta["training"].get("stage", "lora")
    if fmt == "peft" and stage == "full":
        raise UsageError(f"{checkpoint} trained every weight (stage full), not a LoRA; export it --to merged")
    return meta


def write_export(model, tokenizer, meta: dict, fmt: str, out: str | Path, source: str) -> Path:
    """Write a loaded checkpoint (``model``: a peft model for ``peft``, its LoRA folded in for ``merged``) to the
    new folder ``out`` with its tokenizer, model card and ``kvcondense_source.json``, atomically. Returns ``out``.
    :func:`kvcondense.loader.export` loads and checks it first."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        if fmt == "peft":  # the new rows travel as peft's trainable tokens; not the whole resized embedding
            model.peft_config["default"].base_model_name_or_path = meta["base_model"]["name"]
            model.save_pretrained(tmp, save_embedding_layers=False)
        else:
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(meta, fmt, source))
        (tmp / "kvcondense_source.json").write_text(json.dumps(meta, indent=2) + "\n")  # what it came from
        make_readable(tmp)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
