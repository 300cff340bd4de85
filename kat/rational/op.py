"""`group_rational`: the GR-KAN activation F(x + bias) as a differentiable op with backend selection.

Defined once through `kat.rational.library.GradOp`: torch.library ops `kat::group_rational_fwd` / `_bwd` for
torch.compile, an autograd.Function for eager calls, the plain-PyTorch reference while exporting. The op keeps
x's dtype (a bf16 activation stays bf16 end to end, and only x in its own dtype is saved for backward). The
backend is a string argument of the op, resolved in Python beforehand:
  'triton': kat.rational.kernels (CUDA tensors; CPU tensors run in the Triton interpreter, TRITON_INTERPRET=1)
  'torch':  kat.rational.reference, the same function and gradients in plain PyTorch.
"""

import os

import torch
from torch import Tensor

from kat.rational import reference
from kat.rational.library import GradOp, check_channel_vector, check_coefficients, check_tensors
from kat.triton_utils import HAS_TRITON, direct

if HAS_TRITON:  # kat works where triton is not installed: the 'torch' backend needs none
    from kat.rational import kernels as _kernels

BACKENDS = ("triton", "torch")
ENV_VAR = "KAT_RATIONAL_BACKEND"


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
    check_tensors("group_rational", x, numerator=numerator, denominator=denominator, bias=bias)
    check_coefficients("group_rational", x, numerator, denominator)
    check_channel_vector("group_rational", x, bias=bias)


def forward_impl(x: Tensor, numerator: Tensor, denominator: Tensor, bias: Tensor | None, backend: str,
                 wrap=direct) -> Tensor:  # fmt: skip
    """F(x + bias) on `backend`."""
    if backend == "triton":
        return _kernels.rational_forward(x, numerator, denominator, bias, wrap=wrap)
    return reference.rational_forward(x, numerator, denominator, bias)


def backward_impl(grad_output: Tensor, x: Tensor, numerator: Tensor, denominator: Tensor, bias: Tensor | None,
                  backend: str, wrap=direct) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:  # fmt: skip
    """(dx, d numerator, d denominator, d bias or None) on `backend`."""
    if backend == "triton":
        return _kernels.rational_backward(grad_output, x, numerator, denominator, bias, wrap=wrap)
    return reference.rational_backward(grad_output, x, numerator, denominator, bias)


def _forward_fake(x, numerator, denominator, bias, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


GROUP_RATIONAL = GradOp(
    "kat::group_rational",
    forward=forward_impl,
    backward=backward_impl,
    forward_fake=_forward_fake,
    reference=lambda x, numerator, denominator, bias, backend: reference.rational_forward(
        x, numerator, denominator, bias
    ),
    forward_schema="(Tensor x, Tensor numerator, Tensor denominator, Tensor? bias, str backend) -> Tensor",
    backward_schema=(
        "(Tensor grad_output, Tensor x, Tensor numerator, Tensor denominator, Tensor? bias, str backend) "
        "-> (Tensor, Tensor, Tensor, Tensor)"
    ),
    tensor_inputs=(0, 1, 2, 3),
)


def group_rational(
    x: Tensor, numerator: Tensor, denominator: Tensor, backend: str | None = None, bias: Tensor | None = None
) -> Tensor:
    """F(x + bias) = P/Q per channel group; x [..., C], numerator (Gn, 6), denominator (Gd, 4), Gn, Gd in
    {1, G}, bias (C,) or None (docs/MODELS.md, GR-KAN function).

    Returns x's shape and dtype; differentiable in all inputs. `bias` is the preceding linear layer's bias
    (the fused KAT mixer passes fc1's): added inside the op, it costs no pass over memory of its own, and its
    gradient comes out of the op's backward kernel instead of a separate reduction. Coefficients and bias may
    have another float dtype than x (e.g. float32 with bfloat16 x); the math runs in float32 (float64 if any
    input is). backend: None/'auto' (see `active_backend`), 'triton' or 'torch'.
    """
    check_inputs(x, numerator, denominator, bias)
    return GROUP_RATIONAL(x, numerator, denominator, bias, active_backend(x, backend))
