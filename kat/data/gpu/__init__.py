"""JPEG decoding and the train augmentation on the training device (the `device_augment: true` option).

Why this package exists: on the loader's CPUs, decoding a JPEG and running RandomResizedCrop + RandAugment on
PIL costs ~5-6 ms per image per core (docs/BENCHMARKS.md section 4), so a host's cores feed fewer images per
second than one GPU trains KAT-S at. With this option the workers only read each file and draw its random
parameters; the training process decodes the batch with nvJPEG and crops, flips and RandAugments it on the
GPU (kat.data.DeviceLoader runs this on a background thread and a side stream; its rates: the same section).

  worker:  file bytes + (crop box, flip, RandAugment draws), drawn with timm's samplers from the header size
  device:  decode_jpeg(batch) -> crop + PIL's resize + flip (resized_crop) -> RandAugment (rand_augment)

Modules: `augment` (the config, the batch collation and DeviceAugment, which runs the steps above),
`resized_crop` (the crop + resize + flip and its torch reference) with its Triton kernels and their
launcher in `resized_crop_kernels`, and `rand_augment` (a package: policy and draws, op arguments, torch
reference ops, kernels). The kernels take their host helpers from kat.triton_utils, as the GR-KAN ops do.

What differs from the CPU path (kat.data.build_transforms), deliberately: nvJPEG's IDCT rounds differently
from libjpeg-turbo's, and the flip is drawn with Python's `random` instead of torch's. The crop's resize is
PIL's own arithmetic (the same pixels: tests/test_resized_crop.py) and RandAugment reproduces PIL's
(tests/test_rand_augment.py). The distributions of crops, flips and augmentations are timm's. Only the train
split: evaluation keeps the CPU transforms.
"""

from kat.data.gpu.augment import DeviceAugment, DeviceAugmentConfig, collate_encoded

__all__ = ["DeviceAugment", "DeviceAugmentConfig", "collate_encoded"]
