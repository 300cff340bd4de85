"""Fused LayerNorm -> group-rational activation, y = F(LayerNorm(x)): the KAT block's `norm2 -> mlp.act1`.

Why fuse: unfused under autocast, LayerNorm writes its output in fp32, act1 reads it and saves it for
backward, and fc1 casts act1's fp32 output to bf16: three extra memory passes and one extra saved [N, C] fp32
activation per block (the whole of KAT-S's peak-memory excess over ViT-S). Fused, one kernel reads x,
normalises each row, applies gamma/beta and F, and writes y directly in the dtype fc1 consumes; backward
saves only x (which the residual stream keeps alive anyway), mean and rstd ([N] fp32) and recomputes the
LayerNorm output.

Defined once through `kat.rational.library.GradOp`: `kat::layer_norm_rational_fwd` -> (y, mean, rstd) and
`kat::layer_norm_rational_bwd` -> (dx, d_weight, d_bias, d_numerator, d_denominator) for torch.compile, an
autograd.Function for eager calls, F.layer_norm with the reference group-rational while exporting. Backends,
chosen by `kat.rational.op.active_backend`:
  'triton': kat.rational.norm_rational_kernels (CUDA; CPU tensors run in the interpreter, TRITON_INTERPRET=1)
  'torch':  torch.native_layer_norm composed with kat.rational.reference, explicit LayerNorm backward;
            the same function and gradients, also in float64.
`layer_norm_rational_reference` (F.layer_norm then the reference group-rational, autograd) is the test oracle.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from kat.rational import reference
from kat.rational.library import FLOAT_DTYPES, GradOp, check_channel_vector, check_coefficients, check_tensors
from kat.rational.op import active_backend
from kat.triton_utils import HAS_TRITON, direct

if HAS_TRITON:  # kat works where triton is not installed: the 'torch' backend needs none
    from kat.rational import norm_rational_kernels as _kernels


def _stats_dtype(x, weight, bias, numerator, denominator, backend: str) -> torch.dtype:
    """dtype of mean/rstd: fp32 in the kernels; the compute dtype (fp64 if any input is) on the torch path."""
    if backend == "triton":
        return torch.float32
    return reference.compute_dtype(x, weight, bias, numerator, denominator)


# ---------------------------------------------------------------------------------------------------------
# The 'torch' backend: explicit formulas, fp64-capable.


def _torch_forward(x, weight, bias, eps, numerator, denominator, out_dtype):
    dtype = reference.compute_dtype(x, weight, bias, numerator, denominator)
    weight, bias = (None if t is None else t.to(dtype) for t in (weight, bias))
    h, mean, rstd = torch.native_layer_norm(x.to(dtype), (x.shape[-1],), weight, bias, eps)
    y = reference.rational_forward(h, numerator, denominator).to(out_dtype)
    return y, mean.view(x.shape[:-1]), rstd.view(x.shape[:-1])  # [..., 1] -> [...]


def _torch_backward(grad_output, x, weight, bias, mean, rstd, numerator, denominator):
    dtype = mean.dtype
    channels = x.shape[-1]
    mean, rstd = mean.unsqueeze(-1), rstd.unsqueeze(-1)
    xhat = (x.to(dtype) - mean) * rstd
    gamma = None if weight is None else weight.to(dtype)
    h = xhat if gamma is None else xhat * gamma
    if bias is not None:
        h = h + bias.to(dtype)
    dh, d_num, d_den, _ = reference.rational_backward(grad_output, h, numerator, denominator)
    d_weight = (dh * xhat).reshape(-1, channels).sum(0)
    d_bias = dh.reshape(-1, channels).sum(0)
    g = dh if gamma is None else dh * gamma
    dx = rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    d_weight = d_weight.to(torch.float32 if weight is None else weight.dtype)
    d_bias = d_bias.to(torch.float32 if bias is None else bias.dtype)
    return dx.to(x.dtype).contiguous(), d_weight, d_bias, d_num, d_den  # contiguous, as the fake says


def forward_impl(x, weight, bias, eps, numerator, denominator, out_dtype, backend, wrap=direct):
    """(y, mean, rstd) on `backend`."""
    if backend == "triton":
        return _kernels.forward(x, weight, bias, eps, numerator, denominator, out_dtype, wrap=wrap)
    return _torch_forward(x, weight, bias, eps, numerator, denominator, out_dtype)


def backward_impl(grad_output, x, weight, bias, numerator, denominator, mean, rstd, backend, wrap=direct):
    """(dx, d_weight, d_bias, d_numerator, d_denominator) on `backend`."""
    if backend == "triton":
        return _kernels.backward(grad_output, x, weight, bias, mean, rstd, numerator, denominator, wrap=wrap)
    return _torch_backward(grad_output, x, weight, bias, mean, rstd, numerator, denominator)


def _forward_fake(x, weight, bias, eps, numerator, denominator, out_dtype, backend):
    stats = _stats_dtype(x, weight, bias, numerator, denominator, backend)
    return (
        x.new_empty(x.shape, dtype=out_dtype),
        x.new_empty(x.shape[:-1], dtype=stats),
        x.new_empty(x.shape[:-1], dtype=stats),
    )


def _reference(x, weight, bias, eps, numerator, denominator, out_dtype, backend):
    """F.layer_norm then the group-rational, in the compute dtype, rounded once to out_dtype."""
    dtype = reference.compute_dtype(x, weight, bias, numerator, denominator)
    weight, bias = (None if t is None else t.to(dtype) for t in (weight, bias))
    h = F.layer_norm(x.to(dtype), (int(x.shape[-1]),), weight, bias, eps)  # int: a constant for exporters
    return reference.rational_forward(h, numerator, denominator).to(out_dtype)


LAYER_NORM_RATIONAL = GradOp(
    "kat::layer_norm_rational",
    forward=forward_impl,
    backward=backward_impl,
    forward_fake=_forward_fake,
    reference=_reference,
    forward_schema=(
        "(Tensor x, Tensor? weight, Tensor? bias, float eps, Tensor numerator, Tensor denominator, "
        "ScalarType out_dtype, str backend) -> (Tensor, Tensor, Tensor)"
    ),
    backward_schema=(
        "(Tensor grad_output, Tensor x, Tensor? weight, Tensor? bias, Tensor numerator, Tensor denominator, "
        "Tensor mean, Tensor rstd, str backend) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    tensor_inputs=(0, 1, 2, 4, 5),
)


# ---------------------------------------------------------------------------------------------------------
# Public API.


def check_inputs(x, weight, bias, eps, numerator, denominator, out_dtype) -> None:
    """Clear errors for what `layer_norm_rational` cannot compute (types, dtypes, devices, shapes)."""
    name = "layer_norm_rational"
    check_tensors(name, x, weight=weight, bias=bias, numerator=numerator, denominator=denominator)
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: out_dtype={out_dtype} is not float32, bfloat16, float16 or float64")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"{name}: eps must be a float >= 0, got {eps!r}")
    check_coefficients(name, x, numerator, denominator)
    check_channel_vector(name, x, weight=weight, bias=bias)


def default_out_dtype(x: Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for x's device type (what the next linear layer would cast
    to), else x's dtype. float64 x stays float64, as autocast leaves float64 alone."""
    device_type = x.device.type
    if x.dtype != torch.float64 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def layer_norm_rational(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    numerator: Tensor,
    denominator: Tensor,
    out_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> Tensor:
    """F(LayerNorm(x)): LayerNorm over the last dim (C) with weight/bias (C,) (None: no affine), then the
    group-rational F with numerator (Gn, 6) and denominator (Gd, 4), Gn, Gd in {1, G}, C divisible by G.

    Equals `group_rational(F.layer_norm(x, (C,), weight, bias, eps), numerator, denominator)` computed in fp32
    (fp64 if any input is) and rounded once to out_dtype. out_dtype None: the autocast dtype if autocast is on
    for x's device type, else x's dtype. Differentiable in x, weight, bias, numerator and denominator; dx has
    x's dtype, parameter gradients their parameters' dtypes (deterministic). backend: None/'auto', 'triton',
    'torch' (see kat.rational.op.active_backend).
    """
    if out_dtype is None:
        out_dtype = default_out_dtype(x) if isinstance(x, Tensor) else None
    check_inputs(x, weight, bias, eps, numerator, denominator, out_dtype)
    backend = active_backend(x, backend)
    return LAYER_NORM_RATIONAL(x, weight, bias, float(eps), numerator, denominator, out_dtype, backend)


def layer_norm_rational_reference(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, numerator: Tensor, denominator: Tensor
) -> Tensor:
    """The unfused composition F.layer_norm -> reference group-rational, differentiated by autograd: the
    oracle the fused op is tested against (run it in float64)."""
    h = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return reference.group_rational_reference(h, numerator, denominator)
