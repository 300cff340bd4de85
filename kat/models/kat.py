"""Kolmogorov-Arnold Transformer (KAT) models for timm: KAT-T/S/B.

KAT (Yang & Wang, arXiv 2409.10594) is a timm ViT/DeiT whose MLP is replaced by a GR-KAN channel mixer: a
group-rational activation in front of each of the two linear layers (docs/MODELS.md). Everything else is
timm's VisionTransformer, so timm's kwargs, model API, optimizer/EMA helpers and checkpoint layout carry over.

Initialisation (`weight_init`); both use mimetic attention init, they differ only in the KAN linears:
- 'vp' (default): the paper's variance-preserving rule actually applied, fc1 ~ N(0, alpha(act1) / d_in),
  fc2 ~ N(0, alpha(act2) / d_hidden), alpha = Var[x] / E[F(x)^2] of the activation in front of the layer. The
  KAN branch then starts with its output variance ~ its input's (0.91-1.08 per block for KAT-T).
- 'official': what the public KAT code ends up with: trunc_normal(std=0.02) on every linear (it computes the VP
  weights, then overwrites them), so the KAN branch starts with 0.006 (KAT-T) to 0.11 (KAT-B) of its input's
  variance. For reproduction studies.
"""

import math
from functools import partial
from pathlib import Path

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.models import VisionTransformer, build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._manipulate import named_apply
from timm.models.vision_transformer import Block, init_weights_vit_timm
from torch import Tensor, nn

from kat.models.channel_mixer import channel_mixer
from kat.models.pretrained import CheckpointMismatchError, checkpoint_filter_fn
from kat.rational import GroupRational, vp_gain

__all__ = ["FusedKatBlock", "KANMlp", "Kat", "init_mimetic_attention"]

WEIGHT_INITS = ("vp", "official")


class KANMlp(nn.Module):
    """GR-KAN channel mixer: act1 -> drop -> fc1 -> act2 -> drop -> norm -> fc2, every submodule called.

    Drop-in `mlp_layer` for timm's Block (takes the same kwargs as timm's Mlp). act1 starts as the identity and
    act2 as `act_init`; both are GroupRational over `groups` channel groups (docs/MODELS.md, GR-KAN function).
    `act_layer` is accepted for timm's Block and ignored: the activations are the rationals. This is the plain
    composition (the reference, and what hooks on submodules see); FusedKatBlock computes the same function
    from the same parameters without calling the submodules.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer=None,
        norm_layer=None,
        bias: bool | tuple[bool, bool] = True,
        drop: float | tuple[float, float] = 0.0,
        act_init: str = "swish",
        groups: int = 8,
        device=None,
        dtype=None,
    ):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        bias = bias if isinstance(bias, tuple) else (bias, bias)
        drop = drop if isinstance(drop, tuple) else (drop, drop)
        dd = dict(device=device, dtype=dtype)
        self.act_inits = ("identity", act_init)

        self.act1 = GroupRational(in_features, groups=groups, init="identity").to(device=device)
        self.drop1 = nn.Dropout(drop[0])
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias[0], **dd)
        self.act2 = GroupRational(hidden_features, groups=groups, init=act_init).to(device=device)
        self.drop2 = nn.Dropout(drop[1])
        # timm's scale_mlp_norm: a norm on the hidden features, where timm's Mlp puts it (before fc2).
        self.norm = norm_layer(hidden_features, **dd) if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias[1], **dd)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop1(self.act1(x))
        x = self.drop2(self.act2(self.fc1(x)))
        return self.fc2(self.norm(x))

    @torch.no_grad()
    def init_variance_preserving(self) -> None:
        """fc ~ N(0, alpha / d_in) with alpha = Var[x] / E[F(x)^2] of the activation F in front of fc (paper 4.4).

        For x ~ N(0, 1) into F, the linear layer's output then has unit variance again, so the branch output keeps
        the variance of its (LayerNorm-ed) input. Biases start at zero.
        """
        for act_init, fc in zip(self.act_inits, (self.fc1, self.fc2)):
            nn.init.normal_(fc.weight, std=math.sqrt(vp_gain(act_init) / fc.in_features))
            if fc.bias is not None:
                nn.init.zeros_(fc.bias)


class FusedKatBlock(Block):
    """timm's ViT block whose channel mixer `mlp(norm2(x))` runs fused (kat.models.channel_mixer).

    Same parameters, state-dict keys, function and gradients as timm's Block with a KANMlp (what `fused=False`
    builds). Eager, the mixer is one autograd node (an eager step is bound by host time); under torch.compile and
    while exporting it is composed of the GR-KAN ops. norm2 -> act1 is one kernel that neither writes nor saves
    the LayerNorm output: in KAT-S that saved fp32 output was the whole of KAT's training-memory excess over
    ViT's (docs/BENCHMARKS.md). norm2 and the mlp's submodules are not called, so hooks on them do not fire:
    build the model with fused=False to hook into them.

    Raises ValueError for what the fused mixer does not compute: dropout inside the mixer (proj_drop > 0), a norm
    before fc2 (timm's scale_mlp_norm), a norm2 other than nn.LayerNorm.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        mlp = self.mlp
        unfusable = (
            "norm2 is not an nn.LayerNorm" if not isinstance(self.norm2, nn.LayerNorm)
            else "the mlp is not a KANMlp" if not isinstance(mlp, KANMlp)
            else f"dropout p={mlp.drop1.p} in the mixer" if mlp.drop1.p or mlp.drop2.p
            else "a norm before fc2 (scale_mlp_norm)" if not isinstance(mlp.norm, nn.Identity)
            else None
        )  # fmt: skip
        if unfusable:
            raise ValueError(f"the fused KAT block cannot compute {unfusable}: build the model with fused=False")

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), *args, **kwargs)))  # as timm's Block
        return x + self.drop_path2(self.ls2(channel_mixer(x, self.norm2, self.mlp)))


def _factorize(target: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """left [d, rank], right [rank, d] with left @ right = target [d, d] P, P a random rank-`rank` projection.

    right = c B^T and left = target B / c for a random orthonormal basis B [d, rank] (P = B B^T, the identity
    when rank = d: then the product is the target exactly), with c equalising the two factors' norms. Split
    into heads (columns of left, rows of right), head h gets target P_h for a random rank-head_dim projection
    P_h, and the heads' products sum to the target. (Any factorisation gives the product; a QR of [d, rank] costs
    a fraction of the target's SVD, which adds seconds to building KAT-B on a CPU.)
    """
    basis = torch.linalg.qr(torch.randn(target.shape[0], rank, device=target.device)).Q
    left = target @ basis
    c = (left.norm() / basis.norm()).sqrt()
    return left / c, c * basis.T


@torch.no_grad()
def init_mimetic_attention(
    attn: nn.Module, qk: tuple[float, float] = (0.7, 0.7), vo: tuple[float, float] = (0.4, 0.4)
):
    """Mimetic init (Trockman & Kolter 2023): W_q W_k^T = a1 Z1 + b1 I and W_v W_proj = a2 Z2 - b2 I.

    Z1, Z2: [d, d] with i.i.d. uniform entries of variance 1/d; q = x W_q, k = x W_k, v = x W_v (timm's qkv
    weight rows are the columns of W_q, W_k, W_v). Each token then starts out attending mostly to itself and the
    value/output path starts near a negative identity plus noise, as in trained ViTs. The products hold summed
    over heads; each head gets a random rank-head_dim share of them (see _factorize).
    """
    qkv, proj = attn.qkv, attn.proj
    dim, inner = qkv.in_features, qkv.out_features // 3
    if inner > dim:
        raise ValueError(f"mimetic init needs the attention dim ({inner}) <= embed_dim ({dim})")

    def target(scale: float, identity: float) -> Tensor:
        bound = math.sqrt(3.0 / dim)  # uniform(-bound, bound) has variance 1/dim
        z = torch.empty(dim, dim, device=qkv.weight.device).uniform_(-bound, bound)
        return scale * z + identity * torch.eye(dim, device=z.device)

    w_q, w_k_t = _factorize(target(qk[0], qk[1]), inner)  # [dim, inner], [inner, dim]
    w_v, w_proj = _factorize(target(vo[0], -vo[1]), inner)
    qkv.weight.copy_(torch.cat([w_q.T, w_k_t, w_v.T]))  # Linear computes x @ weight.T
    proj.weight.copy_(w_proj.T)
    for layer in (qkv, proj):
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


class Kat(VisionTransformer):
    """Kolmogorov-Arnold Transformer: timm's VisionTransformer with KANMlp channel mixers.

    Args (on top of timm's VisionTransformer kwargs):
        act_init: init of every act2 ('swish' as published; 'gelu', 'identity', ... from kat.rational).
        kan_groups: channel groups of each GroupRational (8 as published).
        weight_init: 'vp' or 'official', see the module docstring and docs/MODELS.md.
        fused: True (default) builds FusedKatBlock (each block's channel mixer fused: fewer kernels, less memory,
            less host time); False builds timm's Block with KANMlp, every submodule called (every hook fires).
            Same parameters, state-dict keys, outputs and gradients either way. fused=True raises ValueError
            where the fused mixer does not apply (dropout inside the mixer, a norm before fc2, a norm2 other
            than LayerNorm): pass fused=False there.
    """

    def __init__(
        self,
        act_init: str = "swish",
        kan_groups: int = 8,
        weight_init: str = "vp",
        fix_init: bool = False,
        fused: bool = True,
        **kwargs,
    ):
        if weight_init not in WEIGHT_INITS:
            raise ValueError(f"weight_init={weight_init!r}: KAT models take one of {WEIGHT_INITS}")
        mlp_layer = partial(KANMlp, act_init=act_init, groups=kan_groups)
        # 'skip': timm's own init is replaced by init_weights below (timm 1.0.15 and 1.0.31 both accept it).
        kwargs.setdefault("block_fn", FusedKatBlock if fused else Block)
        super().__init__(mlp_layer=mlp_layer, weight_init="skip", **kwargs)
        self.fused = fused
        self.act_init, self.kan_groups = act_init, kan_groups
        self.weight_init_mode, self.fix_init = weight_init, fix_init
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, mode: str = "") -> None:
        """timm's ViT init (trunc_normal(0.02) on every linear, zero biases, pos_embed 0.02, tokens 1e-6), fitted
        rational inits, mimetic attention, then for 'vp' the variance-preserving fc1/fc2."""
        mode = mode or self.weight_init_mode
        if mode not in WEIGHT_INITS:
            raise ValueError(f"weight_init={mode!r}: KAT models take one of {WEIGHT_INITS}")
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=0.02)
        for token in (self.cls_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)
        named_apply(init_weights_vit_timm, self)
        for block in self.blocks:
            block.mlp.act1.reset_parameters()
            block.mlp.act2.reset_parameters()
            init_mimetic_attention(block.attn)
            if mode == "vp":
                block.mlp.init_variance_preserving()
        if self.fix_init:
            self.fix_init_weight()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """timm's ViT set plus every rational coefficient.

        The coefficients set the shape of the activation functions, like LayerNorm's scale and shift, not a
        weight matrix's scale: decay would pull every numerator to 0 (F -> 0) and every denominator to a plain
        polynomial. They are 2-D, so timm's rule of skipping 1-D parameters misses them. (The public KAT code
        leaves them in; its published runs decayed them with 0.05.)
        """
        rational = {
            f"{module_name}.{param_name}"
            for module_name, module in self.named_modules()
            if isinstance(module, GroupRational)
            for param_name, _ in module.named_parameters()
        }
        return super().no_weight_decay() | rational


def _cfg(**kwargs) -> dict:
    return {
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "paper_ids": "arXiv:2409.10594",
        "origin_url": "https://github.com/Adamdad/kat",
        **kwargs,
    }


# Published weights, as named by the public KAT README (github.com/Adamdad/kat) and its timm cfgs. We have not
# downloaded or validated them. Points to know:
# - The README's table swaps the KAT-T and KAT-S release links; we go by the file names (its own evaluation log
#   runs kat_tiny_patch16_224 on kat_tiny_patch16_224_1f3ad3b2...pth: 5,718,328 params, 74.56% top-1).
# - A user reports that file validating at 0.09% with the public code (Adamdad/kat issue #33): unresolved.
# - The README also links per-model hub repos (adamdad/kat_{tiny,small,base}_patch16_224[.vitft]) whose file
#   layout we have not checked; we use the repo whose file names the public code and README give.
# Tags: 'in1k' = trained from scratch on ImageNet-1k; 'vitft' = initialised from ViT weights, then trained.
_RELEASE = "https://github.com/Adamdad/kat/releases/download/checkpoint/"
_HUB = "adamdad/kat_pretained"  # sic


def _published(file: str, on_hub: bool = True, on_github: bool = True) -> dict:
    """Pretrained cfg of a published file (hub first: timm prefers hf_hub_id when huggingface_hub is there)."""
    hub = dict(hf_hub_id=_HUB, hf_hub_filename=file) if on_hub else {}
    url = _RELEASE + file if on_github else f"https://huggingface.co/{_HUB}/resolve/main/{file}"
    return _cfg(url=url, **hub)


default_cfgs = generate_default_cfgs(
    {
        "kat_tiny_patch16_224.in1k": _published(
            "kat_tiny_patch16_224_1f3ad3b2e69821f3d412f2924cf159a0e266f142d739cb68f68f796f5a0fe289.pth"
        ),
        "kat_tiny_patch16_224.vitft": _published(
            "kat_tiny_patch16_224-finetune_64f124d003803e4a7e1aba1ba23500ace359b544e8a5f0110993f25052e402fb.pth",
            on_hub=False,
        ),
        "kat_small_patch16_224.in1k": _published(
            "kat_small_patch16_224_32487885cf13d2c14e461c9016fac8ad43f7c769171f132530941e930aeb5fe2.pth"
        ),
        "kat_small_patch16_224.vitft": _published(
            "kat_small_patch_224-finetune_3ae087a4c28e2993468eb377d5151350c52c80b2a70cc48ceec63d1328ba58e0.pth",
            on_hub=False,
        ),
        "kat_base_patch16_224.in1k": _published(
            "kat_base_patch16_224_abff874d925d756d15cde97303f772a3460ddbd44b9c53fb9ce5cf15be230fb6.pth"
        ),
        "kat_base_patch16_224.vitft": _published(
            "kat_base_patch16_224-finetune_440bf1ead9dd8ecab642078cfb60ae542f1fa33ca65517260501e02c011e38f2.pth",
            on_github=False,
        ),
    }
)


def _create_kat(variant: str, pretrained: bool = False, **kwargs) -> Kat:
    """build_model_with_cfg for Kat; a local weights file (pretrained_cfg_overlay=dict(file=...)) is read by us.

    kat.weights.load reads the file safely (our checkpoints checksum-verified) and we hand timm its state dict.
    Its head's size becomes the cfg's num_classes, so our own checkpoints with other class counts load without
    extra arguments (pass num_classes to replace the head instead).
    """
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    path = overlay.get("file")
    if pretrained and path and overlay.get("state_dict") is None:
        from kat import weights  # kat.weights imports kat.models, so not at the top of this module

        if Path(path).is_dir():  # timm's `file` is a file; kat.weights.load would take a run directory
            raise FileNotFoundError(f"checkpoint {path} is a directory: pass a weights file in it (model.safetensors)")
        overlay["state_dict"] = weights.load(path).state_dict
        head = overlay["state_dict"].get("head.weight")
        if head is not None:
            overlay.setdefault("num_classes", head.shape[0])
    out_indices = kwargs.pop("out_indices", 3)
    try:
        model = build_model_with_cfg(
            Kat,
            variant,
            pretrained,
            pretrained_cfg_overlay=overlay,
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
            **kwargs,
        )
    except CheckpointMismatchError as e:
        raise CheckpointMismatchError(f"{path or variant}: {e}") from None
    # Keep the config light: the weights live in the model now.
    model.pretrained_cfg.pop("state_dict", None)
    return model


_ARCHS = {
    "tiny": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "small": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "base": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
}


@register_model
def kat_tiny_patch16_224(pretrained: bool = False, **kwargs) -> Kat:
    """KAT-T/16 at 224 px: ViT-Ti/16 with GR-KAN channel mixers, 5,718,328 params."""
    return _create_kat("kat_tiny_patch16_224", pretrained, **dict(_ARCHS["tiny"], **kwargs))


@register_model
def kat_small_patch16_224(pretrained: bool = False, **kwargs) -> Kat:
    """KAT-S/16 at 224 px: ViT-S/16 with GR-KAN channel mixers, 22,051,576 params."""
    return _create_kat("kat_small_patch16_224", pretrained, **dict(_ARCHS["small"], **kwargs))


@register_model
def kat_base_patch16_224(pretrained: bool = False, **kwargs) -> Kat:
    """KAT-B/16 at 224 px: ViT-B/16 with GR-KAN channel mixers, 86,568,568 params."""
    return _create_kat("kat_base_patch16_224", pretrained, **dict(_ARCHS["base"], **kwargs))


# Short names: the same models with the same pretrained cfgs (model.pretrained_cfg names the full name).
@register_model
def kat_tiny(pretrained: bool = False, **kwargs) -> Kat:
    """Alias of kat_tiny_patch16_224."""
    return kat_tiny_patch16_224(pretrained, **kwargs)


@register_model
def kat_small(pretrained: bool = False, **kwargs) -> Kat:
    """Alias of kat_small_patch16_224."""
    return kat_small_patch16_224(pretrained, **kwargs)


@register_model
def kat_base(pretrained: bool = False, **kwargs) -> Kat:
    """Alias of kat_base_patch16_224."""
    return kat_base_patch16_224(pretrained, **kwargs)
