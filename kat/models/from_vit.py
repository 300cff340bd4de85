"""KAT from ViT weights (the paper's KAT*): start a KAT from a trained timm ViT of the same size.

A KAT is a ViT whose MLP `fc1 -> GELU -> fc2` became `act1 -> fc1 -> act2 -> fc2` (docs/MODELS.md), with the
same state-dict keys for everything but the rational coefficients. So a ViT's weights copy over key for key; with
act1 the identity and act2 our rational fit of GELU (the ViT's own activation, max error 3.1e-3 on [-3, 3]), the
converted KAT computes the ViT's function up to that fit error, and training continues from there.

`load_weights_except_head` is the shared last step, also used for our own checkpoints and published KAT files:
everything must fit exactly, except a classifier with another class count, which keeps the model's fresh init.

ViT weights come as a state dict (.safetensors/.pth), as a JAX `.npz` (Google's augreg release) or as a timm
model name plus a local file; the last two are read by timm into a timm ViT (`vit_from_npz`,
`vit_from_timm_name`), whose state dict then converts like any other. Nothing is downloaded. Which source is
which is kat.weights' job (`kat.weights.load`, `kat.weights.init_from`); this module converts.
"""

import logging
import math
from pathlib import Path

import numpy as np
import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from kat.models.pretrained import (
    CheckpointMismatchError,
    checkpoint_filter_fn,
    load_checkpoint_file,
    unwrap_state_dict,
)
from kat.rational import GroupRational
from kat.rational.coefficients import init_coefficients

logger = logging.getLogger(__name__)

VIT_ACTIVATION = "gelu"  # timm's ViTs use erf GELU, the function kat.rational's 'gelu' coefficients fit


def is_kat_state_dict(state_dict: dict[str, Tensor]) -> bool:
    """Whether a state dict already holds rational coefficients (a KAT checkpoint, not a ViT one)."""
    return any(".mlp.act1.weight_" in key or ".mlp.act2.weight_" in key for key in state_dict)


def _head_keys(model: nn.Module) -> set[str]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("classifier") or "head"
    return {f"{name}.weight", f"{name}.bias"}


@torch.no_grad()
def load_weights_except_head(model: nn.Module, state_dict: dict[str, Tensor], source: str) -> bool:
    """Load `state_dict` into `model`; a classifier of another shape is skipped. Returns whether it was loaded.

    Patch and position embeddings are resampled to the model's patch size and grid (checkpoint_filter_fn); any
    other missing, unexpected or mis-shaped key raises CheckpointMismatchError naming it and `source`.
    """
    try:
        state_dict = checkpoint_filter_fn(state_dict, model)
    except CheckpointMismatchError as error:
        raise CheckpointMismatchError(f"{source}: {error}") from None
    own = model.state_dict()
    head = _head_keys(model) & own.keys()  # empty for a model without classifier (num_classes=0)
    head_fits = all(k in state_dict and state_dict[k].shape == own[k].shape for k in head)
    if not head_fits:
        weight = next(k for k in sorted(head) if k.endswith("weight"))
        given = state_dict.get(weight)
        logger.warning(
            "%s: classifier %s does not fit the model's %s; it starts freshly initialised",
            source,
            tuple(given.shape) if given is not None else "(absent)",
            tuple(own[weight].shape),
        )
    state_dict = {k: v for k, v in state_dict.items() if head_fits or k not in _head_keys(model)}
    if not head:
        state_dict = {k: v for k, v in state_dict.items() if k not in _head_keys(model)}
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    left = [k for k in missing if head_fits or k not in head]
    if left or unexpected:  # checkpoint_filter_fn checked all but the stem conv and head: only those get here
        raise CheckpointMismatchError(f"{source}: missing keys {left}, unexpected keys {unexpected}")
    return head_fits


@torch.no_grad()
def kat_from_vit(
    kat_model: nn.Module, vit_state_dict: dict[str, Tensor], source: str = "ViT weights"
) -> bool:
    """Copy a timm ViT's weights into `kat_model` (a KAT of the same size); act1 -> identity, act2 -> GELU fit.

    Copied: patch_embed, cls_token, pos_embed (resampled to the KAT's grid if needed), every block's
    norm1/attn/norm2 and mlp.fc1/fc2, the final norm, and the head when its class count matches (returns whether
    it did). Raises CheckpointMismatchError naming the keys when the ViT is not the KAT's size, or ValueError if
    the weights already are a KAT's.
    """
    vit_state_dict = unwrap_state_dict(vit_state_dict)
    if is_kat_state_dict(vit_state_dict):
        raise ValueError(f"{source} holds rational coefficients: it is a KAT checkpoint, not a ViT one")
    rationals = [(name, m) for name, m in kat_model.named_modules() if isinstance(m, GroupRational)]
    if not rationals:
        raise ValueError(
            f"{type(kat_model).__name__} has no GroupRational activations: it is not a KAT model"
        )

    # The ViT's dict plus the coefficients we choose: act1 = identity (fc1 sees what the ViT's fc1 saw),
    # act2 = the GELU fit (fc2 sees ~ what the ViT's fc2 saw).
    state_dict = dict(vit_state_dict)
    for name, module in rationals:
        init = VIT_ACTIVATION if name.endswith("act2") else "identity"
        numerator, denominator = init_coefficients(init)
        state_dict[f"{name}.weight_numerator"] = torch.tensor(numerator).expand(1, 6).clone()
        state_dict[f"{name}.weight_denominator"] = torch.tensor(denominator).expand(module.groups, 4).clone()
        module.init = init  # reset_parameters() and the repr then say what the activation now is
    return load_weights_except_head(kat_model, state_dict, source)


def _npz_vit_kwargs(weights: np.lib.npyio.NpzFile, path: Path) -> dict:
    """VisionTransformer kwargs of the ViT stored in an augreg-layout .npz, read off its array shapes.

    timm's npz loader reads as many blocks as the model it fills has and skips a head of another size, so the
    ViT is built from the file's own shapes: every array is then read, and kat_from_vit compares the ViT with
    the KAT key for key.
    """
    keys = set(weights.files)
    prefix = next((p for p in ("", "opt/target/", "params/") if f"{p}embedding/kernel" in keys), None)
    if prefix is None or f"{prefix}Transformer/posembed_input/pos_embedding" not in keys:
        raise ValueError(
            f"{path} is not a ViT .npz in the augreg layout timm reads (no 'embedding/kernel' and "
            "'Transformer/posembed_input/pos_embedding' arrays; big_vision's stacked layout is not supported)"
        )
    if f"{prefix}cls" not in keys:
        raise ValueError(f"{path} holds a ViT without class token ('cls'); a KAT has one")
    blocks = f"{prefix}Transformer/encoderblock_"
    depth = len({key[len(blocks) :].split("/")[0] for key in keys if key.startswith(blocks)})
    kernel = weights[f"{prefix}embedding/kernel"]  # [patch, patch, in_chans, embed_dim]
    query = weights[f"{blocks}0/MultiHeadDotProductAttention_1/query/kernel"]  # [embed_dim, heads, head_dim]
    hidden = weights[f"{blocks}0/MlpBlock_3/Dense_0/kernel"].shape[1]  # [embed_dim, mlp_hidden]
    positions = weights[f"{prefix}Transformer/posembed_input/pos_embedding"].shape[1] - 1  # the cls' aside
    grid = math.isqrt(positions)
    head = weights[f"{prefix}head/kernel"].shape[1] if f"{prefix}head/kernel" in keys else 0  # [dim, classes]
    return dict(
        img_size=grid * kernel.shape[0],
        patch_size=kernel.shape[0],
        in_chans=kernel.shape[2],
        embed_dim=kernel.shape[3],
        depth=depth,
        num_heads=query.shape[1],
        mlp_ratio=hidden / kernel.shape[3],
        num_classes=head,
    )


def vit_from_npz(path: str | Path) -> VisionTransformer:
    """The timm ViT stored in a JAX .npz (augreg layout), loaded by timm's own npz reader (load_pretrained)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ViT weights file {path} does not exist")
    with np.load(path, allow_pickle=False) as weights:
        kwargs = _npz_vit_kwargs(weights, path)
    vit = VisionTransformer(**kwargs)
    try:
        vit.load_pretrained(str(path))
    except KeyError as error:
        raise ValueError(f"{path}: array {error} missing for a ViT with {kwargs}") from error
    return vit


def vit_from_timm_name(name: str, file: str | Path | None) -> nn.Module:
    """timm ViT `name` with weights from a local `file` (.npz, .safetensors, .pth), as
    timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=file)) does, never downloading.

    The ViT keeps its pretrained class count, so a file with another head fails here with the shapes named.
    A .safetensors/.pth is read by load_checkpoint_file (torch.load(weights_only=True), which older timm does
    not use) and handed to timm as `state_dict`; timm's filter then converts DeiT/other layouts as usual.
    """
    if not timm.is_model(name):
        raise ValueError(f"'{name}' is neither an existing file or directory nor a timm model name")
    if file is None:
        raise ValueError(
            f"'{name}' is a timm model name, but runs never download weights: download them once (e.g. "
            f"timm.create_model('{name}', pretrained=True) on a machine with network, then "
            "safetensors.torch.save_file(model.state_dict(), 'vit.safetensors')) and set init_from_file to "
            "that local .safetensors/.pth/.npz file"
        )
    file = Path(file)
    if file.suffix == ".npz":
        if not file.is_file():
            raise FileNotFoundError(f"ViT weights file {file} does not exist")
        # custom_load: timm hands the file to the model's own reader, VisionTransformer.load_pretrained.
        source = dict(file=str(file), custom_load=True)
    else:
        source = dict(state_dict=load_checkpoint_file(file), custom_load=False)
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(source="", **source))
    except (RuntimeError, KeyError) as error:
        raise ValueError(
            f"{file} does not hold the weights of timm model '{name}' (pick the name, tag included, of the "
            f"model the file was saved from): {error}"
        ) from error
