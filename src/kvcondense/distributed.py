"""What training needs to know about the distributed setup: refuse configurations that cannot train our adapters,
and gather / restore the trained tensors when the model is sharded (FSDP).

Data parallel (DDP) needs nothing special: every process holds the whole model. Under FSDP every process holds only
a shard of each tensor, so a checkpoint is gathered collectively (every process calls the gather, the main process
receives the full tensors and writes them), and a resume loads full tensors on every process before re-sharding.
Configs that are documented and tested: ``configs/accelerate/ddp.yaml`` and ``configs/accelerate/fsdp.yaml`` (FSDP1).
FSDP2 (``fsdp_version: 2``) passes the check and goes through the same functions, but is not tested here.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
from accelerate.utils import DistributedType
from peft import get_peft_model_state_dict

from .errors import UsageError
from .lora import adapter_state

if TYPE_CHECKING:
    from accelerate import Accelerator

# FSDP1 (FullyShardedDataParallel) prefixes the names of the parameters of every module it wraps with this
FSDP_PREFIX = "_fsdp_wrapped_module."


def fsdp_requested() -> bool:
    """Whether the launcher asked for FSDP (``accelerate launch`` with an FSDP config sets this variable)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def is_fsdp(accelerator: Accelerator) -> bool:
    """Whether the prepared model is sharded with FSDP (version 1 or 2)."""
    return accelerator.distributed_type == DistributedType.FSDP


def check_distributed(accelerator: Accelerator) -> None:
    """Refuse a distributed setup that cannot train LoRA matrices and new token rows correctly.

    Call right after creating the ``Accelerator``, before the model is prepared.

    Raises:
        ValueError: one line naming the problem and the fix, when FSDP1 is used without ``use_orig_params`` (it
            flattens frozen base weights and trainable LoRA/token rows into one tensor, which needs a single
            ``requires_grad``), or when FSDP was asked for but accelerate fell back to plain DDP (it enables FSDP
            only on GPUs: the sharding the config promises would silently not happen).
    """
    if is_fsdp(accelerator):
        plugin = accelerator.state.fsdp_plugin
        if plugin.fsdp_version == 1 and not plugin.use_orig_params:
            raise UsageError(
                "FSDP without use_orig_params cannot train LoRA and the new token rows next to frozen weights; "
                "set fsdp_use_orig_params: true in the accelerate config (see configs/accelerate/fsdp.yaml)"
            )
    elif fsdp_requested() and accelerator.num_processes > 1:
        raise UsageError(
            f"FSDP was requested but accelerate runs it only on GPUs (this run would be plain "
            f"{accelerator.distributed_type.value} without sharding); use configs/accelerate/ddp.yaml on CPU"
        )


def is_main_process() -> bool:
    """Whether this process is rank 0 of its launch (known from torchrun's environment before Accelerate starts)."""
    return int(os.environ.get("RANK", "0")) == 0


def clean_name(name: str) -> str:
    """A parameter name as the unwrapped model's ``state_dict`` spells it (FSDP1 wrapper prefixes removed)."""
    return name.replace(FSDP_PREFIX, "")


def checkpoint_tensors(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    full: bool = False,
    rows_only: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict] | None:
    """What a checkpoint stores: (adapter tensors as :func:`kvcondense.lora.adapter_state` gives them, full-precision
    trainable tensors and optimizer state for ``--resume``).

    Every process must call it: under FSDP the tensors are gathered from the shards collectively. Returns None on
    every process but the main one, which writes the checkpoint. Without FSDP it is the main process reading its
    own (whole) model, as before.
    """
    if not is_fsdp(accelerator):
        if not accelerator.is_main_process:
            return None
        unwrapped = accelerator.unwrap_model(model)
        trainable = {n: p.detach().clone() for n, p in unwrapped.named_parameters() if p.requires_grad}
        return adapter_state(unwrapped, full=full, rows_only=rows_only), trainable, optimizer.state_dict()
    state, optim_state = gathered_state(accelerator, model), fsdp_optimizer_state(accelerator, model, optimizer)
    if not accelerator.is_main_process:
        return None
    unwrapped = accelerator.unwrap_model(model)
    names = [clean_name(n) for n, p in unwrapped.named_parameters() if p.requires_grad]
    trainable = {n: state[n].detach().clone() for n in names}
    return fsdp_adapter_state(unwrapped, state, full, rows_only), trainable, optim_state


def gathered_state(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict of an FSDP-prepared model, keys as the unwrapped model spells them. A collective: the
    main process gets the full tensors, the others an empty dict."""
    if accelerator.is_fsdp2:
        return accelerator.get_state_dict(model)
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    # accelerate always offloads the gathered tensors to CPU; with the model already on CPU that "offload" frees the
    # storage the state dict still points at (garbage tensors or a segfault, torch 2.13), so offload only from a GPU
    config = FullStateDictConfig(offload_to_cpu=accelerator.device.type != "cpu", rank0_only=True)
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, config):
        return model.state_dict()


def fsdp_adapter_state(
    unwrapped: torch.nn.Module, state: dict[str, torch.Tensor], full: bool, rows_only: bool
) -> dict[str, torch.Tensor]:
    """:func:`kvcondense.lora.adapter_state` (same selection, same cast) from a gathered ``state``, so that FSDP
    shards are never read directly."""
    if not full:
        # peft picks the adapter's entries by walking the modules, whose names carry FSDP1's wrapper prefix inside
        # every wrapped decoder layer; the gathered keys do not, so hand peft the keys under the names it walks
        walked = {clean_name(n): n for n, _ in [*unwrapped.named_parameters(), *unwrapped.named_buffers()]}
        state = {walked.get(k, k): v for k, v in state.items()}
        picked = get_peft_model_state_dict(unwrapped, state_dict=state, save_embedding_layers=False)
        state = {clean_name(k): v for k, v in picked.items()}
    if rows_only:
        state = {k: v for k, v in state.items() if "lora_" not in k}
    return {k: v.detach().to(torch.bfloat16).contiguous() for k, v in state.items()}


def fsdp_optimizer_state(accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state of an FSDP-prepared model gathered to full tensors keyed by parameter name (a
    collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    # offloading from CPU frees storage still in use here too (silently wrong Adam moments after a resume)
    options = StateDictOptions(full_state_dict=True, cpu_offload=accelerator.device.type != "cpu")
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_resume(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainable: dict[str, torch.Tensor],
    optim_state: dict,
) -> None:
    """Restore the trainable tensors and optimizer state of :func:`checkpoint_tensors`. Every process calls it (under
    FSDP each process loads the full tensors and keeps its shard)."""
    saved_by_name = any(isinstance(k, str) for k in optim_state.get("state", {}))  # FSDP saves them by name
    if saved_by_name != is_fsdp(accelerator):
        saved, now = ("with", "without") if saved_by_name else ("without", "with")
        raise UsageError(f"this checkpoint was saved {saved} FSDP and is resumed {now}; resume with the same launch")
    if not is_fsdp(accelerator):
        accelerator.unwrap_model(model).load_state_dict(trainable, strict=False)
        optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, trainable, options=options)
    set_optimizer_state_dict(model, optimizer, optim_state, options=options)
