"""EMA of the weights: timm's ModelEmaV3 with its per-update tensor lists built once.

timm's `apply_update_` (1.0.15 through 1.0.31) rebuilds the lists of (EMA, model) tensors from two
`state_dict()` calls at every update, milliseconds of Python per step for KAT-S/ViT-S, which under CUDA graphs
is a large part of the step (docs/BENCHMARKS.md section 3). The model's tensors are updated in place and never
replaced (optimizer steps, checkpoint loading and FSDP sharding before training all keep them), so the lists
are built at the first update and reused: the same foreach lerp on the same tensors, bitwise the same EMA.
"""

import torch
from timm.utils import ModelEmaV3


class ModelEma(ModelEmaV3):
    """ModelEmaV3 whose `apply_update_` (timm's extension point) reuses its tensor lists; the cases where timm
    does more than a plain lerp (another device or dtype, bfloat16 rounding, no foreach) stay timm's own."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # (ema floats, model floats, ema others, model others) from the first update; False: timm's update
        self._tensors = None

    def apply_update_(self, model: torch.nn.Module, decay: float) -> None:
        if self._tensors is None:
            self._tensors = (self.foreach and self._tensor_lists(model)) or False
        if not self._tensors:
            return super().apply_update_(model, decay)
        ema_floats, model_floats, ema_others, model_others = self._tensors
        torch._foreach_lerp_(ema_floats, model_floats, weight=1.0 - decay)
        for ema_v, model_v in zip(ema_others, model_others):
            ema_v.copy_(model_v)

    def _tensor_lists(self, model: torch.nn.Module):
        """The pairs timm's foreach update walks (state_dict order), or None where a pair differs in
        dtype/device or the EMA is bfloat16 (timm may round it stochastically)."""
        lists = ([], [], [], [])
        for ema_v, model_v in zip(self.module.state_dict().values(), model.state_dict().values()):
            if (ema_v.dtype, ema_v.device) != (model_v.dtype, model_v.device) or ema_v.dtype == torch.bfloat16:
                return None
            offset = 0 if ema_v.is_floating_point() else 2
            lists[offset].append(ema_v)
            lists[offset + 1].append(model_v)
        return lists
