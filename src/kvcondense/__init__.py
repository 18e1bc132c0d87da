"""kvcondense: learned context compression for causal LMs that physically frees the KV of what it condenses.

from kvcondense import load
from kvcondense.generate import generate

got = load(checkpoint="checkpoints/sentinel-r0.5")     # or load(method="streaming", params={"ratio": 0.75})
out = generate(got.model, got.tokenizer, got.method, got.token_ids, "A long document ...", max_new_tokens=16)
print(out.text, out.stored_slots)
"""

# Everything below is imported on first use (PEP 562), so that `kvcondense --help` does not wait for torch.
_EXPORTS = {
    "EvictingCache": "cache",
    "incremental_forward": "engine",
    "EvalConfig": "evaluate",
    "run_eval": "evaluate",
    "parallel_forward": "forward",
    "NEVER": "layout",
    "Kind": "layout",
    "Layout": "layout",
    "Loaded": "loader",
    "load": "loader",
    "load_checkpoint": "loader",
    "METHODS": "methods",
    "Method": "methods",
    "build_method": "methods",
    "tokenize": "methods",
    "add_special_tokens": "models",
    "load_model": "models",
    "MemorySession": "session",
    "TrainConfig": "train",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kvcondense' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__version__ = "0.1.0"
# The functions `train` and `generate` live in the modules of the same name and are not re-exported here, so that
# `kvcondense.train` and `kvcondense.generate` stay the modules.

__all__ = [
    "EvictingCache",
    "EvalConfig",
    "Kind",
    "Layout",
    "METHODS",
    "MemorySession",
    "Method",
    "NEVER",
    "TrainConfig",
    "add_special_tokens",
    "build_method",
    "incremental_forward",
    "Loaded",
    "load",
    "load_checkpoint",
    "load_model",
    "parallel_forward",
    "run_eval",
    "tokenize",
]
