"""Fused LayerNorm -> group-rational (kat.rational.norm_rational): the Triton kernels (interpreter on CPU) and
the torch backend against the unfused float64 composition F.layer_norm -> reference group-rational, plus
determinism, autocast output dtype, saved tensors, the custom ops and input errors."""

import pytest
import torch
from devices import CUDA_TRITON_OPS
from rounding import assert_rounded_close, relative_error

from kat import triton_utils
from kat.rational import norm_rational_kernels
from kat.rational import reference as rational_reference
from kat.rational.norm_rational import (
    LAYER_NORM_RATIONAL,
    default_out_dtype,
    layer_norm_rational,
    layer_norm_rational_reference,
)

BACKENDS = ["triton", "torch"]
EPS = 1e-6  # KAT's LayerNorm eps


def make_inputs(n, channels, gn, gd, dtype, affine=(True, True), seed=0):
    """x [n, C] in `dtype` with a per-row offset and scale; fp32 weight/bias (or None) and coefficients, with
    a b = 0 denominator row (identity-style init) and negative b entries."""
    gen = torch.Generator().manual_seed(seed)
    x = (0.5 + torch.rand(n, 1, generator=gen)) * torch.randn(n, channels, generator=gen)
    x = x + torch.randn(n, 1, generator=gen)
    weight = 1 + 0.3 * torch.randn(channels, generator=gen) if affine[0] else None
    bias = 0.5 * torch.randn(channels, generator=gen) if affine[1] else None
    numerator = torch.randn(gn, 6, generator=gen) / torch.arange(1, 7) ** 2
    denominator = torch.randn(gd, 4, generator=gen) / torch.arange(1, 5)
    denominator[0] = 0.0
    return x.to(dtype), weight, bias, numerator, denominator


def randn(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def run(x, weight, bias, numerator, denominator, grad_output, backend, eps=EPS, out_dtype=None):
    """(y, dx, d_weight, d_bias, d_num, d_den); backend 'reference' runs the unfused oracle."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in (x, weight, bias)]
    leaves += [t.detach().clone().requires_grad_(True) for t in (numerator, denominator)]
    x, weight, bias, numerator, denominator = leaves
    if backend == "reference":
        y = layer_norm_rational_reference(x, weight, bias, eps, numerator, denominator)
    else:
        y = layer_norm_rational(x, weight, bias, eps, numerator, denominator, out_dtype, backend)
    y.backward(grad_output.to(y.dtype))
    return y.detach(), *(None if t is None else t.grad for t in leaves)


def reference64(x, weight, bias, numerator, denominator, grad_output, eps=EPS):
    as64 = [None if t is None else t.double() for t in (x, weight, bias, numerator, denominator)]
    return run(*as64, grad_output.double(), "reference", eps=eps)


def assert_matches_reference(got, expected, x_dtype, out_dtype, backend, param_rtol=2e-5):
    """y and dx element-wise within rounding; parameter gradients (sums of signed terms, so cancellation)
    within param_rtol in norm: fp32 math reaches a few 1e-6 there (the torch backend too), bugs give O(1)."""
    y, dx, d_weight, d_bias, d_num, d_den = got
    y64, dx64, d_weight64, d_bias64, d_num64, d_den64 = expected
    assert_rounded_close(y, y64, out_dtype, backend)
    assert_rounded_close(dx, dx64, x_dtype, backend)
    for actual, exact in ((d_weight, d_weight64), (d_bias, d_bias64), (d_num, d_num64), (d_den, d_den64)):
        if exact is None:
            assert actual is None
            continue
        assert actual.dtype == torch.float32 and actual.shape == exact.shape
        assert relative_error(actual, exact) <= param_rtol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out", ["input", "other"])
@pytest.mark.parametrize(
    "n, channels, gn, gd, affine",
    [
        (37, 48, 1, 8, (True, True)),  # group size 6; shared numerator (KAT's layout)
        (19, 96, 8, 8, (False, False)),  # C = 96 (not a power of two), per-group numerator, no affine
        (11, 40, 4, 1, (True, False)),  # shared denominator, weight without bias
        (3, 384, 1, 8, (True, True)),  # KAT-S norm2 -> act1
    ],
)
def test_matches_fp64_reference(backend, dtype, out, n, channels, gn, gd, affine):
    x, weight, bias, numerator, denominator = make_inputs(n, channels, gn, gd, dtype, affine)
    out_dtype = dtype if out == "input" else (torch.float32 if dtype == torch.bfloat16 else torch.bfloat16)
    grad_output = randn(x.shape).to(out_dtype)
    got = run(x, weight, bias, numerator, denominator, grad_output, backend, out_dtype=out_dtype)
    expected = reference64(x, weight, bias, numerator, denominator, grad_output)
    assert_matches_reference(got, expected, dtype, out_dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_rows(backend):
    """Constant rows (variance 0: rstd = 1/sqrt(eps), LayerNorm output = bias, or exactly 0 without bias,
    where dF/dh takes sign(0) = +1), |x| up to 1e4, one outlier, a large offset. (Not a nearly constant row:
    with std/|mean| ~ 1e-3 any fp32 LayerNorm, torch's included, is off by ~1e-4 from fp64 through the
    rounding of the mean alone.)"""
    x, weight, bias, numerator, denominator = make_inputs(6, 48, 1, 8, torch.float32)
    x[0] = 0.0
    x[1] = 2.5
    x[2] = 1e4 * randn(48, seed=2)
    x[3, 7] = -1e4
    x[4] = 300.0 + 30.0 * randn(48, seed=3)
    grad_output = randn(x.shape)
    for eps, b in ((EPS, bias), (1e-5, bias), (EPS, None)):
        got = run(x, weight, b, numerator, denominator, grad_output, backend, eps=eps)
        assert all(torch.isfinite(t).all() for t in got if t is not None)
        expected = reference64(x, weight, b, numerator, denominator, grad_output, eps=eps)
        assert_matches_reference(got, expected, torch.float32, torch.float32, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_identity_init_denominator_trains(backend):
    """act1 starts as the identity (a = (0, 1, 0, ...), b = 0): with sign(0) = +1 its denominator still gets
    a gradient through the fused op."""
    x, weight, bias, _, _ = make_inputs(8, 32, 1, 4, torch.float32)
    numerator = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    denominator = torch.zeros(4, 4)
    grad_output = randn(x.shape)
    got = run(x, weight, bias, numerator, denominator, grad_output, backend)
    assert (got[5] != 0).all()
    expected = reference64(x, weight, bias, numerator, denominator, grad_output)
    assert_matches_reference(got, expected, torch.float32, torch.float32, backend)


def test_triton_large_channels():
    """C = 4096 (8 groups of 512): one row per tile, correct results."""
    x, weight, bias, numerator, denominator = make_inputs(3, 4096, 1, 8, torch.bfloat16)
    grad_output = randn(x.shape).to(torch.bfloat16)
    got = run(x, weight, bias, numerator, denominator, grad_output, "triton")
    expected = reference64(x, weight, bias, numerator, denominator, grad_output)
    assert_matches_reference(got, expected, torch.bfloat16, torch.bfloat16, "triton")


def test_triton_tiling_invariance(monkeypatch):
    """Other tile sizes, program counts and reduction blocks (several tiles per program, several blocks of
    programs and of channels in the reduction) give the same results up to fp32 rounding."""
    x, weight, bias, numerator, denominator = make_inputs(29, 48, 1, 8, torch.float32)
    grad_output = randn(x.shape).to(torch.bfloat16)
    args = (weight, bias, EPS, numerator, denominator, torch.bfloat16)
    y, mean, rstd = norm_rational_kernels.forward(x, *args)
    grads = norm_rational_kernels.backward(grad_output, x, weight, bias, mean, rstd, numerator, denominator)
    monkeypatch.setattr(triton_utils, "INTERPRETER_PROGRAMS", 5)
    monkeypatch.setattr(norm_rational_kernels, "_REDUCE", {"BLOCK_P": 2, "BLOCK_C": 16, "num_warps": 4})
    y2, mean2, rstd2 = norm_rational_kernels.forward(x, *args, config={"BLOCK_N": 2, "num_warps": 4})
    config = {"BLOCK_N": 1, "num_warps": 4, "programs_per_sm": 1}
    grads2 = norm_rational_kernels.backward(
        grad_output, x, weight, bias, mean2, rstd2, numerator, denominator, config=config
    )
    torch.testing.assert_close(y2, y, rtol=2**-7, atol=0)  # one bf16 rounding step at most
    for a, b in zip((mean2, rstd2, *grads2), (mean, rstd, *grads)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_bitwise_deterministic(dtype):
    x, weight, bias, numerator, denominator = make_inputs(61, 48, 1, 8, dtype)
    grad_output = randn(x.shape).to(torch.bfloat16)
    first = run(x, weight, bias, numerator, denominator, grad_output, "triton", out_dtype=torch.bfloat16)
    second = run(x, weight, bias, numerator, denominator, grad_output, "triton", out_dtype=torch.bfloat16)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_path_equals_custom_op(backend):
    """Eager calls go through an autograd.Function; the custom ops (what torch.compile traces) give the same
    bits."""
    x, weight, bias, numerator, denominator = make_inputs(9, 48, 8, 8, torch.float32)
    grad_output = randn(x.shape).to(torch.bfloat16)
    eager = run(x, weight, bias, numerator, denominator, grad_output, backend, out_dtype=torch.bfloat16)
    leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias, numerator, denominator)]
    x, weight, bias, numerator, denominator = leaves
    y, mean, rstd = LAYER_NORM_RATIONAL.fwd(
        x, weight, bias, EPS, numerator, denominator, torch.bfloat16, backend
    )
    assert not (mean.requires_grad or rstd.requires_grad)
    y.backward(grad_output)
    for a, b in zip(eager, (y.detach(), *(t.grad for t in leaves))):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_empty_inputs(backend):
    x, weight, bias, numerator, denominator = make_inputs(12, 48, 1, 8, torch.float32)
    x_t = x.reshape(3, 4, 48).transpose(0, 1)  # [4, 3, 48], non-contiguous
    grad_output = randn(48).expand(4, 3, 48)  # stride 0
    got = run(x_t, weight, bias, numerator, denominator, grad_output, backend)
    expected = run(x_t.contiguous(), weight, bias, numerator, denominator, grad_output.contiguous(), backend)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    empty = torch.zeros(0, 5, 48)
    y, dx, d_weight, d_bias, d_num, d_den = run(empty, weight, bias, numerator, denominator, empty, backend)
    assert y.shape == dx.shape == (0, 5, 48)
    for grad in (d_weight, d_bias, d_num, d_den):
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_output_dtype_and_saved_tensors(backend):
    """Under autocast the output is already in the autocast dtype (no cast before fc1), and backward keeps
    no [N, C] activation but x itself (only x, mean/rstd [N] and the parameters)."""
    x, weight, bias, numerator, denominator = make_inputs(10, 32, 1, 4, torch.float32)
    x.requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        assert default_out_dtype(x) == torch.bfloat16
        assert default_out_dtype(x.double()) == torch.float64  # autocast leaves float64 alone
        y = layer_norm_rational(x, weight, bias, EPS, numerator, denominator, backend=backend)
        y16 = layer_norm_rational(x, weight, bias, EPS, numerator, denominator, torch.float16, backend)
    assert y.dtype == torch.bfloat16 and y16.dtype == torch.float16
    activations = [t for t in saved if t.shape == x.shape]
    assert activations and all(t.data_ptr() == x.data_ptr() and t.dtype == torch.float32 for t in activations)
    assert {tuple(t.shape) for t in saved} <= {(10, 32), (10,), (32,), (1, 6), (4, 4)}
    assert layer_norm_rational(x, weight, bias, EPS, numerator, denominator, backend=backend).dtype == x.dtype


def test_reference_gradcheck_fp64():
    """The oracle and the torch backend (explicit LayerNorm backward) against finite differences in fp64."""
    gen = torch.Generator().manual_seed(0)
    for gn, gd, affine in [(1, 4, True), (4, 4, False), (4, 1, True)]:
        x = torch.randn(2, 3, 8, generator=gen, dtype=torch.float64).requires_grad_(True)
        params = [torch.randn(8, generator=gen, dtype=torch.float64).requires_grad_(True) for _ in "wb"]
        weight, bias = params if affine else (None, None)
        numerator = torch.randn(gn, 6, generator=gen, dtype=torch.float64).requires_grad_(True)
        denominator = torch.randn(gd, 4, generator=gen, dtype=torch.float64).requires_grad_(True)
        inputs = (x, weight, bias, numerator, denominator)
        assert torch.autograd.gradcheck(
            lambda x, w, b, n, d: layer_norm_rational_reference(x, w, b, 1e-5, n, d), inputs
        )
        assert torch.autograd.gradcheck(
            lambda x, w, b, n, d: layer_norm_rational(x, w, b, 1e-5, n, d, backend="torch"), inputs
        )


@pytest.mark.parametrize("device", ["cpu", CUDA_TRITON_OPS])
def test_opcheck(device):
    inputs = make_inputs(6, 16, 1, 4, torch.float32)
    x, weight, bias, numerator, denominator = (None if t is None else t.to(device) for t in inputs)
    grad_output = randn(6, 16).to(device)
    for backend in BACKENDS:
        for w, b, out_dtype in ((weight, bias, torch.bfloat16), (None, None, torch.float32)):
            leaves = [None if t is None else t.clone().requires_grad_(True) for t in (x, w, b)]
            fwd_args = (*leaves, EPS, numerator.requires_grad_(True), denominator.requires_grad_(True))
            torch.library.opcheck(LAYER_NORM_RATIONAL.fwd, (*fwd_args, out_dtype, backend))
            _, mean, rstd = LAYER_NORM_RATIONAL.fwd(x, w, b, EPS, numerator, denominator, out_dtype, backend)
            bwd_args = (
                grad_output.to(out_dtype),
                x,
                w,
                b,
                numerator.detach(),
                denominator.detach(),
                mean,
                rstd,
            )
            torch.library.opcheck(LAYER_NORM_RATIONAL.bwd, (*bwd_args, backend))


def test_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) traces the custom op (a graph break would be an error) and matches
    eager; aot_eager keeps the test fast (no code generation)."""
    x, weight, bias, numerator, denominator = make_inputs(5, 16, 1, 4, torch.float32)

    def block(x, weight, bias, numerator, denominator):
        y = layer_norm_rational(x, weight, bias, EPS, numerator, denominator, backend="triton")
        return layer_norm_rational(y, None, None, EPS, numerator, denominator, backend="torch").square().sum()

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (block, compiled):
        leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias, numerator, denominator)]
        loss = fn(*leaves)
        loss.backward()
        results.append([loss.detach(), *(t.grad for t in leaves)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_rational_formulas_shared():
    """The torch backend's rational part is kat.rational.reference itself (one spec for F and its grads)."""
    x, weight, bias, numerator, denominator = make_inputs(4, 16, 1, 4, torch.float64, affine=(False, False))
    y = layer_norm_rational(x, None, None, EPS, numerator, denominator, backend="torch")
    h = torch.nn.functional.layer_norm(x, (16,), eps=EPS)
    torch.testing.assert_close(y, rational_reference.rational_forward(h, numerator, denominator))


C16 = dict(numerator=torch.zeros(1, 6), denominator=torch.zeros(8, 4))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(x=torch.zeros(2, 12)), ValueError, "C divisible by the 8 groups"),
        (dict(x=torch.zeros(2, 0)), ValueError, "C >= 1"),
        (dict(x=torch.tensor(1.0)), ValueError, "x must be"),
        (dict(x=torch.zeros(2, 16, dtype=torch.int64)), TypeError, "x has dtype"),
        (dict(weight=torch.zeros(17)), ValueError, r"weight must have shape \(C,\) = \(16,\)"),
        (dict(bias=torch.zeros(1, 16)), ValueError, "bias must have shape"),
        (dict(weight=torch.zeros(16, dtype=torch.int32)), TypeError, "weight has dtype"),
        (dict(bias=torch.zeros(16, device="meta")), ValueError, r"tensors on different devices \(x: cpu, bias: meta\)"),
        (dict(numerator=torch.zeros(1, 5)), ValueError, r"shape \(Gn, 6\)"),
        (dict(denominator=torch.zeros(8, 3)), ValueError, r"shape \(Gd, 4\)"),
        (dict(numerator=torch.zeros(2, 6)), ValueError, "numerator has 2 rows but the groups are 8"),
        (dict(eps=-1.0), ValueError, "eps must be a float >= 0"),
        (dict(eps=None), ValueError, "eps must be a float >= 0"),
        (dict(out_dtype=torch.int32), TypeError, "out_dtype=torch.int32"),
        (dict(x=[[0.0] * 16]), TypeError, "x must be a torch.Tensor"),
        (dict(x=torch.zeros(2, 16, dtype=torch.float64), backend="triton"), TypeError, "for float64"),
        (dict(out_dtype=torch.float64, backend="triton"), TypeError, "out_dtype"),
        (
            dict(x=torch.zeros(1, 8200), weight=None, bias=None, backend="triton"),
            ValueError,
            "up to 8192 channels",
        ),
        (dict(backend="fast"), ValueError, "backend='fast'"),
    ],
)
def test_input_errors(kwargs, error, match):
    args = dict(x=torch.zeros(2, 16), weight=torch.ones(16), bias=torch.zeros(16), eps=EPS, **C16)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        layer_norm_rational(**args)


def test_triton_needs_interpreter_on_cpu(monkeypatch):
    monkeypatch.setattr(triton_utils, "INTERPRETED", False)  # as if TRITON_INTERPRET was not set
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        layer_norm_rational(torch.zeros(2, 16), None, None, EPS, backend="triton", **C16)
