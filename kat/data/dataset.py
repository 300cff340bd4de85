"""ImageFolder datasets (train/ and val/) that are checked up front and survive a few unreadable images.

A layout problem (no val/, train and val with different classes, an empty or unreadable class folder) is an
error before any training starts. Folders are walked with explicit symlink rules (`make_dataset`). An image
that cannot be decoded mid-run (truncated download, not an image, over PIL's decompression-bomb limit) is
logged by name, counted once per file, and replaced by the next readable one so batches keep their size on
every process; the run stops once more than `max_bad_images` distinct files have failed, because then the
data itself is broken.
"""

import collections
import io
import logging
import multiprocessing
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

logger = logging.getLogger(__name__)

# Consecutive unreadable files before a single __getitem__ gives up (a folder of garbage, not a stray file).
MAX_CONSECUTIVE_FAILURES = 10
JPEG_MAGIC = b"\xff\xd8\xff"


class DataError(ValueError):
    """The dataset on disk cannot be used as it is; the message names the path and the fix."""


def _unreadable(path, error: OSError) -> DataError:
    return DataError(
        f"'{path}' cannot be read ({error.strerror or error}); "
        "fix its permissions (e.g. chmod -R a+rX) or remove it"
    )


def _class_folders(split_dir: Path) -> list[str]:
    try:
        return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as error:
        raise _unreadable(split_dir, error) from error


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. PIL's convert("RGB") clips 16-bit greyscale ('I;16*', and 'I' as 16-bit PNGs may open)
    to 0 or 255, so those are rescaled from 0..65535 first; every other mode (palette, RGBA, L, CMYK) converts
    as PIL does. Float images, and 'I' beyond 16 bit, have no range we could assume and are refused."""
    if image.mode.startswith("I;16") or image.mode == "I":
        pixels = np.asarray(image).astype(np.int64)
        if pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
            raise ValueError(f"{image.mode} image with values outside 0..65535; save it as 8 or 16 bit")
        grey = ((pixels * 255 + 32767) // 65535).astype(np.uint8)  # rounded 16 -> 8 bit
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "F":
        raise ValueError("floating-point (mode F) image; save it as 8 or 16 bit")
    return image.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    with open(path, "rb") as file:
        return to_rgb(Image.open(file))


def _describe(names: set[str], limit: int = 5) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_layout(data_dir: str | Path) -> list[str]:
    """Validate data_dir/{train,val}/<class>/ and return the class names (sorted, as ImageFolder orders them)."""
    root = Path(data_dir)
    hint = "expected data_dir/train/<class>/<image> and data_dir/val/<class>/<image> (see data/README.md)"
    if not root.is_dir():
        raise DataError(f"data_dir '{root}' does not exist; {hint}")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"'{root / split}' is missing; {hint}")
    train_classes, val_classes = _class_folders(root / "train"), _class_folders(root / "val")
    if not train_classes:
        raise DataError(f"'{root / 'train'}' has no class folders; {hint}")
    if train_classes != val_classes:
        only_train, only_val = set(train_classes) - set(val_classes), set(val_classes) - set(train_classes)
        parts = [f"only in train/: {_describe(only_train)}"] if only_train else []
        parts += [f"only in val/: {_describe(only_val)}"] if only_val else []
        raise DataError(f"train/ and val/ of '{root}' have different class folders ({'; '.join(parts)})")
    return train_classes


class ImageFolderDataset(ImageFolder):
    """torchvision ImageFolder that skips unreadable images (logged by name, counted across workers)."""

    def __init__(self, root: str | Path, transform=None, max_bad_images: int = 100):
        super().__init__(str(root), transform=transform, loader=load_rgb, allow_empty=True)
        counts = [0] * len(self.classes)
        for target in self.targets:
            counts[target] += 1
        empty = [str(Path(root) / name) for name, count in zip(self.classes, counts) if count == 0]
        if empty:
            raise DataError(
                f"class folder(s) without images: {_describe(set(empty))} (image types: {', '.join(IMG_EXTENSIONS)})"
                "; add images or remove the class from both train/ and val/"
            )
        self.max_bad_images = max_bad_images
        # One flag per sample and their count, shared with DataLoader workers (inherited at start): a file
        # that fails every epoch counts once, whichever process read it.
        self._bad_samples = multiprocessing.Array("b", len(self.samples))
        self._bad_images = multiprocessing.Value("i", 0, lock=False)  # changed under _bad_samples' lock

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = _class_folders(Path(directory))  # the same rule check_layout uses (hidden folders skipped)
        return classes, {name: index for index, name in enumerate(classes)}

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        """(path, class index) of each image file under directory/<class>/, once, in torchvision's order.

        Real folders and files are listed first, then symlinks are followed (datasets are often assembled
        from links), except one that leads to a folder or image already listed: a loop such as
        `train/3/loop -> ..`, or a link into another class, would otherwise relabel other classes' images as
        this one, or recurse. Skipped links are logged. An unreadable folder is an error, not an empty class.
        """
        root = Path(directory)
        seen_dirs = {_dir_identity(root / name) for name in [".", *class_to_idx]}
        seen_files, listed, links, duplicates = set(), {}, collections.deque(), []

        def walk(top: str, index: int) -> None:
            """List the real folders under `top`; symlinks found are queued in `links`."""
            pending = [top]
            while pending:
                folder = pending.pop()
                try:
                    entries = list(os.scandir(folder))
                    folder_dev = os.stat(folder).st_dev
                except OSError as error:
                    raise _unreadable(folder, error) from error
                names = []
                listed[folder] = (index, names)
                for entry in entries:
                    if entry.is_symlink():
                        links.append((entry, index))
                    elif entry.is_dir():
                        seen_dirs.add(_dir_identity(entry.path))
                        pending.append(entry.path)
                    elif has_file_allowed_extension(entry.name, extensions):
                        identity = (folder_dev, entry.inode())  # from the listing, no extra stat
                        if identity in seen_files:
                            duplicates.append(entry.path)
                        else:
                            seen_files.add(identity)
                            names.append(entry.name)

        for name, index in class_to_idx.items():
            walk(str(root / name), index)
        while links:
            entry, index = links.popleft()
            if entry.is_dir():
                identity = _dir_identity(entry.path)
                if identity in seen_dirs:
                    logger.warning(
                        "skipped %s: it leads to %s, which is already part of the dataset "
                        "(a symlink loop or a second path to the same images)",
                        entry.path,
                        os.path.realpath(entry.path),
                    )
                    continue
                seen_dirs.add(identity)
                walk(entry.path, index)
            elif has_file_allowed_extension(entry.name, extensions):
                identity = _link_target_identity(entry)
                if identity in seen_files:
                    duplicates.append(entry.path)
                    continue
                seen_files.add(identity)
                listed[os.path.dirname(entry.path)][1].append(entry.name)
        if duplicates:
            logger.warning(
                "skipped %d second path(s) to images already listed (symlinks or hard links), e.g. %s",
                len(duplicates),
                duplicates[0],
            )
        # torchvision's order: class by class, folders by path, files by name
        return [
            (os.path.join(folder, name), index)
            for folder, (index, names) in sorted(listed.items(), key=lambda item: (item[1][0], item[0]))
            for name in sorted(names)
        ]

    @property
    def num_bad_images(self) -> int:
        """Distinct files that could not be read so far (by any process, in any epoch)."""
        return self._bad_images.value

    def check_bad_images(self) -> None:
        """Raise once more images failed than the run tolerates (called by the training loop)."""
        if self.num_bad_images > self.max_bad_images:
            raise DataError(
                f"{self.num_bad_images} images under '{self.root}' could not be read (limit max_bad_images="
                f"{self.max_bad_images}); the data looks damaged: re-extract it, or raise max_bad_images"
            )

    def count_bad_image(self, sample: int, error: Exception) -> None:
        """Count sample `sample` as unreadable (once per file) and log it the first time."""
        with self._bad_samples.get_lock():
            if self._bad_samples[sample]:
                return
            self._bad_samples[sample] = 1
            self._bad_images.value += 1
        path = self.samples[sample][0]
        logger.warning("skipped unreadable image %s (%s: %s)", path, type(error).__name__, error)

    def __getitem__(self, index: int):
        for attempt in range(MAX_CONSECUTIVE_FAILURES):
            sample = (index + attempt) % len(self.samples)
            path, target = self.samples[sample]
            try:
                loaded = self._read(path)
            # What PIL raises for broken files; a decompression bomb would fail again on every rerun.
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                self.count_bad_image(sample, error)
                continue
            return self._item(loaded, target, sample)
        raise DataError(f"{MAX_CONSECUTIVE_FAILURES} consecutive images from '{path}' back could not be read")

    def _read(self, path: str):
        """What may fail on a broken file (and then counts as a bad image)."""
        return self.loader(path)

    def _item(self, image, target: int, sample: int):
        return (self.transform(image) if self.transform is not None else image), target


class EncodedImageFolderDataset(ImageFolderDataset):
    """Items are (the file's JPEG bytes as uint8 [n], or for other formats the decoded uint8 [3, H, W]; target;
    float32 params; sample index) for decoding and augmentation on the device (kat.data.gpu).

    Only the header is parsed here: `draw_params(image)` draws the item's random augmentation parameters
    (crop box, flip, ...) from the header-only PIL image, in this worker, with its seeded RNG.
    """

    def __init__(self, root: str | Path, draw_params, max_bad_images: int = 100):
        super().__init__(root, transform=None, max_bad_images=max_bad_images)
        self.draw_params = draw_params

    def _read(self, path: str) -> tuple[torch.Tensor, Image.Image]:
        with open(path, "rb") as file:
            data = file.read()
        image = Image.open(io.BytesIO(data))  # parses the header only
        if data.startswith(JPEG_MAGIC):
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), image
        pixels = torch.from_numpy(np.array(to_rgb(image)))  # [H, W, 3]
        return pixels.permute(2, 0, 1).contiguous(), image

    def _item(self, loaded, target: int, sample: int):
        data, image = loaded
        return data, target, torch.tensor(self.draw_params(image), dtype=torch.float32), sample


def _dir_identity(path) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


def _link_target_identity(entry: os.DirEntry) -> tuple:
    """(device, inode) of the file a symlink points to; a broken link is its own path (it fails when read)."""
    try:
        target = entry.stat()
    except OSError:
        return (entry.path,)
    return target.st_dev, target.st_ino


def build_datasets(
    data_dir, train_transform, eval_transform, max_bad_images: int = 100, draw_train_params=None
):
    """Return (train, val) datasets after checking the layout; class indices agree by construction.

    With `draw_train_params` the train set is an EncodedImageFolderDataset (decoding on the device)."""
    check_layout(data_dir)
    root = Path(data_dir)
    if draw_train_params is not None:
        train = EncodedImageFolderDataset(root / "train", draw_train_params, max_bad_images)
    else:
        train = ImageFolderDataset(root / "train", train_transform, max_bad_images)
    val = ImageFolderDataset(root / "val", eval_transform, max_bad_images)
    return train, val
