"""kat.data.gpu.resized_crop: the batched crop + resize + flip (Triton kernels through the interpreter, and the
torch path) against PIL's crop().resize(), which is what timm's RandomResizedCrop computes: the same pixels."""

import numpy as np
import pytest
import torch
from devices import needs_interpreter
from photos import photo_pixels
from PIL import Image

from kat.data.gpu import resized_crop, resized_crop_kernels
from kat.data.gpu.resized_crop import CANVAS_PIXELS, _canvas_groups

RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}
IMPLEMENTATIONS = {
    "triton": lambda images, boxes, flips, size, interp: resized_crop_kernels.resized_crops_triton(
        images, boxes, flips, size, interp, resized_crop.pil_runs_vertical_first(*boxes[:, 2:].T, *size)
    ),
    "torch": lambda images, boxes, flips, size, interp: torch.where(
        flips.view(-1, 1, 1, 1),
        resized_crop.resized_crops_torch(images, boxes, size, interp).flip(-1),
        resized_crop.resized_crops_torch(images, boxes, size, interp),
    ),
}


def photo(rng, height: int, width: int) -> np.ndarray:
    return photo_pixels(rng, height, width, cell=6, noise=8)


def batch(seed: int, size: tuple[int, int]):
    """Images of assorted sizes with crop boxes that shrink, enlarge, keep the output size, or are one pixel
    high; Pillow 13 resizes the third vertically first and the fourth horizontally first."""
    rng = np.random.default_rng(seed)
    out_h, out_w = size
    arrays, boxes = [], []
    for i in range(7):
        height, width = (int(v) for v in rng.integers(8, 70, 2))
        if i == 0:
            height, width = out_h + 3, out_w + 5
            h, w = out_h, out_w  # output size: no resampling at all
        elif i in (2, 3):  # Pillow's two orders of the passes: vertical first (the crop wider than one block
            # of kernel columns: several column chunks), then horizontal first
            height, width = (60, 2 * out_w) if i == 2 else (20, 60)
            h, w = (50, 2 * out_w - 2) if i == 2 else (out_h + 2, 50)
        elif i == 1:
            h, w = 1, int(rng.integers(1, width + 1))  # a one-row crop
        else:
            h, w = int(rng.integers(1, height + 1)), int(rng.integers(1, width + 1))
        top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        arrays.append(photo(rng, height, width))
        boxes.append([top, left, h, w])
    images = [torch.from_numpy(a).permute(2, 0, 1).contiguous() for a in arrays]
    flips = torch.from_numpy(rng.random(len(arrays)) < 0.5)
    return arrays, images, torch.tensor(boxes), flips


def pil_resized_crop(array, box, size, interpolation, flip) -> torch.Tensor:
    top, left, h, w = box
    image = Image.fromarray(array).crop((left, top, left + w, top + h)).resize(size[::-1], RESAMPLE[interpolation])
    out = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    return out.flip(-1) if flip else out


@pytest.mark.parametrize("implementation", [pytest.param("triton", marks=needs_interpreter), "torch"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_resized_crops_are_pils(implementation, interpolation):
    size = (14, 11)
    for seed in range(2):
        arrays, images, boxes, flips = batch(seed, size)
        out = IMPLEMENTATIONS[implementation](images, boxes, flips, size, interpolation)
        assert out.shape == (len(images), 3, *size) and out.dtype == torch.uint8
        if resized_crop._PILLOW_MAJOR >= 13:  # both orders of the passes are exercised
            assert resized_crop.pil_runs_vertical_first(boxes[:, 2], boxes[:, 3], *size)[2:4].tolist() == [True, False]
        for b, (array, box, flip) in enumerate(zip(arrays, boxes.tolist(), flips.tolist())):
            expected = pil_resized_crop(array, box, size, interpolation, flip)
            assert torch.equal(out[b], expected), (seed, box, (out[b].int() - expected.int()).abs().max())


def test_resized_crops_runs_the_torch_path_on_a_cpu():
    """Even under TRITON_INTERPRET=1 (conftest): the interpreter is for testing the kernels, not for training.
    Bad arguments are named."""
    arrays, images, boxes, flips = batch(1, (8, 8))
    out = resized_crop.resized_crops(images, boxes, flips, (8, 8), "bilinear")
    assert torch.equal(out, IMPLEMENTATIONS["torch"](images, boxes, flips, (8, 8), "bilinear"))
    with pytest.raises(ValueError, match="interpolation='nearest': use one of bilinear, bicubic"):
        resized_crop.resized_crops(images, boxes, flips, (8, 8), "nearest")
    with pytest.raises(ValueError, match="7 images, 6 boxes and 7 flips: give one of each per image"):
        resized_crop.resized_crops(images, boxes[:6], flips, (8, 8), "bilinear")
    with pytest.raises(ValueError, match="crops of 2688000000 bytes after the first pass in one batch"):
        huge = torch.tensor([[0, 0, 4_000_000, 4_000_000]])  # checked before any pixel is read
        IMPLEMENTATIONS["triton"](images[:1], huge, flips[:1], (224, 224), "bilinear")


def test_crops_of_very_different_sizes_share_no_canvas():
    """torch path: one huge crop among small ones gets a canvas of its own (memory stays bounded)."""
    sizes = [[300, 300]] * 60 + [[4000, 3000]] + [[300, 300]] * 67
    assert _canvas_groups(sizes) == [[60], [*range(60), *range(61, 128)]]
    assert 2 * 4000 * 3000 > CANVAS_PIXELS >= 127 * 300 * 300


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernels_on_the_gpu_are_pils(monkeypatch):
    """The compiled kernels on ImageNet-sized images (and one of 3000 x 2000 px: 27 taps per output pixel) to
    224 x 224, against PIL; then in Pillow 13's order of the passes (whatever Pillow is installed) against
    the torch path on the CPU."""
    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(200, 700, (30, 2))] + [(3000, 2000), (224, 224)]
    arrays = [photo(rng, h, w) for h, w in sizes]
    boxes = []
    for h, w in sizes:
        crop_h, crop_w = int(rng.integers(1, h + 1)), int(rng.integers(1, w + 1))
        boxes.append([int(rng.integers(0, h - crop_h + 1)), int(rng.integers(0, w - crop_w + 1)), crop_h, crop_w])
    boxes[-1] = [0, 0, 224, 224]
    boxes, flips = torch.tensor(boxes), torch.from_numpy(rng.random(len(sizes)) < 0.5)
    images = [torch.from_numpy(a).permute(2, 0, 1).contiguous() for a in arrays]
    on_gpu = [image.cuda() for image in images]
    worst = {}
    for interpolation in ("bicubic", "bilinear"):
        out = resized_crop.resized_crops(on_gpu, boxes, flips, (224, 224), interpolation).cpu()
        diffs = [
            (out[b].int() - pil_resized_crop(array, box, (224, 224), interpolation, flip).int()).abs()
            for b, (array, box, flip) in enumerate(zip(arrays, boxes.tolist(), flips.tolist()))
        ]
        worst[interpolation] = (max(d.max().item() for d in diffs), max(d.float().mean().item() for d in diffs))
    monkeypatch.setattr(resized_crop, "_PILLOW_MAJOR", 13)  # the other order of the passes, on some images
    assert resized_crop.pil_runs_vertical_first(boxes[:, 2], boxes[:, 3], 224, 224).sum() >= 5
    for interpolation in ("bicubic", "bilinear"):
        out = resized_crop.resized_crops(on_gpu[:8], boxes[:8], flips[:8], (224, 224), interpolation).cpu()
        diff = (out.int() - resized_crop.resized_crops(images[:8], boxes[:8], flips[:8], (224, 224), interpolation)
                .int()).abs()  # fmt: skip
        worst[f"{interpolation}, Pillow 13's order, against the torch path"] = (diff.max().item(), diff.float().mean())
    assert all(m == 0 for m, _ in worst.values()), worst  # (max, mean) differences
