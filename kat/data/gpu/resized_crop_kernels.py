"""Triton kernels of RandomResizedCrop's crop + resize + flip, and their launcher (kat.data.gpu.resized_crop's
path for CUDA tensors).

PIL's separable resize of each image's crop, read straight from the decoded images where they lie (a table of
their addresses: no padding, no copies). Pillow rounds to uint8 between its two passes, and Pillow 13 runs the
vertical one first for some images (kat.data.gpu.resized_crop.pil_runs_vertical_first); each image takes the
installed Pillow's order here too.
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
"""

import torch
import triton
import triton.language as tl

from kat.triton_utils import cdiv, device_guard

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


def resized_crops_triton(images, boxes, flips, size, interpolation, vertical_first) -> torch.Tensor:
    """uint8 [B, 3, *size] from the CUDA images (uint8 [3, H, W] each) and the CPU tensors boxes [B, 4] (top,
    left, height, width), flips [B] and vertical_first [B] (each image's order of the passes); two launches.
    The host work per batch is a table of addresses and one small metadata copy (docs/BENCHMARKS.md
    section 4)."""
    out_h, out_w = size
    device = images[0].device
    crop_h, crop_w = boxes[:, 2], boxes[:, 3]
    first_rows = torch.where(vertical_first, out_h, crop_h)  # rows of the first pass' output
    sizes = 3 * first_rows * torch.where(vertical_first, crop_w, out_w)  # its [3, rows, width] block
    buffer_bytes = int(sizes.sum())
    if buffer_bytes >= 2**31:  # the kernels' int32 offsets
        raise ValueError(f"crops of {buffer_bytes} bytes after the first pass in one batch; use smaller batches")
    meta = torch.stack(  # [B, META]: the kernels' per-image metadata
        [torch.tensor([image.shape[1] for image in images]), torch.tensor([image.shape[2] for image in images]),
         boxes[:, 0], boxes[:, 1], crop_h, crop_w, torch.cumsum(sizes, 0) - sizes, flips.long(),
         vertical_first.long()], dim=1,
    ).to(device=device, dtype=torch.int32, non_blocking=True)  # fmt: skip
    # The kernels read image b at its address: contiguous uint8 [3, H, W], alive until they have run (the
    # list holds them; the caching allocator orders their reuse after this stream's kernels).
    images = [image.contiguous() for image in images]
    addresses = torch.tensor([image.data_ptr() for image in images], dtype=torch.int64).to(device, non_blocking=True)
    buffer = torch.empty(buffer_bytes, dtype=torch.uint8, device=device)
    batch = torch.empty(len(images), 3, out_h, out_w, dtype=torch.uint8, device=device)
    constants = {
        "SUPPORT": 2.0 if interpolation == "bicubic" else 1.0,
        "BICUBIC": interpolation == "bicubic",
        "BLOCK_R": BLOCK_R,
        "BLOCK_W": triton.next_power_of_2(out_w),
        "META": META,
        "enable_fp_fusion": False,  # PIL's float64 weights to the last bit: no fused multiply-adds
    }
    with device_guard(device):
        grid = (cdiv(int(first_rows.max()), BLOCK_R), len(images), 3)
        _first_pass_kernel[grid](addresses, meta, buffer, out_h, out_w, **constants)
        grid = (cdiv(out_h, BLOCK_R), len(images), 3)
        _second_pass_kernel[grid](buffer, meta, batch, out_h, out_w, **constants)
    return batch
