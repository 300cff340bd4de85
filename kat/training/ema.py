"""EMA of the weights: timm's ModelEmaV3 with its per-update tensor lists built once.

timm rebuilds the lists of (EMA, model) tensors from two `state_dict()` calls at every update. On the GPU
host that costs 3-6 ms of Python per step for KAT-S/ViT-S (H200, docs/BENCHMARKS.md section 3), which under
CUDA graphs is a fifth of the step. The model's tensors are updated in place and never replaced (optimizer
steps, checkpoint loading and FSDP sharding before training all keep them), so the lists are built at the
first update and reused: the same foreach lerp on the same tensors, bitwise the same EMA.
"""

import torch
from timm.utils import ModelEmaV3


class ModelEma(ModelEmaV3):
    """ModelEmaV3 (foreach, parameters and buffers) with cached tensor lists; other modes are timm's own."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # (ema floats, model floats, ema others, model others) from the first update; False: timm's update
        self._tensors = None

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int | None = None) -> None:
        if not self.foreach or getattr(self, "exclude_buffers", False) or getattr(self, "device", None) is not None:
            return super().update(model, step)
        if self._tensors is None:
            self._tensors = self._tensor_lists(model) or False
        if not self._tensors:  # mixed dtypes or devices, bf16: timm's update handles those
            return super().update(model, step)
        ema_floats, model_floats, ema_others, model_others = self._tensors
        torch._foreach_lerp_(ema_floats, model_floats, weight=1.0 - self.get_decay(step))
        for ema_v, model_v in zip(ema_others, model_others):
            ema_v.copy_(model_v)

    def _tensor_lists(self, model: torch.nn.Module):
        """The pairs timm's foreach update walks (state_dict order), or None where timm does more than a plain
        lerp: a pair that differs in dtype/device, or a bfloat16 EMA (timm may round it stochastically)."""
        lists = ([], [], [], [])
        for ema_v, model_v in zip(self.module.state_dict().values(), model.state_dict().values()):
            if (ema_v.dtype, ema_v.device) != (model_v.dtype, model_v.device) or ema_v.dtype == torch.bfloat16:
                return None
            offset = 0 if ema_v.is_floating_point() else 2
            lists[offset].append(ema_v)
            lists[offset + 1].append(model_v)
        return lists
