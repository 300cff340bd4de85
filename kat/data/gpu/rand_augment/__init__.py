"""timm's RandAugment ('rand-m9-mstd0.5', ...) on uint8 image batches, on any device.

Why: RandAugment on PIL is a large part of a loader worker's per-image cost; as hundreds of small tensor ops
per batch on the GPU its host time bound the device_augment thread, so on CUDA each layer is one Triton
kernel (docs/BENCHMARKS.md section 4). The modules, in the one direction they import each other:
  policy     (host) the config string's parser and `sample()`: runs in a loader worker, once per image, and
             draws what timm's RandAugment draws per image (op, probability skip, magnitude noise, sign) from
             Python's `random`;
  arguments  (host, numpy) a layer's draws as per-image op arguments: op kind, factor, affine matrix, table;
  reference  the tensor ops (any device): the images grouped by the family of their op, each family one
             batched computation; what the tests compare with timm, and the kernels with;
  kernels    (CUDA) the Triton kernels and their launcher: one kernel per layer applies each image's op;
  here       `BatchRandAugment`: the policy, and `__call__(images, params)`, which checks its arguments and
             applies the draws with the kernels on CUDA, with the tensor ops elsewhere.

Ops reproduce PIL's arithmetic (timm applies them with PIL), so outputs equal timm's:
  - lookup-table ops (AutoContrast, Equalize, Invert, Posterize, Solarize, SolarizeAdd): PIL's tables, from
    per-image, per-channel histograms for AutoContrast / Equalize; exact;
  - enhance ops (Color, Contrast, Brightness, Sharpness): PIL's blend with its degenerate image (grayscale
    ITU-R 601 in PIL's 16-bit fixed point, the grayscale's rounded mean, black, the SMOOTH filter with the
    border kept), in float32 and truncated as PIL does; exact;
  - geometric ops (Rotate, ShearX/Y, TranslateX/YRel): PIL's affine transform, i.e. its pixel-centre
    coordinates, its inside test (fill with `img_mean` outside), edge clamping and kernels (bilinear, or
    bicubic with a = -1, which is why this is not grid_sample: its bicubic has a = -0.75). Where we differ:
    PIL interpolates in float64 and truncates; we weight in float32 and truncate the value plus 1e-3, so
    that exact values which float32 puts just below an integer are not truncated a level down. A value that
    PIL puts within 1e-3 below an integer (or just below an exact one, by float64 rounding) comes out one
    level higher: at most 1 level, on under 0.1% (bicubic) to about 1% (bilinear) of the values.
Also different: Posterize to 0 bits (Posterize below magnitude 2.5, PosterizeIncreasing at 10) gives black,
as timm intends and older Pillow did; Pillow 13's ImageOps.posterize raises for bits < 1, so timm's op fails.
Not implemented (the config parser rejects them): timm's weighted op choice ('t' transform sets) and the
'random' interpolation.
"""

from collections.abc import Sequence

import numpy as np
import torch

from kat.data.gpu.rand_augment.arguments import LayerArguments, layer_arguments
from kat.data.gpu.rand_augment.policy import (
    NEGATED,
    RAND_INCREASING_TRANSFORMS,
    RAND_TRANSFORMS,
    Kind,
    RandAugmentPolicy,
    op_kind,
)
from kat.data.gpu.rand_augment.reference import apply_tensor_ops
from kat.triton_utils import HAS_TRITON

if HAS_TRITON:
    from kat.data.gpu.rand_augment.kernels import apply_kernels

__all__ = [
    "NEGATED",
    "RAND_INCREASING_TRANSFORMS",
    "RAND_TRANSFORMS",
    "BatchRandAugment",
    "Kind",
    "LayerArguments",
]


class BatchRandAugment(RandAugmentPolicy):
    """timm's RandAugment ('rand-m9-mstd0.5', ...) applied to uint8 image batches.

    config_str: timm's grammar, 'rand' then '-'-separated m, n, mstd, mmax, inc, p (rand_augment_transform).
    img_mean: the fill (R, G, B) of pixels that geometric ops move in from outside the image.
    interpolation: 'bilinear' or 'bicubic' (timm passes the train interpolation).
    translate_pct: TranslateX/YRel's shift at magnitude 10, as a fraction of the image size.
    """

    def __init__(
        self,
        config_str: str,
        img_mean: Sequence[int],
        interpolation: str = "bicubic",
        translate_pct: float = 0.45,
    ):
        super().__init__(config_str)
        if len(img_mean) != 3 or not all(0 <= v <= 255 for v in img_mean):
            raise ValueError(f"img_mean={tuple(img_mean)!r}: expected 3 values in [0, 255] (R, G, B)")
        if interpolation not in ("bilinear", "bicubic"):
            raise ValueError(
                f"interpolation={interpolation!r}: BatchRandAugment implements 'bilinear' and 'bicubic'"
            )
        self.img_mean = tuple(int(v) for v in img_mean)
        self.interpolation = interpolation
        self.translate_pct = float(translate_pct)
        self._kinds = np.array([Kind.IDENTITY, *map(op_kind, self.ops)])  # by op index + 1 (skipped: -1)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={self.num_layers}, m={self.magnitude}, mstd={self.magnitude_std}, "
            f"mmax={self.magnitude_max}, p={self.prob}, ops={len(self.ops)}, {self.interpolation})"
        )

    def __call__(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Augment uint8 [B, 3, H, W] `images` with `params` [B, num_layers, 3] (rows of sample()).

        The op arguments are computed on the host, so params on the GPU cost one copy to the host (a sync);
        pass them on the CPU to avoid it. On CUDA each layer is one Triton kernel (.kernels), plus two small
        ones when an image needs its histograms or grayscale mean; elsewhere batched tensor ops (.reference).
        """
        host = self._check(images, params)
        layers = [self.arguments(host[:, layer], *images.shape[2:]) for layer in range(self.num_layers)]
        if images.is_cuda and HAS_TRITON:
            return apply_kernels(images, layers, self.img_mean, self.interpolation)
        return apply_tensor_ops(images, layers, self.img_mean, self.interpolation)

    def arguments(self, draws: torch.Tensor, height: int, width: int) -> LayerArguments:
        """One layer's draws [B, 3] (float64, on the host) as per-image op arguments for images of height x
        width (arguments.layer_arguments)."""
        return layer_arguments(draws, self.ops, self._kinds, self.translate_pct, height, width)

    def _check(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """params as float64 on the host, after checking both arguments."""
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
            got = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
            raise TypeError(f"BatchRandAugment expects uint8 images [B, 3, H, W], got {got}")
        if images.dim() != 4 or images.shape[1] != 3 or min(images.shape[2:]) < 3:
            raise ValueError(
                "BatchRandAugment expects uint8 images [B, 3, H, W] (H, W >= 3), got shape "
                f"{tuple(images.shape)}"
            )
        expected = (images.shape[0], self.num_layers, 3)
        if not isinstance(params, torch.Tensor) or tuple(params.shape) != expected:
            got = tuple(params.shape) if isinstance(params, torch.Tensor) else type(params).__name__
            raise ValueError(
                f"params {got} for {images.shape[0]} images: expected a tensor of shape {expected} "
                "(one sample() per image, stacked)"
            )
        host = params.detach().to("cpu", torch.float64)
        ops = host[..., 0]
        if ((ops < -1) | (ops >= len(self.ops)) | (ops != ops.round())).any():
            raise ValueError(
                f"params[..., 0] must be op indices in [-1, {len(self.ops) - 1}] (from sample())"
            )
        return host
