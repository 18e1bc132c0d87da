"""The training settings: :class:`TrainConfig`, what a checkpoint records of them, and reading them back.

A run's settings come from the command line, a ``--config`` file (:func:`read_config`) or, on ``--resume``, the
checkpoint itself (:func:`config_from_checkpoint`); a resumed run is refused when its settings contradict the
stored ones (:func:`check_resumable`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path, PurePath

from .checkpoint import read_meta
from .errors import UsageError
from .lora import LoraSettings
from .meta import training_problem
from .methods import Method
from .models import DEFAULT_MODEL
from .trackers import tracker_names

OBJECTIVES = ("lm", "kl", "lm+kl")
TEACHER_DTYPES = ("float32", "bfloat16")
SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
             "inverse_sqrt")  # fmt: skip
"""The ``transformers.get_scheduler`` names that need nothing but the optimizer, warmup and step count."""


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved in the checkpoint.

    Attributes:
        method: method name (see ``kvcondense.methods.METHODS``).
        method_params: the method's hyperparameters (e.g. ``{"ratio": 0.5}``).
        model: registered model name or local model directory.
        data: built-in corpus name or path to .txt/.jsonl files.
        out: checkpoint directory.
        steps: optimizer steps.
        batch_size: blocks per optimizer step (per process, before accumulation).
        grad_accum: micro-batches accumulated per optimizer step.
        block_tokens: text tokens per training block (special tokens come on top).
        lr: peak learning rate (AdamW, no weight decay).
        schedule: learning-rate schedule name understood by ``transformers.get_scheduler``.
        warmup_steps: linear warm-up steps.
        seed: seed for data order, span placement and initialisation.
        lora: LoRA settings.
        log_every: steps between log lines.
        save_every: steps between checkpoints (0: only at the end).
        stage: what trains: ``rows`` (new token rows only), ``lora`` (LoRA + rows) or ``full`` (every weight).
        init_from: a checkpoint of the same method whose trained tensors start this run (stage 1 -> stage 2).
        attention: ``auto`` (sdpa; flex_attention with a block-sparse mask on CUDA for long blocks), ``sdpa`` or
            ``flex`` (see ``kvcondense.forward.choose_attention``).
        grad_checkpointing: recompute activations in the backward (non-reentrant) to fit longer blocks.
        objective: ``lm`` (next-token loss under the method's mask), ``kl`` (KL to the frozen uncompressed model on
            every text prediction, see :mod:`kvcondense.distill`) or ``lm+kl`` (their sum, KL weighted).
        kl_weight: weight of the KL term (``kl`` and ``lm+kl``).
        temperature: softening of both distributions in the KL term.
        teacher_dtype: the teacher's forward in ``float32`` (exact) or under ``bfloat16`` autocast: about twice as
            fast where the hardware has bf16 matrix units (GPUs; CPUs with AMX), its targets off by ~6e-4 nats per
            token on SmolLM2-135M (``benchmarks/kl_step_cost.py`` measures both).
        max_grad_norm: clip the gradients' global norm to this before each optimizer step (0: no clipping).
        sample_ratios: when given, each training block draws its compression ratio from these (one adapter for
            several KV budgets, as Activation Beacon samples its ratio); empty: every block uses the method's ratio.
        sample_chunks: when given, each training episode is cut to its last T chunks (its evidence chunk kept, as
            ``eval --time-steps`` cuts), T drawn from these per example: a memory learns to keep a few facts apart
            before it holds many; empty: every episode as long as the block allows.
        continuation_tokens: when > 0, the last this many tokens of each text block are a plain continuation read
            through what the method left of the rest (the prefix task's shape: a compressed prompt, then text that
            reads it); the method lays out only the prompt part. 0: the method lays out the whole block.
        report_to: experiment trackers that also receive each log line (Accelerate's: ``tensorboard``, ``wandb``,
            ``mlflow``, ...; from Python also ``GeneralTracker`` objects); their files go under ``out/trackers``.
    """

    method: str = "sentinel"
    method_params: dict = field(default_factory=dict)
    model: str = DEFAULT_MODEL
    data: str = "wiki"
    out: str = "checkpoints/run"
    steps: int = 300
    batch_size: int = 2
    grad_accum: int = 1
    block_tokens: int = 256
    lr: float = 3e-4
    schedule: str = "linear"
    warmup_steps: int = 0
    seed: int = 0
    lora: LoraSettings = field(default_factory=LoraSettings)
    log_every: int = 1
    save_every: int = 50
    stage: str = "lora"
    init_from: str | None = None
    attention: str = "auto"
    grad_checkpointing: bool = False
    objective: str = "lm"
    kl_weight: float = 1.0
    temperature: float = 1.0
    teacher_dtype: str = "float32"
    max_grad_norm: float = 1.0
    sample_ratios: list[float] = field(default_factory=list)
    sample_chunks: list[int] = field(default_factory=list)
    continuation_tokens: int = 0
    report_to: list = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("model", "data", "out", "init_from"):  # a Path from Python is the path it names
            if isinstance(getattr(self, name), PurePath):
                setattr(self, name, str(getattr(self, name)))

        def as_json(values: dict) -> dict:  # the Python API may give tuples where a config file holds lists
            return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

        settings = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("lora", "report_to")}
        lora = self.lora if isinstance(self.lora, dict) else asdict(self.lora)
        if problem := training_problem(as_json(settings), as_json(lora)):
            raise UsageError(f"training setting {problem.removeprefix('field ')}")
        if not isinstance(self.report_to, list | tuple):
            raise UsageError(f"report_to must be a list of trackers, got {self.report_to!r}")
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)
        if self.schedule not in SCHEDULES:
            raise UsageError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.steps < 1:
            raise UsageError(f"steps must be >= 1, got {self.steps}")
        for name in ("batch_size", "grad_accum", "block_tokens", "log_every"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise UsageError(f"lr must be > 0, got {self.lr}")
        if self.objective not in OBJECTIVES:
            raise UsageError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if self.max_grad_norm < 0:
            raise UsageError(f"--max-grad-norm must be >= 0 (0: no clipping), got {self.max_grad_norm}")
        if self.kl_weight <= 0 or self.temperature <= 0:
            raise UsageError(f"--kl-weight and --temperature must be > 0, got {self.kl_weight}, {self.temperature}")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise UsageError(f"--teacher-dtype must be one of {', '.join(TEACHER_DTYPES)}, got {self.teacher_dtype!r}")
        self.sample_ratios = [float(r) for r in self.sample_ratios]
        if any(not 0 < r < 1 for r in self.sample_ratios):
            raise UsageError(f"--sample-ratios must each be in (0, 1), got {self.sample_ratios}")
        self.sample_chunks = [int(t) for t in self.sample_chunks]
        if any(t < 1 for t in self.sample_chunks):
            raise UsageError(f"--sample-chunks must each be >= 1, got {self.sample_chunks}")
        if not 0 <= self.continuation_tokens < self.block_tokens:
            raise UsageError(
                f"--continuation-tokens must be >= 0 and below --block-tokens {self.block_tokens}, "
                f"got {self.continuation_tokens}"
            )
        for name in ("warmup_steps", "save_every"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        """The settings as JSON values, as checkpoints and ``--config`` files hold them (a tracker object from the
        Python API by its name)."""
        return {**asdict(replace(self, report_to=[])), "report_to": tracker_names(self.report_to)}


def checkpoint_meta(
    cfg: TrainConfig, method: Method, token_ids: dict, identity: dict, step: int, run_id: str | None = None
) -> dict:
    return {
        "run_id": run_id,
        "method": {"name": method.name, "params": method.params()},
        "special_tokens": token_ids,
        "base_model": identity,
        "lora": asdict(cfg.lora),
        "training": {
            **{k: v for k, v in cfg.to_dict().items() if k != "lora"},
            "steps_done": step,
        },
        "command": " ".join(["kvcondense", *sys.argv[1:]]) if sys.argv[0].endswith("kvcondense") else None,
    }


# Settings a resumed run may change: how long it runs, how often it saves or logs, and where the logs also go.
RESUMABLE_CHANGES = ("steps", "save_every", "log_every", "out", "report_to")


def check_resumable(cfg: TrainConfig, previous: dict, out: Path) -> None:
    """Refuse to continue the run in ``out`` with settings that contradict it (one line naming both values)."""
    stored = asdict(config_from_meta(previous))
    stored["lora"] = previous["lora"]
    now = cfg.to_dict()
    for key, value in now.items():
        if key in RESUMABLE_CHANGES or key not in stored:
            continue
        if stored[key] != value:
            flag = "--" + key.replace("_", "-")
            raise UsageError(
                f"{out} was trained with {key}={stored[key]!r}, this command gives {value!r}; resume with the same "
                f"settings (drop {flag}) or train into another --out"
            )


def config_from_meta(meta: dict) -> TrainConfig:
    training = {k: v for k, v in meta["training"].items() if k in TrainConfig.__dataclass_fields__}
    training.setdefault("max_grad_norm", 0.0)  # runs saved before clipping existed trained without it
    return TrainConfig(**training, lora=LoraSettings(**meta["lora"]))


def read_config(path: str | Path) -> dict:
    """The training settings in a JSON or YAML file: :class:`TrainConfig`'s fields (``lora`` a dict), or a
    checkpoint's ``kvcondense.json`` (its ``training`` and ``lora``). Unknown fields are refused by name."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--config {path} does not exist; check the path")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error of a user file is one line
        kind = "YAML" if path.suffix in (".yaml", ".yml") else "JSON"
        raise UsageError(f"--config {path} is not valid {kind} ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path} must hold a mapping of settings, not a {type(data).__name__}")
    if "training" in data:  # a checkpoint's kvcondense.json
        data = {**data["training"], "lora": data.get("lora", {})}
    data = {k: v for k, v in data.items() if k != "steps_done"}
    unknown = sorted(set(data) - set(TrainConfig.__dataclass_fields__))
    if unknown:
        raise UsageError(f"--config {path} has unknown settings {unknown}; see kvcondense train --help")
    if "lora" in data:
        extra = sorted(set(data["lora"]) - set(LoraSettings.__dataclass_fields__))
        if not isinstance(data["lora"], dict) or extra:
            raise UsageError(f"--config {path}: lora must be a mapping of {list(LoraSettings.__dataclass_fields__)}")
        data["lora"] = LoraSettings(**data["lora"])
    return data


def config_from_checkpoint(path: str | Path) -> TrainConfig:
    """The training config stored in a checkpoint (used by --resume)."""
    return config_from_meta(read_meta(path))


def dump_config(cfg: TrainConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2)
