"""RandAugment's policy on the host: timm's op sets, the config string's parser, and the draws a loader worker
makes per image (`RandAugmentPolicy.sample`), with Python's `random` (the worker's seeded RNG)."""

import enum
import math
import random
import re

import torch

LEVEL_DENOM = 10.0  # timm: magnitude 10 is an op's full strength

RAND_TRANSFORMS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
RAND_INCREASING_TRANSFORMS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
# Ops whose argument timm negates with probability 1/2 (its _randomly_negate).
NEGATED = {
    "Rotate",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
}


class Kind(enum.IntEnum):
    """What an image's op does, per layer: the tensor ops batch each family (LUT..EQUALIZE, COLOR..SHARPNESS,
    AFFINE) into one computation; the layer kernel branches on it per image."""

    IDENTITY = 0  # the layer skipped this image
    LUT = 1  # a table of the op's argument: Invert, Posterize, Solarize, SolarizeAdd
    AUTOCONTRAST = 2  # tables from the image's histograms
    EQUALIZE = 3
    COLOR = 4  # blends with a degenerate image
    CONTRAST = 5
    BRIGHTNESS = 6
    SHARPNESS = 7
    AFFINE = 8  # Rotate, ShearX/Y, TranslateX/YRel


def op_kind(name: str) -> Kind:
    """The kind of an op of RAND_TRANSFORMS / RAND_INCREASING_TRANSFORMS."""
    if name in ("AutoContrast", "Equalize"):
        return Kind[name.upper()]
    if name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"):
        return Kind.AFFINE
    base = name.removesuffix("Increasing")
    if base in ("Color", "Contrast", "Brightness", "Sharpness"):
        return Kind[base.upper()]
    return Kind.LUT


# Config keys: name -> (parser, description). Longest first: 'mstd' and 'mmax' also start with 'm'.
_KEYS = {
    "mstd": (float, "mstd<float> magnitude std (0: fixed; inf or > 100: uniform in [0, m])"),
    "mmax": (int, "mmax<int> magnitude max (default 10)"),
    "inc": (int, "inc<0|1> the increasing op set"),
    "m": (int, "m<int> magnitude"),
    "n": (int, "n<int> ops per image"),
    "p": (float, "p<float> probability of each op"),
}


class RandAugmentPolicy:
    """timm's RandAugment policy from its config string: 'rand' then '-'-separated m, n, mstd, mmax, inc, p
    (timm's rand_augment_transform grammar), and the per-image draws."""

    def __init__(self, config_str: str):
        settings = parse_config(config_str)
        self.magnitude = settings.get("m", 10)
        self.num_layers = settings.get("n", 2)
        self.prob = settings.get("p", 0.5)
        std = settings.get("mstd", 0.0)
        self.magnitude_std = math.inf if std > 100 else std
        self.magnitude_max = settings.get("mmax", 0) or LEVEL_DENOM  # timm: mmax0 means the default
        self.ops = RAND_INCREASING_TRANSFORMS if settings.get("inc", 0) else RAND_TRANSFORMS

    def sample(self) -> torch.Tensor:
        """One image's draws, float32 [num_layers, 3]: (op index or -1 when skipped, magnitude, sign).

        timm's draws per op: the probability skip, then the magnitude noise, then (for NEGATED ops) the sign.
        timm picks the ops with numpy; here Python's `random` draws everything (same distribution).
        """
        rows = []
        for _ in range(self.num_layers):
            op = random.randrange(len(self.ops))
            if self.prob < 1.0 and random.random() > self.prob:
                rows.append((-1.0, 0.0, 1.0))
                continue
            magnitude = self.magnitude
            if self.magnitude_std == math.inf:
                magnitude = random.uniform(0, magnitude)
            elif self.magnitude_std > 0:
                magnitude = random.gauss(magnitude, self.magnitude_std)
            magnitude = max(0.0, min(magnitude, self.magnitude_max))
            sign = -1.0 if self.ops[op] in NEGATED and random.random() > 0.5 else 1.0
            rows.append((float(op), magnitude, sign))
        return torch.tensor(rows, dtype=torch.float32).view(self.num_layers, 3)


def parse_config(config_str: str) -> dict:
    """timm's rand_augment_transform grammar -> {key: value}; a ValueError for anything it does not cover."""
    sections = config_str.split("-")
    if sections[0] != "rand":
        raise ValueError(
            f"RandAugment config {config_str!r} must start with 'rand' (e.g. 'rand-m9-mstd0.5'); timm's "
            "other policies (AutoAugment, AugMix) are not implemented"
        )
    supported = "; ".join(description for _, description in _KEYS.values())
    settings = {}
    for section in sections[1:]:
        key = next((k for k in _KEYS if section.startswith(k)), None)
        if key is None:
            name = "t" if section.startswith("t") else re.match(r"[a-z]*", section)[0] or section
            raise ValueError(
                f"RandAugment config {config_str!r}: unsupported key {name!r} (section {section!r}); "
                f"supported keys: {supported}. timm's 't' transform sets (weighted choice) are not "
                "implemented"
            )
        parse, description = _KEYS[key]
        try:
            value = parse(section[len(key) :])
        except ValueError:
            raise ValueError(
                f"RandAugment config {config_str!r}: section {section!r} has no valid value; "
                f"expected {description}"
            ) from None
        if key in settings:
            raise ValueError(f"RandAugment config {config_str!r}: key {key!r} appears twice")
        if (key in ("n", "mmax") and value < 0) or (key == "inc" and value not in (0, 1)):
            raise ValueError(
                f"RandAugment config {config_str!r}: section {section!r}; expected {description}"
            )
        settings[key] = value
    return settings
