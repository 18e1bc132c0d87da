"""The README.md (a Hugging Face model card) written beside every checkpoint (:mod:`kvcondense.checkpoint`) and
every export (:mod:`kvcondense.export`): method, parameters, base model, training, and how to load it."""

from __future__ import annotations


def model_card(meta: dict, fmt: str, source: str) -> str:
    """A README.md for a checkpoint (``fmt`` ``kvcondense``) or an export (``peft``, ``merged``): method,
    parameters, base model, data, steps, and how to load it."""
    training, method, base = meta["training"], meta["method"], meta["base_model"]
    steps, objective = training.get("steps_done", training["steps"]), training.get("objective", "lm")
    batch, block, lr = (training.get(k, "?") for k in ("batch_size", "block_tokens", "lr"))
    shape = f"batch {batch} x {block} tokens, lr {lr}"
    params = ", ".join(f"{k}={v}" for k, v in method["params"].items())
    if fmt == "kvcondense":
        origin = f"Trained with `{meta.get('command') or 'kvcondense train'}`."
    else:
        origin = f"Exported from the kvcondense checkpoint `{source}` with `kvcondense export --to {fmt}`."
    load = {
        "peft": (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\nfrom peft import PeftModel\n\n"
            "tok = AutoTokenizer.from_pretrained(DIR)\nbase = AutoModelForCausalLM.from_pretrained(BASE)\n"
            "base.resize_token_embeddings(len(tok))\nmodel = PeftModel.from_pretrained(base, DIR)"
        ),
        "merged": "from transformers import AutoModelForCausalLM\n\nmodel = AutoModelForCausalLM.from_pretrained(DIR)",
        "kvcondense": (
            "from kvcondense import load\nfrom kvcondense.generate import generate\n\n"
            "got = load(checkpoint=DIR)\n"
            "out = generate(got.model, got.tokenizer, got.method, got.token_ids, 'A long document ...')"
        ),
    }[fmt]
    return f"""---
library_name: {"peft" if fmt == "peft" else "kvcondense" if fmt == "kvcondense" else "transformers"}
tags: [kvcondense, kv-cache-compression, {method["name"]}]
license: apache-2.0
---

# kvcondense {method["name"]} ({"checkpoint" if fmt == "kvcondense" else f"{fmt} export"})

{origin}

| | |
|---|---|
| method | `{method["name"]}` ({params}) |
| special tokens | {", ".join(f"`{t}` = {i}" for t, i in meta["special_tokens"].items())} |
| base model | `{base["name"]}` ({base["model_type"]}, weights {base["fingerprint"]}) |
| training | {steps} steps, objective `{objective}`, data `{training.get("data", "?")}`, {shape} |
| LoRA | r = {meta["lora"].get("r", "?")}, alpha = {meta["lora"].get("alpha", "?")} |
| command | `{meta.get("command") or "see kvcondense.json"}` |

## Load

```python
{load}
```

The weights alone do not compress: the method's layout inserts the special tokens and kvcondense's evicting
cache frees the keys and values they condense. Run it through kvcondense to get the compression, e.g.
`kvcondense generate --checkpoint {source} ...`. Results of this checkpoint: the kvcondense README's tables.
"""
