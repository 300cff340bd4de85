"""Data faults (docs/ERRORS.md, section Data): symlinks in the dataset, 16-bit PNGs, decompression bombs,
unreadable folders, and the bad-image limit counting files rather than reads."""

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

import kat.data.dataset
from kat.data import DataError, ImageFolderDataset, build_datasets
from kat.data.dataset import to_rgb


def make_split(root: Path, classes=("a", "b", "c"), per_class=2) -> Path:
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (60 * c, 20 * i, 7)).save(root / name / f"{i}.png")
    return root


def test_plain_tree_lists_what_torchvision_lists(tmp_path):
    root = make_split(tmp_path / "train", classes=("a", "a-b", "b"))
    (root / "a" / "nested" / "deeper").mkdir(parents=True)
    Image.new("L", (8, 8)).save(root / "a" / "nested" / "deeper" / "x.jpg")
    Image.new("L", (8, 8)).save(root / "a" / "nested" / "y.png")
    (root / "b" / "notes.txt").write_text("not an image")
    assert ImageFolderDataset(root).samples == ImageFolder(str(root)).samples  # same files, same order


def test_symlink_loop_and_cross_class_links_are_skipped_with_a_warning(tmp_path, caplog):
    root = make_split(tmp_path / "train")
    os.symlink("..", root / "c" / "loop")  # train/c/loop -> train/: every class again, labelled c
    os.symlink("../a", root / "b" / "more")  # a's images would be labelled b
    os.symlink(root / "c" / "0.png", root / "a" / "copy.png")  # a second path to one file
    outside = make_split(tmp_path / "elsewhere", classes=("extra",), per_class=3)
    os.symlink(outside / "extra", root / "a" / "linked")  # an ordinary link into another tree: followed
    with caplog.at_level(logging.WARNING):
        dataset = ImageFolderDataset(root)
    assert [dataset.classes[t] for _, t in dataset.samples].count("a") == 2 + 3
    assert len(dataset) == 3 * 2 + 3
    assert f"skipped {root / 'c' / 'loop'}" in caplog.text and "symlink loop" in caplog.text
    assert f"skipped {root / 'b' / 'more'}" in caplog.text
    assert "skipped 1 second path(s) to images already listed" in caplog.text


def test_unreadable_class_folder_is_named(tmp_path, monkeypatch):
    root = tmp_path / "data"
    for split in ("train", "val"):
        make_split(root / split)
    locked = root / "train" / "b"
    real_scandir = os.scandir

    def scandir(path):  # what a folder without read permission gives (root would read it anyway)
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(kat.data.dataset.os, "scandir", scandir)
    with pytest.raises(
        DataError, match=rf"'{locked}' cannot be read \(Permission denied\); fix its permissions"
    ):
        build_datasets(root, None, None)


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "grey16.png")  # a 16-bit greyscale PNG
    png = Image.open(tmp_path / "grey16.png")
    big_endian = Image.frombytes("I;16B", (4, 1), values.astype(">u2").tobytes())
    for image, mode in ((png, "I;16"), (big_endian, "I;16B"), (png.convert("I"), "I")):
        assert image.mode == mode
        rgb = np.asarray(to_rgb(image))
        assert rgb.shape == (1, 4, 3) and (rgb == rgb[..., :1]).all(), mode
        assert rgb[0, :, 0].tolist() == [0, 1, 128, 255], mode


def test_other_modes_convert_as_pil_does_and_float_images_are_refused(tmp_path):
    palette = Image.new("P", (4, 4), 3)
    palette.putpalette([0, 0, 0] * 3 + [10, 200, 30] + [0, 0, 0] * 252)
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    for image in (palette, rgba, Image.new("L", (4, 4), 77), Image.new("CMYK", (4, 4), (0, 255, 0, 0))):
        assert np.array_equal(np.asarray(to_rgb(image)), np.asarray(image.convert("RGB"))), image.mode
    with pytest.raises(ValueError, match="floating-point"):
        to_rgb(Image.new("F", (4, 4), 0.5))
    with pytest.raises(ValueError, match="values outside 0..65535"):
        to_rgb(Image.new("I", (4, 4), 70000))
    # The dataset reads 16-bit PNGs through to_rgb as well.
    root = make_split(tmp_path / "train", classes=("a",), per_class=1)
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(root / "a" / "0.png")
    image, _ = ImageFolderDataset(root)[0]
    assert np.asarray(image).min() == 255


def test_decompression_bomb_is_skipped_and_counted(tmp_path, monkeypatch, caplog):
    root = make_split(tmp_path / "train", classes=("a",), per_class=3)
    Image.new("RGB", (64, 64)).save(root / "a" / "1.png")
    # PIL refuses images over twice MAX_IMAGE_PIXELS; lowered so a small file stands for a huge one.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    dataset = ImageFolderDataset(root, transform=lambda image: image.size)
    with caplog.at_level(logging.WARNING):
        assert [dataset[i][0] for i in range(3)] == [(8, 8), (8, 8), (8, 8)]
    assert dataset.num_bad_images == 1 and "DecompressionBombError" in caplog.text


def test_bad_image_counts_once_over_epochs_and_workers(tmp_path, caplog):
    root = make_split(tmp_path / "train", per_class=3)
    (root / "b" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # sample 4
    dataset = ImageFolderDataset(root, transform=lambda image: torch.zeros(1), max_bad_images=1)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            dataset[4]
    assert dataset.num_bad_images == 1 and caplog.text.count("skipped unreadable image") == 1
    for _ in range(3):  # epochs, each in fresh worker processes
        assert sum(len(b[0]) for b in DataLoader(dataset, batch_size=3, num_workers=2)) == 9
    assert dataset.num_bad_images == 1
    dataset.check_bad_images()  # one damaged file is within max_bad_images=1 however long the run
    (root / "c" / "0.png").write_bytes(b"broken too")  # sample 6, found by a worker
    list(DataLoader(dataset, batch_size=3, num_workers=2))
    assert dataset.num_bad_images == 2
    with pytest.raises(DataError, match="2 images under"):
        dataset.check_bad_images()
