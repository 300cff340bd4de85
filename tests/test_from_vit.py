"""KAT from ViT weights: right after conversion the KAT computes the ViT's function (act2's GELU fit aside)."""

import copy
import math

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

import kat.weights
from kat.models.from_vit import kat_from_vit, vit_from_npz, vit_from_timm_name
from kat.models.pretrained import CheckpointMismatchError, load_checkpoint_file
from kat.rational.coefficients import init_coefficients
from kat.training.config import ConfigError, TrainConfig
from kat.training.loop import init_weights_from

SMALL = dict(img_size=32, depth=2, num_classes=10)


def trained_like_vit(**kwargs) -> nn.Module:
    """A small timm ViT with weights of trained-model scale (timm's init, std 0.02, would make every block a
    near no-op and hide any conversion error): linears ~ N(0, 1/d_in), so fc1 outputs span GELU's curved part."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", **{**SMALL, **kwargs}).eval()
    with torch.no_grad():
        for module in vit.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=1 / math.sqrt(module.in_features))
                nn.init.normal_(module.bias, std=0.1)
            elif isinstance(module, nn.LayerNorm):
                nn.init.normal_(module.weight, mean=1.0, std=0.1)
                nn.init.normal_(module.bias, std=0.1)
        nn.init.normal_(vit.pos_embed, std=0.5)
        nn.init.normal_(vit.cls_token, std=0.5)
    return vit


def test_converted_kat_reproduces_vit_logits():
    vit = trained_like_vit()
    model = timm.create_model("kat_tiny", **SMALL, act_init="gelu").eval()
    assert kat_from_vit(model, vit.state_dict()) is True  # head copied (same class count)
    for block in model.blocks:
        n1, d1 = init_coefficients("identity")
        assert block.mlp.act1.weight_numerator.tolist() == [list(map(float, n1))]
        assert torch.all(block.mlp.act1.weight_denominator == 0)
        assert torch.allclose(block.mlp.act2.weight_numerator, torch.tensor([init_coefficients("gelu")[0]]))

    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        vit_logits, kat_logits = vit(x), model(x)
        # act1 = identity exactly: the KAT's MLP with act2 swapped for exact GELU is the ViT's MLP, bit for bit.
        h = torch.randn(4, 5, 192)
        mlp, vit_mlp = model.blocks[0].mlp, vit.blocks[0].mlp
        assert torch.equal(mlp.act1(h), h)
        exact = mlp.fc2(nn.functional.gelu(mlp.fc1(mlp.act1(h))))
        assert torch.allclose(exact, vit_mlp(h), atol=1e-6, rtol=0)
        # act2 alone: within the fit's 3.1e-3 of GELU on [-3, 3].
        z = torch.linspace(-3, 3, 601)[:, None].expand(601, 768).contiguous()  # [points, hidden channels]
        assert (mlp.act2(z) - nn.functional.gelu(z)).abs().max() < 3.2e-3

    diff = (kat_logits - vit_logits).abs().max().item()
    scale = vit_logits.abs().max().item()
    # Measured (torch 2.14 CPU, this seed): max |KAT - ViT| = 3.0e-3 on logits of magnitude up to 2.5. The whole
    # difference is act2's GELU fit error (<= 3.1e-3 per element), propagated through 2 blocks and the head.
    assert diff < 1e-2, f"max |KAT - ViT| logit difference {diff:.2e} (logit scale {scale:.2f})"
    assert torch.equal(kat_logits.argmax(-1), vit_logits.argmax(-1))
    print(f"\nmax |KAT - ViT| logit difference after conversion: {diff:.2e} (logit scale {scale:.2f})")


def test_conversion_from_file_with_other_class_count_resets_head(tmp_path):
    vit = trained_like_vit()
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, path)
    model = timm.create_model("kat_tiny", **{**SMALL, "num_classes": 3}, act_init="gelu")
    fresh_head = model.head.weight.clone()
    assert kat_from_vit(model, load_checkpoint_file(path), source=str(path)) is False
    assert torch.equal(model.head.weight, fresh_head)
    assert torch.equal(model.blocks[1].mlp.fc2.weight, vit.blocks[1].mlp.fc2.weight)
    assert torch.equal(model.pos_embed, vit.pos_embed)


def test_conversion_names_mismatched_keys():
    vit = trained_like_vit(depth=3)
    model = timm.create_model("kat_tiny", **SMALL)
    with pytest.raises(CheckpointMismatchError, match=r"(?s)vit\.pth.*unexpected keys.*blocks\.2\."):
        kat_from_vit(model, vit.state_dict(), source="vit.pth")
    wide = timm.create_model("vit_small_patch16_224", **SMALL)
    with pytest.raises(CheckpointMismatchError, match=r"(?s)shape mismatches.*blocks\.0\.attn\.qkv\.weight"):
        kat_from_vit(model, wide.state_dict())
    with pytest.raises(ValueError, match="KAT checkpoint, not a ViT"):
        kat_from_vit(model, model.state_dict())


def save_augreg_npz(vit: nn.Module, path) -> None:
    """Write a timm ViT as Google's augreg .npz (the layout timm's _load_weights reads), inverting its transposes:
    conv kernels HWIO, dense kernels [in, out], attention kernels [D, heads, head_dim] / out [heads, head_dim, D]."""
    d, heads = vit.embed_dim, vit.blocks[0].attn.num_heads
    arrays = {
        "embedding/kernel": vit.patch_embed.proj.weight.permute(2, 3, 1, 0),
        "embedding/bias": vit.patch_embed.proj.bias,
        "cls": vit.cls_token,
        "Transformer/posembed_input/pos_embedding": vit.pos_embed,
        "Transformer/encoder_norm/scale": vit.norm.weight,
        "Transformer/encoder_norm/bias": vit.norm.bias,
        "head/kernel": vit.head.weight.T,
        "head/bias": vit.head.bias,
    }
    for i, block in enumerate(vit.blocks):
        p = f"Transformer/encoderblock_{i}/"
        for norm, name in ((block.norm1, "LayerNorm_0"), (block.norm2, "LayerNorm_2")):
            arrays[f"{p}{name}/scale"], arrays[f"{p}{name}/bias"] = norm.weight, norm.bias
        mha = f"{p}MultiHeadDotProductAttention_1/"
        for n, w, b in zip(
            ("query", "key", "value"), block.attn.qkv.weight.chunk(3), block.attn.qkv.bias.chunk(3)
        ):
            arrays[f"{mha}{n}/kernel"] = w.T.reshape(d, heads, -1)
            arrays[f"{mha}{n}/bias"] = b.reshape(heads, -1)
        arrays[f"{mha}out/kernel"] = block.attn.proj.weight.reshape(d, heads, -1).permute(1, 2, 0)
        arrays[f"{mha}out/bias"] = block.attn.proj.bias
        for r, fc in enumerate((block.mlp.fc1, block.mlp.fc2)):
            arrays[f"{p}MlpBlock_3/Dense_{r}/kernel"] = fc.weight.T
            arrays[f"{p}MlpBlock_3/Dense_{r}/bias"] = fc.bias
    np.savez(path, **{k: v.detach().numpy() for k, v in arrays.items()})


NPZ_VIT = dict(img_size=32, patch_size=8, embed_dim=48, num_heads=3, depth=2, num_classes=10)


def test_npz_read_by_timm_round_trips_and_converts(tmp_path):
    vit = trained_like_vit(**NPZ_VIT)
    save_augreg_npz(vit, tmp_path / "vit.npz")
    loaded = vit_from_npz(tmp_path / "vit.npz")  # size read off the arrays, weights read by timm
    assert (loaded.embed_dim, len(loaded.blocks), loaded.blocks[0].attn.num_heads) == (48, 2, 3)
    assert loaded.patch_embed.grid_size == (4, 4) and loaded.num_classes == 10
    own = vit.state_dict()
    assert loaded.state_dict().keys() == own.keys()
    assert all(torch.equal(v, own[k]) for k, v in loaded.state_dict().items()), "npz did not round-trip"

    kat_kwargs = {k: v for k, v in NPZ_VIT.items() if k != "depth"}
    model = timm.create_model("kat_tiny", depth=2, **kat_kwargs, act_init="gelu").eval()
    assert kat_from_vit(model, loaded.state_dict(), "vit.npz") is True
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(x) - vit(x)).abs().max() < 1e-2  # act2's GELU fit error only, as above

    deeper = timm.create_model("kat_tiny", depth=3, **kat_kwargs, act_init="gelu")
    with pytest.raises(CheckpointMismatchError, match=r"(?s)vit\.npz.*keys missing.*blocks\.2\."):
        kat_from_vit(deeper, loaded.state_dict(), "vit.npz")  # timm's reader alone would fill 2 of 3 blocks
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(ValueError, match=r"other\.npz is not a ViT \.npz in the augreg layout"):
        vit_from_npz(tmp_path / "other.npz")


def test_timm_name_with_local_file(tmp_path):
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224")  # full size: a name means the name's architecture
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, tmp_path / "vit.safetensors")
    save_augreg_npz(vit, tmp_path / "vit.npz")
    for file in ("vit.safetensors", "vit.npz"):
        loaded = vit_from_timm_name("vit_tiny_patch16_224", tmp_path / file)
        assert all(torch.equal(v, vit.state_dict()[k]) for k, v in loaded.state_dict().items()), file

    with pytest.raises(ValueError, match=r"runs never download weights.*set init_from_file"):
        vit_from_timm_name("vit_tiny_patch16_224", None)
    with pytest.raises(
        ValueError, match=r"vit\.safetensors does not hold the weights of timm model 'vit_small"
    ):
        vit_from_timm_name("vit_small_patch16_224", tmp_path / "vit.safetensors")
    with pytest.raises(ValueError, match="neither an existing file or directory nor a timm model name"):
        vit_from_timm_name("vit_tinny_patch16_224", tmp_path / "vit.safetensors")


def test_init_from_config_keys(tmp_path):
    """The config route (loop.init_weights_from): .npz path, name + init_from_file, and their errors."""
    vit = trained_like_vit(**NPZ_VIT)
    save_augreg_npz(vit, tmp_path / "vit.npz")
    kat_kwargs = {k: v for k, v in NPZ_VIT.items() if k != "num_classes"}
    model = timm.create_model("kat_tiny", **kat_kwargs, num_classes=3, act_init="gelu")
    init_weights_from(model, TrainConfig(init_from=str(tmp_path / "vit.npz")))
    assert torch.equal(model.blocks[1].attn.qkv.weight, vit.blocks[1].attn.qkv.weight)
    assert model.blocks[1].mlp.act2.init == "gelu" and model.blocks[1].mlp.act1.init == "identity"

    with pytest.raises(ConfigError, match=r"init_from.*runs never download weights"):
        init_weights_from(model, TrainConfig(init_from="vit_tiny_patch16_224"))
    with pytest.raises(
        ConfigError, match=r"init_from_file .* is only read when init_from is a timm model name"
    ):
        init_weights_from(model, TrainConfig(init_from=str(tmp_path / "vit.npz"), init_from_file="x.pth"))
    with pytest.raises(ConfigError, match=r"init_from.*vit\.npz holds ViT weights.*act_init: gelu"):
        init_weights_from(
            timm.create_model("kat_tiny", **kat_kwargs), TrainConfig(init_from=str(tmp_path / "vit.npz"))
        )


def test_weights_init_from_every_source(tmp_path):
    """kat.weights.init_from, the config route's entry point: each kind of source, what it logs, its errors."""
    vit = trained_like_vit(**NPZ_VIT)
    save_augreg_npz(vit, tmp_path / "vit.npz")
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, tmp_path / "vit.safetensors")
    kat_kwargs = {k: v for k, v in NPZ_VIT.items() if k != "num_classes"}

    def fresh(**kwargs):
        return timm.create_model("kat_tiny", **{**kat_kwargs, "act_init": "gelu", **kwargs})

    untouched = fresh(num_classes=10)  # copied rather than built again: building a KAT is the slow part here
    for source in (tmp_path / "vit.npz", tmp_path / "vit.safetensors"):
        model = copy.deepcopy(untouched)
        assert kat.weights.init_from(model, str(source)) == f"{source} (all weights)"
        assert torch.equal(model.blocks[1].attn.qkv.weight, vit.blocks[1].attn.qkv.weight)
        assert torch.equal(model.head.weight, vit.head.weight)

    # A KAT's weights (a published-style .pth) into a KAT with another class count: all but the head.
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "kat.pth")  # the KAT* just made
    model = copy.deepcopy(untouched)
    model.reset_classifier(3)
    assert kat.weights.init_from(model, str(tmp_path / "kat.pth")) == f"{tmp_path / 'kat.pth'} (all but the head)"
    assert torch.equal(model.blocks[1].attn.qkv.weight, vit.blocks[1].attn.qkv.weight)
    assert model.head.weight.shape == (3, 48)
    weights = kat.weights.load(tmp_path / "kat.pth")
    assert (weights.kind, weights.epoch, weights.meta, weights.ema) == ("file", 3, None, False)
    assert kat.weights.load(tmp_path / "vit.npz").kind == "npz"

    errors = [  # the first three fail before the model is touched
        (lambda: kat.weights.init_from(model, "vit_tiny_patch16_224"), "runs never download weights"),
        (lambda: kat.weights.init_from(model, str(tmp_path / "vit.npz"), "x.pth"), "is only read when"),
        (lambda: kat.weights.init_from(model, str(tmp_path / "gone.pth")), "gone.pth does not exist"),
        (
            lambda: kat.weights.init_from(fresh(act_init="swish"), str(tmp_path / "vit.npz")),
            "holds ViT weights (no rational coefficients)",
        ),
        (lambda: kat.weights.init_from(fresh(depth=3), str(tmp_path / "vit.npz")), "keys missing"),
    ]
    for call, words in errors:
        with pytest.raises(ValueError) as error:
            call()
        assert words in str(error.value) and "\n" not in str(error.value), str(error.value)
