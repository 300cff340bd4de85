"""The eager one-node channel mixer (kat.models.channel_mixer) against its composition of the GR-KAN ops (what
torch.compile traces): outputs, every gradient, saved activations, frozen parameters."""

import pytest
import torch
from devices import CUDA_TRITON_OPS

from kat.models import KANMlp
from kat.models.channel_mixer import channel_mixer

DIM, HIDDEN, GROUPS = 32, 64, 4
# (backend, x dtype, autocast dtype): 'triton' on CPU runs the kernels in the Triton interpreter (conftest).
PRECISIONS = [
    ("triton", torch.float32, None),
    ("triton", torch.float32, torch.bfloat16),
    ("torch", torch.float32, None),
    ("torch", torch.float32, torch.bfloat16),
    ("torch", torch.float64, None),
]


def make_mixer(seed: int = 0, bias: bool = True, norm_bias: bool = True, drop: float = 0.0):
    """(LayerNorm, KANMlp) with every parameter random: numerators, denominators with one all-zero row (act1's
    identity init has b = 0), biases (the init zeroes them)."""
    gen = torch.Generator().manual_seed(seed)
    norm = torch.nn.LayerNorm(DIM, bias=norm_bias)
    mlp = KANMlp(DIM, HIDDEN, groups=GROUPS, bias=bias, drop=drop)
    with torch.no_grad():
        for param in [*norm.parameters(), *mlp.parameters()]:
            param.copy_(torch.randn(param.shape, generator=gen) / param.shape[-1] ** 0.5)
        mlp.act1.weight_denominator[0] = 0.0
    return norm, mlp


def mixer(norm, mlp, x, one_node: bool):
    """channel_mixer(x, norm, mlp): eager as one node, or composed of the ops as torch.compile traces it (the
    library ops, run eagerly)."""
    with pytest.MonkeyPatch.context() as patch:
        if not one_node:
            patch.setattr(torch.compiler, "is_compiling", lambda: True)
        return channel_mixer(x, norm, mlp)


def run(norm, mlp, x, one_node: bool, autocast_dtype=None, seed: int = 3):
    """(output, {name: gradient}) of channel_mixer(x, norm, mlp) against a fixed random output gradient."""
    params = {"x": x, **{f"norm.{n}": p for n, p in norm.named_parameters()}, **dict(mlp.named_parameters())}
    for t in params.values():
        t.grad = None
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        y = mixer(norm, mlp, x, one_node)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype).to(x.device)
    y.backward(g)
    return y.detach(), {n: t.grad for n, t in params.items() if t.requires_grad}, g


@pytest.mark.parametrize("device", ["cpu", CUDA_TRITON_OPS])
@pytest.mark.parametrize("backend,dtype,autocast_dtype", PRECISIONS)
def test_one_node_computes_the_composed_ops(monkeypatch, device, backend, dtype, autocast_dtype):
    monkeypatch.setenv("KAT_RATIONAL_BACKEND", backend)
    norm, mlp = make_mixer()
    norm, mlp = norm.to(device, dtype), mlp.to(device, dtype)
    x = 3 * torch.randn(2, 5, DIM, generator=torch.Generator().manual_seed(1), dtype=dtype)
    x = x.to(device).requires_grad_()
    y, grads, g = run(norm, mlp, x, True, autocast_dtype)
    y_plain, grads_plain, _ = run(norm, mlp, x, False, autocast_dtype)
    assert y.dtype == y_plain.dtype == (autocast_dtype or dtype) and y.shape == (2, 5, DIM)
    torch.testing.assert_close(y, y_plain, rtol=0, atol=0)  # the same kernels and matmuls on the same inputs
    assert grads.keys() == grads_plain.keys() and len(grads) == 11
    for name, grad in grads_plain.items():
        assert grads[name].dtype == grad.dtype and grads[name].shape == grad.shape, name
        if name == "fc2.bias" and autocast_dtype is not None:
            # Deliberate difference: summed in the bias's fp32, where autocast's composed path sums in bf16.
            torch.testing.assert_close(grads[name], g.float().sum((0, 1)), rtol=1e-5, atol=1e-6)
            continue
        error = ((grads[name] - grad).norm() / grad.norm()).item()
        assert error < 1e-6, f"{name}: relative gradient difference {error:.2e}"


def test_one_node_without_biases_and_with_frozen_parameters(monkeypatch):
    monkeypatch.setenv("KAT_RATIONAL_BACKEND", "triton")
    norm, mlp = make_mixer(bias=False, norm_bias=False)
    mlp.fc1.weight.requires_grad_(False)
    norm.weight.requires_grad_(False)
    x = torch.randn(7, DIM, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y, grads, _ = run(norm, mlp, x, True)
    y_plain, grads_plain, _ = run(norm, mlp, x, False)
    torch.testing.assert_close(y, y_plain, rtol=0, atol=0)
    assert grads.keys() == grads_plain.keys() == {"x", "act1.weight_numerator", "act1.weight_denominator",
                                                  "act2.weight_numerator", "act2.weight_denominator", "fc2.weight"}
    assert mlp.fc1.weight.grad is None and norm.weight.grad is None
    for name, grad in grads_plain.items():
        assert ((grads[name] - grad).norm() / grad.norm()).item() < 1e-6, name


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages that autograd saves for backward while running fn()."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_one_node_saves_no_more_than_the_composed_ops(monkeypatch):
    monkeypatch.setenv("KAT_RATIONAL_BACKEND", "triton")
    norm, mlp = make_mixer()
    x = torch.randn(4, 9, DIM, requires_grad=True)
    sizes = {}
    for one_node in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sizes[one_node] = saved_bytes(lambda one_node=one_node: mixer(norm, mlp, x, one_node))
    assert 0 < sizes[True] <= sizes[False], sizes
