"""KAT from ViT weights: right after conversion the KAT computes the ViT's function (act2's GELU fit aside)."""

import math

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

import kat  # noqa: F401  (registers the KAT models)
from kat.models.from_vit import kat_from_vit
from kat.models.pretrained import CheckpointMismatchError, load_checkpoint_file
from kat.rational.coefficients import init_coefficients

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
