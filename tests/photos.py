"""Synthetic test photos for the image tests (shared by test_device_augment and test_resized_crop)."""

import numpy as np
from PIL import Image


def photo_pixels(rng: np.random.Generator, height: int, width: int, cell: int, noise: int) -> np.ndarray:
    """uint8 [H, W, 3]: random colours on a grid of `cell`-pixel cells, bicubic-smoothed, plus uniform noise in
    [-noise, noise]: compresses and resamples like a photo, not like flat colour or pure noise."""
    coarse = Image.fromarray(rng.integers(0, 256, (height // cell + 2, width // cell + 2, 3), dtype=np.uint8))
    pixels = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.int16)
    return (pixels + rng.integers(-noise, noise + 1, (height, width, 3))).clip(0, 255).astype(np.uint8)
