"""Data pipeline: layout errors, unreadable images skipped and named, the resumable sampler, timm transforms."""

import logging
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from torch.utils.data import DataLoader

import kat  # noqa: F401  (registers kat_tiny)
from kat.data import (
    DataError,
    ImageFolderDataset,
    ResumableSampler,
    build_datasets,
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
    assert "RandomErasing" in text
    image = Image.new("RGB", (50, 40), (10, 20, 30))
    assert train(image).shape == evaluation(image).shape == (3, 32, 32)


def test_committed_demo_set():
    assert check_layout(DEMO) == [str(d) for d in range(10)]
    for split, count in (("train", 4000), ("val", 1000)):
        files = sorted((DEMO / split).rglob("*.png"))
        assert len(files) == count
        with Image.open(files[0]) as image:
            assert image.size == (28, 28) and image.mode == "L"
    total = sum(f.stat().st_size for f in DEMO.rglob("*.png"))
    assert total < 2_000_000  # small enough to ship in git
