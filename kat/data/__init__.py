"""Data pipeline: ImageFolder datasets with layout checks and bad-image skipping, a resumable sampler, timm
transforms/random erasing/Mixup, uint8 batches normalised on the device, and (device_augment: kat.data.gpu)
JPEG decoding and augmentation on the device.
The embedded demo set lives in data/demo/ (built by data/prepare_demo.py)."""

from kat.data.dataset import (
    DataError,
    EncodedImageFolderDataset,
    ImageFolderDataset,
    build_datasets,
    check_layout,
)
from kat.data.device import DeviceLoader
from kat.data.gpu import DeviceAugment, DeviceAugmentConfig, collate_encoded
from kat.data.sampler import ResumableSampler
from kat.data.transforms import (
    build_mixup,
    build_random_erasing,
    build_train_loss,
    build_transforms,
    resolve_data_config,
)

__all__ = [
    "DataError",
    "DeviceAugment",
    "DeviceAugmentConfig",
    "DeviceLoader",
    "EncodedImageFolderDataset",
    "ImageFolderDataset",
    "ResumableSampler",
    "build_datasets",
    "build_mixup",
    "build_random_erasing",
    "build_train_loss",
    "build_transforms",
    "check_layout",
    "collate_encoded",
    "resolve_data_config",
]
