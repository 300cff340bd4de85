"""KAT-T/S/B as timm models: registry, architecture, timm API, init, checkpoint loading, torch.compile.

Small shapes (32 px, reduced depth) except where the full architecture is the point (parameter counts, the
variance through all 12 blocks); full-size models are built but never run at 224 px.
"""

import argparse
import math
import re

import pytest
import safetensors.torch
import timm
import torch
from timm.models.vision_transformer import Block
from timm.optim import create_optimizer_v2

import kat  # noqa: F401  (registers the models)
from kat.models import CheckpointMismatchError, FusedKatBlock, KANMlp, Kat
from kat.rational import GroupRational

CANONICAL = ["kat_tiny_patch16_224", "kat_small_patch16_224", "kat_base_patch16_224"]
ALIASES = ["kat_tiny", "kat_small", "kat_base"]
SMALL = dict(img_size=32, depth=2)  # 2x2 patches of 16 px + the class token


def tiny(**kwargs) -> Kat:
    return timm.create_model("kat_tiny_patch16_224", **{**SMALL, **kwargs})


def images(batch: int = 2, size: int = 32, chans: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, chans, size, size, generator=torch.Generator().manual_seed(seed))


def test_registry_lists_canonical_names_and_aliases():
    assert set(CANONICAL + ALIASES) <= set(timm.list_models("kat_*"))
    published = {f"{name}.{tag}" for name in CANONICAL for tag in ("in1k", "vitft")}
    assert published == set(timm.list_pretrained("kat_*"))
    cfg = timm.models.get_pretrained_cfg("kat_tiny_patch16_224.in1k")
    assert cfg.hf_hub_filename.startswith("kat_tiny_patch16_224_1f3ad3b2") and cfg.url.endswith(
        cfg.hf_hub_filename
    )


@pytest.mark.parametrize("alias,canonical", zip(ALIASES, CANONICAL))
def test_alias_builds_the_canonical_architecture(alias, canonical):
    a, c = timm.create_model(alias, **SMALL), timm.create_model(canonical, **SMALL)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in c.state_dict().items()}
    assert a.pretrained_cfg == c.pretrained_cfg  # architecture 'kat_*_patch16_224', tag 'in1k'


@pytest.mark.parametrize("name,expected", zip(CANONICAL, [5_718_328, 22_051_576, 86_568_568]))
def test_exact_parameter_counts_and_published_layout(name, expected):
    model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == expected
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    dim = model.embed_dim
    for i in range(12):
        for act in ("act1", "act2"):
            assert shapes[f"blocks.{i}.mlp.{act}.weight_numerator"] == (1, 6)
            assert shapes[f"blocks.{i}.mlp.{act}.weight_denominator"] == (8, 4)
        assert shapes[f"blocks.{i}.mlp.fc1.weight"] == (4 * dim, dim)
        assert shapes[f"blocks.{i}.mlp.fc2.weight"] == (dim, 4 * dim)
        assert shapes[f"blocks.{i}.attn.qkv.weight"] == (3 * dim, dim)
    assert shapes["pos_embed"] == (1, 197, dim) and shapes["head.weight"] == (1000, dim)
    assert sum(p.numel() for n, p in model.named_parameters() if ".act" in n) == 912


def assert_every_parameter_has_a_gradient(model):
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        # act1 starts as the identity (all b = 0): its denominator only trains if sign(0) is taken as +1.
        assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("name", CANONICAL + ALIASES)
def test_every_name_trains_at_small_size(name):
    model = timm.create_model(name, img_size=32, depth=1, num_classes=10)
    logits = model(images())
    assert logits.shape == (2, 10)
    torch.nn.functional.cross_entropy(logits, torch.tensor([1, 7])).backward()
    assert_every_parameter_has_a_gradient(model)


def test_every_parameter_gets_a_gradient_with_the_official_init():
    model = tiny(num_classes=10, weight_init="official")
    torch.nn.functional.cross_entropy(model(images()), torch.tensor([1, 7])).backward()
    assert_every_parameter_has_a_gradient(model)


def fused_and_plain(**kwargs) -> tuple[Kat, Kat]:
    """A fused (default) and a fused=False tiny KAT with the same weights, fc1's biases nonzero (the init zeroes
    them: give the fused bias add something to add)."""
    torch.manual_seed(0)
    fused = timm.create_model("kat_tiny", img_size=32, patch_size=8, depth=2, num_classes=10, **kwargs)
    with torch.no_grad():
        for block in fused.blocks:
            block.mlp.fc1.bias.normal_(generator=torch.Generator().manual_seed(2))
    plain = timm.create_model("kat_tiny", img_size=32, patch_size=8, depth=2, num_classes=10, fused=False,
                              **kwargs)  # fmt: skip
    assert list(plain.state_dict()) == list(fused.state_dict())  # same keys, same order
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def outputs_and_gradients(model: Kat, x: torch.Tensor, autocast: torch.dtype | None):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
        y = model(x).float()
    y.square().sum().backward()
    return y.detach(), {n: p.grad for n, p in model.named_parameters()}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise: sums in other orders round entries of cancelling sums differently, not the whole."""
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_model_computes_the_plain_one(monkeypatch, backend):
    """fused=True (FusedKatBlock: the mixer as one node) and fused=False (timm's Block, KANMlp's modules called)
    give the same outputs and gradients in fp32."""
    monkeypatch.setenv("KAT_RATIONAL_BACKEND", backend)  # 'triton' on CPU: the Triton interpreter (conftest)
    fused, plain = fused_and_plain()
    assert isinstance(fused.blocks[0], FusedKatBlock) and type(plain.blocks[0]) is Block
    x = images(seed=1)
    (y_fused, g_fused), (y_plain, g_plain) = (outputs_and_gradients(m, x, None) for m in (fused, plain))
    torch.testing.assert_close(y_fused, y_plain, rtol=1e-5, atol=1e-5)
    for name, grad in g_plain.items():
        assert relative_error(g_fused[name], grad) < 1e-4, name


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_model_under_bf16_autocast_matches_fp32(monkeypatch, backend):
    """Under bf16 autocast the fused and plain models round at different points (the fused one adds fc1's bias
    in fp32 inside act2, the plain one in bf16 inside fc1; backward passes round differently too), so each is
    compared with the fp32 result: both within bf16 accuracy (8-bit mantissa, a few roundings deep)."""
    monkeypatch.setenv("KAT_RATIONAL_BACKEND", backend)
    fused, plain = fused_and_plain()
    x = images(seed=1)
    y_ref, g_ref = outputs_and_gradients(plain, x, None)
    for model in (fused, plain):
        y, grads = outputs_and_gradients(model, x, torch.bfloat16)
        assert relative_error(y, y_ref) < 3e-2
        errors = {name: relative_error(grads[name], grad) for name, grad in g_ref.items()}
        worst = max(errors, key=errors.get)
        assert errors[worst] < 5e-2, (type(model.blocks[0]).__name__, worst, errors[worst])


def test_plain_model_calls_every_submodule():
    """fused=False: a forward hook on every submodule fires (the reference for users who hook into them), but
    timm's attention dropout, which fused attention passes to scaled_dot_product_attention instead."""
    _, plain = fused_and_plain()
    fired = set()
    for name, module in plain.named_modules():
        module.register_forward_hook(lambda m, args, out, name=name: fired.add(name))
    plain(images(size=32))
    missing = {name for name, _ in plain.named_modules()} - fired
    assert all(name.endswith(".attn.attn_drop") for name in missing), missing  # timm's fused attention's
    assert {f"blocks.0.mlp.{child}" for child in ("act1", "drop1", "fc1", "act2", "drop2", "norm", "fc2")} <= fired


def test_fused_block_refuses_what_it_cannot_compute():
    with pytest.raises(ValueError, match="dropout p=0.1 in the mixer: build the model with fused=False"):
        tiny(proj_drop_rate=0.1)
    tiny(proj_drop_rate=0.1, fused=False)


def test_kan_mlp_order_and_knobs():
    model = tiny(act_init="identity", kan_groups=4)
    mlp = model.blocks[0].mlp
    assert isinstance(mlp, KANMlp)
    assert [n for n, _ in mlp.named_children()] == ["act1", "drop1", "fc1", "act2", "drop2", "norm", "fc2"]
    assert mlp.act1.weight_denominator.shape == (4, 4) and mlp.act2.init == "identity"
    x = torch.randn(5, model.embed_dim)
    # With both rationals the identity, the mixer is exactly fc2(fc1(x)).
    torch.testing.assert_close(mlp(x), mlp.fc2(mlp.fc1(x)), rtol=1e-5, atol=1e-5)
    assert tiny().blocks[0].mlp.act2.init == "swish"  # the published default
    with pytest.raises(ValueError, match="divisible"):
        tiny(kan_groups=5)


def test_timm_kwargs_and_model_api():
    model = tiny(patch_size=8, in_chans=1, num_classes=7, drop_path_rate=0.1, embed_dim=96, num_heads=2)
    x = images(chans=1)
    features = model.forward_features(x)
    assert features.shape == (2, 1 + 16, 96)
    assert model.forward_head(features, pre_logits=True).shape == (2, 96)
    assert model.forward_head(features).shape == (2, 7)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    assert tiny(global_pool="avg", num_classes=4)(images()).shape == (2, 4)
    assert len(tiny(depth=3).blocks) == 3

    cfg = model.pretrained_cfg
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    assert (cfg["crop_pct"], cfg["interpolation"], cfg["num_classes"]) == (0.875, "bicubic", 1000)
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert data_cfg["crop_pct"] == 0.875 and data_cfg["interpolation"] == "bicubic"

    groups = timm.models.group_parameters(model, model.group_matcher())
    assert sum(len(v) for v in groups.values()) == len(list(model.named_parameters()))

    with pytest.raises(ValueError, match="weight_init"):
        tiny(weight_init="jax")


def test_rational_coefficients_get_no_weight_decay():
    model = tiny()
    rational = {
        f"{m}.{p}"
        for m, mod in model.named_modules()
        if isinstance(mod, GroupRational)
        for p, _ in mod.named_parameters()
    }
    assert len(rational) == 2 * 2 * 2 and rational <= model.no_weight_decay()
    assert {"pos_embed", "cls_token"} <= model.no_weight_decay()
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    by_name = dict(model.named_parameters())
    assert not any(id(by_name[n]) in decayed for n in rational)
    assert id(by_name["blocks.0.mlp.fc1.weight"]) in decayed


def test_vp_init_follows_the_paper_rule():
    model = tiny(weight_init="vp")
    mlp = model.blocks[0].mlp
    dim = model.embed_dim
    for fc, alpha, fan_in in ((mlp.fc1, 1.0, dim), (mlp.fc2, kat.rational.vp_gain("swish"), 4 * dim)):
        assert fc.weight.std().item() == pytest.approx(math.sqrt(alpha / fan_in), rel=0.02)
        assert torch.count_nonzero(fc.bias) == 0
    official = tiny(weight_init="official").blocks[0].mlp
    for fc in (official.fc1, official.fc2):
        assert fc.weight.std().item() == pytest.approx(0.02, rel=0.05)  # trunc_normal(std=0.02)


@pytest.mark.parametrize("weight_init", ["vp", "official"])
def test_mimetic_attention_init(weight_init):
    model = tiny(weight_init=weight_init)
    dim = model.embed_dim
    for block in model.blocks:
        w = block.attn.qkv.weight
        w_q, w_k, w_v = w[:dim].T, w[dim : 2 * dim].T, w[2 * dim :].T  # x @ W per projection
        w_proj = block.attn.proj.weight.T
        qk, vo = w_q @ w_k.T, w_v @ w_proj  # summed over heads: exactly the targets
        eye = torch.eye(dim, dtype=torch.bool)
        # Targets 0.7 Z + 0.7 I and 0.4 Z - 0.4 I, Z uniform with variance 1/dim.
        assert qk[eye].mean().item() == pytest.approx(0.7, abs=0.02)
        assert vo[eye].mean().item() == pytest.approx(-0.4, abs=0.02)
        assert qk[~eye].std().item() == pytest.approx(0.7 / math.sqrt(dim), rel=0.05)
        assert vo[~eye].std().item() == pytest.approx(0.4 / math.sqrt(dim), rel=0.05)
        head_dim = dim // block.attn.num_heads
        head0 = w_q[:, :head_dim] @ w_k[:, :head_dim].T
        assert torch.diagonal(head0).mean() > 0  # each head starts biased towards attending to itself


def kan_branch_variance_ratios(weight_init: str) -> list[float]:
    """Var(mlp output) / Var(mlp input) in each of kat_tiny's 12 blocks on a random batch at init."""
    torch.manual_seed(0)
    # Unfused blocks, so that the hook sees the MLP's own input (the LayerNorm output); same function.
    model = timm.create_model(
        "kat_tiny_patch16_224", img_size=32, patch_size=8, weight_init=weight_init, fused=False
    ).eval()
    ratios = []
    for block in model.blocks:
        block.mlp.register_forward_hook(lambda m, inp, out: ratios.append((out.var() / inp[0].var()).item()))
    with torch.no_grad():
        model(images(batch=8))
    return ratios


def test_vp_init_preserves_kan_branch_variance_through_all_blocks():
    vp, official = kan_branch_variance_ratios("vp"), kan_branch_variance_ratios("official")
    print("\nVar(KAN out) / Var(KAN in), blocks 1-12")
    print("  vp:      ", " ".join(f"{r:.3f}" for r in vp))
    print("  official:", " ".join(f"{r:.4f}" for r in official))
    assert len(vp) == len(official) == 12
    # Measured 0.90-1.08 over seeds; the theory says 1 (sampling noise of finite random layers).
    assert all(0.8 < r < 1.25 for r in vp)
    assert abs(sum(vp) / 12 - 1) < 0.1
    # 'official' (trunc_normal 0.02) starts the branch ~170x too small: 192 * 0.02^2 * E[F^2] * 768 * 0.02^2.
    assert all(r < 0.02 for r in official)


@pytest.mark.parametrize("wrapper", ["plain", "deit", "timm_train"])
def test_published_layout_pth_loads_strictly_and_reproduces_outputs(tmp_path, wrapper):
    torch.manual_seed(0)
    source = tiny().eval()
    weights = source.state_dict()
    if wrapper == "deit":  # DeiT-style: {'model': ...} from a DistributedDataParallel module
        checkpoint = {"model": {f"module.{k}": v for k, v in weights.items()}, "epoch": 299}
    elif wrapper == "timm_train":  # timm train.py: 'state_dict' (+ EMA) next to the argparse Namespace
        ema = {k: torch.zeros_like(v) for k, v in weights.items()}  # must not be picked: non-EMA first
        checkpoint = {
            "state_dict": weights,
            "state_dict_ema": ema,
            "args": argparse.Namespace(model="kat_tiny"),
        }
    else:
        checkpoint = weights
    path = tmp_path / "kat_tiny_patch16_224_published.pth"
    torch.save(checkpoint, path)

    loaded = tiny(pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    for key, value in weights.items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0, msg=key)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images()), source(images()), rtol=0, atol=0)
    assert "state_dict" not in loaded.pretrained_cfg and loaded.pretrained_cfg["file"] == str(path)


def test_own_safetensors_checkpoint_loads_with_its_class_count(tmp_path):
    source = tiny(num_classes=10).eval()
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(source.state_dict(), path)
    loaded = timm.create_model(
        "kat_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **SMALL
    )
    assert loaded.num_classes == 10
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(images()), source(images()), rtol=0, atol=0)
    # Asking for another class count keeps the backbone and starts a new head.
    finetune = tiny(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), num_classes=3)
    assert finetune.head.out_features == 3
    torch.testing.assert_close(
        finetune.blocks[1].mlp.act2.weight_denominator, source.blocks[1].mlp.act2.weight_denominator
    )


def test_pos_embed_is_resampled_for_another_img_size(tmp_path):
    source = tiny()
    with torch.no_grad():
        source.pos_embed[:, :1] = 100.0  # class token entry
        # The same vector at every grid position.
        source.pos_embed[:, 1:] = torch.linspace(-1, 1, source.embed_dim)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": source.state_dict()}, path)
    loaded = tiny(img_size=64, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert loaded.pos_embed.shape == (1, 1 + 16, source.embed_dim)
    torch.testing.assert_close(loaded.pos_embed[:, :1], source.pos_embed[:, :1])
    # A constant field stays constant under interpolation; any mix-up with the class token would show.
    torch.testing.assert_close(
        loaded.pos_embed[:, 1:], source.pos_embed[:, 1:2].expand(1, 16, -1), atol=1e-4, rtol=0
    )
    assert loaded(images(size=64)).shape == (2, 1000)


def test_wrong_architecture_checkpoint_names_the_mismatched_keys(tmp_path):
    path = tmp_path / "small.pth"
    small = timm.create_model("kat_small", img_size=32, depth=1)
    torch.save({"model": small.state_dict()}, path)
    with pytest.raises(CheckpointMismatchError) as error:
        tiny(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    message = str(error.value)
    assert str(path) in message
    assert "shape mismatches" in message and "blocks.0.attn.qkv.weight (1152, 384) vs (576, 192)" in message
    assert "keys missing from the checkpoint" in message and "blocks.1.norm1.weight" in message

    torch.save(tiny(kan_groups=4).state_dict(), path)
    with pytest.raises(
        CheckpointMismatchError, match=r"blocks\.0\.mlp\.act1\.weight_denominator \(4, 4\) vs \(8, 4\)"
    ):
        tiny(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))

    weights = tiny().state_dict()
    weights["blocks.0.mlp.act3.weight_numerator"] = weights.pop("blocks.0.mlp.act1.weight_numerator")
    torch.save(weights, path)
    with pytest.raises(
        CheckpointMismatchError, match=r"unexpected keys in the checkpoint: blocks\.0\.mlp\.act3"
    ):
        tiny(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


class _Payload:
    pass


def test_checkpoint_files_are_loaded_without_running_pickled_code(tmp_path):
    path = tmp_path / "unsafe.pth"
    torch.save({"state_dict": tiny().state_dict(), "extra": _Payload()}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        tiny(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    with pytest.raises(FileNotFoundError, match="is a directory"):
        tiny(pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_compile_launches_our_kernels_cuda(monkeypatch):
    """On CUDA the GR-KAN ops are triton_ops: inductor's code for a forward + backward launches our Triton
    kernels itself (no kat op called through the dispatcher and our Python wrappers at run time) and
    matches eager in loss and gradients."""
    from torch._inductor.utils import run_and_get_code

    from kat.triton_utils import INTERPRETED

    if INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1: run with TRITON_INTERPRET=0 to test the compiled kernels")
    # cuDNN convolutions run in TF32 by default, in algorithms that differ between eager and compiled: 4e-4
    # norm-wise apart on the patch embedding's weight gradient. Without TF32 every gradient agreed to 4e-6
    # (three seeds on an H200).
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    model = tiny(num_classes=10).cuda().eval()  # eval: no drop-path draws to differ between the two runs
    x = images().cuda()

    def step(m):
        loss = m(x).square().mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss, grads = step(model)
    model.zero_grad(set_to_none=True)
    (compiled_loss, compiled_grads), code = run_and_get_code(step, torch.compile(model, fullgraph=True))
    code = "\n".join(code)
    assert "torch.ops.kat." not in code
    for kernel in ("_rational_forward_kernel", "_rational_backward_kernel", "_rational_reduce_kernel",
                   "_forward_kernel", "_backward_kernel", "_reduce_kernel"):  # act2 (+ fc1 bias), norm2 -> act1
        assert re.search(rf"def {kernel}(_\d+)?\(", code), kernel  # inductor may number user kernels
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-4, atol=1e-6)
    # Norm-wise per parameter: inductor sums in other orders, and a coefficient gradient is a sum whose terms
    # cancel, so single entries carry fp32 rounding of the terms' size, not of their result.
    errors = {name: ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
              for (name, _), a, b in zip(model.named_parameters(), compiled_grads, grads)}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 2e-5, (worst, errors[worst])


@pytest.mark.slow
def test_torch_compile_forward_matches_eager():
    model = tiny(num_classes=10).eval()
    x = images()
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, fullgraph=True)  # fullgraph: the GR-KAN op must not break the graph
        torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-5)
