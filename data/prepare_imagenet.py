"""Turn ILSVRC-2012 as downloaded into the ImageFolder layout train.py reads: data/imagenet/{train,val}/<wnid>/.

    python data/prepare_imagenet.py --train /datasets/ILSVRC2012_img_train.tar \\
        --val /datasets/ILSVRC2012_img_val.tar --val-labels /datasets/ILSVRC2012_devkit_t12.tar.gz

Inputs (each either form):
  --train       ILSVRC2012_img_train.tar (one n*.tar per class inside), a folder of n*.tar, or a folder of n*/
  --val         ILSVRC2012_img_val.tar, or the folder of 50,000 flat ILSVRC2012_val_*.JPEG
  --val-labels  ILSVRC2012_devkit_t12.tar.gz (reads meta.mat: needs scipy), or a LOC_val_solution.csv-style
                file (ImageId,PredictionString with the wnid first: Kaggle's ImageNet release)
Images in folders are linked (--link symlink, the default, or hard) or copied; images in tars are extracted.
Reruns skip what is done (a class from a tar is extracted to a temp folder and renamed when complete), so an
interrupted run continues. At the end the counts are checked (1,281,167 train / 50,000 val / 1,000 classes,
--expect-* to change) and, with --verify, every image is decoded by PIL; problems are listed and the exit
status is 1.
"""

import argparse
import csv
import io
import os
import shutil
import sys
import tarfile
from pathlib import Path

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
DEVKIT_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = "data/meta.mat"


def place(src: Path, dst: Path, link: str) -> None:
    """Link or copy one image; an existing destination is left as it is (resumed runs)."""
    if dst.exists() or dst.is_symlink():
        return
    tmp = dst.with_name(dst.name + ".partial")
    tmp.unlink(missing_ok=True)
    if link == "symlink":
        tmp.symlink_to(src.resolve())
    elif link == "hard":
        os.link(src, tmp)
    else:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)  # atomic: dst is whole or absent


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def extract_class_tar(fileobj, class_dir: Path) -> None:
    """Extract one class tar (a stream) into class_dir via a temp folder renamed at the end."""
    tmp = class_dir.with_name(f".{class_dir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for member in tar:
            if member.isfile() and is_image(member.name):
                (tmp / Path(member.name).name).write_bytes(tar.extractfile(member).read())
    os.replace(tmp, class_dir)


def prepare_train(src: Path, out: Path, link: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if src.is_file():  # ILSVRC2012_img_train.tar: one n*.tar per class
        with tarfile.open(src, mode="r|*") as outer:
            for member in outer:
                wnid = Path(member.name).name.removesuffix(".tar")
                if not member.isfile() or not member.name.endswith(".tar") or (out / wnid).is_dir():
                    continue
                print(f"train: extracting {wnid}", flush=True)
                extract_class_tar(outer.extractfile(member), out / wnid)
        return
    if not src.is_dir():
        raise SystemExit(f"--train {src}: no such file or folder")
    for entry in sorted(src.iterdir()):
        if entry.is_file() and entry.suffix == ".tar":
            if not (out / entry.stem).is_dir():
                print(f"train: extracting {entry.name}", flush=True)
                with open(entry, "rb") as f:
                    extract_class_tar(f, out / entry.stem)
        elif entry.is_dir():
            (out / entry.name).mkdir(exist_ok=True)
            for image in sorted(entry.iterdir()):
                if is_image(image.name):
                    place(image, out / entry.name / image.name, link)


def read_val_labels(path: Path) -> dict[str, str]:
    """Validation image stem (ILSVRC2012_val_00000001) -> wnid, from the devkit or a LOC_val_solution.csv."""
    if not path.is_file():
        raise SystemExit(f"--val-labels {path}: no such file")
    if path.suffix == ".csv":
        labels = {}
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if not {"ImageId", "PredictionString"} <= set(reader.fieldnames or ()):
                raise SystemExit(f"--val-labels {path}: expected the columns ImageId,PredictionString")
            for row in reader:
                labels[row["ImageId"]] = row["PredictionString"].split()[0]
        return labels
    try:
        import scipy.io
    except ImportError:
        raise SystemExit(
            f"--val-labels {path}: reading the devkit's meta.mat needs scipy (pip install scipy); or pass a "
            "LOC_val_solution.csv-style file (ImageId,PredictionString) instead"
        ) from None
    with tarfile.open(path) as tar:
        files = {m.name.split("/", 1)[-1]: m for m in tar.getmembers() if m.isfile()}
        if DEVKIT_TRUTH not in files or DEVKIT_META not in files:
            raise SystemExit(
                f"--val-labels {path}: not the ILSVRC2012 devkit (no {DEVKIT_TRUTH} / {DEVKIT_META})"
            )
        truth = tar.extractfile(files[DEVKIT_TRUTH]).read().decode().split()
        meta = scipy.io.loadmat(io.BytesIO(tar.extractfile(files[DEVKIT_META]).read()), squeeze_me=True)
    wnid_of = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in meta["synsets"]}
    # The ground-truth file lists the class id of ILSVRC2012_val_00000001, _00000002, ... in order.
    return {f"ILSVRC2012_val_{i:08d}": wnid_of[int(label)] for i, label in enumerate(truth, start=1)}


def prepare_val(src: Path, labels: dict[str, str], out: Path, link: str) -> list[str]:
    """Sort the flat validation images into class folders; returns the problems found."""
    problems, seen = [], set()

    def destination(name: str) -> Path | None:
        stem = Path(name).stem
        seen.add(stem)
        if stem not in labels:
            problems.append(f"val image {name} has no label in --val-labels")
            return None
        (out / labels[stem]).mkdir(parents=True, exist_ok=True)
        return out / labels[stem] / Path(name).name

    if src.is_file():  # ILSVRC2012_img_val.tar
        with tarfile.open(src, mode="r|*") as tar:
            for member in tar:
                if not (member.isfile() and is_image(member.name)):
                    continue
                dst = destination(member.name)
                if dst is not None and not dst.exists():
                    tmp = dst.with_name(dst.name + ".partial")
                    tmp.write_bytes(tar.extractfile(member).read())
                    os.replace(tmp, dst)
    elif src.is_dir():
        for image in sorted(src.iterdir()):
            if is_image(image.name) and (dst := destination(image.name)):
                place(image, dst, link)
    else:
        raise SystemExit(f"--val {src}: no such file or folder")
    missing = sorted(set(labels) - seen)
    problems += [f"val image {stem} is labelled but not in --val" for stem in missing]
    return problems


def check(out: Path, expect_train: int, expect_val: int, expect_classes: int, verify: bool) -> list[str]:
    """Counts against the expected ones; with verify, every image decoded by PIL."""
    problems = []
    counts = {}
    for split, expected in (("train", expect_train), ("val", expect_val)):
        classes = sorted(p for p in (out / split).iterdir() if p.is_dir() and not p.name.startswith("."))
        found = [f for c in classes for f in c.iterdir() if is_image(f.name)]
        images = [f for f in found if f.exists()]  # a link whose source was moved or deleted does not count
        problems += [f"{split}: dangling link {f} (its source is gone)" for f in found if not f.exists()]
        counts[split] = {p.name for p in classes}
        print(f"{split}: {len(images):,} images in {len(classes):,} classes")
        if len(images) != expected:
            problems.append(f"{split}: {len(images):,} images, expected {expected:,}")
        if len(classes) != expect_classes:
            problems.append(f"{split}: {len(classes):,} classes, expected {expect_classes:,}")
        if verify:
            from PIL import Image

            for f in images:
                try:
                    with Image.open(f) as image:
                        image.verify()
                except Exception as error:  # PIL raises many types for broken files
                    problems.append(f"{split}: corrupt image {f}: {error}")
    if counts["train"] != counts["val"]:
        problems.append(
            f"train/ and val/ class folders differ: {sorted(counts['train'] ^ counts['val'])[:10]}"
        )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--train", type=Path, required=True, help="train tar, folder of class tars or folders"
    )
    parser.add_argument("--val", type=Path, required=True, help="val tar or folder of flat JPEGs")
    parser.add_argument(
        "--val-labels", type=Path, required=True, help="devkit .tar.gz or LOC_val_solution.csv"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("data/imagenet"), help="output root (default: %(default)s)"
    )
    parser.add_argument(
        "--link",
        choices=("symlink", "hard", "copy"),
        default="symlink",
        help="how images in folders are placed (tars are always extracted; default: %(default)s)",
    )
    parser.add_argument("--verify", action="store_true", help="decode every image with PIL (slow: hours)")
    parser.add_argument("--expect-train", type=int, default=1_281_167)
    parser.add_argument("--expect-val", type=int, default=50_000)
    parser.add_argument("--expect-classes", type=int, default=1_000)
    args = parser.parse_args(argv)

    labels = read_val_labels(args.val_labels)
    prepare_train(args.train, args.out / "train", args.link)
    problems = prepare_val(args.val, labels, args.out / "val", args.link)
    problems += check(args.out, args.expect_train, args.expect_val, args.expect_classes, args.verify)
    for problem in problems[:50]:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    if len(problems) > 50:
        print(f"... and {len(problems) - 50} more problems", file=sys.stderr)
    print(f"{args.out}: {'ready' if not problems else f'{len(problems)} problems (see above)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
