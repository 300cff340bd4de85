"""FSDP (PyTorch's FSDP2, set up through Accelerate): what training needs beyond DDP.

Under FSDP each of N processes holds 1/N of every parameter (a DTensor sharded on dim 0), of its gradient and
of its AdamW state; a block's weights are all-gathered just before its forward and backward and freed after.
What that changes for us, and how:
- the EMA is sharded exactly like the model, so timm's ModelEmaV3 update stays a local lerp of the shards;
- a checkpoint gathers the model and EMA weights to full tensors (model.safetensors stays the one format that
  eval.py, init_from and resuming read) and writes the optimizer state sharded with torch.distributed.checkpoint
  (DCP): every process writes its own shard, and DCP reshards when a run resumes with another process count;
- plotting the learned rationals needs their full coefficients: `unsharded` gathers them for a moment.
The training engine sees these differences through one object, `Replicated` (DDP or one process) or `Sharded`
(FSDP), chosen once when the run is built (`strategy`).
Accelerate enables FSDP on GPUs only, so CPU tests exercise these functions on models sharded by fully_shard
directly, over gloo (tests/test_fsdp.py); the end-to-end run is in docs/DISTRIBUTED.md.
"""

from contextlib import contextmanager, nullcontext
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
from torch.distributed.tensor import DTensor

from kat.training.checkpoint import OPTIMIZER_SHARDS, begin_checkpoint, checkpoint_tmp_dir


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


def strategy(fsdp: bool) -> "Replicated":
    return Sharded() if fsdp else Replicated()


class Replicated:
    """DDP (or one process): every process holds the whole model and optimizer; rank 0 writes them.

    The one place where DDP and FSDP training differ; `Sharded` overrides what FSDP does otherwise.
    """

    sharded = False

    def accelerate_plugin(self):
        return None

    def before_prepare(self, accelerator, model: torch.nn.Module) -> None:
        """Called on the plain model before accelerator.prepare."""

    def fused_adam(self, device: torch.device) -> bool:
        # torch's fused AdamW kernels on CUDA: timm's default foreach step costs host time per step, which
        # under CUDA graphs is step time (docs/BENCHMARKS.md section 3); on CPU foreach keeps tested numerics.
        return device.type == "cuda"

    def after_prepare(self, raw_model: torch.nn.Module, ema_module: torch.nn.Module | None) -> None:
        """Called once the model is prepared, with the EMA's module (or None)."""

    def forward_context(self, accelerator):
        """prepare() already put the model's forward in autocast."""
        return nullcontext()

    def full_norm(self, grad_norm: torch.Tensor) -> torch.Tensor:
        return grad_norm

    def gathered(self, model: torch.nn.Module):
        """The model's full parameters for the duration (plots)."""
        return nullcontext(model)

    def weights(self, module: torch.nn.Module, is_main: bool) -> dict | None:
        """The full state dict on the main process (None elsewhere); collective under FSDP."""
        return module.state_dict() if is_main else None

    def load_weights(self, module: torch.nn.Module, state_dict: dict) -> None:
        module.load_state_dict(state_dict)

    def save_optimizer(self, accelerator, run_dir: Path, step: int, raw_model, optimizer):
        """(temp checkpoint dir already holding the optimizer or None, optimizer state for training_state)."""
        return None, optimizer.state_dict() if accelerator.is_main_process else None

    def load_optimizer(self, checkpoint_dir: Path, state: dict, raw_model, optimizer) -> None:
        optimizer.load_state_dict(state["optimizer"])


class Sharded(Replicated):
    """FSDP2: each process holds 1/N of the parameters, gradients and optimizer state (the module docstring)."""

    sharded = True

    def accelerate_plugin(self):
        return fsdp_plugin()

    def before_prepare(self, accelerator, model: torch.nn.Module) -> None:
        wrap_blocks_of(accelerator.state.fsdp_plugin, model)

    def fused_adam(self, device: torch.device) -> bool:
        return False  # sharded DTensor parameters

    def after_prepare(self, raw_model: torch.nn.Module, ema_module: torch.nn.Module | None) -> None:
        if ema_module is not None:
            shard_like(ema_module, raw_model)

    def forward_context(self, accelerator):
        # Accelerate leaves casting to FSDP's mixed-precision policy, which we keep at fp32 (fsdp_plugin says why)
        return accelerator.autocast()

    def full_norm(self, grad_norm: torch.Tensor) -> torch.Tensor:
        return grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm

    def gathered(self, model: torch.nn.Module):
        return unsharded(model)

    def weights(self, module: torch.nn.Module, is_main: bool) -> dict | None:
        return full_state_dict(module)

    def load_weights(self, module: torch.nn.Module, state_dict: dict) -> None:
        load_full_state_dict(module, state_dict)  # every process reads the full weights, keeps its shard

    def save_optimizer(self, accelerator, run_dir: Path, step: int, raw_model, optimizer):
        tmp = checkpoint_tmp_dir(run_dir, step)
        if accelerator.is_main_process:
            begin_checkpoint(run_dir, step)
        accelerator.wait_for_everyone()
        save_optimizer_shards(raw_model, optimizer.optimizer, tmp / OPTIMIZER_SHARDS)
        return tmp, None

    def load_optimizer(self, checkpoint_dir: Path, state: dict, raw_model, optimizer) -> None:
        load_optimizer_shards(raw_model, optimizer.optimizer, checkpoint_dir / OPTIMIZER_SHARDS)
