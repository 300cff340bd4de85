"""FSDP (PyTorch's FSDP2, set up through Accelerate): what training needs beyond DDP.

Under FSDP each of N processes holds 1/N of every parameter (a DTensor sharded on dim 0), of its gradient and
of its AdamW state; a block's weights are all-gathered just before its forward and backward and freed after.
What that changes for us, and how:
- the EMA is sharded exactly like the model, so timm's ModelEmaV3 update stays a local lerp of the shards;
- a checkpoint gathers the model and EMA weights to full tensors (model.safetensors stays the one format that
  eval.py, init_from and resuming read) and writes the optimizer state sharded with torch.distributed.checkpoint
  (DCP): every process writes its own shard, and DCP reshards when a run resumes with another process count;
- plotting the learned rationals needs their full coefficients: `unsharded` gathers them for a moment.
Accelerate enables FSDP on GPUs only, so CPU tests exercise these functions on models sharded by fully_shard
directly, over gloo (tests/test_fsdp.py); the end-to-end run is in docs/DISTRIBUTED.md.
"""

from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


def fsdp_plugin():
    """Accelerate's FSDP2 plugin as training uses it.

    Parameters stay fp32 and the forward runs under the same bf16 autocast as DDP, and gradients are reduced
    in fp32: the same numerics as DDP. (Accelerate's default for mixed_precision bf16 would cast the weights,
    rational coefficients included, to bf16 and reduce gradients in bf16.) The all-gathers move fp32, twice
    the bytes of bf16, which for KAT-B's 86M parameters is a few ms per step on NVLink. One FSDP unit per
    transformer block: the class names are filled in from the model (`wrap_blocks_of`) before prepare().
    """
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=[],
        reshard_after_forward=True,
        mixed_precision_policy=MixedPrecisionPolicy(),
        cpu_ram_efficient_loading=False,
    )


def wrap_blocks_of(plugin, model: torch.nn.Module) -> None:
    """Make each of the model's transformer blocks (timm's `model.blocks`) an FSDP unit."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, torch.nn.Sequential) or len(blocks) == 0:
        raise ValueError(
            f"fsdp: true shards one unit per transformer block, and {type(model).__name__} has no `blocks` "
            "(timm ViT-style models have); set fsdp: false"
        )
    plugin.transformer_cls_names_to_wrap = sorted({type(block).__name__ for block in blocks})


def shard_like(module: torch.nn.Module, model: torch.nn.Module) -> None:
    """Shard `module` (a copy of `model`, e.g. its EMA) exactly as `model` is: same units, same device mesh."""
    mesh = next(p for p in model.parameters() if hasattr(p, "device_mesh")).device_mesh
    units = [name for name, m in model.named_modules() if isinstance(m, FSDPModule) and name]
    for name in units:  # children before the root, as fully_shard requires
        fully_shard(module.get_submodule(name), mesh=mesh, mp_policy=MixedPrecisionPolicy())
    fully_shard(module, mesh=mesh, mp_policy=MixedPrecisionPolicy())


def full_state_dict(model: torch.nn.Module) -> dict:
    """The full (unsharded) weights on the CPU of global rank 0, {} elsewhere. Every process must call it."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: torch.nn.Module, state_dict: dict) -> None:
    """Load full weights (every process holds them) into a sharded model: each keeps its own shard."""
    set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True, strict=True))


def save_optimizer_shards(model: torch.nn.Module, optimizer, directory: Path) -> None:
    """Every process writes its shard of the optimizer state into `directory` (DCP); collective."""
    dcp.save(get_optimizer_state_dict(model, optimizer), checkpoint_id=directory)


def load_optimizer_shards(model: torch.nn.Module, optimizer, directory: Path) -> None:
    """Read the optimizer state saved by save_optimizer_shards, resharded to this run's processes; collective."""
    state = get_optimizer_state_dict(model, optimizer)  # the layout to fill (creates AdamW's state tensors)
    dcp.load(state, checkpoint_id=directory)
    set_optimizer_state_dict(model, optimizer, state)


@contextmanager
def unsharded(model: torch.nn.Module):
    """All parameters gathered, as plain tensors, for the duration; collective (every process must enter)."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
