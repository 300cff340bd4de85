"""JPEG decoding and the train augmentation on the training device (the `device_augment: true` option).

Why: on the loader's CPUs, decoding a JPEG and running RandomResizedCrop + RandAugment on PIL costs 5-6 ms
per image per core, so the 16 cores of our H200 host feed 2,300-3,500 images/s, a third to a half of what KAT-S
trains at with CUDA graphs (docs/BENCHMARKS.md section 4). With this option the workers only read each file
and draw its random parameters; the training process decodes the batch with nvJPEG and crops, flips and
RandAugments it with batched tensor ops on the GPU (kat.data.DeviceLoader runs this on a background thread
and a side stream): ~19 ms of one host thread per batch of 128 there, so 6 workers deliver ~6,000 images/s.

  worker:  file bytes + (crop box, flip, RandAugment draws), drawn with timm's own samplers from the header size
  device:  decode_jpeg(batch) -> per-image crop + antialiased resize -> flip -> BatchRandAugment -> uint8 batch

What differs from the CPU path (kat.data.build_transforms), deliberately: the crop's resize is PyTorch's
antialiased bicubic/bilinear instead of PIL's (pixels differ by rounding: tests/test_device_augment.py), nvJPEG's
IDCT rounds differently from libjpeg-turbo's, and the flip is drawn with Python's `random` instead of torch's;
RandAugment reproduces PIL's arithmetic (kat.data.rand_augment). The distributions of crops, flips and
augmentations are timm's. Only the train split: evaluation keeps the CPU transforms.
Files that are not JPEG (PNG, ...) are decoded by the worker (PIL) and only augmented on the device.
torchvision 0.29 deprecated its image decoders in favour of TorchCodec; decode_jpeg still works there.
"""

import random

import torch
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.io import ImageReadMode, decode_jpeg

from kat.data.dataset import DataError, EncodedImageFolderDataset
from kat.data.rand_augment import BatchRandAugment

INTERPOLATIONS = ("bilinear", "bicubic")
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
        batch = self._resized_crops(images, params[:, CROP].long())
        flip = params[:, FLIP].bool().view(-1, 1, 1, 1).to(self.device, non_blocking=True)
        batch = torch.where(flip, batch.flip(-1), batch)
        if self.config.rand_augment is not None:
            batch = self.config.rand_augment(batch, params[:, FLIP + 1 :].view(len(batch), -1, 3))
        return batch, targets.to(self.device, non_blocking=True)

    def _resized_crops(self, images: list[torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
        """RandomResizedCrop's crop + resize for the whole batch: the crops are zero-padded into a few canvases
        [n, 3, h, w] of at most CANVAS_PIXELS pixels each (one, for ImageNet-sized images) and resampled by two
        batched matmuls with per-image antialiasing weights (PIL's separable resize: horizontal pass, rounded
        to uint8, then vertical), instead of one resize call per image."""
        out_h, out_w = self.config.size
        batch = torch.empty(len(images), 3, out_h, out_w, dtype=torch.uint8, device=self.device)
        for group in _canvas_groups(boxes[:, 2:].tolist()):
            heights, widths = boxes[group, 2], boxes[group, 3]
            canvas = torch.zeros(len(group), 3, int(heights.max()), int(widths.max()), dtype=torch.uint8,
                                 device=self.device)  # fmt: skip
            crops = [images[i][:, t : t + h, le : le + w] for i, (t, le, h, w) in zip(group, boxes[group].tolist())]
            # One call for all the copies (per-image copy_ calls cost the host ~70 us each, 9 ms per batch).
            torch._foreach_copy_(
                [canvas[slot, :, : c.shape[1], : c.shape[2]] for slot, c in enumerate(crops)], crops
            )
            canvas = canvas.float()
            rows = resize_weights(heights, out_h, canvas.shape[2], self.config.interpolation, self.device)
            cols = resize_weights(widths, out_w, canvas.shape[3], self.config.interpolation, self.device)
            x = (canvas @ cols.transpose(1, 2).unsqueeze(1)).round_().clamp_(0, 255)  # [n, 3, h, out_w]
            x = (rows.unsqueeze(1) @ x).round_().clamp_(0, 255)  # [n, 3, out_h, out_w]
            batch[torch.tensor(group, device=self.device)] = x.to(torch.uint8)
        return batch

    def _decode(self, buffer, lengths, decoded, samples) -> list[torch.Tensor]:
        """uint8 [3, H, W] images on the device; the JPEGs in one nvJPEG call (on a CUDA device)."""
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
        good = [image for image in images if image is not None]
        if not good:
            raise DataError("no image of a whole batch could be decoded; the data looks damaged")
        return [image if image is not None else good[0] for image in images]  # a bad one: repeat a good one

    def _decode_one(self, jpeg: torch.Tensor, sample: int) -> torch.Tensor | None:
        """One JPEG on the CPU (libjpeg-turbo also reads what nvJPEG refuses, e.g. CMYK); None if unreadable."""
        try:
            return decode_jpeg(jpeg, mode=ImageReadMode.RGB).to(self.device, non_blocking=True)
        except RuntimeError as error:
            self.dataset.count_bad_image(self.dataset.samples[sample][0], error)
            return None


CANVAS_PIXELS = 1 << 24  # per canvas: 16.7 M pixels, 200 MB as float32 RGB; 128 crops of 360 x 360


def _canvas_groups(sizes: list[list[int]]) -> list[list[int]]:
    """Batch indices grouped so that len(group) x (tallest crop) x (widest crop) <= CANVAS_PIXELS (one big
    image does not blow up the whole batch's canvas); largest crops first."""
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i][0] * sizes[i][1])
    groups, current, height, width = [], [], 0, 0
    for i in order:
        h, w = max(height, sizes[i][0]), max(width, sizes[i][1])
        if current and (len(current) + 1) * h * w > CANVAS_PIXELS:
            groups.append(current)
            current, h, w = [], sizes[i][0], sizes[i][1]
        current.append(i)
        height, width = h, w
    return groups + [current]


def _pil_filter(x: torch.Tensor, interpolation: str) -> torch.Tensor:
    """PIL's resampling kernels: bicubic with a = -0.5 (support 2), bilinear = triangle (support 1)."""
    x = x.abs()
    if interpolation == "bilinear":
        return (1 - x).clamp_(min=0)
    a = -0.5
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resize_weights(sizes: torch.Tensor, out: int, width: int, interpolation: str, device) -> torch.Tensor:
    """[B, out, width] weights that resize row b's first sizes[b] pixels to `out` pixels as PIL does: output
    pixel o centred at (o + 0.5) * scale, kernel stretched by max(scale, 1) (antialiasing when shrinking),
    pixels outside the crop weighted 0, each row normalised to sum 1."""
    sizes = sizes.to(device=device, dtype=torch.float64)
    scale = (sizes / out).view(-1, 1, 1)
    stretch = scale.clamp(min=1)
    centre = (torch.arange(out, device=device, dtype=torch.float64).view(1, -1, 1) + 0.5) * scale
    pixel = torch.arange(width, device=device, dtype=torch.float64).view(1, 1, -1)
    weights = _pil_filter((pixel + 0.5 - centre) / stretch, interpolation)
    weights = weights * (pixel < sizes.view(-1, 1, 1))
    return (weights / weights.sum(-1, keepdim=True)).float()
