"""The training recipe: data -> model + adapters -> loop -> checkpoint. Meant to be read top to bottom.

    kvcondense train --method sentinel --ratio 0.5 --steps 300 --out checkpoints/sentinel-r0.5

The base model is frozen; LoRA and the method's new token rows are trained with the causal LM loss under the
method's mask (one parallel masked forward per batch). Runs on Hugging Face Accelerate, so the same recipe
runs on one CPU or under ``accelerate launch``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import secrets
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_scheduler

from .atomic import exclusive
from .checkpoint import (
    ADAPTER,
    META,
    check_output_dir,
    read_adapter,
    read_log,
    read_meta,
    read_resume,
    recover,
    write_checkpoint,
)
from .data import load_split
from .data.episodes import is_episode_data, load_episodes
from .distill import kl_to_teacher, teacher_logits
from .distributed import check_distributed, checkpoint_tensors, is_main_process, load_resume
from .errors import UsageError
from .forward import parallel_forward
from .layout import IGNORE, Layout
from .lora import LoraSettings, attach_lora, load_adapter_state, set_stage
from .methods import EpisodeTokens, Method, TokenizedText, build_method, tokenize, tokenize_episode
from .models import DEFAULT_MODEL, add_special_tokens, load_model, model_identity

OBJECTIVES = ("lm", "kl", "lm+kl")
logger = logging.getLogger(__name__)


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
        max_grad_norm: clip the gradients' global norm to this before each optimizer step (0: no clipping).
        sample_ratios: when given, each training block draws its compression ratio from these (one adapter for
            several KV budgets, as Activation Beacon samples its ratio); empty: every block uses the method's ratio.
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
    max_grad_norm: float = 1.0
    sample_ratios: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)
        if self.steps < 1:
            raise UsageError(f"steps must be >= 1, got {self.steps}")
        for name in ("batch_size", "grad_accum", "block_tokens"):
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
        self.sample_ratios = [float(r) for r in self.sample_ratios]
        if any(not 0 < r < 1 for r in self.sample_ratios):
            raise UsageError(f"--sample-ratios must each be in (0, 1), got {self.sample_ratios}")
        for name in ("warmup_steps", "save_every"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")


# ---------------------------------------------------------------------------------------------------------------- data
def text_blocks(docs, tokenizer, block_tokens: int) -> list[TokenizedText]:
    """Tokenize documents and cut each into blocks of ``block_tokens`` text tokens (a short tail is kept if it
    is at least half a block)."""
    blocks = []
    for doc in docs:
        toks = tokenize(doc.text, tokenizer)
        for lo in range(0, len(toks), block_tokens):
            block = toks[lo : lo + block_tokens]
            if len(block) >= max(2, block_tokens // 2):
                blocks.append(block)
    return blocks


def episode_items(episodes, tokenizer, budget: int) -> list[EpisodeTokens]:
    """Tokenize episodes; drop the oldest chunks until the text of chunks + query + answer fits ``budget`` tokens
    (episodes whose query and answer alone do not fit are skipped)."""
    items = []
    for ep in episodes:
        tok = tokenize_episode(ep, tokenizer)
        room = budget - len(tok.query) - len(tok.answer)
        keep = len(tok.chunks)
        while keep and sum(len(c) for c in tok.truncated(keep).chunks) > room:
            keep -= 1
        if room > 0 and keep:
            items.append(tok.truncated(keep))
    return items


def batches(blocks: list, batch_size: int, seed: int, rank: int = 0, world: int = 1):
    """Endless stream of (epoch, list of (block index, block)), reshuffled every epoch; each process takes its
    own slice of every global batch."""
    epoch = 0
    global_bs = batch_size * world
    while True:
        order = list(range(len(blocks)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        for lo in range(0, len(order) - global_bs + 1, global_bs):
            mine = order[lo + rank * batch_size : lo + (rank + 1) * batch_size]
            yield epoch, [(i, blocks[i]) for i in mine]
        epoch += 1


def lm_loss(logits: torch.Tensor, layouts: list[Layout], reduction: str = "mean") -> tuple[torch.Tensor, int]:
    """Cross-entropy over the layouts' targets (right-padded), mean or sum. Returns (loss, number of targets)."""
    targets = torch.full(logits.shape[:2], IGNORE, dtype=torch.long, device=logits.device)
    for b, lay in enumerate(layouts):
        targets[b, : len(lay)] = lay.targets.to(logits.device)
    n = int((targets != IGNORE).sum())
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    return (loss if reduction == "sum" else loss / max(n, 1)), n


def block_layout(method: Method, cfg: TrainConfig, block, token_ids: dict[str, int], seed: int) -> Layout:
    """One block's layout; with ``cfg.sample_ratios`` its ratio is drawn from them (fixed by ``seed``)."""
    if cfg.sample_ratios:
        method = dataclasses.replace(method, ratio=random.Random(seed).choice(cfg.sample_ratios))
    return method.layout(block, token_ids, seed=seed)


def objective_loss(model, layouts: list[Layout], cfg: TrainConfig, accelerator: Accelerator):
    """The training objective on one micro-batch: LM loss, KL to the frozen uncompressed model, or both.

    Each term is a token-weighted mean over the global batch: DDP averages gradients over processes, so each
    process scales its sum by world / global count (exactly the 1-process loss at any world size). Returns the loss
    to back-propagate and the global values of every term (``loss``, ``loss_lm`` and ``loss_kl``) for the log.
    """
    logits = parallel_forward(model, layouts, attention=cfg.attention).logits
    world = accelerator.num_processes
    lm_sum, n = lm_loss(logits, layouts, reduction="sum")
    sums, counts = {"loss_lm": lm_sum}, {"loss_lm": n}
    if cfg.objective != "lm":
        teacher = teacher_logits(model, layouts)
        sums["loss_kl"], counts["loss_kl"] = kl_to_teacher(logits, teacher, layouts, cfg.temperature)
    weights = {"loss_lm": 0.0 if cfg.objective == "kl" else 1.0, "loss_kl": cfg.kl_weight}
    loss, parts = logits.new_zeros((), dtype=torch.float32), {"loss": 0.0}
    for key, value in sums.items():
        total = accelerator.reduce(torch.tensor(float(counts[key]), device=value.device), reduction="sum").clamp(min=1)
        loss = loss + weights[key] * value * world / total
        parts[key] = (accelerator.reduce(value.detach(), reduction="sum") / total).item()
        parts["loss"] += weights[key] * parts[key]
    return loss, parts


# ---------------------------------------------------------------------------------------------------------------- model
def prepare_model(cfg: TrainConfig, method: Method):
    """Base model (frozen) + the method's tokens + LoRA. Returns (model, tokenizer, token_ids, identity)."""
    model, tokenizer = load_model(cfg.model)
    identity = model_identity(model, cfg.model)
    token_ids = add_special_tokens(model, tokenizer, method.special_tokens)
    torch.manual_seed(cfg.seed)
    model = attach_lora(model, cfg.lora, list(token_ids.values()), method.lora_on)
    set_stage(model, cfg.stage)
    if cfg.grad_checkpointing:  # non-reentrant: works with frozen inputs and keeps the dropout RNG state
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.init_from:
        start = read_meta(cfg.init_from)
        if start["method"]["name"] != method.name or start["special_tokens"] != token_ids:
            raise UsageError(f"--init-from {cfg.init_from} was trained for another method or other tokens")
        if start["lora"]["r"] != cfg.lora.r:
            raise UsageError(
                f"--init-from {cfg.init_from} has LoRA rank {start['lora']['r']}, this run {cfg.lora.r}; "
                f"pass --lora-rank {start['lora']['r']}"
            )
        stage = start["training"].get("stage")
        load_adapter_state(
            model,
            read_adapter(cfg.init_from),
            full=stage == "full",
            rows_only=stage == "rows",
            source=str(Path(cfg.init_from) / ADAPTER),
        )
    model.train()
    return model, tokenizer, token_ids, identity


def checkpoint_meta(
    cfg: TrainConfig, method: Method, token_ids: dict, identity: dict, step: int, run_id: str | None = None
) -> dict:
    return {
        "run_id": run_id,
        "method": {"name": method.name, "params": method.params()},
        "special_tokens": token_ids,
        "base_model": identity,
        "lora": asdict(cfg.lora),
        "training": {**{k: v for k, v in asdict(cfg).items() if k != "lora"}, "steps_done": step},
        "command": " ".join(["kvcondense", *sys.argv[1:]]) if sys.argv[0].endswith("kvcondense") else None,
    }


# ---------------------------------------------------------------------------------------------------------------- loop
def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Run the recipe and write the checkpoint to ``cfg.out``. Returns its path.

    ``resume``: continue the run saved in ``cfg.out`` (a fresh run when it holds none). ``overwrite``: replace
    another kvcondense checkpoint at ``cfg.out`` (at the first save, so a failed run loses nothing). A folder that is
    not a kvcondense checkpoint is refused either way. One process at a time may write ``cfg.out``.
    """
    out = Path(cfg.out)
    lock = out.parent / f".{out.name}.lock"
    if not is_main_process():
        return _train(cfg, resume, overwrite)
    check_output_dir(out, overwrite=overwrite, resume=resume)
    with exclusive(lock, f"checkpoint {out}"):
        if recover(out) is not None:
            logger.warning(f"recovered the newest complete checkpoint of {out} (a save was interrupted)")
        return _train(cfg, resume, overwrite)


def _train(cfg: TrainConfig, resume: bool, overwrite: bool) -> Path:
    out = Path(cfg.out)
    method = build_method(cfg.method, **cfg.method_params)
    if cfg.sample_ratios and "ratio" not in method.params():
        raise UsageError(f"--sample-ratios needs a method with a ratio; {cfg.method} has none")
    if not method.trainable:
        raise UsageError(f"method {method.name!r} is training-free; evaluate it directly with kvcondense eval")
    episodic = is_episode_data(cfg.data)
    if episodic and not method.episodic:
        raise UsageError(f"--data {cfg.data} holds online episodes, which only the ccm methods train on")
    resumable = resume and (out / META).is_file()
    previous = read_meta(out) if (out / META).is_file() else None
    if resumable:
        check_resumable(cfg, previous, out)
    run_id = previous.get("run_id") if resumable else secrets.token_hex(8)
    replaces = (previous.get("run_id"),) if previous is not None and overwrite else ()
    # bad data fails before the model is loaded
    docs = load_episodes(cfg.data, "train", cfg.seed) if episodic else load_split(cfg.data, "train")
    # cpu=True when there is no GPU: that is what makes a multi-process launch (torchrun) use gloo on CPU
    cuda = torch.cuda.is_available()
    # step_scheduler_with_optimizer=False: accelerate would step the schedule once per process at every optimizer
    # step (it assumes a dataloader that shrinks with the world size); ours counts optimizer steps, stepped below
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.grad_accum,
        cpu=not cuda,
        mixed_precision="bf16" if cuda else "no",
        step_scheduler_with_optimizer=False,
    )
    check_distributed(accelerator)
    model, tokenizer, token_ids, identity = prepare_model(cfg, method)

    if episodic:
        blocks = episode_items(docs, tokenizer, cfg.block_tokens)
    else:
        blocks = text_blocks(docs, tokenizer, cfg.block_tokens)
    if not blocks:
        raise UsageError(f"no training example of {cfg.block_tokens} tokens in {cfg.data}; give more text")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    scheduler = get_scheduler(cfg.schedule, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    step, log = 0, []
    if resumable and (state := read_resume(out)) is not None:
        load_resume(accelerator, model, optimizer, state["trainable"], state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, log = state["step"], read_log(out)
        torch.set_rng_state(state["torch_rng"])
        if step >= cfg.steps and accelerator.is_main_process:
            logger.warning(f"{out} already finished its {step} steps; nothing to do (pass a larger --steps to go on)")

    def save() -> None:
        # every process takes part (under FSDP the tensors are gathered from the shards); the main process writes
        tensors = checkpoint_tensors(
            accelerator, model, optimizer, full=cfg.stage == "full", rows_only=cfg.stage == "rows"
        )
        if tensors is None:
            return
        adapter, trainable, optimizer_state = tensors
        resume_state = {
            "trainable": trainable,
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "step": step,
            "torch_rng": torch.get_rng_state(),
        }
        meta = checkpoint_meta(cfg, method, token_ids, identity, step, run_id)
        write_checkpoint(out, meta, adapter, log, resume_state, replaces=replaces)

    stream = batches(blocks, cfg.batch_size, cfg.seed, accelerator.process_index, accelerator.num_processes)
    for _ in range(step * cfg.grad_accum):  # fast-forward the data order on resume
        next(stream)
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {method.name}", disable=not accelerator.is_main_process)
    t0 = time.perf_counter()
    while step < cfg.steps:
        for _ in range(cfg.grad_accum):
            epoch, batch = next(stream)
            layouts = [block_layout(method, cfg, b, token_ids, cfg.seed + 7919 * epoch + i) for i, b in batch]
            with accelerator.accumulate(model):
                loss, parts = objective_loss(model, layouts, cfg, accelerator)
                accelerator.backward(loss)
                if cfg.max_grad_norm and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
        scheduler.step()  # once per optimizer step, whatever the accumulation and the number of processes
        step += 1
        loss_value = parts["loss"]
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss became {loss_value} at step {step}; lower --lr")
        bar.update()
        bar.set_postfix(loss=f"{loss_value:.3f}")
        if step % cfg.log_every == 0 or step == cfg.steps:
            kept = sum(lay.kept_slots() for lay in layouts) / sum(lay.n_text for lay in layouts)
            log.append(
                {
                    "step": step,
                    "epoch": epoch,
                    **{k: round(v, 5) for k, v in parts.items()},
                    "lr": float(f"{scheduler.get_last_lr()[0]:.6g}"),
                    "kv_kept": round(kept, 4),
                    "elapsed_s": round(time.perf_counter() - t0, 1),
                }
            )
        if step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0):
            save()
    bar.close()
    accelerator.wait_for_everyone()
    return out


# Settings a resumed run may change: how long it runs and how often it saves or logs.
RESUMABLE_CHANGES = ("steps", "save_every", "log_every", "out")


def check_resumable(cfg: TrainConfig, previous: dict, out: Path) -> None:
    """Refuse to continue the run in ``out`` with settings that contradict it (one line naming both values)."""
    stored = asdict(config_from_meta(previous))
    stored["lora"] = previous["lora"]
    now = asdict(cfg)
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
    return json.dumps(asdict(cfg), indent=2)
