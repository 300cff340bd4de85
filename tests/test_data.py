"""Data pipeline: layout errors, unreadable images skipped and named, the resumable sampler, timm transforms,
uint8 batches normalised on the device."""

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data.random_erasing import RandomErasing
from torch.utils.data import DataLoader

import kat  # noqa: F401  (registers kat_tiny)
from kat.data import (
    DataError,
    DeviceLoader,
    ImageFolderDataset,
    ResumableSampler,
    build_datasets,
    build_random_erasing,
    build_transforms,
    check_layout,
    resolve_data_config,
)
from kat.training.config import parse_config

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"


def make_folder(root: Path, classes=("a", "b"), per_class=3, splits=("train", "val")) -> Path:
    for split in splits:
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.new("RGB", (12, 12), (40 * c, 10 * i, 90)).save(root / split / name / f"{i}.png")
    return root


def test_layout_ok_and_class_order(tmp_path):
    root = make_folder(tmp_path, classes=("cat", "ant", "bee"))
    (root / "train" / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    assert check_layout(root) == ["ant", "bee", "cat"]
    train, val = build_datasets(root, None, None)
    assert train.classes == val.classes == ["ant", "bee", "cat"] and len(train) == len(val) == 9


def test_missing_val(tmp_path):
    root = make_folder(tmp_path, splits=("train",))
    with pytest.raises(DataError, match=r"'.*/val' is missing; expected data_dir/train/<class>"):
        check_layout(root)
    with pytest.raises(DataError, match="does not exist"):
        check_layout(tmp_path / "nowhere")


def test_class_mismatch(tmp_path):
    root = make_folder(tmp_path, classes=("a", "b", "c"))
    (root / "val" / "c").rename(root / "val" / "d")
    with pytest.raises(DataError, match=r"different class folders \(only in train/: c; only in val/: d\)"):
        check_layout(root)


def test_empty_class_folder(tmp_path):
    root = make_folder(tmp_path)
    (root / "train" / "empty").mkdir()
    (root / "val" / "empty").mkdir()
    (root / "train" / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"class folder\(s\) without images: .*train/empty"):
        build_datasets(root, None, None)


def test_unreadable_images_are_skipped_named_and_counted(tmp_path, caplog):
    root = make_folder(tmp_path, per_class=4)
    truncated = root / "train" / "a" / "1.png"
    noise = Image.frombytes(
        "RGB", (64, 64), torch.randint(0, 256, (64 * 64 * 3,), dtype=torch.uint8).numpy().tobytes()
    )
    noise.save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:4000])  # a cut-off download
    not_image = root / "train" / "b" / "2.png"
    not_image.write_text("<html>404</html>")
    dataset = ImageFolderDataset(root / "train", transform=lambda im: torch.tensor(im.getpixel((0, 0))))
    with caplog.at_level(logging.WARNING):
        items = [dataset[i] for i in range(len(dataset))]
    assert len(items) == 8 and dataset.num_bad_images == 2
    assert str(truncated) in caplog.text and str(not_image) in caplog.text
    # The substitute is the next readable sample: same batch size, a real image.
    assert torch.equal(items[1][0], items[2][0])
    dataset.check_bad_images()  # 2 <= 100: fine
    dataset.max_bad_images = 1
    with pytest.raises(DataError, match=r"2 images under .* could not be read \(limit max_bad_images=1\)"):
        dataset.check_bad_images()


def test_bad_image_count_crosses_worker_processes(tmp_path):
    root = make_folder(tmp_path, per_class=4)
    (root / "train" / "a" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    dataset = ImageFolderDataset(root / "train", transform=lambda im: torch.zeros(1))
    batches = list(DataLoader(dataset, batch_size=4, num_workers=1))
    assert sum(len(b[0]) for b in batches) == 8 and dataset.num_bad_images == 1


@pytest.mark.parametrize("num_replicas", [1, 3])
def test_sampler_shards_and_resumes_mid_epoch(num_replicas):
    n, batch = 103, 4
    full = []
    for rank in range(num_replicas):
        sampler = ResumableSampler(n, num_replicas=num_replicas, rank=rank, seed=7)
        sampler.set_epoch(2)
        full.append(list(sampler))
    flat = sorted(i for shard in full for i in shard)
    assert len(flat) == len(set(flat)) == (n // num_replicas) * num_replicas  # disjoint, tail dropped
    # After k batches on every process, resuming at start = k * batch * processes continues each shard exactly.
    k = 5
    for rank in range(num_replicas):
        sampler = ResumableSampler(n, num_replicas=num_replicas, rank=rank, seed=7)
        sampler.set_epoch(2, start=k * batch * num_replicas)
        assert list(sampler) == full[rank][k * batch :]
    other_epoch = ResumableSampler(n, num_replicas=num_replicas, rank=0, seed=7)
    other_epoch.set_epoch(3)
    assert list(other_epoch) != full[0]


def test_transforms_follow_model_and_recipe():
    cfg = parse_config(["--config", "kat_t"])
    model = timm.create_model("kat_tiny", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2)
    data_config = resolve_data_config(model, cfg)
    assert data_config == {
        "input_size": [3, 32, 32],
        "interpolation": "bicubic",
        "mean": list(timm.data.IMAGENET_DEFAULT_MEAN),
        "std": list(timm.data.IMAGENET_DEFAULT_STD),
        "crop_pct": 0.875,
    }
    train, evaluation = build_transforms(cfg, data_config)
    text = str(train)
    assert "RandomResizedCrop" in text and "rand-m9-mstd0.5" in text.replace(" ", "") or "RandAugment" in text
    assert "Normalize" not in text and "RandomErasing" not in text  # both on the device now
    image = Image.new("RGB", (50, 40), (10, 20, 30))
    for transform in (train, evaluation):
        out = transform(image)
        assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    erasing = build_random_erasing(cfg, "cpu")
    assert (erasing.probability, erasing.mode, erasing.max_count) == (cfg.reprob, cfg.remode, cfg.recount)
    assert build_random_erasing(parse_config(["--config", "kat_t", "--reprob", "0"]), "cpu") is None


def _old_transforms(cfg, data_config: dict):
    """The CPU path before DeviceLoader: timm's transforms ending in ToTensor + Normalize (no erasing)."""
    common = dict(
        input_size=tuple(data_config["input_size"]), mean=data_config["mean"], std=data_config["std"]
    )
    train = timm.data.create_transform(
        is_training=True,
        scale=tuple(cfg.scale),
        ratio=tuple(cfg.ratio),
        hflip=cfg.hflip,
        color_jitter=cfg.color_jitter,
        auto_augment=cfg.aa,
        interpolation=cfg.train_interpolation,
        **common,
    )
    evaluation = timm.data.create_transform(
        is_training=False,
        interpolation=data_config["interpolation"],
        crop_pct=data_config["crop_pct"],
        **common,
    )
    return train, evaluation


def _seeded(transform, image, seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return transform(image)


def test_device_normalisation_equals_the_cpu_path():
    """Demo digits and a 0..255 ramp through the uint8 transforms, default collate and DeviceLoader: bitwise the
    values ToTensor + Normalize gave on the CPU, for the eval transform and (same seeds) the train transform."""
    cfg = parse_config(["--config", "kat_t", "--crop_pct", "1.0"])
    data_config = {
        "input_size": [3, 28, 28],
        "interpolation": "bicubic",
        "mean": list(timm.data.IMAGENET_DEFAULT_MEAN),
        "std": list(timm.data.IMAGENET_DEFAULT_STD),
        "crop_pct": 1.0,
    }
    images = [Image.open(f).convert("RGB") for f in sorted((DEMO / "val").rglob("*.png"))[::100]]
    ramp = np.arange(28 * 28 * 3).reshape(28, 28, 3) % 256
    images.append(Image.fromarray(ramp.astype(np.uint8)))  # every uint8 value in every channel
    new_train, new_eval = build_transforms(cfg, data_config)
    old_train, old_eval = _old_transforms(cfg, data_config)
    for new, old in ((new_eval, old_eval), (new_train, old_train)):
        samples = [(_seeded(new, image, i), i) for i, image in enumerate(images)]
        loader = DeviceLoader(
            DataLoader(samples, batch_size=4), data_config["mean"], data_config["std"], "cpu"
        )
        batches = list(loader)
        assert len(loader) == len(batches) == 3
        normalised = torch.cat([b[0] for b in batches])
        assert normalised.dtype == torch.float32 and torch.equal(
            torch.cat([b[1] for b in batches]), torch.arange(11)
        )
        expected = torch.stack([_seeded(old, image, i) for i, image in enumerate(images)])
        torch.testing.assert_close(normalised, expected, rtol=0, atol=1e-6)
        assert torch.equal(normalised, expected)  # the same float32 operations: not even rounding differs


def test_device_loader_wants_uint8():
    loader = DeviceLoader([(torch.zeros(2, 3, 4, 4), torch.zeros(2))], [0.5] * 3, [0.2] * 3, "cpu")
    with pytest.raises(TypeError, match="expects uint8 images .* got torch.float32; build the dataset's"):
        next(iter(loader))


def test_random_erasing_of_a_normalised_batch():
    """timm's RandomErasing (batched: tests/test_random_erasing.py) on the device batch: erases per image,
    drawing the global RNG (saved in checkpoints)."""
    cfg = parse_config(["--config", "kat_t", "--reprob", "1.0", "--remode", "pixel"])
    erasing = build_random_erasing(cfg, "cpu")
    assert isinstance(erasing, RandomErasing)
    batch = torch.full((4, 3, 16, 16), 7.0)
    first = _seeded(erasing, batch.clone(), 0)
    assert all((image != 7.0).any() and (image == 7.0).any() for image in first)  # a box in each image
    assert torch.equal(first, _seeded(erasing, batch.clone(), 0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_prefetch_on_a_side_stream_gives_the_same_batches():
    data = [(torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8), i) for i in range(10)]
    loader = DataLoader(data, batch_size=3, num_workers=1, pin_memory=True)
    sync = DeviceLoader(loader, [0.5] * 3, [0.25] * 3, "cuda")
    ahead = DeviceLoader(loader, [0.5] * 3, [0.25] * 3, "cuda", prefetch=True)
    for _ in range(2):  # a second epoch reuses the side stream
        pairs = list(zip(sync, ahead, strict=True))
        assert len(pairs) == 4
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in pairs)


def test_committed_demo_set():
    assert check_layout(DEMO) == [str(d) for d in range(10)]
    for split, count in (("train", 4000), ("val", 1000)):
        files = sorted((DEMO / split).rglob("*.png"))
        assert len(files) == count
        with Image.open(files[0]) as image:
            assert image.size == (28, 28) and image.mode == "L"
    total = sum(f.stat().st_size for f in DEMO.rglob("*.png"))
    assert total < 2_000_000  # small enough to ship in git
