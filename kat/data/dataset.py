"""ImageFolder datasets (train/ and val/) that are checked up front and survive a few unreadable images.

A layout problem (no val/, train and val with different classes, an empty class folder) is an error before
any training starts. An image that cannot be decoded mid-run (truncated download, not an image) is logged by
name, counted, and replaced by the next readable one so batches keep their size on every process; the run
stops once more than `max_bad_images` have failed, because then the data itself is broken.
"""

import logging
import multiprocessing
from pathlib import Path

from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

logger = logging.getLogger(__name__)

# Consecutive unreadable files before a single __getitem__ gives up (a folder of garbage, not a stray file).
MAX_CONSECUTIVE_FAILURES = 10


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

    def __getitem__(self, index: int):
        for attempt in range(MAX_CONSECUTIVE_FAILURES):
            path, target = self.samples[(index + attempt) % len(self.samples)]
            try:
                image = self.loader(path)
            except (OSError, ValueError, SyntaxError) as error:  # what PIL raises for broken files
                with self._bad_images.get_lock():
                    self._bad_images.value += 1
                logger.warning("skipped unreadable image %s (%s: %s)", path, type(error).__name__, error)
                continue
            if self.transform is not None:
                image = self.transform(image)
            return image, target
        raise DataError(f"{MAX_CONSECUTIVE_FAILURES} consecutive images from '{path}' back could not be read")


def build_datasets(data_dir, train_transform, eval_transform, max_bad_images: int = 100):
    """Return (train, val) ImageFolderDatasets after checking the layout; class indices agree by construction."""
    check_layout(data_dir)
    root = Path(data_dir)
    train = ImageFolderDataset(root / "train", train_transform, max_bad_images)
    val = ImageFolderDataset(root / "val", eval_transform, max_bad_images)
    return train, val
