"""The GR-KAN operator: Triton kernels (via the interpreter on CPU) and the torch backend against the fp64
reference, the sign(0) = +1 convention, determinism, non-contiguous inputs, autocast, input errors."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from devices import CUDA_TRITON_OPS
from rounding import assert_rounded_close, relative_error

from kat import triton_utils
from kat.rational import GroupRational, active_backend, group_rational
from kat.rational import op as rational_op
from kat.rational.reference import group_rational_reference
from kat.triton_utils import INTERPRETED

BACKENDS = ["triton", "torch"]


def make_inputs(n, channels, groups, gn, gd, dtype, seed=0, edge=False):
    """x [n, C] in `dtype`, fp32 coefficients (Gn, 6), (Gd, 4) with negative and zero denominator entries."""
    gen = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(n, channels, generator=gen)
    if edge:  # exact zeros, large magnitudes, tiny values
        x.view(-1)[:8] = torch.tensor([0.0, -0.0, 1e4, -1e4, 3e2, -7e3, 1e-30, -1e-20])
    numerator = torch.randn(gn, 6, generator=gen) / torch.arange(1, 7) ** 2
    denominator = torch.randn(gd, 4, generator=gen) / torch.arange(1, 5)
    denominator[0] = 0.0  # a b = 0 row (identity-style init)
    return x.to(dtype), numerator, denominator


def run(x, numerator, denominator, grad_output, backend):
    """(y, dx, d numerator, d denominator); the reference runs on float64 copies of the same inputs."""
    x = x.detach().clone().requires_grad_(True)
    num = numerator.detach().clone().requires_grad_(True)
    den = denominator.detach().clone().requires_grad_(True)
    if backend == "reference":
        y = group_rational_reference(x, num, den)
    else:
        y = group_rational(x, num, den, backend=backend)
    y.backward(grad_output)
    return y.detach(), x.grad, num.grad, den.grad


def reference64(x, numerator, denominator, grad_output):
    return run(x.double(), numerator.double(), denominator.double(), grad_output.double(), "reference")


def sum_error(value: torch.Tensor, reference: torch.Tensor, magnitude: torch.Tensor) -> float:
    """||value - reference|| relative to `magnitude`: the same sums taken with |grad_output|, i.e. without the
    cancellation between the gradient's signs. A coefficient gradient sums millions of terms; in fp32 it is
    accurate to the size of its terms, not of its result, which cancellation can make 500x smaller (such
    draws gave 2e-5 relative error here, and 1e-5 for the plain PyTorch path in fp32)."""
    return ((value.double() - reference).norm() / magnitude.norm()).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "n, channels, groups, gn, gd",
    [
        (37, 48, 8, 1, 8),  # group size 6: not a power of two
        (64, 64, 4, 4, 4),  # per-group numerator
        (19, 40, 8, 8, 1),  # shared denominator; C = 40 is masked in the kernel's channel block
        (5, 384, 8, 1, 8),  # KAT-S act1 layout: 48 channels per group
        (33, 24, 1, 1, 1),  # one group
    ],
)
def test_matches_fp64_reference(backend, dtype, n, channels, groups, gn, gd):
    x, numerator, denominator = make_inputs(n, channels, groups, gn, gd, dtype, edge=dtype == torch.float32)
    grad_output = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    y, dx, d_num, d_den = run(x, numerator, denominator, grad_output, backend)
    y64, dx64, d_num64, d_den64 = reference64(x, numerator, denominator, grad_output)
    assert_rounded_close(y, y64, dtype, backend)
    assert_rounded_close(dx, dx64, dtype, backend)
    assert d_num.dtype == d_den.dtype == torch.float32
    assert d_num.shape == (gn, 6) and d_den.shape == (gd, 4)
    assert relative_error(d_num, d_num64) <= 1e-6
    assert relative_error(d_den, d_den64) <= 1e-6


def run_with_bias(x, numerator, denominator, bias, grad_output, backend):
    """(y, dx, d numerator, d denominator, d bias) of F(x + bias) through the fused bias argument."""
    x, num, den, bias = (t.detach().clone().requires_grad_(True) for t in (x, numerator, denominator, bias))
    y = group_rational(x, num, den, backend=backend, bias=bias)
    y.backward(grad_output)
    return y.detach(), x.grad, num.grad, den.grad, bias.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, channels, groups, gn, gd", [(37, 48, 8, 1, 8), (19, 40, 8, 8, 1), (70, 96, 8, 1, 8)])
def test_fused_bias_matches_fp64_reference(backend, dtype, n, channels, groups, gn, gd):
    """F(x + bias) with the bias added inside the op equals the unfused add -> F in float64: values, dx, the
    coefficient gradients and d bias (= dx summed over rows, from the op's backward kernel)."""
    x, numerator, denominator = make_inputs(n, channels, groups, gn, gd, dtype, edge=dtype == torch.float32)
    gen = torch.Generator().manual_seed(2)
    bias = torch.randn(channels, generator=gen)
    large = 30.0 if dtype == torch.float32 else 1.0  # F(x + 30) overflows fp16
    bias[:3] = torch.tensor([0.0, large, -x[1, 2].float().item()])  # zero, large, and x + b = 0 exactly
    grad_output = torch.randn(x.shape, generator=gen).to(dtype)
    y, dx, d_num, d_den, d_bias = run_with_bias(x, numerator, denominator, bias, grad_output, backend)

    # The oracle: the add x + b rounded once to fp32 (the op's math is fp32, as a fp32 linear layer's output
    # would be; in float64 the rounding of x = 1e4 + b alone moves the x^5 terms by ~1e-6), then the float64
    # reference activation without a bias, differentiated by autograd through the add.
    h = (x.float() + bias).double().requires_grad_(True)
    num64, den64 = numerator.double().requires_grad_(True), denominator.double().requires_grad_(True)
    y64 = group_rational_reference(h, num64, den64)
    y64.backward(grad_output.double())
    x64, b64 = h, SimpleNamespace(grad=h.grad.reshape(-1, channels).sum(0))  # d/dx = d/db = dF/dh
    assert_rounded_close(y, y64.detach(), dtype, backend)
    assert_rounded_close(dx, x64.grad, dtype, backend)
    assert d_bias.dtype == bias.dtype and d_bias.shape == (channels,)
    assert relative_error(d_bias, b64.grad) <= 1e-6
    assert relative_error(d_num, num64.grad) <= 1e-6 and relative_error(d_den, den64.grad) <= 1e-6
    if backend == "triton":  # the bias gradient is reduced in a fixed order too
        again = run_with_bias(x, numerator, denominator, bias, grad_output, backend)
        assert all(torch.equal(a, b) for a, b in zip(again, (y, dx, d_num, d_den, d_bias)))


def test_fused_bias_errors():
    x, numerator, denominator = make_inputs(4, 16, 4, 1, 4, torch.float32)
    with pytest.raises(ValueError, match=r"bias must have shape \(C,\) = \(16,\).*got \(8,\)"):
        group_rational(x, numerator, denominator, bias=torch.zeros(8))
    with pytest.raises(TypeError, match="bias has dtype torch.int64"):
        group_rational(x, numerator, denominator, bias=torch.zeros(16, dtype=torch.long))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_coefficients_and_huge_inputs(backend):
    """All-zero coefficients give F = 0 and exact gradients; |x| = 1e4 with b = 0 (Q = 1) stays finite."""
    x = torch.tensor([[0.0, 1e4, -3e3, 2.5, -3.0, 1e-3, 7.0, -0.5]])
    numerator, denominator = torch.zeros(1, 6), torch.zeros(2, 4)
    grad_output = torch.ones_like(x)
    y, dx, d_num, d_den = run(x, numerator, denominator, grad_output, backend)
    assert torch.equal(y, torch.zeros_like(x)) and torch.equal(dx, torch.zeros_like(x))
    powers = torch.stack([x.double().pow(i).sum() for i in range(6)])  # dF/da_i = x^i (Q = 1)
    torch.testing.assert_close(d_num[0].double(), powers, rtol=1e-6, atol=0)
    assert torch.equal(d_den, torch.zeros_like(d_den))  # P = 0

    numerator = torch.tensor([[0.1, 1.0, 0.01, 1e-3, 1e-4, 1e-5]])
    y, dx, d_num, d_den = run(x, numerator, denominator, grad_output, backend)
    y64, dx64, d_num64, d_den64 = reference64(x, numerator, denominator, grad_output)
    assert torch.isfinite(y).all() and torch.isfinite(d_den).all()
    assert_rounded_close(y, y64, torch.float32, backend)
    assert relative_error(d_num, d_num64) <= 1e-6 and relative_error(d_den, d_den64) <= 1e-6


@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
def test_sign_of_zero_is_plus_one(backend):
    """At x = 0 and b = 0 the gradients use sign(0) = +1: dF/dx = a1 - |b1| a0, dF/db_j = -|x|^j P/Q^2."""
    numerator = torch.tensor([[0.3, 0.7, 0.0, 0.0, 0.0, 0.0]])
    denominator = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0]])
    x = torch.tensor([[0.0, 1.0, 0.0, 0.0]])  # group 0 (b = 0): x = 0, 1; group 1 (b1 = 0.5): x = 0, 0
    y, dx, d_num, d_den = run(x, numerator, denominator, torch.ones_like(x), backend)
    torch.testing.assert_close(dx, torch.tensor([[0.7, 0.7, 0.7 - 0.5 * 0.3, 0.7 - 0.5 * 0.3]]))
    # Group 0: -sum |x|^j P/Q^2 over x = 0 (zero) and x = 1 (P = 1, Q = 1) -> -1 for every j; b = 0 counts as +.
    torch.testing.assert_close(d_den[0], torch.full((4,), -1.0))
    torch.testing.assert_close(d_den[1], torch.zeros(4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_identity_init_denominator_trains(backend):
    module = GroupRational(16, groups=4, init="identity", backend=backend)
    assert torch.equal(module.weight_denominator, torch.zeros(4, 4))
    module(torch.randn(8, 16)).square().sum().backward()
    assert (module.weight_denominator.grad != 0).all()


def test_reference_gradcheck_fp64():
    gen = torch.Generator().manual_seed(0)
    for gn, gd in [(1, 4), (4, 4), (4, 1)]:
        x = torch.randn(3, 5, 12, generator=gen, dtype=torch.float64)
        x = (x + 0.1 * torch.sign(x)).requires_grad_(True)  # away from the kink at 0
        numerator = torch.randn(gn, 6, generator=gen, dtype=torch.float64).requires_grad_(True)
        denominator = torch.randn(gd, 4, generator=gen, dtype=torch.float64).requires_grad_(True)
        assert torch.autograd.gradcheck(group_rational_reference, (x, numerator, denominator))
        assert torch.autograd.gradcheck(
            lambda *t: group_rational(*t, backend="torch"), (x, numerator, denominator)
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_coefficient_grads_bitwise_deterministic(dtype):
    x, numerator, denominator = make_inputs(61, 48, 8, 1, 8, dtype)
    grad_output = torch.randn(x.shape).to(dtype)
    first = run(x, numerator, denominator, grad_output, "triton")
    second = run(x, numerator, denominator, grad_output, "triton")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    x, numerator, denominator = make_inputs(16, 48, 8, 8, 8, torch.float32)
    x_t = x.reshape(4, 4, 48).transpose(0, 1)  # [4, 4, 48], non-contiguous
    num_t = numerator.t().contiguous().t()  # (8, 6) with transposed strides
    grad_output = torch.randn(48).expand(4, 4, 48)  # stride 0
    assert not (x_t.is_contiguous() or num_t.is_contiguous() or grad_output.is_contiguous())
    got = run(x_t, num_t, denominator, grad_output, backend)
    expected = run(x_t.contiguous(), numerator, denominator, grad_output.contiguous(), backend)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # A strided slice of channels of a wider tensor.
    wide = torch.randn(6, 96)
    sliced = wide[:, ::2]
    torch.testing.assert_close(
        group_rational(sliced, numerator, denominator, backend=backend),
        group_rational(sliced.contiguous(), numerator, denominator, backend=backend),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_no_casts_and_saves_input_dtype(backend):
    """Under autocast a bf16 activation and fp32 coefficients go straight into the Triton kernels (no cast
    ops; the PyTorch reference upcasts inside by design); the backward saves x in bf16 (no fp32 copy)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class RecordOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    module = GroupRational(32, groups=8, init="swish", backend=backend)
    x = torch.randn(4, 32, dtype=torch.bfloat16, requires_grad=True)
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with torch.autocast("cpu", dtype=torch.bfloat16), RecordOps() as recorder, hooks:
        y = module(x)
    assert y.dtype == torch.bfloat16
    if backend == "triton":  # the kernels read bf16 x and fp32 coefficients as they are: no cast op at all
        assert not [op for op in recorder.ops if "_to_copy" in op or "convert" in op], recorder.ops
    assert (torch.bfloat16, (4, 32)) in saved and (torch.float32, (4, 32)) not in saved


def test_active_backend(monkeypatch):
    x = torch.zeros(2, 8)
    monkeypatch.delenv(rational_op.ENV_VAR, raising=False)
    assert active_backend(x) == "torch"  # CPU tensors default to the PyTorch path
    assert active_backend(x, "triton") == "triton"
    monkeypatch.setenv(rational_op.ENV_VAR, "triton")
    assert active_backend(x) == "triton" and active_backend(x, "auto") == "triton"
    assert active_backend(x, "torch") == "torch"  # an explicit argument beats the environment
    monkeypatch.setenv(rational_op.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="KAT_RATIONAL_BACKEND='cuda'"):
        active_backend(x)
    with pytest.raises(ValueError, match="backend='fast'"):
        active_backend(x, "fast")


@pytest.mark.parametrize(
    "x, numerator, denominator, error, match",
    [
        (torch.zeros(2, 12), torch.zeros(1, 6), torch.zeros(8, 4), ValueError, "C divisible by the 8 groups"),
        (torch.zeros(2, 16), torch.zeros(1, 5), torch.zeros(8, 4), ValueError, r"shape \(Gn, 6\)"),
        (torch.zeros(2, 16), torch.zeros(1, 6), torch.zeros(8, 3), ValueError, r"shape \(Gd, 4\)"),
        (torch.zeros(2, 16), torch.zeros(6), torch.zeros(8, 4), ValueError, r"shape \(Gn, 6\)"),
        (torch.zeros(2, 16), torch.zeros(2, 6), torch.zeros(8, 4), ValueError, "numerator has 2 rows"),
        (torch.zeros(2, 16), torch.zeros(4, 6), torch.zeros(8, 4), ValueError, "numerator has 4 rows"),
        (
            torch.zeros(2, 16, dtype=torch.int64),
            torch.zeros(1, 6),
            torch.zeros(8, 4),
            TypeError,
            "x has dtype",
        ),
        (torch.zeros(2, 16), torch.zeros(1, 6, dtype=torch.int32), torch.zeros(8, 4), TypeError, "numerator"),
        (
            torch.zeros(2, 16),
            torch.zeros(1, 6),
            torch.zeros(8, 4, device="meta"),
            ValueError,
            "different devices",
        ),
        (torch.tensor(1.0), torch.zeros(1, 6), torch.zeros(8, 4), ValueError, "must be"),
    ],
)
def test_input_errors(x, numerator, denominator, error, match):
    with pytest.raises(error, match=match):
        group_rational(x, numerator, denominator)


def test_triton_backend_errors(monkeypatch):
    numerator, denominator = torch.zeros(1, 6), torch.zeros(2, 4)
    with pytest.raises(TypeError, match="use backend='torch' for float64"):
        group_rational(torch.zeros(2, 8, dtype=torch.float64), numerator, denominator, backend="triton")
    monkeypatch.setattr(triton_utils, "INTERPRETED", False)  # as if TRITON_INTERPRET was not set
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        group_rational(torch.zeros(2, 8), numerator, denominator, backend="triton")
    with pytest.raises(ValueError, match="channels=10 is not divisible by groups=4"):
        GroupRational(10, groups=4)
    monkeypatch.setattr(rational_op, "HAS_TRITON", False)  # as if triton was not installed
    with pytest.raises(ImportError, match="pip install triton, or use backend='torch'"):
        group_rational(torch.zeros(2, 8), numerator, denominator, backend="triton")
    assert active_backend(torch.zeros(2, 8, device="meta")) == "torch"


@pytest.mark.parametrize("device", ["cpu", CUDA_TRITON_OPS])
def test_opcheck(device):
    x, numerator, denominator = (t.to(device) for t in make_inputs(6, 16, 4, 1, 4, torch.float32))
    grad_output = torch.randn(6, 16, device=device)
    for backend in BACKENDS:
        for num, bias in ((numerator, None), (torch.randn(4, 6), None), (numerator, torch.randn(16))):
            num, bias = num.to(device), None if bias is None else bias.to(device)
            bias = None if bias is None else bias.requires_grad_(True)
            args = (
                x.requires_grad_(True),
                num.requires_grad_(True),
                denominator.requires_grad_(True),
                bias,
                backend,
            )
            torch.library.opcheck(rational_op.GROUP_RATIONAL.fwd, args)
            plain = (t if t is None else t.detach() for t in (x, num, denominator, bias))
            torch.library.opcheck(rational_op.GROUP_RATIONAL.bwd, (grad_output, *plain, backend))


def test_torch_compile_fullgraph_cpu():
    """torch.compile (inductor, fullgraph=True: a graph break is an error) of a small block with one Triton
    (interpreter) and one torch-backend activation matches eager in values and gradients."""
    torch.manual_seed(0)
    block = torch.nn.Sequential(
        GroupRational(16, groups=4, init="identity", backend="triton"),
        torch.nn.Linear(16, 32),
        GroupRational(32, groups=4, init="swish", backend="torch"),
        torch.nn.Linear(32, 16),
    )
    compiled = torch.compile(block, fullgraph=True)
    x = torch.randn(2, 5, 16)
    y_eager = block(x)
    y_eager.square().sum().backward()
    eager_grads = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    y_compiled = compiled(x)
    y_compiled.square().sum().backward()
    torch.testing.assert_close(y_compiled, y_eager)
    for p, g in zip(block.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g)


def test_torch_compile_fullgraph_with_fused_bias_cpu():
    """KANMlp's fc1 -> act2 pattern (bias inside the op) under torch.compile(fullgraph=True) matches eager."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=gen)
    weight, bias = torch.randn(32, 16, generator=gen), torch.randn(32, generator=gen)
    numerator, denominator = torch.randn(1, 6, generator=gen) / 4, torch.randn(4, 4, generator=gen) / 4
    params = [t.requires_grad_(True) for t in (weight, bias, numerator, denominator)]

    def fc_act(x, weight, bias, numerator, denominator):
        return group_rational(F.linear(x, weight), numerator, denominator, backend="triton", bias=bias)

    results = []
    for fn in (fc_act, torch.compile(fc_act, fullgraph=True)):
        y = fn(x, *params)
        results.append((y.detach(), torch.autograd.grad(y.square().sum(), params)))
    (y_eager, g_eager), (y_compiled, g_compiled) = results
    torch.testing.assert_close(y_compiled, y_eager)
    for a, b in zip(g_compiled, g_eager):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kernels_match_reference_and_are_deterministic():
    if INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1: run with TRITON_INTERPRET=0 to test the compiled kernels")
    device = f"cuda:{torch.cuda.device_count() - 1}"  # the last device: kernels must not assume cuda:0
    for dtype in (torch.float32, torch.bfloat16):
        x, numerator, denominator = make_inputs(4096, 384, 8, 1, 8, dtype)
        # x ~ N(0, 1) like KAT's activations (LayerNorm and fc1 outputs). At make_inputs' N(0, 4) the
        # x^9-sized terms of the b = 0 group cancel so strongly that exactly rounded fp32 element math alone
        # reaches ~1.4e-6 relative error against float64 for some seeds; the 1e-6 target is for real activations.
        x = (x.float() / 2).to(dtype)
        x, numerator, denominator = x.to(device), numerator.to(device), denominator.to(device)
        grad_output = torch.randn(x.shape, device=device).to(dtype)
        backend = "triton"
        y, dx, d_num, d_den = run(x, numerator, denominator, grad_output, backend)
        y64, dx64, d_num64, d_den64 = reference64(x, numerator, denominator, grad_output)
        assert_rounded_close(y, y64, dtype, backend)
        assert_rounded_close(dx, dx64, dtype, backend)
        *_, num_size, den_size = reference64(x, numerator, denominator, grad_output.abs())
        assert sum_error(d_num, d_num64, num_size) <= 1e-6 and sum_error(d_den, d_den64, den_size) <= 1e-6
        again = run(x, numerator, denominator, grad_output, "triton")
        assert torch.equal(again[2], d_num) and torch.equal(again[3], d_den)

        bias = torch.randn(x.shape[-1], device=device)  # fc1's bias fused into the op (KANMlp)
        fused = run_with_bias(x, numerator, denominator, bias, grad_output, backend)
        h = (x.float() + bias).double()
        y64, dh64, d_num64, d_den64 = reference64(h, numerator, denominator, grad_output)
        assert_rounded_close(fused[0], y64, dtype, backend)
        assert_rounded_close(fused[1], dh64, dtype, backend)
        *_, num_size, den_size = reference64(h, numerator, denominator, grad_output.abs())
        assert sum_error(fused[2], d_num64, num_size) <= 1e-6 and sum_error(fused[3], d_den64, den_size) <= 1e-6
        assert sum_error(fused[4], dh64.sum(0), dh64.abs().sum(0)) <= 1e-6
        again = run_with_bias(x, numerator, denominator, bias, grad_output, backend)
        assert all(torch.equal(a, b) for a, b in zip(again, fused))
