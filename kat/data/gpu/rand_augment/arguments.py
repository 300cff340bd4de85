"""RandAugment's draws as per-image op arguments (host, numpy): op kind, blend factor, affine matrix, lookup
table, with timm's level_to_arg arithmetic. Both implementations (kat.data.gpu.rand_augment.reference and
.kernels) apply these."""

import math
from typing import NamedTuple

import numpy as np
import torch

from kat.data.gpu.rand_augment.policy import LEVEL_DENOM, Kind

# Geometric ops weigh their taps in float32 and truncate the value plus this, so that exact values which
# float32 puts just below an integer are not truncated a level down (PIL weighs in float64).
TRUNCATE_SLACK = 1e-3


class LayerArguments(NamedTuple):
    """One layer's ops as per-image arguments, computed on the host from the draws: kind [B] int64, factor [B]
    float32 (blends), matrix [B, 6] float64 (affine: output pixel centre -> input point), lut [B, 256] uint8
    (Kind.LUT's table)."""

    kind: torch.Tensor
    factor: torch.Tensor
    matrix: torch.Tensor
    lut: torch.Tensor

    def packed(self) -> torch.Tensor:
        """float64 [B, 8]: kind, factor, matrix (the kernels' argument rows; float32 factors are exact)."""
        return torch.cat([self.kind[:, None].double(), self.factor[:, None].double(), self.matrix], 1)


def layer_arguments(
    draws: torch.Tensor,
    ops: tuple[str, ...],
    kinds: np.ndarray,
    translate_pct: float,
    height: int,
    width: int,
) -> LayerArguments:
    """One layer's draws [B, 3] (op, magnitude, sign; float64 on the host) as per-image op arguments for
    images of height x width, with timm's level_to_arg arithmetic in float64, as Python computes it;
    `kinds`: the Kind of op index + 1 (at 0: the skipped op -1's). In numpy, not torch ops: a CPU torch op's
    dispatch costs far more host time than numpy's on these small arrays."""
    draws = draws.numpy()
    op, level, sign = draws[:, 0].astype(np.int64), draws[:, 1], draws[:, 2]
    frac = level / LEVEL_DENOM
    n = len(op)
    kind = kinds[op + 1]
    factor = np.ones(n)
    matrix = np.tile(np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]), (n, 1))
    lut = np.tile(np.arange(256), (n, 1))
    for k in np.unique(op[op >= 0]).tolist():
        name, rows, op_kind = ops[k], op == k, kinds[k + 1]
        f, s = frac[rows], sign[rows]
        if op_kind == Kind.LUT:
            lut[rows] = pointwise_lut(name, f[:, None])
        elif Kind.COLOR <= op_kind <= Kind.SHARPNESS:  # PIL's ImageEnhance factor
            factor[rows] = np.maximum(1.0 + s * (f * 0.9), 0.1) if name.endswith("Increasing") else f * 1.8 + 0.1
        elif name == "Rotate":
            matrix[rows] = [rotation(degrees, width, height) for degrees in (f * 30.0 * s).tolist()]
        elif name in ("ShearX", "ShearY"):
            matrix[rows, 1 if name == "ShearX" else 3] = f * 0.3 * s
        elif name in ("TranslateXRel", "TranslateYRel"):  # a fraction of the width / height, in pixels
            horizontal = name == "TranslateXRel"
            matrix[rows, 2 if horizontal else 5] = f * translate_pct * s * (width if horizontal else height)
    return LayerArguments(
        torch.from_numpy(kind),
        torch.from_numpy(factor.astype(np.float32)),
        torch.from_numpy(matrix),
        torch.from_numpy(lut.astype(np.uint8)),
    )


def pointwise_lut(name: str, frac: np.ndarray) -> np.ndarray:
    """[n, 256] tables of the ops that do not look at the image, from frac = level / 10 [n, 1] (timm's
    level_to_arg)."""
    ramp = np.arange(256)
    if name == "Invert":
        return np.broadcast_to(255 - ramp, (len(frac), 256))
    if name.startswith("Posterize"):  # keep `bits` high bits; timm leaves the image as is from 8 bits
        bits = np.trunc(frac * 4)
        if name == "PosterizeIncreasing":
            bits = 4 - bits
        shift = np.clip(8 - bits, 0, 8).astype(np.int64)
        return ramp >> shift << shift
    if name == "SolarizeAdd":  # add to the pixels below 128, saturating
        add = np.minimum(np.trunc(frac * 110), 128).astype(np.int64)
        return np.where(ramp < 128, np.minimum(ramp + add, 255), ramp)
    threshold = np.minimum(np.trunc(frac * 256), 256)  # Solarize: invert the pixels >= threshold
    if name == "SolarizeIncreasing":
        threshold = 256 - threshold
    return np.where(ramp < threshold, ramp, 255 - ramp)


def rotation(degrees: float, w: int, h: int) -> list[float]:
    """PIL's Image.rotate(degrees) matrix about the image centre, with its arithmetic (Python floats: cos and
    sin rounded to 15 decimals)."""
    angle = -math.radians(degrees % 360.0)
    cos, sin = round(math.cos(angle), 15), round(math.sin(angle), 15)
    cx, cy = w / 2, h / 2
    return [cos, sin, cos * -cx + sin * -cy + 0.0 + cx, -sin, cos, -sin * -cx + cos * -cy + 0.0 + cy]
