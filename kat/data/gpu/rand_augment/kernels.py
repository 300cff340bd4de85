"""Triton kernels of RandAugment and their launcher (`apply_kernels`: kat.data.gpu.rand_augment's path for
CUDA tensors).

Per layer one kernel in which a program applies one image's op to a block of its pixels, branching on the op's
kind: its lookup table, a blend with a degenerate image (grayscale, its mean, black, the SMOOTH filter), the
affine warp (Rotate, Shear, Translate: input point in float64, tap weights cast to float32, float32 sums, as
reference._affine), or a copy. Images whose op needs statistics get them first from two small kernels
(histograms and grayscale sums with integer atomics, then AutoContrast's and Equalize's tables). The same
arithmetic as the tensor ops (kat.data.gpu.rand_augment.reference), which equal PIL's
(tests/test_rand_augment.py), in one pass over the batch per layer instead of one per tensor op.
"""

import torch
import triton
import triton.language as tl

from kat.data.gpu.rand_augment.arguments import TRUNCATE_SLACK, LayerArguments
from kat.data.gpu.rand_augment.policy import Kind
from kat.triton_utils import cdiv, device_guard

_APPLY_BLOCK = 256  # output pixels per program of the layer kernel
_STATS_BLOCK = 1024  # pixels per program of the statistics kernel


@triton.jit
def _affine_pixels(src, dst, matrix, fill_r, fill_g, fill_b, pixel, valid, height, width, slack, BICUBIC: tl.constexpr,
                   BLOCK: tl.constexpr):  # fmt: skip
    """PIL's affine transform of one image (src, dst: its uint8 [3, H, W]; matrix: its 6 float64 entries) at
    output pixels `pixel`: output (x, y) samples the input at matrix @ (x + 0.5, y + 0.5, 1); outside
    [0, W) x [0, H) it is the fill; else the taps around point - 0.5, clamped to the image, weighted by the
    bilinear or bicubic (a = -1) kernel, the sum truncated (after `slack`) to uint8."""
    x = (pixel % width).to(tl.float64) + 0.5
    y = (pixel // width).to(tl.float64) + 0.5
    px = tl.load(matrix + 0) * x + tl.load(matrix + 1) * y + tl.load(matrix + 2)
    py = tl.load(matrix + 3) * x + tl.load(matrix + 4) * y + tl.load(matrix + 5)
    inside = (px >= 0) & (px < width) & (py >= 0) & (py < height)
    px, py = px - 0.5, py - 0.5
    bx, by = tl.floor(px), tl.floor(py)
    dx, dy = px - bx, py - by
    bx, by = bx.to(tl.int32), by.to(tl.int32)
    plane = height * width
    for c in tl.static_range(3):
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for ty in tl.static_range(4 if BICUBIC else 2):
            wy = _affine_weight(dy, ty, BICUBIC)
            row = tl.minimum(tl.maximum(by + (ty - 1 if BICUBIC else ty), 0), height - 1)  # taps -1..2 or 0..1
            for tx in tl.static_range(4 if BICUBIC else 2):
                wx = _affine_weight(dx, tx, BICUBIC)
                col = tl.minimum(tl.maximum(bx + (tx - 1 if BICUBIC else tx), 0), width - 1)
                value = tl.load(src + c * plane + row * width + col, mask=valid & inside, other=0)
                acc += value.to(tl.float32) * (wy * wx)
        sampled = tl.minimum(tl.maximum(acc + slack, 0.0), 255.0).to(tl.uint8)  # truncation, as PIL
        fill = fill_r if c == 0 else (fill_g if c == 1 else fill_b)
        tl.store(dst + c * plane + pixel, tl.where(inside, sampled, fill), mask=valid)


@triton.jit
def _affine_weight(d, tap: tl.constexpr, BICUBIC: tl.constexpr):
    """Kernel weight (float64 polynomial in the fraction d, cast to float32) of tap `tap`: bilinear taps 0, 1;
    bicubic (a = -1, PIL's Geometry.c) taps -1, 0, 1, 2 at indices 0..3."""
    if BICUBIC:
        if tap == 0:
            w = -d + 2 * d * d - d * d * d
        elif tap == 1:
            w = 1 - 2 * d * d + d * d * d
        elif tap == 2:
            w = d + d * d - d * d * d
        else:
            w = -d * d + d * d * d
    else:
        if tap == 0:
            w = 1 - d
        else:
            w = d
    return w.to(tl.float32)


# RandAugment's per-image arguments (arguments.LayerArguments.packed): [B, ARGS] float64 rows of (op kind,
# enhance factor, affine matrix [6]); per-image statistics [B, STATS] int64: the three channels' histograms,
# then the grayscale's sum.
ARGS = tl.constexpr(8)
STATS = tl.constexpr(3 * 256 + 1)
_LUT = tl.constexpr(int(Kind.LUT))
_AUTOCONTRAST = tl.constexpr(int(Kind.AUTOCONTRAST))
_EQUALIZE = tl.constexpr(int(Kind.EQUALIZE))
_COLOR = tl.constexpr(int(Kind.COLOR))
_CONTRAST = tl.constexpr(int(Kind.CONTRAST))
_SHARPNESS = tl.constexpr(int(Kind.SHARPNESS))
_AFFINE = tl.constexpr(int(Kind.AFFINE))


@triton.jit
def _load_rgb(image, plane, pixel, valid):
    """One image's three channels (uint8 planes `plane` apart) at `pixel`, as int32; 0 where not valid."""
    r = tl.load(image + pixel, mask=valid, other=0).to(tl.int32)
    g = tl.load(image + plane + pixel, mask=valid, other=0).to(tl.int32)
    b = tl.load(image + 2 * plane + pixel, mask=valid, other=0).to(tl.int32)
    return r, g, b


@triton.jit
def _gray(r, g, b):
    """PIL's RGB -> L in its 16-bit fixed point (int32 in, int32 out)."""
    return (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16


@triton.jit
def _rand_augment_stats_kernel(images_ptr, args_ptr, stats_ptr, plane, BLOCK: tl.constexpr):
    """For each image whose op needs them, over a block of its pixels: the channels' histograms (AutoContrast,
    Equalize) or its grayscale's sum (Contrast), added into stats (zeroed) with integer atomics, whose sums
    are the same in any order."""
    b = tl.program_id(1)
    kind = tl.load(args_ptr + b * ARGS).to(tl.int32)
    pixel = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = pixel < plane
    image = images_ptr + b.to(tl.int64) * 3 * plane
    stats = stats_ptr + b * STATS
    if (kind == _AUTOCONTRAST) | (kind == _EQUALIZE):
        bins = tl.arange(0, 256)
        masked = BLOCK - tl.sum(valid.to(tl.int32), axis=0)
        for c in tl.static_range(3):
            value = tl.load(image + c * plane + pixel, mask=valid, other=0).to(tl.int32)
            histogram = tl.histogram(value, 256) - tl.where(bins == 0, masked, 0)  # masked pixels read as 0
            tl.atomic_add(stats + c * 256 + bins, histogram.to(tl.int64))
    if kind == _CONTRAST:
        r, g, bl = _load_rgb(image, plane, pixel, valid)
        gray = tl.where(valid, _gray(r, g, bl), 0)
        tl.atomic_add(stats + 3 * 256, tl.sum(gray.to(tl.int64), axis=0))


@triton.jit
def _histogram_lut_kernel(args_ptr, stats_ptr, luts_ptr):
    """AutoContrast's and Equalize's tables, uint8 [B, 3, 256], from the histograms: PIL's ImageOps arithmetic,
    as reference._autocontrast_luts and _equalize_luts compute it (launched without fused multiply-adds)."""
    b, c = tl.program_id(0), tl.program_id(1)
    kind = tl.load(args_ptr + b * ARGS).to(tl.int32)
    ramp = tl.arange(0, 256)
    out = luts_ptr + (b * 3 + c) * 256 + ramp
    if (kind == _AUTOCONTRAST) | (kind == _EQUALIZE):
        histogram = tl.load(stats_ptr + b * STATS + c * 256 + ramp)
        present = histogram > 0
        high = tl.max(tl.where(present, ramp, -1), axis=0)  # the last non-empty bin
        if kind == _AUTOCONTRAST:  # stretch [low, high] to [0, 255]; identity when one value
            low = tl.min(tl.where(present, ramp, 256), axis=0)
            scale = 255.0 / tl.maximum(high - low, 1).to(tl.float64)
            stretched = ramp.to(tl.float64) * scale + (-low).to(tl.float64) * scale
            stretched = tl.minimum(tl.maximum(stretched.to(tl.int32), 0), 255)  # truncated, then clipped
            tl.store(out, tl.where(high > low, stretched, ramp).to(tl.uint8))
        else:  # Equalize: steps from the histogram less its last non-empty bin
            last = tl.sum(tl.where(ramp == high, histogram, 0), axis=0)
            step = (tl.sum(histogram, axis=0) - last) // 255
            equalized = (step // 2 + tl.cumsum(histogram, axis=0) - histogram) // tl.maximum(step, 1)
            usable = (tl.sum(present.to(tl.int32), axis=0) > 1) & (step > 0)
            tl.store(out, tl.where(usable, tl.minimum(equalized, 255), ramp).to(tl.uint8))


@triton.jit
def _blend_store(dst, x, degenerate, factor, valid):
    """PIL's ImageEnhance blend, degenerate + factor * (x - degenerate) in float32 (each step rounded), clipped
    and truncated to uint8."""
    x = x.to(tl.float32)
    blended = degenerate + factor * (x - degenerate)
    tl.store(dst, tl.minimum(tl.maximum(blended, 0.0), 255.0).to(tl.uint8), mask=valid)


@triton.jit
def _smooth(channel, pixel, valid, height, width):
    """PIL's ImageFilter.SMOOTH at `pixel` of one channel: ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] sum + 6.5) / 13,
    floored; the image's border keeps its value. The sums are exact integers in float32, and the quotient is
    at least 1/26 from an integer, so any rounding of the division floors to PIL's value."""
    y, x = pixel // width, pixel % width
    interior = valid & (y > 0) & (y < height - 1) & (x > 0) & (x < width - 1)
    centre = tl.load(channel + pixel, mask=valid, other=0).to(tl.float32)
    total = 4.0 * centre
    for dy in tl.static_range(-1, 2):
        for dx in tl.static_range(-1, 2):
            total += tl.load(channel + pixel + dy * width + dx, mask=interior, other=0).to(tl.float32)
    return tl.where(interior, tl.floor((total + 6.5) / 13.0), centre)


@triton.jit
def _rand_augment_kernel(
    src_ptr, dst_ptr, args_ptr, luts_ptr, histogram_luts_ptr, stats_ptr, height, width, slack, fill_r, fill_g,
    fill_b, BICUBIC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One RandAugment layer: each image's own op on a block of its pixels, src -> dst (uint8 [B, 3, H, W]).
    The op kinds, with PIL's arithmetic as the tensor ops (reference) compute it: a lookup table
    (per image, or per channel from the histograms), a blend with a degenerate image (Color, Contrast,
    Brightness, Sharpness), the affine warp, or none (a copy)."""
    b = tl.program_id(1)
    args = args_ptr + b * ARGS
    kind = tl.load(args).to(tl.int32)
    plane = height * width
    pixel = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = pixel < plane
    src = src_ptr + b.to(tl.int64) * 3 * plane
    dst = dst_ptr + b.to(tl.int64) * 3 * plane
    if kind == _AFFINE:
        _affine_pixels(src, dst, args + 2, fill_r, fill_g, fill_b, pixel, valid, height, width, slack, BICUBIC, BLOCK)
    elif kind >= _COLOR:
        factor = tl.load(args + 1).to(tl.float32)
        if kind == _SHARPNESS:
            for c in tl.static_range(3):
                x = tl.load(src + c * plane + pixel, mask=valid, other=0)
                degenerate = _smooth(src + c * plane, pixel, valid, height, width)
                _blend_store(dst + c * plane + pixel, x, degenerate, factor, valid)
        else:
            r, g, bl = _load_rgb(src, plane, pixel, valid)
            if kind == _COLOR:  # the grayscale image
                degenerate = _gray(r, g, bl).to(tl.float32)
            elif kind == _CONTRAST:  # the grayscale's mean, PIL's int(mean + 0.5)
                total, count = tl.load(stats_ptr + b * STATS + 3 * 256), plane.to(tl.int64)
                degenerate = tl.zeros((BLOCK,), tl.float32) + ((2 * total + count) // (2 * count)).to(tl.float32)
            else:  # Brightness: black
                degenerate = tl.zeros((BLOCK,), tl.float32)
            _blend_store(dst + pixel, r, degenerate, factor, valid)
            _blend_store(dst + plane + pixel, g, degenerate, factor, valid)
            _blend_store(dst + 2 * plane + pixel, bl, degenerate, factor, valid)
    elif kind >= _LUT:
        for c in tl.static_range(3):
            value = tl.load(src + c * plane + pixel, mask=valid, other=0).to(tl.int32)
            if kind == _LUT:
                table = luts_ptr + b * 256
            else:
                table = histogram_luts_ptr + (b * 3 + c) * 256
            tl.store(dst + c * plane + pixel, tl.load(table + value, mask=valid, other=0), mask=valid)
    else:
        for c in tl.static_range(3):
            tl.store(dst + c * plane + pixel, tl.load(src + c * plane + pixel, mask=valid, other=0), mask=valid)


def apply_kernels(
    images: torch.Tensor, layers: list[LayerArguments], fill: tuple, interpolation: str
) -> torch.Tensor:
    """The layers on uint8 [B, 3, H, W] images with these kernels: per layer one pass over the batch (each
    image its own op, out of place), plus, when an image's op needs them, one over its pixels for the
    histograms or grayscale sum and one small kernel for the histogram tables; a fraction of the tensor ops'
    host time on CUDA (docs/BENCHMARKS.md section 4). The arguments of all layers travel in two host-to-device
    copies, from pinned memory."""
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
                stats = torch.zeros(n, STATS.value, dtype=torch.int64, device=device)
                grid = (cdiv(h * w, _STATS_BLOCK), n)
                _rand_augment_stats_kernel[grid](out, args, stats, h * w, BLOCK=_STATS_BLOCK)
            if kinds & {Kind.AUTOCONTRAST, Kind.EQUALIZE}:
                histogram_luts = torch.empty(n, 3, 256, dtype=torch.uint8, device=device)
                _histogram_lut_kernel[(n, 3)](args, stats, histogram_luts, enable_fp_fusion=False)
            src, out = out, torch.empty_like(out)
            _rand_augment_kernel[(cdiv(h * w, _APPLY_BLOCK), n)](
                src, out, args, lut, histogram_luts, stats, h, w, TRUNCATE_SLACK, *fill,
                BICUBIC=interpolation == "bicubic", BLOCK=_APPLY_BLOCK, enable_fp_fusion=False,  # as the CPU: no FMA
            )  # fmt: skip
    return out if out is not images else images.clone()
