"""`group_rational`: the GR-KAN activation as a torch.library op with backend selection.

Two ops, `kat::group_rational_fwd` and `kat::group_rational_bwd`, with an autograd registration, are what
torch.compile(fullgraph=True) traces (no graph breaks). Where Triton compiles the kernels they are
torch.library.triton_ops: the compiler traces into them and launches our kernels from its own generated code,
as it does its own kernels. Under the Triton interpreter (CPU tests) they are opaque custom ops (see `define_op`).
Eager calls run the same implementations through an autograd.Function, which costs far less host time than
the op dispatch (see `_EagerGroupRational`). Either way autocast leaves the op alone, so a bf16 activation
stays bf16 end to end (no cast kernels, and only x in its own dtype is saved for backward). The backend is a
string argument of the op, resolved in Python beforehand:
  'triton': kat.rational.kernels (CUDA tensors; CPU tensors run in the Triton interpreter, TRITON_INTERPRET=1)
  'torch':  kat.rational.reference, the same function and gradients in plain PyTorch.
"""

import importlib.util
import os

import torch
from torch import Tensor

from kat.rational import reference

BACKENDS = ("triton", "torch")
ENV_VAR = "KAT_RATIONAL_BACKEND"
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON:  # kat works where triton is not installed: the 'torch' backend needs none
    from kat.rational import kernels as _kernels

# Whether torch.compile can trace into the ops: interpreted kernels (TRITON_INTERPRET=1) cannot run on the fake
# tensors that tracing uses. `WRAP` is what the ops' bodies pass to the kernel wrappers.
TRACEABLE_KERNELS = HAS_TRITON and not _kernels.INTERPRETED
WRAP = torch.library.wrap_triton if TRACEABLE_KERNELS else (_kernels.direct if HAS_TRITON else None)


def define_op(name: str, fake):
    """Decorator registering `fn` as the op `name` (no mutated arguments).

    A torch.library.triton_op where the kernels are compiled: torch.compile then launches them from its
    generated code instead of calling the op through the dispatcher and our Python wrappers for every call.
    Measured on an H200 (torch 2.11, bench/bench_train.py --compile on): as opaque custom ops, default-mode
    torch.compile ran KAT-S at 0.55x ViT-S's images/s (docs/BENCHMARKS.md section 3). Under the interpreter
    an opaque torch.library.custom_op whose fake (meta) implementation is `fake`.
    """

    def decorate(fn):
        if TRACEABLE_KERNELS:
            return torch.library.triton_op(name, fn, mutates_args=())  # its fake is fn itself, traced
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(fake)
        return op

    return decorate


def active_backend(x: Tensor, backend: str | None = None) -> str:
    """The backend `group_rational(x, ..., backend)` runs: 'triton' or 'torch'.

    An explicit 'triton'/'torch' argument wins; otherwise (None or 'auto') the environment variable
    KAT_RATIONAL_BACKEND=triton|torch|auto decides, and 'auto' means Triton for CUDA tensors (float32, bfloat16,
    float16) when triton is installed, PyTorch otherwise (CPU, float64).
    """
    choice = backend if backend is not None else "auto"
    if choice == "auto":
        choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        if choice not in (*BACKENDS, "auto"):
            raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r} is not one of 'triton', 'torch', 'auto'")
    elif choice not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of None, 'auto', 'triton', 'torch'")
    if choice == "auto":
        use_triton = HAS_TRITON and x.is_cuda and x.dtype != torch.float64
        choice = "triton" if use_triton else "torch"
    elif choice == "triton" and not HAS_TRITON:
        raise ImportError("the 'triton' backend needs the triton package: pip install triton, or use backend='torch'")
    return choice


def check_inputs(x: Tensor, numerator: Tensor, denominator: Tensor, bias: Tensor | None) -> None:
    """Clear errors for what `group_rational` cannot compute (types, dtypes, devices, shapes)."""
    named = {"x": x, "numerator": numerator, "denominator": denominator, "bias": bias}
    for name, t in named.items():
        if t is None and name == "bias":
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"group_rational: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"group_rational: {name} has dtype {t.dtype}; use float32, bfloat16, float16 or float64 "
                f"(e.g. {name}.float())"
            )
        if t.device != x.device:
            raise ValueError(
                f"group_rational: tensors on different devices (x: {x.device}, {name}: {t.device}); move them "
                "to one device"
            )
    if numerator.dim() != 2 or numerator.shape[1] != 6:
        raise ValueError(f"group_rational: numerator must have shape (Gn, 6), got {tuple(numerator.shape)}")
    if denominator.dim() != 2 or denominator.shape[1] != 4:
        raise ValueError(
            f"group_rational: denominator must have shape (Gd, 4), got {tuple(denominator.shape)}"
        )
    groups = max(numerator.shape[0], denominator.shape[0])
    for name, t in (("numerator", numerator), ("denominator", denominator)):
        if t.shape[0] not in (1, groups):
            raise ValueError(
                f"group_rational: {name} has {t.shape[0]} rows but the groups are {groups}: each coefficient "
                f"tensor must have 1 row (shared by all groups) or one row per group"
            )
    if x.dim() == 0 or x.shape[-1] % groups != 0:
        channels = x.shape[-1] if x.dim() else None
        raise ValueError(
            f"group_rational: x must be [..., C] with C divisible by the {groups} groups; got x of shape "
            f"{tuple(x.shape)} (C = {channels})"
        )
    if bias is not None and tuple(bias.shape) != (x.shape[-1],):
        raise ValueError(
            f"group_rational: bias must have shape (C,) = ({x.shape[-1]},), one value per channel of x, got "
            f"{tuple(bias.shape)}"
        )


def forward_impl(
    x: Tensor, numerator: Tensor, denominator: Tensor, bias: Tensor | None, backend: str, wrap=None
) -> Tensor:
    """F(x + bias) on `backend`: the body of the op, of the eager autograd.Function and of the eager channel
    mixer (kat.models.channel_mixer)."""
    if backend == "triton":
        return _kernels.rational_forward(x, numerator, denominator, bias, wrap=wrap or _kernels.direct)
    return reference.rational_forward(x, numerator, denominator, bias)


def backward_impl(
    grad_output: Tensor,
    x: Tensor,
    numerator: Tensor,
    denominator: Tensor,
    bias: Tensor | None,
    backend: str,
    wrap=None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(dx, d numerator, d denominator, d bias or None) on `backend` (see `forward_impl`)."""
    if backend == "triton":
        return _kernels.rational_backward(grad_output, x, numerator, denominator, bias, wrap=wrap or _kernels.direct)
    return reference.rational_backward(grad_output, x, numerator, denominator, bias)


def _fwd_fake(x, numerator, denominator, bias, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@define_op("kat::group_rational_fwd", _fwd_fake)
def _group_rational_fwd(
    x: Tensor, numerator: Tensor, denominator: Tensor, bias: Tensor | None, backend: str
) -> Tensor:
    return forward_impl(x, numerator, denominator, bias, backend, WRAP)


def _bwd_fake(grad_output, x, numerator, denominator, bias, backend):
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(numerator, memory_format=torch.contiguous_format),
        torch.empty_like(denominator, memory_format=torch.contiguous_format),
        x.new_empty(0) if bias is None else torch.empty_like(bias, memory_format=torch.contiguous_format),
    )


@define_op("kat::group_rational_bwd", _bwd_fake)
def _group_rational_bwd(
    grad_output: Tensor, x: Tensor, numerator: Tensor, denominator: Tensor, bias: Tensor | None, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, d numerator, d denominator, d bias); d bias is an empty tensor without a bias (ops cannot return
    None)."""
    dx, d_num, d_den, d_bias = backward_impl(grad_output, x, numerator, denominator, bias, backend, WRAP)
    return dx, d_num, d_den, x.new_empty(0) if d_bias is None else d_bias


def _setup_context(ctx, inputs, output):
    x, numerator, denominator, bias, backend = inputs
    ctx.save_for_backward(x, numerator, denominator, bias)  # x in its own dtype: no fp32 copy
    ctx.backend = backend


def _backward(ctx, grad_output):
    x, numerator, denominator, bias = ctx.saved_tensors
    dx, d_num, d_den, d_bias = _group_rational_bwd(grad_output, x, numerator, denominator, bias, ctx.backend)
    return dx, d_num, d_den, None if bias is None else d_bias, None


_group_rational_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerGroupRational(torch.autograd.Function):
    """The same forward and backward as the custom ops, without the custom-op dispatch.

    Measured on an H200 (torch 2.11, bench/bench_host_overhead.py): the custom-op wrapper costs about 0.36 ms
    of host time per call, so a KAT-S training step (24 activations, forward and backward) spent ~17 ms of
    CPU in it and was launch-bound. Eager calls therefore take this path; the custom ops are what
    torch.compile traces (see `group_rational`).
    """

    @staticmethod
    def forward(ctx, x, numerator, denominator, bias, backend):
        ctx.save_for_backward(x, numerator, denominator, bias)  # x in its own dtype: no fp32 copy
        ctx.backend = backend
        return forward_impl(x, numerator, denominator, bias, backend)

    @staticmethod
    def backward(ctx, grad_output):
        x, numerator, denominator, bias = ctx.saved_tensors
        return *backward_impl(grad_output, x, numerator, denominator, bias, ctx.backend), None


def group_rational(
    x: Tensor, numerator: Tensor, denominator: Tensor, backend: str | None = None, bias: Tensor | None = None
) -> Tensor:
    """F(x + bias) = P/Q per channel group; x [..., C], numerator (Gn, 6), denominator (Gd, 4), Gn, Gd in
    {1, G}, bias (C,) or None.

    Returns x's shape and dtype; differentiable in all inputs. `bias` is the preceding linear layer's bias
    (KANMlp passes fc1's): added inside the op, it costs no pass over memory of its own, and its gradient
    comes out of the op's backward kernel instead of a separate reduction. Coefficients and bias may have
    another float dtype than x (e.g. float32 with bfloat16 x); the math runs in float32 (float64 if any input
    is). backend: None/'auto' (see `active_backend`), 'triton' or 'torch'.
    Under torch.compile this is the custom op `kat::group_rational_fwd` (one opaque node, no graph break);
    in eager mode the same kernels run through a lighter autograd.Function.
    """
    check_inputs(x, numerator, denominator, bias)
    backend = active_backend(x, backend)
    if torch.compiler.is_compiling():
        return _group_rational_fwd(x, numerator, denominator, bias, backend)
    return _EagerGroupRational.apply(x, numerator, denominator, bias, backend)
