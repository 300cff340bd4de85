"""KAT from ViT weights (the paper's KAT*): start a KAT from a trained timm ViT of the same size.

A KAT is a ViT whose MLP `fc1 -> GELU -> fc2` became `act1 -> fc1 -> act2 -> fc2` (KAT_FACTS section 1), with the
same state-dict keys for everything but the rational coefficients. So a ViT's weights copy over key for key; with
act1 the identity and act2 our rational fit of GELU (the ViT's own activation, max error 3.1e-3 on [-3, 3]), the
converted KAT computes the ViT's function up to that fit error, and training continues from there.

`load_weights_except_head` is the shared last step, also used for our own checkpoints and published KAT files:
everything must fit exactly, except a classifier with another class count, which keeps the model's fresh init.
"""

import logging

import torch
from torch import Tensor, nn

from kat.models.pretrained import CheckpointMismatchError, checkpoint_filter_fn, unwrap_state_dict
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
