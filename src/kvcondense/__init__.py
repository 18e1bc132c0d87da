"""kvcondense: learned context compression for causal LMs that physically frees the KV of what it condenses.

from kvcondense import load_checkpoint, generate
model, tokenizer, method, token_ids, meta = load_checkpoint("checkpoints/sentinel-r0.5")
out = generate(model, tokenizer, method, token_ids, "a long document ...", max_new_tokens=64)
"""

from .cache import EvictingCache
from .checkpoint import load_checkpoint
from .engine import incremental_forward
from .evaluate import EvalConfig, run_eval
from .forward import parallel_forward
from .layout import NEVER, Kind, Layout
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
    "load_checkpoint",
    "load_model",
    "parallel_forward",
    "run_eval",
    "tokenize",
]
