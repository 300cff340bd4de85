"""RandomResizedCrop's crop + resize, and the flip, for a batch of differently sized images on the device.

The function is PIL's `image.crop(box).resize(size, BICUBIC | BILINEAR)` (what timm's RandomResizedCrop does),
per image: a separable antialiased resize, one pass rounded to uint8, then the other, in the installed
Pillow's order (`pil_runs_vertical_first`). Two implementations:
  triton: CUDA tensors: kat.data.kernels, two kernel launches per batch that read the decoded
          images in place; the host work per batch is a table of addresses and one small metadata copy (0.6
          ms per batch of 128 on an H200 host, against 7 ms for the torch path: docs/BENCHMARKS.md section 4);
  torch:  other devices: the crops zero-padded into a few canvases and resampled by two batched integer
          matmuls with per-image fixed-point weight matrices. The tests run the kernels on the CPU through the Triton interpreter
          (TRITON_INTERPRET=1) and check both against PIL.
"""

import PIL
import torch

from kat.triton_utils import HAS_TRITON

INTERPOLATIONS = ("bilinear", "bicubic")
_PILLOW_MAJOR = int(PIL.__version__.split(".")[0])


def resized_crops(
    images: list[torch.Tensor], boxes: torch.Tensor, flips: torch.Tensor, size: tuple[int, int], interpolation: str
) -> torch.Tensor:
    """uint8 [B, 3, *size]: image b (uint8 [3, H, W], on the device) cropped to boxes[b] = (top, left, height,
    width), resized, and mirrored left-right where flips[b]; boxes and flips are CPU tensors."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r}: use one of {', '.join(INTERPOLATIONS)}")
    if not len(images) == len(boxes) == len(flips):
        raise ValueError(f"{len(images)} images, {len(boxes)} boxes and {len(flips)} flips: give one of each per image")
    device = images[0].device
    if device.type == "cuda" and HAS_TRITON:
        return _resized_crops_triton(images, boxes, flips, size, interpolation)
    batch = _resized_crops_torch(images, boxes, size, interpolation)
    flip = flips.view(-1, 1, 1, 1).to(device, non_blocking=True)
    return torch.where(flip, batch.flip(-1), batch)


def _resized_crops_triton(images, boxes, flips, size, interpolation) -> torch.Tensor:
    import triton

    from kat.data import kernels
    from kat.triton_utils import cdiv, device_guard

    out_h, out_w = size
    device = images[0].device
    crop_h, crop_w = boxes[:, 2], boxes[:, 3]
    vertical_first = pil_runs_vertical_first(crop_h, crop_w, out_h, out_w)
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
        "BLOCK_R": kernels.BLOCK_R,
        "BLOCK_W": triton.next_power_of_2(out_w),
        "META": kernels.META,
        "enable_fp_fusion": False,  # PIL's float64 weights to the last bit: no fused multiply-adds
    }
    with device_guard(device):
        grid = (cdiv(int(first_rows.max()), kernels.BLOCK_R), len(images), 3)
        kernels._first_pass_kernel[grid](addresses, meta, buffer, out_h, out_w, **constants)
        grid = (cdiv(out_h, kernels.BLOCK_R), len(images), 3)
        kernels._second_pass_kernel[grid](buffer, meta, batch, out_h, out_w, **constants)
    return batch


def pil_runs_vertical_first(crop_h: torch.Tensor, crop_w: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """The installed Pillow's order of the passes, per image (bool, crop_h's shape). Pillow 13 (Resample.c)
    resamples vertically first when the height shrinks, and by more than twice as many pixels as the width;
    earlier versions always horizontally first. Following the installed one keeps device_augment's pixels
    those of the CPU transforms on the same machine."""
    if _PILLOW_MAJOR < 13:
        return torch.zeros_like(crop_h, dtype=torch.bool)
    return (crop_h > out_h) & (crop_h - out_h > 2 * (crop_w - out_w))


CANVAS_PIXELS = 1 << 24  # per canvas: 16.7 M pixels, 400 MB as int64 RGB; 128 crops of 360 x 360


def _resized_crops_torch(images, boxes, size, interpolation) -> torch.Tensor:
    """The crops zero-padded into canvases [n, 3, h, w] of at most CANVAS_PIXELS pixels each (one, for
    ImageNet-sized images), resampled by two batched integer matmuls with per-image fixed-point weights, in
    each image's order of the passes (both orders computed where the canvas has images of both)."""
    out_h, out_w = size
    device = images[0].device
    batch = torch.empty(len(images), 3, out_h, out_w, dtype=torch.uint8, device=device)
    for group in _canvas_groups(boxes[:, 2:].tolist()):
        heights, widths = boxes[group, 2], boxes[group, 3]
        canvas = torch.zeros(len(group), 3, int(heights.max()), int(widths.max()), dtype=torch.uint8, device=device)
        crops = [images[i][:, t : t + h, le : le + w] for i, (t, le, h, w) in zip(group, boxes[group].tolist())]
        # One call for all the copies (one copy_ per image cost the GPU host ~70 us each, when this path ran there).
        torch._foreach_copy_([canvas[slot, :, : c.shape[1], : c.shape[2]] for slot, c in enumerate(crops)], crops)
        canvas = canvas.long()
        rows = resize_weights(heights, out_h, canvas.shape[2], interpolation).to(device).unsqueeze(1)
        cols = resize_weights(widths, out_w, canvas.shape[3], interpolation).to(device).transpose(1, 2).unsqueeze(1)
        x = _clip8(rows @ _clip8(canvas @ cols))  # horizontal first: [n, 3, h, out_w], then [n, 3, out_h, out_w]
        vertical = pil_runs_vertical_first(heights, widths, out_h, out_w).to(device).view(-1, 1, 1, 1)
        if vertical.any():
            x = torch.where(vertical, _clip8(_clip8(rows @ canvas) @ cols), x)
        batch[torch.tensor(group, device=device)] = x.to(torch.uint8)
    return batch


def _canvas_groups(sizes: list[list[int]]) -> list[list[int]]:
    """Batch indices grouped so that len(group) x (tallest crop) x (widest crop) <= CANVAS_PIXELS (one big
    image does not blow up the whole batch's canvas); largest crops first."""
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i][0] * sizes[i][1])
    groups, current, height, width = [], [], 0, 0
    for i in order:
        h, w = max(height, sizes[i][0]), max(width, sizes[i][1])
        if current and (len(current) + 1) * h * w > CANVAS_PIXELS:
            groups.append(current)
            current, h, w = [], sizes[i][0], sizes[i][1]
        current.append(i)
        height, width = h, w
    return groups + [current]


def _pil_filter(x: torch.Tensor, interpolation: str) -> torch.Tensor:
    """PIL's resampling kernels, in its expressions: bicubic with a = -0.5 (support 2), bilinear = triangle."""
    x = x.abs()
    if interpolation == "bilinear":
        return torch.where(x < 1, 1 - x, 0.0)
    near = (1.5 * x - 2.5) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * -0.5
    return torch.where(x < 1, near, torch.where(x < 2, far, 0.0))


def resize_weights(sizes: torch.Tensor, out: int, width: int, interpolation: str) -> torch.Tensor:
    """int64 [B, out, width]: the coefficients with which PIL resizes row b's first sizes[b] pixels to `out`
    pixels (Resample.c's precompute_coeffs + normalize_coeffs_8bpc): output pixel o centred at (o + 0.5) *
    scale, its window [first, end), the kernel stretched by max(scale, 1) (antialiasing when shrinking),
    normalised by the weights' sequential sum, in 22-bit fixed point rounded away from zero."""
    sizes = sizes.to(torch.float64).view(-1, 1, 1)
    scale = sizes / out
    filter_scale = scale.clamp(min=1)
    support = (2.0 if interpolation == "bicubic" else 1.0) * filter_scale
    centre = (torch.arange(out, dtype=torch.float64).view(1, -1, 1) + 0.5) * scale
    first = (centre - support + 0.5).trunc().clamp(min=0)
    end = torch.minimum((centre + support + 0.5).trunc(), sizes)
    pixel = torch.arange(width, dtype=torch.float64).view(1, 1, -1)
    weights = _pil_filter((pixel - centre + 0.5) * (1 / filter_scale), interpolation)
    weights = torch.where((pixel >= first) & (pixel < end), weights, 0.0)
    total = weights.cumsum(-1)[..., -1:]  # a sequential sum, as PIL's loop (zeros add nothing)
    scaled = weights / total * (1 << 22)
    return torch.where(scaled < 0, scaled - 0.5, scaled + 0.5).trunc().long()


def _clip8(fixed_point: torch.Tensor) -> torch.Tensor:
    """PIL's clip8 of integer sums of 22-bit fixed-point products, started at one half."""
    return ((fixed_point + (1 << 21)) >> 22).clamp_(0, 255)
