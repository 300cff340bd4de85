"""Image transforms, random erasing, Mixup/CutMix and the training loss, all from timm (the DeiT recipe)."""

import timm.data
import torch.nn as nn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from kat.data.random_erasing import BatchRandomErasing


def resolve_data_config(model: nn.Module, cfg) -> dict:
    """The model's eval preprocessing (size, interpolation, mean/std, crop) with the config's overrides.

    timm keeps the pretrained_cfg's 224 px even when a model is built with another img_size, so the input size
    is read from the patch embedding when the model has one.
    """
    data_config = dict(timm.data.resolve_model_data_config(model))
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        data_config["input_size"] = (data_config["input_size"][0], *img_size)
    for key in ("crop_pct", "interpolation", "mean", "std"):
        if getattr(cfg, key) is not None:
            data_config[key] = getattr(cfg, key)
    return {
        "input_size": [int(v) for v in data_config["input_size"]],
        "interpolation": str(data_config["interpolation"]),
        "mean": [float(v) for v in data_config["mean"]],
        "std": [float(v) for v in data_config["std"]],
        "crop_pct": float(data_config["crop_pct"]),
    }


def build_transforms(cfg, data_config: dict):
    """(train, eval) transforms: RandomResizedCrop + flip + RandAugment; resize + center crop.

    Both end in uint8 [3, H, W] (timm's use_prefetcher=True): kat.data.DeviceLoader normalises on the device,
    and the training loop applies random erasing (build_random_erasing) to the normalised batch there.
    """
    # mean still matters: RandAugment fills with it.
    common = dict(
        input_size=tuple(data_config["input_size"]),
        mean=data_config["mean"],
        std=data_config["std"],
        use_prefetcher=True,
    )
    train = timm.data.create_transform(
        is_training=True,
        scale=tuple(cfg.scale),
        ratio=tuple(cfg.ratio),
        hflip=cfg.hflip,
        color_jitter=cfg.color_jitter,
        auto_augment=cfg.aa,
        interpolation=cfg.train_interpolation,
        **common,
    )
    evaluation = timm.data.create_transform(
        is_training=False,
        interpolation=data_config["interpolation"],
        crop_pct=data_config["crop_pct"],
        **common,
    )
    return train, evaluation


def build_random_erasing(cfg, device) -> BatchRandomErasing | None:
    """timm's random erasing of normalised [B, 3, H, W] batches on `device`, with the batch's boxes filled in a
    few tensor ops (kat.data.random_erasing); None when reprob is 0.

    Applied by the training loop to the batch it is about to use (after normalising, before Mixup, timm's
    order), so it draws this process' RNG at the step it belongs to and a checkpoint captures it.
    """
    if cfg.reprob <= 0:
        return None
    return BatchRandomErasing(cfg.reprob, mode=cfg.remode, max_count=cfg.recount, device=device)


def build_mixup(cfg, num_classes: int) -> Mixup | None:
    """timm Mixup/CutMix (it also applies label smoothing to the mixed targets); None when both are off."""
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    return Mixup(
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        prob=cfg.mixup_prob,
        switch_prob=cfg.mixup_switch_prob,
        mode=cfg.mixup_mode,
        label_smoothing=cfg.smoothing,
        num_classes=num_classes,
    )


def build_train_loss(cfg, mixup: Mixup | None) -> nn.Module:
    """Soft-target cross-entropy after mixup (targets are distributions), else (label-smoothed) cross-entropy."""
    if mixup is not None:
        return SoftTargetCrossEntropy()
    if cfg.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return nn.CrossEntropyLoss()
