"""DeviceAugment: one collated batch of encoded images -> decoded, cropped, flipped, RandAugmented uint8
images on the device; DeviceAugmentConfig: the settings and the worker-side draws; collate_encoded: the
workers' batch.

Files that are not JPEG (PNG, ...) are decoded by the worker (PIL) and only augmented on the device. A file
that cannot be decoded is counted as a bad image and its whole sample replaced by another of the batch (its
pixels, label and augmentation parameters), as the CPU path's dataset replaces it by the next readable file.
torchvision 0.29 deprecated its image decoders in favour of TorchCodec; decode_jpeg still works there.
"""

import random

import torch
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.io import ImageReadMode, decode_jpeg

from kat.data.dataset import DataError, EncodedImageFolderDataset
from kat.data.gpu.rand_augment import BatchRandAugment
from kat.data.gpu.resized_crop import INTERPOLATIONS, resized_crops

CROP = slice(0, 4)  # params columns: crop box (top, left, height, width), then flip, then RandAugment's draws
FLIP = 4


class DeviceAugmentConfig:
    """The train augmentation's settings, checked once (the config keys they come from are named in errors)."""

    def __init__(self, cfg, data_config: dict):
        self.size = tuple(data_config["input_size"][1:])
        if cfg.train_interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"train_interpolation={cfg.train_interpolation!r} with device_augment: true; use one of "
                f"{', '.join(INTERPOLATIONS)} (or device_augment: false)"
            )
        if cfg.aa is None and cfg.color_jitter > 0:
            raise ValueError(
                f"device_augment: true does not implement color jitter (color_jitter={cfg.color_jitter}, used "
                "while aa is null); set color_jitter: 0, or aa to a 'rand-...' policy, or device_augment: false"
            )
        self.interpolation = cfg.train_interpolation
        self.crop = RandomResizedCropAndInterpolation(
            self.size, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio)
        )
        self.hflip = cfg.hflip
        self.rand_augment = None
        if cfg.aa is not None:
            img_mean = tuple(min(255, round(255 * m)) for m in data_config["mean"])
            try:
                self.rand_augment = BatchRandAugment(cfg.aa, img_mean, interpolation=self.interpolation)
            except ValueError as error:
                raise ValueError(f"aa={cfg.aa!r} with device_augment: true: {error}") from error

    def draw_params(self, image: Image.Image) -> list[float]:
        """One image's crop box, flip and RandAugment draws (timm's samplers), from its header-only PIL image."""
        params = [
            *self.crop.get_params(image, self.crop.scale, self.crop.ratio),
            float(random.random() < self.hflip),
        ]
        if self.rand_augment is not None:
            params += self.rand_augment.sample().flatten().tolist()
        return params


def collate_encoded(items):
    """(JPEG bytes of the batch in one uint8 buffer, their lengths [B] (0: not a JPEG), the other images decoded,
    targets [B], params [B, P], sample indices [B]). One buffer: one shared-memory transfer from the worker,
    one pinned copy, instead of one per image."""
    data, targets, params, samples = zip(*items)
    jpegs = [d for d in data if d.dim() == 1]
    lengths = torch.tensor([d.numel() if d.dim() == 1 else 0 for d in data])
    buffer = torch.cat(jpegs) if jpegs else torch.empty(0, dtype=torch.uint8)
    decoded = [d for d in data if d.dim() == 3]
    return buffer, lengths, decoded, torch.tensor(targets), torch.stack(params), torch.tensor(samples)


class DeviceAugment:
    """Decodes and augments one collated batch on `device`; returns uint8 [B, 3, H, W] and the targets."""

    def __init__(self, config: DeviceAugmentConfig, dataset: EncodedImageFolderDataset, device):
        self.config, self.device = config, torch.device(device)
        self.dataset = dataset  # where undecodable files are counted

    def __call__(
        self, buffer, lengths, decoded, targets, params, samples
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # params stay on the host: they pick the crops' slices and RandAugment's op groups
        images = self._decode(buffer, lengths, decoded, samples)
        if any(image is None for image in images):
            images, targets, params = _substitute_undecodable(images, targets, params)
        batch = resized_crops(
            images, params[:, CROP].long(), params[:, FLIP].bool(), self.config.size, self.config.interpolation
        )
        if self.config.rand_augment is not None:
            batch = self.config.rand_augment(batch, params[:, FLIP + 1 :].view(len(batch), -1, 3))
        return batch, targets.to(self.device, non_blocking=True)

    def _decode(self, buffer, lengths, decoded, samples) -> list[torch.Tensor | None]:
        """uint8 [3, H, W] images on the device, None where a file cannot be decoded; the JPEGs in one nvJPEG
        call (on a CUDA device)."""
        is_jpeg = (lengths > 0).tolist()
        jpegs = list(buffer.split([n for n in lengths.tolist() if n > 0]))
        others = iter(decoded)
        images = [None if j else next(others).to(self.device, non_blocking=True) for j in is_jpeg]
        where = [i for i, j in enumerate(is_jpeg) if j]
        if jpegs:
            try:
                results = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:  # one file nvJPEG cannot read fails the whole call: decode one by one
                results = [self._decode_one(jpeg, int(samples[i])) for i, jpeg in zip(where, jpegs)]
            for i, image in zip(where, results):
                images[i] = image
        return images

    def _decode_one(self, jpeg: torch.Tensor, sample: int) -> torch.Tensor | None:
        """One JPEG on the CPU (libjpeg-turbo also reads what nvJPEG refuses, e.g. CMYK); None if unreadable."""
        try:
            return decode_jpeg(jpeg, mode=ImageReadMode.RGB).to(self.device, non_blocking=True)
        except RuntimeError as error:
            self.dataset.count_bad_image(sample, error)
            return None


def _substitute_undecodable(images: list, targets: torch.Tensor, params: torch.Tensor):
    """(images, targets, params) with each undecodable sample (image None) replaced by the next decodable
    one of the batch, cyclically: its pixels with its label and its crop box, flip and RandAugment draws (a
    box drawn from another file's header may not fit these pixels), so batches keep their size, as the CPU
    path's."""
    good = [i for i, image in enumerate(images) if image is not None]
    if not good:
        raise DataError("no image of a whole batch could be decoded; the data looks damaged")
    source = [i if image is not None else next((j for j in good if j > i), good[0]) for i, image in enumerate(images)]
    index = torch.tensor(source)
    return [images[i] for i in source], targets[index], params[index]
