"""kat.data.random_erasing.BatchRandomErasing against timm's RandomErasing: the same boxes and the same draws
from Python's RNG, boxes filled as timm's modes fill them."""

import copy
import random

import pytest
import torch
from timm.data.random_erasing import RandomErasing

from kat.data.random_erasing import BatchRandomErasing

SHAPE = (6, 3, 20, 24)


def erase(erasing, batch, seed):
    """(erased batch, Python RNG state afterwards) from a fixed seed; the input is left as it was."""
    random.seed(seed)
    torch.manual_seed(seed)
    out = erasing(batch.clone())
    return out, random.getstate()


@pytest.mark.parametrize("num_splits", [0, 2])
@pytest.mark.parametrize("max_count", [1, 3])
def test_same_boxes_and_draws_as_timm(num_splits, max_count):
    """'const' mode zeroes the boxes: the whole output is then bitwise timm's, over several seeds."""
    kwargs = dict(probability=0.6, mode="const", max_count=max_count, num_splits=num_splits, device="cpu")
    batch = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    erased_any = False
    for seed in range(8):
        ours, state = erase(BatchRandomErasing(**kwargs), batch, seed)
        theirs, timm_state = erase(RandomErasing(**kwargs), batch, seed)
        assert torch.equal(ours, theirs), seed
        assert state == timm_state, seed
        erased_any |= not torch.equal(ours, batch)
    assert erased_any
    if num_splits:
        assert torch.equal(ours[: SHAPE[0] // num_splits], batch[: SHAPE[0] // num_splits])  # the clean split


@pytest.mark.parametrize("mode", ["pixel", "rand"])
def test_fill_modes_fill_timms_boxes(mode):
    batch = torch.full((8, 3, 64, 64), 7.0)
    ours, _ = erase(BatchRandomErasing(probability=1.0, mode=mode, device="cpu"), batch, 1)
    boxes, _ = erase(RandomErasing(probability=1.0, mode="const", device="cpu"), batch, 1)
    inside = boxes == 0
    assert torch.equal(ours != 7.0, inside)
    values = ours[inside]
    if mode == "pixel":  # per-pixel standard normal noise
        assert abs(values.mean().item()) < 0.05 and abs(values.std().item() - 1) < 0.05
    else:  # one standard normal colour per box and channel
        for image, mask in zip(ours, inside):
            for channel, channel_mask in zip(image, mask):
                assert channel[channel_mask].unique().numel() == 1


def test_later_boxes_overwrite_earlier_ones():
    """As in timm, an image's boxes are filled in order: the last one's colour covers its whole box."""
    erasing = BatchRandomErasing(probability=1.0, mode="rand", min_count=3, max_count=3, device="cpu")
    batch = torch.full((8, 3, 32, 32), 7.0)
    random.seed(5)
    boxes = [erasing._boxes(3, 32, 32, batch.dtype) for _ in range(8)]
    out, _ = erase(erasing, batch, 5)
    overlapping = 0
    for image, image_boxes in zip(out, boxes):
        top, bottom, left, right = image_boxes[-1]
        assert all(channel.unique().numel() == 1 for channel in image[:, top:bottom, left:right])
        overlapping += any(max(t, top) < min(b, bottom) and max(le, left) < min(r, right)
                           for t, b, le, r in image_boxes[:-1])  # fmt: skip
    assert overlapping  # else the order was never put to the test


def test_single_image_and_in_place():
    erasing = BatchRandomErasing(probability=1.0, mode="const", device="cpu")
    image = torch.ones(3, 16, 16)
    out, _ = erase(erasing, image, 0)
    random.seed(0)
    same = erasing(image)
    assert same is image and torch.equal(image, out) and (image == 0).any()
    random.seed(0)
    assert torch.equal(erasing(torch.ones(0, 3, 16, 16)), torch.ones(0, 3, 16, 16))
    copied = copy.deepcopy(erasing)
    copied.probability = 0.0  # the copy draws with its own parameters
    assert torch.equal(copied(torch.ones(2, 3, 16, 16)), torch.ones(2, 3, 16, 16))
    assert erasing.probability == 1.0 and (erasing(torch.ones(1, 3, 16, 16)) == 0).any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batch_gets_the_cpu_boxes():
    batch = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    kwargs = dict(probability=0.6, mode="const", max_count=3)
    cpu, _ = erase(BatchRandomErasing(**kwargs, device="cpu"), batch, 3)
    cuda, _ = erase(BatchRandomErasing(**kwargs, device="cuda"), batch.cuda(), 3)
    assert torch.equal(cuda.cpu(), cpu)
    pixel, _ = erase(BatchRandomErasing(probability=0.6, mode="pixel", max_count=3, device="cuda"), batch.cuda(), 3)
    assert torch.equal((pixel != batch.cuda()).cpu(), cpu != batch)
