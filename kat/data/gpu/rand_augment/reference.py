"""RandAugment's ops as batched tensor ops on any device, with PIL's arithmetic: the path off CUDA, and the
reference that the tests compare with timm's ops on PIL, and the kernels (kat.data.gpu.rand_augment.kernels)
with."""

import functools

import torch
import torch.nn.functional as F

from kat.data.gpu.rand_augment.arguments import TRUNCATE_SLACK, LayerArguments
from kat.data.gpu.rand_augment.policy import Kind

_FAMILIES = (
    (Kind.LUT, Kind.AUTOCONTRAST, Kind.EQUALIZE),
    (Kind.COLOR, Kind.CONTRAST, Kind.BRIGHTNESS, Kind.SHARPNESS),
    (Kind.AFFINE,),
)
L24 = (19595, 38470, 7471)  # PIL's RGB -> L: (R * 19595 + G * 38470 + B * 7471 + 0x8000) >> 16


def apply_tensor_ops(
    images: torch.Tensor, layers: list[LayerArguments], fill: tuple, interpolation: str
) -> torch.Tensor:
    """The layers on uint8 [B, 3, H, W] images (out of place): per layer, the images grouped by the family of
    their op, each family one batched computation (never a Python loop over images)."""
    geometric = functools.partial(_geometric, fill=fill, interpolation=interpolation)
    out = images.clone()
    for arguments in layers:
        for family, apply in zip(_FAMILIES, (_lut, _enhance, geometric)):
            rows = torch.isin(arguments.kind, torch.tensor(family)).nonzero().squeeze(1)
            if len(rows) == 0:
                continue
            index = rows.to(out.device, non_blocking=True)
            result = apply(out.index_select(0, index), LayerArguments(*(a[rows] for a in arguments)))
            out.index_copy_(0, index, result)
    return out


def _lut(images: torch.Tensor, arguments: LayerArguments) -> torch.Tensor:
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


def _enhance(images: torch.Tensor, arguments: LayerArguments) -> torch.Tensor:
    """PIL's ImageEnhance: blend(degenerate, image, factor) = degenerate + factor * (image - degenerate),
    in float32, truncated to uint8 (clipped first when extrapolating)."""
    device = images.device
    x = images.float()
    degenerate = torch.zeros_like(x)  # Brightness' degenerate: black
    kinds = set(arguments.kind.tolist())
    if Kind.COLOR in kinds or Kind.CONTRAST in kinds:
        weights = torch.tensor(L24, dtype=torch.int32, device=device).view(1, 3, 1, 1)
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


def _geometric(
    images: torch.Tensor, arguments: LayerArguments, fill: tuple, interpolation: str
) -> torch.Tensor:
    """PIL's Image.transform(AFFINE) with per-image matrices (output pixel centre -> input point)."""
    matrix = arguments.matrix.to(images.device, non_blocking=True)
    return _affine(images, matrix, fill, interpolation)


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


def _affine(images: torch.Tensor, matrix: torch.Tensor, fill: tuple, interpolation: str) -> torch.Tensor:
    """Sample each image at its matrix's input points as PIL's bilinear/bicubic affine filters do (on CUDA the
    layer kernel does the same arithmetic: kat.data.gpu.rand_augment.kernels._affine_pixels).

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
    sampled = sampled.add_(TRUNCATE_SLACK).clamp_(0, 255).to(torch.uint8)
    return torch.where(inside[:, None], sampled, fill)


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
