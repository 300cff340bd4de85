"""timm's RandAugment ('rand-m9-mstd0.5', ...) on uint8 image batches, on any device.

Why: RandAugment on PIL is a large part of a loader worker's per-image cost. On the GPU as tensor ops, a batch
of 128 took 5-8 ms of host time (hundreds of small tensor ops, most of them on host tensors), which bound the
device_augment thread; on CUDA each layer is now one Triton kernel (kat.data.kernels,
`apply_kernels`): 1.4 ms (docs/BENCHMARKS.md section 4).
The policy is split in two so that the random draws stay where timm makes them:
  - `sample()` runs in a loader worker, once per image, and draws what timm's RandAugment draws per image
    (op, probability skip, magnitude noise, sign) from Python's `random`;
  - `__call__(images, params)` applies those draws to a batch: per layer, the draws become per-image op
    arguments on the host (`arguments`: op kind, factor, affine matrix, lookup table), then either one kernel
    applies each image's op (CUDA), or the images are grouped by the family of their op and each family is
    one batched computation of tensor ops (elsewhere; never a Python loop over images). The tensor ops are
    the reference that the tests compare with timm, and the kernels with them.

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

import enum
import functools
import math
import random
import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from kat.triton_utils import HAS_TRITON

_LEVEL_DENOM = 10.0  # timm: magnitude 10 is an op's full strength

RAND_TRANSFORMS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
RAND_INCREASING_TRANSFORMS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
# Ops whose argument timm negates with probability 1/2 (its _randomly_negate).
NEGATED = {
    "Rotate",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
}


class Kind(enum.IntEnum):
    """What an image's op does, per layer: the torch version batches each family (LUT..EQUALIZE,
    COLOR..SHARPNESS, AFFINE) into one computation; the CUDA kernel branches on it per image."""

    IDENTITY = 0  # the layer skipped this image
    LUT = 1  # a table of the op's argument: Invert, Posterize, Solarize, SolarizeAdd
    AUTOCONTRAST = 2  # tables from the image's histograms
    EQUALIZE = 3
    COLOR = 4  # blends with a degenerate image
    CONTRAST = 5
    BRIGHTNESS = 6
    SHARPNESS = 7
    AFFINE = 8  # Rotate, ShearX/Y, TranslateX/YRel


def _kind(name: str) -> Kind:
    """The kind of an op of RAND_TRANSFORMS / RAND_INCREASING_TRANSFORMS."""
    if name in ("AutoContrast", "Equalize"):
        return Kind[name.upper()]
    if name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"):
        return Kind.AFFINE
    base = name.removesuffix("Increasing")
    if base in ("Color", "Contrast", "Brightness", "Sharpness"):
        return Kind[base.upper()]
    return Kind.LUT


_FAMILIES = (
    (Kind.LUT, Kind.AUTOCONTRAST, Kind.EQUALIZE),
    (Kind.COLOR, Kind.CONTRAST, Kind.BRIGHTNESS, Kind.SHARPNESS),
    (Kind.AFFINE,),
)


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


# Config keys: name -> (parser, description). Longest first: 'mstd' and 'mmax' also start with 'm'.
_KEYS = {
    "mstd": (float, "mstd<float> magnitude std (0: fixed; inf or > 100: uniform in [0, m])"),
    "mmax": (int, "mmax<int> magnitude max (default 10)"),
    "inc": (int, "inc<0|1> the increasing op set"),
    "m": (int, "m<int> magnitude"),
    "n": (int, "n<int> ops per image"),
    "p": (float, "p<float> probability of each op"),
}
_L24 = (19595, 38470, 7471)  # PIL's RGB -> L: (R * 19595 + G * 38470 + B * 7471 + 0x8000) >> 16
_TRUNCATE_SLACK = 1e-3


class BatchRandAugment:
    """timm's RandAugment ('rand-m9-mstd0.5', ...) applied to uint8 image batches with tensor ops.

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
        settings = _parse_config(config_str)
        self.magnitude = settings.get("m", 10)
        self.num_layers = settings.get("n", 2)
        self.prob = settings.get("p", 0.5)
        std = settings.get("mstd", 0.0)
        self.magnitude_std = math.inf if std > 100 else std
        self.magnitude_max = settings.get("mmax", 0) or _LEVEL_DENOM  # timm: mmax0 means the default
        self.ops = RAND_INCREASING_TRANSFORMS if settings.get("inc", 0) else RAND_TRANSFORMS
        if len(img_mean) != 3 or not all(0 <= v <= 255 for v in img_mean):
            raise ValueError(f"img_mean={tuple(img_mean)!r}: expected 3 values in [0, 255] (R, G, B)")
        if interpolation not in ("bilinear", "bicubic"):
            raise ValueError(
                f"interpolation={interpolation!r}: BatchRandAugment implements 'bilinear' and 'bicubic'"
            )
        self.img_mean = tuple(int(v) for v in img_mean)
        self.interpolation = interpolation
        self.translate_pct = float(translate_pct)
        self._kinds = np.array([Kind.IDENTITY] + [_kind(name) for name in self.ops])  # by op index + 1 (skip: -1)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={self.num_layers}, m={self.magnitude}, mstd={self.magnitude_std}, "
            f"mmax={self.magnitude_max}, p={self.prob}, ops={len(self.ops)}, {self.interpolation})"
        )

    def sample(self) -> torch.Tensor:
        """One image's draws, float32 [num_layers, 3]: (op index or -1 when skipped, magnitude, sign).

        timm's draws per op: the probability skip, then the magnitude noise, then (for NEGATED ops) the sign.
        timm picks the ops with numpy; here Python's `random` draws everything (same distribution).
        """
        rows = []
        for _ in range(self.num_layers):
            op = random.randrange(len(self.ops))
            if self.prob < 1.0 and random.random() > self.prob:
                rows.append((-1.0, 0.0, 1.0))
                continue
            magnitude = self.magnitude
            if self.magnitude_std == math.inf:
                magnitude = random.uniform(0, magnitude)
            elif self.magnitude_std > 0:
                magnitude = random.gauss(magnitude, self.magnitude_std)
            magnitude = max(0.0, min(magnitude, self.magnitude_max))
            sign = -1.0 if self.ops[op] in NEGATED and random.random() > 0.5 else 1.0
            rows.append((float(op), magnitude, sign))
        return torch.tensor(rows, dtype=torch.float32).view(self.num_layers, 3)

    def __call__(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Augment uint8 [B, 3, H, W] `images` with `params` [B, num_layers, 3] (rows of sample()).

        The op arguments are computed on the host, so params on the GPU cost one copy to the host (a sync);
        pass them on the CPU to avoid it. On CUDA each layer is one Triton kernel (kat.data.kernels), plus two
        small ones when an image needs its histograms or grayscale mean; elsewhere batched tensor ops.
        """
        host = self._check(images, params)
        layers = [self.arguments(host[:, layer], *images.shape[2:]) for layer in range(self.num_layers)]
        if images.is_cuda and HAS_TRITON:
            return apply_kernels(images, layers, self.img_mean, self.interpolation)
        out = images.clone()
        for arguments in layers:
            for family, apply in zip(_FAMILIES, (self._lut, self._enhance, self._geometric)):
                rows = torch.isin(arguments.kind, torch.tensor(family)).nonzero().squeeze(1)
                if len(rows) == 0:
                    continue
                index = rows.to(out.device, non_blocking=True)
                result = apply(out.index_select(0, index), LayerArguments(*(a[rows] for a in arguments)))
                out.index_copy_(0, index, result)
        return out

    def arguments(self, draws: torch.Tensor, height: int, width: int) -> LayerArguments:
        """One layer's draws [B, 3] (op, magnitude, sign; float64 on the host) as per-image op arguments for
        images of height x width, with timm's level_to_arg arithmetic in float64, as Python computes it. In
        numpy: as torch ops on the CPU this took ~3 ms per batch of 128, a third of the augmentation's host time."""
        draws = draws.numpy()
        op, level, sign = draws[:, 0].astype(np.int64), draws[:, 1], draws[:, 2]
        frac = level / _LEVEL_DENOM
        n = len(op)
        kind = self._kinds[op + 1]
        factor = np.ones(n)
        matrix = np.tile(np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]), (n, 1))
        lut = np.tile(np.arange(256), (n, 1))
        for k in np.unique(op[op >= 0]).tolist():
            name, rows, op_kind = self.ops[k], op == k, self._kinds[k + 1]
            f, s = frac[rows], sign[rows]
            if op_kind == Kind.LUT:
                lut[rows] = _pointwise_lut(name, f[:, None])
            elif Kind.COLOR <= op_kind <= Kind.SHARPNESS:  # PIL's ImageEnhance factor
                factor[rows] = np.maximum(1.0 + s * (f * 0.9), 0.1) if name.endswith("Increasing") else f * 1.8 + 0.1
            elif name == "Rotate":
                matrix[rows] = [_rotation(degrees, width, height) for degrees in (f * 30.0 * s).tolist()]
            elif name in ("ShearX", "ShearY"):
                matrix[rows, 1 if name == "ShearX" else 3] = f * 0.3 * s
            elif name in ("TranslateXRel", "TranslateYRel"):  # a fraction of the width / height, in pixels
                horizontal = name == "TranslateXRel"
                matrix[rows, 2 if horizontal else 5] = f * self.translate_pct * s * (width if horizontal else height)
        return LayerArguments(
            torch.from_numpy(kind),
            torch.from_numpy(factor.astype(np.float32)),
            torch.from_numpy(matrix),
            torch.from_numpy(lut.astype(np.uint8)),
        )

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

    def _lut(self, images, arguments: LayerArguments) -> torch.Tensor:
        """Lookup-table ops: the tables of the op's argument, and AutoContrast's and Equalize's from each
        image's histograms (on the device)."""
        device = images.device
        lut = arguments.lut.to(device, non_blocking=True)[:, None].expand(-1, 3, -1)
        kind = arguments.kind
        if (kind == Kind.AUTOCONTRAST).any() or (kind == Kind.EQUALIZE).any():
            histogram = _histograms(images)
            for k, tables in ((Kind.AUTOCONTRAST, _autocontrast_luts), (Kind.EQUALIZE, _equalize_luts)):
                if (kind == k).any():
                    rows = (kind == k).to(device, non_blocking=True).view(-1, 1, 1)
                    lut = torch.where(rows, tables(histogram), lut)
        n, c, h, w = images.shape
        return lut.gather(2, images.reshape(n, c, h * w).long()).view(n, c, h, w)

    def _enhance(self, images, arguments: LayerArguments) -> torch.Tensor:
        """PIL's ImageEnhance: blend(degenerate, image, factor) = degenerate + factor * (image - degenerate),
        in float32, truncated to uint8 (clipped first when extrapolating)."""
        device = images.device
        x = images.float()
        degenerate = torch.zeros_like(x)  # Brightness' degenerate: black
        kinds = set(arguments.kind.tolist())
        if Kind.COLOR in kinds or Kind.CONTRAST in kinds:
            weights = torch.tensor(_L24, dtype=torch.int32, device=device).view(1, 3, 1, 1)
            gray = ((images.int() * weights).sum(1, keepdim=True) + 0x8000) >> 16
        for kind in kinds:
            if kind == Kind.COLOR:
                value = gray.float()
            elif kind == Kind.CONTRAST:  # PIL: int(mean + 0.5) of the grayscale
                total, count = gray.sum((2, 3), keepdim=True), gray.shape[2] * gray.shape[3]
                value = torch.div(2 * total + count, 2 * count, rounding_mode="floor").float()
            elif kind == Kind.SHARPNESS:
                value = _smooth(x)
            else:
                continue
            rows = (arguments.kind == kind).to(device, non_blocking=True).view(-1, 1, 1, 1)
            degenerate = torch.where(rows, value, degenerate)
        factor = arguments.factor.to(device, non_blocking=True).view(-1, 1, 1, 1)
        # PIL's operation order, each step rounded to float32
        blended = degenerate + factor * (x - degenerate)
        return blended.clamp_(0, 255).to(torch.uint8)

    def _geometric(self, images, arguments: LayerArguments) -> torch.Tensor:
        """PIL's Image.transform(AFFINE) with per-image matrices (output pixel centre -> input point)."""
        matrix = arguments.matrix.to(images.device, non_blocking=True)
        return _affine(images, matrix, self.img_mean, self.interpolation)


def _parse_config(config_str: str) -> dict:
    """timm's rand_augment_transform grammar -> {key: value}; a ValueError for anything it does not cover."""
    sections = config_str.split("-")
    if sections[0] != "rand":
        raise ValueError(
            f"RandAugment config {config_str!r} must start with 'rand' (e.g. 'rand-m9-mstd0.5'); timm's "
            "other policies (AutoAugment, AugMix) are not implemented"
        )
    supported = "; ".join(description for _, description in _KEYS.values())
    settings = {}
    for section in sections[1:]:
        key = next((k for k in _KEYS if section.startswith(k)), None)
        if key is None:
            name = "t" if section.startswith("t") else re.match(r"[a-z]*", section)[0] or section
            raise ValueError(
                f"RandAugment config {config_str!r}: unsupported key {name!r} (section {section!r}); "
                f"supported keys: {supported}. timm's 't' transform sets (weighted choice) are not "
                "implemented"
            )
        parse, description = _KEYS[key]
        try:
            value = parse(section[len(key) :])
        except ValueError:
            raise ValueError(
                f"RandAugment config {config_str!r}: section {section!r} has no valid value; "
                f"expected {description}"
            ) from None
        if key in settings:
            raise ValueError(f"RandAugment config {config_str!r}: key {key!r} appears twice")
        if (key in ("n", "mmax") and value < 0) or (key == "inc" and value not in (0, 1)):
            raise ValueError(
                f"RandAugment config {config_str!r}: section {section!r}; expected {description}"
            )
        settings[key] = value
    return settings


def _pointwise_lut(name: str, frac: np.ndarray) -> np.ndarray:
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


def _histograms(images: torch.Tensor) -> torch.Tensor:
    """Per-image, per-channel histograms, int64 [n, 3, 256] (one scatter_add over an index offset by 256 per
    channel: bincount would sync on CUDA)."""
    n = images.shape[0]
    device = images.device
    index = images.reshape(n * 3, -1).long() + torch.arange(0, n * 3 * 256, 256, device=device)[:, None]
    ones = torch.ones(1, dtype=torch.long, device=device).expand(index.numel())
    histogram = torch.zeros(n * 3 * 256, dtype=torch.long, device=device).scatter_add_(0, index.view(-1), ones)
    return histogram.view(n, 3, 256)


def _autocontrast_luts(histogram: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.autocontrast tables, uint8 [n, 3, 256]: [low, high] stretched to [0, 255]; identity when
    the channel has one value."""
    ramp = torch.arange(256, device=histogram.device)
    present = histogram > 0
    high = torch.where(present, ramp, -1).amax(-1, keepdim=True)  # the last non-empty bin
    low = torch.where(present, ramp, 256).amin(-1, keepdim=True)
    span = (high - low).clamp(min=1).double()
    # not 255.0 / span, which torch computes as 255 * (1 / span), an ulp away from Python's quotient
    scale = torch.full_like(span, 255.0) / span
    table = (ramp * scale + (-low * scale)).trunc().clamp(0, 255)
    return torch.where(high > low, table, ramp).to(torch.uint8)


def _equalize_luts(histogram: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.equalize tables, uint8 [n, 3, 256]: steps from the histogram less its last non-empty bin."""
    ramp = torch.arange(256, device=histogram.device)
    present = histogram > 0
    high = torch.where(present, ramp, -1).amax(-1, keepdim=True)
    step = (histogram.sum(-1, keepdim=True) - histogram.gather(-1, high)) // 255
    table = (step // 2 + histogram.cumsum(-1) - histogram) // step.clamp(min=1)
    usable = (present.sum(-1, keepdim=True) > 1) & (step > 0)
    return torch.where(usable, table.clamp(max=255), ramp).to(torch.uint8)


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL's ImageFilter.SMOOTH ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, + 0.5, truncated), border kept.

    The exact value (S + 6.5) / 13 of an integer sum S is at least 1/26 from an integer, so the float32
    convolution floors to PIL's result whatever its rounding.
    """
    kernel = torch.ones(3, 1, 3, 3, dtype=x.dtype, device=x.device)
    kernel[:, :, 1, 1] = 5.0
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = ((F.conv2d(x, kernel, groups=3) + 6.5) / 13).floor_()
    return out


def _rotation(degrees: float, w: int, h: int) -> list[float]:
    """PIL's Image.rotate(degrees) matrix about the image centre, with its arithmetic (Python floats: cos and
    sin rounded to 15 decimals)."""
    angle = -math.radians(degrees % 360.0)
    cos, sin = round(math.cos(angle), 15), round(math.sin(angle), 15)
    cx, cy = w / 2, h / 2
    return [cos, sin, cos * -cx + sin * -cy + 0.0 + cx, -sin, cos, -sin * -cx + cos * -cy + 0.0 + cy]


def _affine(images: torch.Tensor, matrix: torch.Tensor, fill: tuple, interpolation: str) -> torch.Tensor:
    """Sample each image at its matrix's input points as PIL's bilinear/bicubic affine filters do (on CUDA the
    layer kernel does the same arithmetic: kat.data.kernels._affine_pixels).

    PIL: the input point of output pixel (x, y) is matrix @ (x + 0.5, y + 0.5, 1) (float64 here too); a
    point outside [0, W) x [0, H) gets the fill; else the taps at floor(point - 0.5) + offsets, clamped to the
    image, are weighted by the kernel at point - 0.5 - floor(point - 0.5); the value is truncated to uint8.
    """
    n, c, h, w = images.shape
    centres, size, last, taps, powers, coefficients, fill = _sampling_constants(
        h, w, interpolation, fill, images.device
    )
    rows = matrix.view(n, 1, 1, 2, 3)  # the matrix's x and y rows
    points = (
        rows[..., 0] * centres[..., 0:1] + rows[..., 1] * centres[..., 1:2] + rows[..., 2]
    )  # [n, h, w, 2]
    inside = ((points >= 0) & (points < size)).all(-1)
    points = points - 0.5
    base = points.floor()
    weights = ((points - base).unsqueeze(-1).pow(powers) @ coefficients).float()  # [n, h, w, 2, T]
    index = torch.minimum((base.long().unsqueeze(-1) + taps).clamp_(min=0), last)  # [n, h, w, 2, T]
    flat = (index[..., 1, :, None] * w + index[..., 0, None, :]).view(n, 1, -1).expand(n, c, -1)
    weight = (weights[..., 1, :, None] * weights[..., 0, None, :]).view(n, 1, h * w, -1)
    values = images.reshape(n, c, h * w).gather(2, flat).view(n, c, h * w, -1)
    sampled = (values.float() * weight).sum(-1).view(n, c, h, w)
    sampled = sampled.add_(_TRUNCATE_SLACK).clamp_(0, 255).to(torch.uint8)
    return torch.where(inside[:, None], sampled, fill)


def apply_kernels(images: torch.Tensor, layers: list[LayerArguments], fill: tuple, interpolation: str) -> torch.Tensor:
    """The layers on uint8 [B, 3, H, W] images with kat.data.kernels' RandAugment kernels: per layer one pass
    over the batch (each image its own op, out of place), plus, when an image's op needs them, one over its
    pixels for the histograms or grayscale sum and one small kernel for the histogram tables. The tensor ops
    took 4.7-7.8 ms of host time per batch of 128 on CUDA, this 1.4 ms (docs/BENCHMARKS.md section 4). The
    arguments of all layers travel in two host-to-device copies, from pinned memory."""
    from kat.data import kernels
    from kat.triton_utils import cdiv, device_guard

    n, _, h, w = images.shape
    device = images.device
    arguments = torch.stack([layer.packed() for layer in layers])  # [L, B, 8]
    luts = torch.stack([layer.lut for layer in layers])  # [L, B, 256]
    if device.type == "cuda":  # non_blocking copies from pinned memory: the host does not wait for the stream
        arguments, luts = arguments.pin_memory(), luts.pin_memory()
    arguments = arguments.to(device, non_blocking=True)
    luts = luts.to(device, non_blocking=True)
    out = images.contiguous()
    with device_guard(device):
        for layer, (args, lut) in enumerate(zip(arguments, luts)):
            kinds = set(layers[layer].kind.tolist())
            if kinds == {Kind.IDENTITY}:
                continue
            stats = histogram_luts = lut  # placeholders the kernel does not read when no image needs them
            if kinds & {Kind.AUTOCONTRAST, Kind.EQUALIZE, Kind.CONTRAST}:
                stats = torch.zeros(n, kernels.STATS.value, dtype=torch.int64, device=device)
                grid = (cdiv(h * w, _STATS_BLOCK), n)
                kernels._rand_augment_stats_kernel[grid](out, args, stats, h * w, BLOCK=_STATS_BLOCK)
            if kinds & {Kind.AUTOCONTRAST, Kind.EQUALIZE}:
                histogram_luts = torch.empty(n, 3, 256, dtype=torch.uint8, device=device)
                kernels._histogram_lut_kernel[(n, 3)](args, stats, histogram_luts, enable_fp_fusion=False)
            src, out = out, torch.empty_like(out)
            kernels._rand_augment_kernel[(cdiv(h * w, _APPLY_BLOCK), n)](
                src, out, args, lut, histogram_luts, stats, h, w, _TRUNCATE_SLACK, *fill,
                BICUBIC=interpolation == "bicubic", BLOCK=_APPLY_BLOCK, enable_fp_fusion=False,  # as the CPU: no FMA
            )  # fmt: skip
    return out if out is not images else images.clone()


_APPLY_BLOCK = 256  # output pixels per program of the layer kernel
_STATS_BLOCK = 1024  # pixels per program of the statistics kernel


@functools.lru_cache(maxsize=32)
def _sampling_constants(h: int, w: int, interpolation: str, fill: tuple, device: torch.device):
    """_affine's constants, made once per (size, kernel, fill, device): the output pixel centres [h, w, 2] and
    the image size (x, y) in float64, the last pixel (x, y), the tap offsets, the kernel as powers and
    coefficients [power, tap] (weights = [1, d, d^2, ...] @ coefficients: bilinear, or PIL's bicubic with
    a = -1, Geometry.c's BICUBIC), and the fill [1, 3, 1, 1]."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    centres = torch.stack([xs, ys], -1).double() + 0.5
    size = torch.tensor([w, h], dtype=torch.float64)
    last = torch.tensor([[w - 1], [h - 1]])
    if interpolation == "bilinear":
        taps, coefficients = (0, 1), [[1, 0], [-1, 1]]
    else:
        taps = (-1, 0, 1, 2)
        coefficients = [[0, 1, 0, 0], [-1, 0, 1, 0], [2, -2, 1, -1], [-1, 1, -1, 1]]
    coefficients = torch.tensor(coefficients, dtype=torch.float64)
    constants = (centres, size, last, torch.tensor(taps), torch.arange(len(coefficients)), coefficients)
    fill = torch.tensor(fill, dtype=torch.uint8).view(1, 3, 1, 1)
    return tuple(t.to(device) for t in (*constants, fill))
