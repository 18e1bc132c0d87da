"""The training recipe: data -> model + adapters -> loop -> checkpoint. Meant to be read top to bottom.

    kvcondense train --method sentinel --ratio 0.5 --steps 300 --out checkpoints/sentinel-r0.5

The base model is frozen; LoRA and the method's new token rows are trained with the causal LM loss under the
method's mask (one parallel masked forward per batch). Runs on Hugging Face Accelerate, so the same recipe
runs on one CPU or under ``accelerate launch``. The settings are :class:`~kvcondense.train_config.TrainConfig`;
the losses (LM, KL to the frozen teacher, or both) are in :mod:`kvcondense.objectives`.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from pathlib import Path

import torch
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
from .data.episodes import UNCUT_SOURCES, is_episode_data, load_episodes
from .distributed import check_distributed, checkpoint_tensors, is_main_process, load_resume
from .errors import UsageError
from .lora import attach_lora, load_adapter_state, set_stage
from .methods import Method, build_method
from .models import add_special_tokens, load_model, model_identity

# the settings and the objectives live in train_config.py and objectives.py; callers import them from here too
from .objectives import lm_loss as lm_loss
from .objectives import objective_loss
from .trackers import check_trackers, tracker_config
from .train_config import OBJECTIVES as OBJECTIVES
from .train_config import RESUMABLE_CHANGES as RESUMABLE_CHANGES
from .train_config import TrainConfig, check_resumable, checkpoint_meta
from .train_config import config_from_checkpoint as config_from_checkpoint
from .train_config import config_from_meta as config_from_meta
from .train_config import dump_config as dump_config
from .train_config import read_config as read_config
from .train_data import batches, block_layout, episode_items, episode_prompts
from .train_data import text_blocks as text_blocks

logger = logging.getLogger(__name__)


def attention_switches(method: Method) -> str:
    """What of ``method``'s parallel forward lives in kvcondense's forward-time switches (a token-gated LoRA, slots
    merged inside attention, per-head expiry), which a checkpointed layer's recompute in the backward would miss;
    empty when nothing does."""
    spec = method.scoring()
    parts = [
        "its LoRA is gated by token kind" if method.lora_on else "",
        "its slots are merged inside attention" if method.name == "ccm-merge" else "",
        "it expires keys per head" if spec is not None and spec.per_head else "",
    ]
    return ", ".join(p for p in parts if p)


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
    if cfg.grad_checkpointing and (switches := attention_switches(method)):
        raise UsageError(
            f"--grad-checkpointing cannot train {method.name} ({switches}): the backward recomputes each layer after "
            "kvcondense's attention switches are undone, so it would run another forward; train without it"
        )
    episodic = is_episode_data(cfg.data)
    if episodic and not method.reads_episodes() and not method.compresses_at_prompt_end():
        raise UsageError(
            f"--data {cfg.data} holds online episodes, which the ccm methods and the methods that compress at the "
            f"prompt's end (scored, scored-heads) train on, not {cfg.method}"
        )
    if not episodic and not cfg.continuation_tokens and method.compresses_at_prompt_end():
        raise UsageError(
            f"{cfg.method} frees nothing until a block has been read whole, so a loss on the block itself never sees "
            "the compression: give --continuation-tokens N (the last N tokens read what the method kept)"
        )
    if cfg.sample_chunks:
        if not episodic:
            raise UsageError(f"--sample-chunks cuts online episodes; --data {cfg.data} is text (give an episode set)")
        if not method.reads_episodes():
            raise UsageError(
                f"--sample-chunks cuts the online episodes of a memory (ccm-*); {cfg.method} reads an episode as one "
                "prompt"
            )
        if cfg.data in UNCUT_SOURCES:
            raise UsageError(
                f"--sample-chunks would cut facts that {cfg.data}'s answers state; train on --data recall to cut "
                "episodes"
            )
    if episodic and cfg.continuation_tokens:
        raise UsageError("--continuation-tokens splits text blocks; an episode already ends in its query and answer")
    resumable = resume and (out / META).is_file()
    previous = read_meta(out) if (out / META).is_file() else None
    if resumable:
        check_resumable(cfg, previous, out)
    check_trackers(cfg.report_to)
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
        log_with=cfg.report_to or None,
        project_dir=out / "trackers",
    )
    check_distributed(accelerator)
    if cfg.report_to:
        accelerator.init_trackers(out.name, config=tracker_config(cfg))
    model, tokenizer, token_ids, identity = prepare_model(cfg, method)

    if episodic:  # online episodes (ccm), or each episode's chunks as one prompt, its query and answer after it
        pack = episode_items if method.reads_episodes() else episode_prompts
        blocks = pack(docs, tokenizer, cfg.block_tokens)
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
        if bad := [name for name, t in adapter.items() if t.is_floating_point() and not bool(t.isfinite().all())]:
            raise UsageError(f"training diverged: {bad[0]} holds NaN or inf after step {step} (not saved); lower --lr")
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
            layouts = [block_layout(model, method, cfg, b, token_ids, cfg.seed + 7919 * epoch + i) for i, b in batch]
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
            raise UsageError(f"training diverged: the loss became {loss_value} at step {step}; lower --lr")
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
            ratio = method.params().get("ratio")
            if len(log) == 1 and kept > 0.999 and ratio and accelerator.is_main_process:
                logger.warning(
                    f"step {step} compressed nothing (KV kept {kept:.3f}, {method.name} at ratio {ratio}): "
                    f"give longer --block-tokens than {cfg.block_tokens}"
                )
            if cfg.report_to:
                accelerator.log({k: v for k, v in log[-1].items() if k != "step"}, step=step)
        if step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0):
            save()
    bar.close()
    accelerator.wait_for_everyone()
    if cfg.report_to:
        accelerator.end_training()
    return out
