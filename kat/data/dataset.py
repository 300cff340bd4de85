"""ImageFolder datasets (train/ and val/) that are checked up front and survive a few unreadable images.

A layout problem (no val/, train and val with different classes, an empty class folder) is an error before
any training starts. An image that cannot be decoded mid-run (truncated download, not an image) is logged by
name, counted, and replaced by the next readable one so batches keep their size on every process; the run
stops once more than `max_bad_images` have failed, because then the data itself is broken.
"""

import io
import logging
import multiprocessing
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

logger = logging.getLogger(__name__)

# Consecutive unreadable files before a single __getitem__ gives up (a folder of garbage, not a stray file).
MAX_CONSECUTIVE_FAILURES = 10
JPEG_MAGIC = b"\xff\xd8\xff"


class DataError(ValueError):
    """The dataset on disk cannot be used as it is; the message names the path and the fix."""


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


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
        super().__init__(str(root), transform=transform, allow_empty=True)
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
        # Shared with DataLoader workers (inherited at start), so the training process sees their count.
        self._bad_images = multiprocessing.Value("i", 0)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = _class_folders(Path(directory))  # the same rule check_layout uses (hidden folders skipped)
        return classes, {name: index for index, name in enumerate(classes)}

    @property
    def num_bad_images(self) -> int:
        return self._bad_images.value

    def check_bad_images(self) -> None:
        """Raise once more images failed than the run tolerates (called by the training loop)."""
        if self.num_bad_images > self.max_bad_images:
            raise DataError(
                f"{self.num_bad_images} images under '{self.root}' could not be read (limit max_bad_images="
                f"{self.max_bad_images}); the data looks damaged: re-extract it, or raise max_bad_images"
            )

    def count_bad_image(self, path: str, error: Exception) -> None:
        with self._bad_images.get_lock():
            self._bad_images.value += 1
        logger.warning("skipped unreadable image %s (%s: %s)", path, type(error).__name__, error)

    def __getitem__(self, index: int):
        for attempt in range(MAX_CONSECUTIVE_FAILURES):
            sample = (index + attempt) % len(self.samples)
            path, target = self.samples[sample]
            try:
                loaded = self._read(path)
            except (OSError, ValueError, SyntaxError) as error:  # what PIL raises for broken files
                self.count_bad_image(path, error)
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
        pixels = torch.from_numpy(np.array(image.convert("RGB")))  # [H, W, 3]
        return pixels.permute(2, 0, 1).contiguous(), image

    def _item(self, loaded, target: int, sample: int):
        data, image = loaded
        return data, target, torch.tensor(self.draw_params(image), dtype=torch.float32), sample


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
