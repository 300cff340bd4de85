"""Decoding and augmentation on the device (device_augment): the dataset's draws, DeviceAugment against PIL's
crop + resize, bad files, config errors, and DeviceLoader's background-thread prefetch (here on the CPU)."""

import io
import random

import numpy as np
import pytest
import torch
from photos import photo_pixels
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation
from torch.utils.data import DataLoader

from kat.data import (
    DataError,
    DeviceAugment,
    DeviceAugmentConfig,
    DeviceLoader,
    EncodedImageFolderDataset,
    collate_encoded,
)
from kat.training.config import ConfigError, parse_config
from kat.training.engine import Trainer

DATA_CONFIG = {"input_size": [3, 24, 24], "interpolation": "bicubic", "mean": [0.485, 0.456, 0.406],
               "std": [0.229, 0.224, 0.225], "crop_pct": 1.0}  # fmt: skip


def photo(seed: int, height: int, width: int) -> Image.Image:
    return Image.fromarray(photo_pixels(np.random.default_rng(seed), height, width, cell=8, noise=6))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """train/<2 classes>/: JPEGs of several sizes, one PNG, one grayscale JPEG."""
    root = tmp_path_factory.mktemp("photos") / "train"
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(3):
            photo(10 * c + i, 40 + 8 * i, 56 - 4 * i).save(root / f"c{c}" / f"{i}.jpg", quality=92)
    photo(99, 36, 30).save(root / "c0" / "png.png")
    photo(98, 30, 44).convert("L").save(root / "c1" / "gray.jpg", quality=92)
    return root


def config(*args: str) -> DeviceAugmentConfig:
    cfg = parse_config(["--config", "kat_t", "--aa", "null", "--color_jitter", "0", *args])
    return DeviceAugmentConfig(cfg, DATA_CONFIG)


def batch_of(dataset, indices):
    return collate_encoded([dataset[i] for i in indices])


def test_params_are_timms_draws_from_the_header(folder):
    """The worker draws the crop box with timm's own sampler from the header size, then the flip."""
    augment = config("--hflip", "0.5")
    dataset = EncodedImageFolderDataset(folder, augment.draw_params)
    for index in range(len(dataset)):
        random.seed(index)
        data, target, params, sample = dataset[index]
        random.seed(index)
        with Image.open(dataset.samples[index][0]) as image:
            box = RandomResizedCropAndInterpolation.get_params(image, augment.crop.scale, augment.crop.ratio)
        assert params[:4].tolist() == list(box) and params[4].item() == float(random.random() < 0.5)
        assert sample == index and target == dataset.samples[index][1] and data.dtype == torch.uint8
        is_jpeg = dataset.samples[index][0].endswith(".jpg")
        assert data.dim() == (1 if is_jpeg else 3)  # JPEG bytes; other formats decoded in the worker


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_device_augment_is_timms_crop_and_resize(folder, interpolation):
    """Same crop boxes: decode + batched resize on the device give what timm's RandomResizedCrop (PIL crop, then
    resize) gives, pixel for pixel."""
    augment = config("--hflip", "0", "--train_interpolation", interpolation)
    dataset = EncodedImageFolderDataset(folder, augment.draw_params)
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[interpolation]
    for seed in range(2):  # kat.data.gpu.resized_crop's own tests cover more crops
        random.seed(seed)
        batch = batch_of(dataset, range(len(dataset)))
        *_, targets, params, samples = batch
        images, out_targets = DeviceAugment(augment, dataset, "cpu")(*batch)
        assert images.shape == (len(dataset), 3, 24, 24) and images.dtype == torch.uint8
        assert torch.equal(out_targets, targets)
        for image, box, sample in zip(images, params[:, :4].long().tolist(), samples.tolist()):
            top, left, h, w = box
            with Image.open(dataset.samples[sample][0]) as pil:
                expected = pil.convert("RGB").crop((left, top, left + w, top + h)).resize((24, 24), resample)
            # the same decoder (libjpeg-turbo) and PIL's resize arithmetic (kat.data.gpu.resized_crop)
            assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(np.array(expected)))


def test_flip_is_drawn_per_image(folder):
    images = {}
    for hflip in ("0", "1"):
        augment = config("--hflip", hflip)
        dataset = EncodedImageFolderDataset(folder, augment.draw_params)
        random.seed(1)  # the same crop boxes
        images[hflip] = DeviceAugment(augment, dataset, "cpu")(*batch_of(dataset, range(4)))[0]
    assert torch.equal(images["1"], images["0"].flip(-1))


# CPU only: on the H200 (torch 2.11, torchvision 0.26) nvJPEG decoded these truncated JPEGs without an error, so
# the CUDA path has no bad file to replace here (the substitution code is the same on both devices).
@pytest.mark.parametrize("device", ["cpu"])
def test_unreadable_jpeg_is_counted_and_replaced(tmp_path, device):
    """A truncated JPEG passes the worker's header check (its crop box is drawn from its header) and fails
    decoding on the device: it is counted as a bad image, and its whole sample is replaced by the next
    decodable one of the batch (cyclically): that one's pixels with its label, crop box, flip and RandAugment
    draws, exactly as if the batch had held that sample twice. The broken files are large and their crop
    boxes do not fit the smaller substitutes. A batch of broken files only is an error."""
    root = tmp_path / "train"
    sizes = {"c0": (32, 28), "c1": (120, 100), "c2": (44, 52)}  # c1's files are the broken ones
    for seed, (name, (height, width)) in enumerate(sizes.items()):
        (root / name).mkdir(parents=True)
        encoded = io.BytesIO()
        photo(seed, height, width).save(encoded, format="JPEG", quality=92)
        data = encoded.getvalue()
        truncated = {"a.jpg": data[: len(data) // 2], "b.jpg": data[: len(data) // 3]}
        files = truncated if name == "c1" else {"a.jpg": data}
        for file, content in files.items():
            (root / name / file).write_bytes(content)
    augment = config("--hflip", "0.5", "--scale", "[0.9, 1.0]", "--aa", "rand-m9-mstd0.5-p1")
    dataset = EncodedImageFolderDataset(root, augment.draw_params)
    order = [0, 1, 3, 2]  # c0 small, c1 broken, c2 medium, c1 broken: replaced by c2's and (cyclically) c0's
    assert [dataset.samples[i][1] for i in order] == [0, 1, 2, 1]
    random.seed(0)
    items = [dataset[i] for i in order]
    for bad, substitute in ((1, 2), (3, 0)):  # the broken files' boxes do not fit their substitutes' pixels
        top, left, height, width = items[bad][2][:4].long().tolist()
        substitute_h, substitute_w = sizes[f"c{items[substitute][1]}"]
        assert top + height > substitute_h or left + width > substitute_w
        assert not torch.equal(items[bad][2][4:], items[substitute][2][4:])  # and their other draws differ
    device_augment = DeviceAugment(augment, dataset, device)
    images, targets = device_augment(*collate_encoded(items))
    assert dataset.num_bad_images == 2
    twice = [items[0], items[2], items[2], items[0]]  # the batch as if it held the substitutes twice
    expected_images, expected_targets = device_augment(*collate_encoded(twice))
    assert targets.tolist() == [0, 2, 2, 0] and torch.equal(targets, expected_targets)
    assert torch.equal(images, expected_images)
    with pytest.raises(DataError, match="no image of a whole batch could be decoded"):
        device_augment(*collate_encoded([items[1], items[3]]))
    assert dataset.num_bad_images == 2  # the same two files: the count is of distinct files


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--train_interpolation", "random"],
            "train_interpolation='random' with device_augment: true; use one of",
        ),
        (["--color_jitter", "0.4"], "does not implement color jitter .* set color_jitter: 0"),
        (["--aa", "augmix-m5"], "aa='augmix-m5' with device_augment: true"),
    ],
)
def test_config_errors_name_the_key(tmp_path, demo_digits, args, message):
    root = demo_digits(train=2, val=1)
    argv = ["--config", "demo", "--data_dir", str(root), "--output_dir", str(tmp_path), "--aa", "null",
            "--color_jitter", "0", "--device_augment", "true", "--wandb_mode", "disabled", *args]  # fmt: skip
    with pytest.raises(ConfigError, match=message):
        Trainer(parse_config(argv))


class Numbered(torch.utils.data.Dataset):
    def __init__(self, n: int, fail_at: int | None = None):
        self.n, self.fail_at = n, fail_at

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i == self.fail_at:
            raise RuntimeError(f"broken item {i}")
        return torch.full((3, 2, 2), i, dtype=torch.uint8), i


def test_prefetch_thread_gives_the_same_batches_and_stops_cleanly():
    loader = DataLoader(Numbered(10), batch_size=3, num_workers=1)
    sync = DeviceLoader(loader, [0.5] * 3, [0.25] * 3, "cpu")
    ahead = DeviceLoader(loader, [0.5] * 3, [0.25] * 3, "cpu", prefetch=True)
    for _ in range(2):
        pairs = list(zip(sync, ahead, strict=True))
        assert len(pairs) == 4 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in pairs)
    batches = iter(ahead)
    next(batches)
    batches.close()  # the caller stops early (max_steps): the producer thread ends, nothing hangs
    broken = DeviceLoader(DataLoader(Numbered(10, fail_at=7), batch_size=3), [0.5] * 3, [0.25] * 3, "cpu",
                          prefetch=True)  # fmt: skip
    with pytest.raises(RuntimeError, match="broken item 7"):
        list(broken)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nvjpeg_batch_on_the_gpu_matches_the_cpu(folder):
    """nvJPEG's decode + the GPU's resize against libjpeg-turbo + the CPU's: the same images up to the
    decoders' IDCT rounding; and through DeviceLoader's thread, the same batches as without it."""
    augment = config("--hflip", "0.5")
    dataset = EncodedImageFolderDataset(folder, augment.draw_params)
    random.seed(2)
    batch = batch_of(dataset, range(len(dataset)))
    on_gpu = DeviceAugment(augment, dataset, "cuda")(*batch)[0].cpu()
    on_cpu = DeviceAugment(augment, dataset, "cpu")(*batch)[0]
    diff = (on_gpu.int() - on_cpu.int()).abs()
    # nvJPEG's chroma upsampling and IDCT are not libjpeg-turbo's: on these noisy test photos the H200 gave a
    # mean difference of 2.5 levels, max 32 (2026-12-01); a wrong crop or channel order would give ~50.
    assert diff.float().mean() < 4 and diff.max() <= 64, (diff.float().mean(), diff.max())

    def device_loader(prefetch):  # workers seeded alike: the same draws
        loader = DataLoader(dataset, batch_size=3, num_workers=1, collate_fn=collate_encoded,
                            generator=torch.Generator().manual_seed(0))  # fmt: skip
        return DeviceLoader(loader, [0.5] * 3, [0.25] * 3, "cuda", prefetch=prefetch,
                            augment=DeviceAugment(augment, dataset, "cuda"))  # fmt: skip

    pairs = list(zip(device_loader(False), device_loader(True), strict=True))
    assert len(pairs) == 3 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in pairs)
