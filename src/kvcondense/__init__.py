"""kvcondense: learned context compression for causal LMs that physically frees the KV of what it condenses.

from kvcondense import load
from kvcondense.generate import generate

got = load(checkpoint="checkpoints/sentinel-r0.5")     # or load(method="streaming", params={"ratio": 0.75})
out = generate(got.model, got.tokenizer, got.method, got.token_ids, "A long document ...", max_new_tokens=16)
print(out.text, out.stored_slots)
"""

from .cache import EvictingCache
from .engine import incremental_forward
from .evaluate import EvalConfig, run_eval
from .forward import parallel_forward
from .layout import NEVER, Kind, Layout
from .loader import Loaded, load, load_checkpoint
from .methods import METHODS, Method, build_method, tokenize
from .models import add_special_tokens, load_model
from .session import MemorySession
from .train import TrainConfig

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
