"""Triton kernels of the device augmentation (device_augment: true on CUDA).

Crop + resize + flip (kat.data.resized_crop's fast path): PIL's separable resize of each image's crop, read
straight from the decoded images where they lie (a table of their addresses: no padding, no copies). Pillow
rounds to uint8 between its two passes, and Pillow 13 runs the vertical one first for some images
(kat.data.resized_crop.pil_runs_vertical_first); each image takes the installed Pillow's order here too.
  first pass:  a grid of (row blocks, images, channels); horizontal first: BLOCK_R rows of the crop resampled
               to the output width; vertical first: BLOCK_R output rows, resampled from the crop's columns (in
               chunks of BLOCK_W). Stored as uint8 in a packed buffer, image b's [3, rows, width] block at
               its offset;
  second pass: a grid of (output-row blocks, images, channels); the other axis, then the columns of flipped
               images mirrored, stored as uint8 [B, 3, out_h, out_w].
Each output pixel weighs the source pixels its filter covers with PIL's own arithmetic, computed on the fly:
float64 weights in PIL's expressions and order, normalised, rounded to 22-bit fixed point, integer sums
(Resample.c's 8-bit path). The pixels equal PIL's (tests/test_resized_crop.py); the kernels are launched
without fused multiply-adds, which PIL's x86-64 build does not use either.

RandAugment (kat.data.rand_augment's CUDA path, `apply_kernels`): per layer one kernel in which a program
applies one image's op to a block of its pixels, branching on the op's kind: its lookup table, a blend with a
degenerate image (grayscale, its mean, black, the SMOOTH filter), the affine warp (Rotate, Shear, Translate:
input point in float64, tap weights cast to float32, float32 sums, as rand_augment._affine), or a copy. Images
whose op needs statistics get them first from two small kernels (histograms and grayscale sums with integer
atomics, then AutoContrast's and Equalize's tables). The same arithmetic as the tensor ops, which equal PIL's
(tests/test_rand_augment.py), in one pass over the batch per layer instead of one per tensor op.
"""

import triton
import triton.language as tl

from kat.data.rand_augment import Kind

try:  # triton >= 3.0
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # pragma: no cover
    InterpretedFunction = ()

BLOCK_R = 8  # rows per program (both passes)
# per-image int32 metadata [B, META]: source height, width, crop top, left, height, width, offset of the
# image's block in the first pass' buffer, flip, vertical first
META = 9


@triton.jit
def _pil_filter(x, BICUBIC: tl.constexpr):
    """PIL's kernels (float64, its expressions): bicubic with a = -0.5 (support 2), bilinear = triangle."""
    x = tl.abs(x)
    if BICUBIC:
        near = (1.5 * x - 2.5) * x * x + 1.0
        far = (((x - 5.0) * x + 8.0) * x - 4.0) * -0.5
        return tl.where(x < 1.0, near, tl.where(x < 2.0, far, 0.0))
    else:
        return tl.where(x < 1.0, 1.0 - x, 0.0)


@triton.jit
def _window(out_index, in_size, out_size, SUPPORT: tl.constexpr):
    """PIL's precompute_coeffs for output pixels `out_index`: (centre, first source pixel, end, 1 / filter
    scale, taps), in float64 as PIL computes them."""
    scale = in_size.to(tl.float64) / out_size
    filter_scale = tl.maximum(scale, 1.0)  # > 1 when shrinking: the filter widens (antialiasing)
    support = SUPPORT * filter_scale
    centre = (out_index.to(tl.float64) + 0.5) * scale
    first = tl.maximum((centre - support + 0.5).to(tl.int32), 0)  # C's (int): truncation
    end = tl.minimum((centre + support + 0.5).to(tl.int32), in_size)
    taps = 2 * tl.ceil(support).to(tl.int32) + 1  # PIL's ksize: >= end - first for every output pixel
    return centre, first, end, 1.0 / filter_scale, taps


@triton.jit
def _weight(k, centre, end, inverse_scale, BICUBIC: tl.constexpr):
    """Unnormalised float64 weight of source pixel k (0 outside the window)."""
    return tl.where(k < end, _pil_filter((k.to(tl.float64) - centre + 0.5) * inverse_scale, BICUBIC), 0.0)


@triton.jit
def _fixed_point(weight, total):
    """PIL's normalised coefficient in 22-bit fixed point (normalize_coeffs_8bpc: rounded away from zero)."""
    scaled = weight / total * 4194304.0
    return tl.where(scaled < 0, scaled - 0.5, scaled + 0.5).to(tl.int32)


@triton.jit
def _clip8(acc):
    """PIL's clip8: the fixed-point sum (started at one half) shifted down and clipped to 0..255."""
    return tl.minimum(tl.maximum(acc >> 22, 0), 255).to(tl.uint8)


@triton.jit
def _resample_rows(row_start, row_ok, in_size, out_size, SUPPORT: tl.constexpr, BICUBIC: tl.constexpr,
                   BLOCK_W: tl.constexpr):  # fmt: skip
    """Horizontal pass: rows (pointers to their first pixel, [BLOCK_R]) of in_size pixels -> [BLOCK_R, BLOCK_W]
    uint8, columns >= out_size unused."""
    ox = tl.arange(0, BLOCK_W)
    col_ok = ox < out_size
    centre, first, end, inverse_scale, taps = _window(ox, in_size, out_size, SUPPORT)
    total = tl.zeros((BLOCK_W,), dtype=tl.float64)
    for t in range(0, taps):  # PIL's normaliser: the weights' sum, in its order
        total += _weight(first + t, centre, end, inverse_scale, BICUBIC)
    total = tl.where(col_ok, total, 1.0)
    acc = tl.full((row_start.shape[0], BLOCK_W), 1 << 21, dtype=tl.int32)
    for t in range(0, taps):
        k = first + t  # [BLOCK_W] source column
        weight = _fixed_point(_weight(k, centre, end, inverse_scale, BICUBIC), total)
        pixels = tl.load(row_start[:, None] + k[None, :], mask=row_ok[:, None] & (col_ok & (k < end))[None, :],
                         other=0)  # fmt: skip
        acc += pixels.to(tl.int32) * weight[None, :]
    return _clip8(acc)


@triton.jit
def _resample_columns(src, row_stride, columns, col_ok, oy, in_size, out_size, SUPPORT: tl.constexpr,
                      BICUBIC: tl.constexpr):  # fmt: skip
    """Vertical pass: output rows oy [BLOCK_R] of columns [BLOCK_W] from in_size source rows (src: first row,
    row_stride apart) -> [BLOCK_R, BLOCK_W] uint8."""
    row_ok = oy < out_size
    centre, first, end, inverse_scale, taps = _window(oy, in_size, out_size, SUPPORT)
    total = tl.zeros((oy.shape[0],), dtype=tl.float64)
    for t in range(0, taps):
        total += _weight(first + t, centre, end, inverse_scale, BICUBIC)
    total = tl.where(row_ok, total, 1.0)
    acc = tl.full((oy.shape[0], columns.shape[0]), 1 << 21, dtype=tl.int32)
    for t in range(0, taps):
        k = first + t  # [BLOCK_R] source row
        weight = _fixed_point(_weight(k, centre, end, inverse_scale, BICUBIC), total)
        pointers = src + k.to(tl.int64)[:, None] * row_stride + columns[None, :]
        pixels = tl.load(pointers, mask=(row_ok & (k < end))[:, None] & col_ok[None, :], other=0)
        acc += pixels.to(tl.int32) * weight[:, None]
    return _clip8(acc)


@triton.jit
def _first_pass_kernel(
    images_ptr, meta_ptr, buffer_ptr, out_h, out_w,
    SUPPORT: tl.constexpr, BICUBIC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr, META: tl.constexpr,
):  # fmt: skip
    b, c = tl.program_id(1), tl.program_id(2)
    meta = meta_ptr + b * META
    height, width = tl.load(meta + 0), tl.load(meta + 1)
    crop_h, crop_w, offset = tl.load(meta + 4), tl.load(meta + 5), tl.load(meta + 6).to(tl.int64)
    image = tl.load(images_ptr + b).to(tl.pointer_type(tl.uint8))  # image b: uint8 [3, height, width]
    crop = image + c * height * width + tl.load(meta + 2).to(tl.int64) * width + tl.load(meta + 3)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    if tl.load(meta + 8) == 0:  # horizontal first: crop rows r -> [3, crop_h, out_w] block
        row_ok = r < crop_h
        out = _resample_rows(crop + r.to(tl.int64) * width, row_ok, crop_w, out_w, SUPPORT, BICUBIC, BLOCK_W)
        ox = tl.arange(0, BLOCK_W)
        dst = buffer_ptr + offset + (c * crop_h + r).to(tl.int64)[:, None] * out_w + ox[None, :]
        tl.store(dst, out, mask=row_ok[:, None] & (ox < out_w)[None, :])
    else:  # vertical first: output rows r from the crop's columns -> [3, out_h, crop_w] block
        for col0 in range(0, crop_w, BLOCK_W):
            columns = col0 + tl.arange(0, BLOCK_W)
            col_ok = columns < crop_w
            out = _resample_columns(crop, width, columns, col_ok, r, crop_h, out_h, SUPPORT, BICUBIC)
            dst = buffer_ptr + offset + (c * out_h + r).to(tl.int64)[:, None] * crop_w + columns[None, :]
            tl.store(dst, out, mask=(r < out_h)[:, None] & col_ok[None, :])


@triton.jit
def _second_pass_kernel(
    buffer_ptr, meta_ptr, out_ptr, out_h, out_w,
    SUPPORT: tl.constexpr, BICUBIC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr, META: tl.constexpr,
):  # fmt: skip
    b, c = tl.program_id(1), tl.program_id(2)
    meta = meta_ptr + b * META
    crop_h, crop_w, offset = tl.load(meta + 4), tl.load(meta + 5), tl.load(meta + 6).to(tl.int64)
    oy = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ox = tl.arange(0, BLOCK_W)
    row_ok, col_ok = oy < out_h, ox < out_w
    if tl.load(meta + 8) == 0:  # horizontal first: now the vertical pass over [crop_h, out_w]
        block = buffer_ptr + offset + c.to(tl.int64) * crop_h * out_w
        out = _resample_columns(block, out_w, ox, col_ok, oy, crop_h, out_h, SUPPORT, BICUBIC)
    else:  # vertical first: now the horizontal pass over [out_h, crop_w]
        block = buffer_ptr + offset + c.to(tl.int64) * out_h * crop_w
        out = _resample_rows(block + oy.to(tl.int64) * crop_w, row_ok, crop_w, out_w, SUPPORT, BICUBIC, BLOCK_W)
    column = tl.where(tl.load(meta + 7) != 0, out_w - 1 - ox, ox)  # flip
    plane = ((b * 3 + c) * out_h + oy).to(tl.int64) * out_w  # [BLOCK_R]
    tl.store(out_ptr + plane[:, None] + column[None, :], out, mask=row_ok[:, None] & col_ok[None, :])


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


# RandAugment's per-image arguments (rand_augment.LayerArguments.packed): [B, ARGS] float64 rows of (op kind,
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
    as rand_augment._autocontrast_luts and _equalize_luts compute it (launched without fused multiply-adds)."""
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
    The op kinds, with PIL's arithmetic as kat.data.rand_augment's torch version computes it: a lookup table
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


INTERPRETED = isinstance(_first_pass_kernel, InterpretedFunction)
