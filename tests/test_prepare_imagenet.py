"""data/prepare_imagenet.py on tiny fake ILSVRC-2012 downloads: folders + CSV labels, and tars + devkit."""

import csv
import io
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kat.data import check_layout

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
import prepare_imagenet  # noqa: E402

WNIDS = ["n01440764", "n01443537", "n01484850"]
EXPECT = ["--expect-train", "6", "--expect-val", "3", "--expect-classes", "3"]


def jpeg_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def fake_folders(root: Path) -> tuple[Path, Path, Path]:
    """train/<wnid>/ with 2 JPEGs each, 3 flat val JPEGs, a LOC_val_solution.csv."""
    for c, wnid in enumerate(WNIDS):
        (root / "train" / wnid).mkdir(parents=True)
        for i in range(2):
            (root / "train" / wnid / f"{wnid}_{i}.JPEG").write_bytes(jpeg_bytes(10 * c + i))
    (root / "val").mkdir()
    with open(root / "LOC_val_solution.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", "PredictionString"])
        for i, wnid in enumerate(reversed(WNIDS), start=1):
            (root / "val" / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(jpeg_bytes(100 + i))
            writer.writerow([f"ILSVRC2012_val_{i:08d}", f"{wnid} 1 2 30 40 {wnid} 5 6 70 80"])
    return root / "train", root / "val", root / "LOC_val_solution.csv"


def run(train: Path, val: Path, labels: Path, out: Path, *extra: str) -> int:
    argv = ["--train", str(train), "--val", str(val), "--val-labels", str(labels), "--out", str(out)]
    return prepare_imagenet.main(argv + EXPECT + list(extra))


def test_folders_with_csv_labels_symlinked_resumable_and_verified(tmp_path, capsys):
    train, val, labels = fake_folders(tmp_path / "download")
    out = tmp_path / "imagenet"
    assert run(train, val, labels, out, "--verify") == 0
    assert check_layout(str(out)) == WNIDS  # the layout train.py reads
    first_val = out / "val" / WNIDS[2] / "ILSVRC2012_val_00000001.JPEG"
    assert first_val.is_symlink() and first_val.read_bytes() == (val / first_val.name).read_bytes()
    assert (out / "train" / WNIDS[0] / f"{WNIDS[0]}_1.JPEG").is_symlink()

    # Interrupted run: a class folder and an image gone; the rerun restores them and touches nothing else.
    (out / "train" / WNIDS[1] / f"{WNIDS[1]}_0.JPEG").unlink()
    first_val.unlink()
    assert run(train, val, labels, out) == 0
    assert first_val.is_symlink() and (out / "train" / WNIDS[1] / f"{WNIDS[1]}_0.JPEG").is_symlink()

    # A corrupt source image and a labelled val image that is missing: both reported, exit status 1.
    (train / WNIDS[0] / f"{WNIDS[0]}_0.JPEG").write_bytes(b"<html>not found</html>")
    (val / "ILSVRC2012_val_00000003.JPEG").unlink()
    capsys.readouterr()
    assert run(train, val, labels, out, "--verify") == 1
    err = capsys.readouterr().err
    assert f"corrupt image {out / 'train' / WNIDS[0] / WNIDS[0]}_0.JPEG" in err
    assert "ILSVRC2012_val_00000003 is labelled but not in --val" in err
    assert "dangling link" in err and "val: 2 images, expected 3" in err


def test_hard_links_and_copies(tmp_path):
    train, val, labels = fake_folders(tmp_path / "download")
    for mode in ("hard", "copy"):
        out = tmp_path / mode
        assert run(train, val, labels, out, "--link", mode) == 0
        image = out / "train" / WNIDS[0] / f"{WNIDS[0]}_0.JPEG"
        assert not image.is_symlink() and image.read_bytes() == (train / WNIDS[0] / image.name).read_bytes()
        assert image.stat().st_nlink == (2 if mode == "hard" else 1)


def test_tars_with_devkit_labels(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    train_dir, val_dir, _ = fake_folders(tmp_path / "download")
    # ILSVRC2012_img_train.tar: one <wnid>.tar per class inside.
    train_tar = tmp_path / "ILSVRC2012_img_train.tar"
    with tarfile.open(train_tar, "w") as outer:
        for wnid in WNIDS:
            class_tar = tmp_path / f"{wnid}.tar"
            with tarfile.open(class_tar, "w") as inner:
                for image in sorted((train_dir / wnid).iterdir()):
                    inner.add(image, arcname=image.name)
            outer.add(class_tar, arcname=class_tar.name)
    val_tar = tmp_path / "ILSVRC2012_img_val.tar"
    with tarfile.open(val_tar, "w") as tar:
        for image in sorted(val_dir.iterdir()):
            tar.add(image, arcname=image.name)
    # The devkit: class ids (1-based, ILSVRC2012_ID) per val image, and meta.mat mapping ids to wnids.
    devkit = tmp_path / "devkit" / "ILSVRC2012_devkit_t12" / "data"
    devkit.mkdir(parents=True)
    ids = {wnid: i for i, wnid in enumerate(WNIDS, start=1)}
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "".join(f"{ids[w]}\n" for w in reversed(WNIDS))
    )
    synsets = np.array(
        [(i, w, 0) for w, i in ids.items()],
        dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")],
    )
    scipy_io.savemat(devkit / "meta.mat", {"synsets": synsets})
    devkit_tar = tmp_path / "ILSVRC2012_devkit_t12.tar.gz"
    with tarfile.open(devkit_tar, "w:gz") as tar:
        tar.add(devkit.parent, arcname="ILSVRC2012_devkit_t12")

    out = tmp_path / "imagenet"
    assert run(train_tar, val_tar, devkit_tar, out, "--verify") == 0
    assert check_layout(str(out)) == WNIDS
    extracted = out / "val" / WNIDS[2] / "ILSVRC2012_val_00000001.JPEG"
    assert extracted.read_bytes() == (val_dir / extracted.name).read_bytes() and not extracted.is_symlink()
    assert not list((out / "train").glob(".*partial"))
    assert run(train_tar, val_tar, devkit_tar, out) == 0  # rerun: everything already there
