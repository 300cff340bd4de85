"""Fused LayerNorm -> group-rational activation, y = F(LayerNorm(x)): the KAT block's `norm2 -> mlp.act1`.

Why fuse: unfused under autocast, LayerNorm writes its output in fp32, act1 reads it and saves it for
backward, and fc1 casts act1's fp32 output to bf16: three extra memory passes and one extra saved [N, C] fp32
activation per block (the whole of KAT-S's peak-memory excess over ViT-S). Fused, one kernel reads x,
normalises each row, applies gamma/beta and F, and writes y directly in the dtype fc1 consumes; backward
saves only x (which the residual stream keeps alive anyway), mean and rstd ([N] fp32) and recomputes the
LayerNorm output.

Two ops, `kat::layer_norm_rational_fwd` -> (y, mean, rstd) and `kat::layer_norm_rational_bwd` ->
(dx, d_weight, d_bias, d_numerator, d_denominator), with an autograd registration, are what torch.compile
traces (triton_ops where Triton compiles the kernels: see `kat.rational.op.define_op`); eager calls run the
same implementations through an autograd.Function, which costs far less host time than the op dispatch (as
`kat.rational.op.group_rational` does). Backends, chosen by `kat.rational.op.active_backend`:
  'triton': kat.rational.norm_rational_kernels (CUDA; CPU tensors run in the interpreter, TRITON_INTERPRET=1)
  'torch':  torch.native_layer_norm composed with kat.rational.reference, explicit LayerNorm backward;
            the same function and gradients, also in float64.
`layer_norm_rational_reference` (F.layer_norm then the reference group-rational, autograd) is the test oracle.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from kat.rational import reference
from kat.rational.op import HAS_TRITON, WRAP, active_backend, define_op

if HAS_TRITON:  # kat works where triton is not installed: the 'torch' backend needs none
    from kat.rational import norm_rational_kernels as _kernels

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


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


def forward_impl(x, weight, bias, eps, numerator, denominator, out_dtype, backend, wrap=None):
    """(y, mean, rstd) on `backend`: the body of the op, of the eager autograd.Function and of the eager channel
    mixer (kat.models.channel_mixer)."""
    if backend == "triton":
        return _kernels.forward(
            x, weight, bias, eps, numerator, denominator, out_dtype, wrap=wrap or _kernels.direct
        )
    return _torch_forward(x, weight, bias, eps, numerator, denominator, out_dtype)


def backward_impl(grad_output, x, weight, bias, mean, rstd, numerator, denominator, backend, wrap=None):
    """(dx, d_weight, d_bias, d_numerator, d_denominator) on `backend` (see `forward_impl`)."""
    if backend == "triton":
        return _kernels.backward(
            grad_output, x, weight, bias, mean, rstd, numerator, denominator, wrap=wrap or _kernels.direct
        )
    return _torch_backward(grad_output, x, weight, bias, mean, rstd, numerator, denominator)


# ---------------------------------------------------------------------------------------------------------
# Ops (what torch.compile traces).


def _fwd_fake(x, weight, bias, eps, numerator, denominator, out_dtype, backend):
    stats = _stats_dtype(x, weight, bias, numerator, denominator, backend)
    return (
        x.new_empty(x.shape, dtype=out_dtype),
        x.new_empty(x.shape[:-1], dtype=stats),
        x.new_empty(x.shape[:-1], dtype=stats),
    )


@define_op("kat::layer_norm_rational_fwd", _fwd_fake)
def _layer_norm_rational_fwd(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    numerator: Tensor,
    denominator: Tensor,
    out_dtype: torch.dtype,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return forward_impl(x, weight, bias, eps, numerator, denominator, out_dtype, backend, WRAP)


def _bwd_fake(grad_output, x, weight, bias, mean, rstd, numerator, denominator, backend):
    channels = x.shape[-1]
    return (
        x.new_empty(x.shape),
        x.new_empty(channels, dtype=torch.float32 if weight is None else weight.dtype),
        x.new_empty(channels, dtype=torch.float32 if bias is None else bias.dtype),
        numerator.new_empty(numerator.shape),
        denominator.new_empty(denominator.shape),
    )


@define_op("kat::layer_norm_rational_bwd", _bwd_fake)
def _layer_norm_rational_bwd(
    grad_output: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    numerator: Tensor,
    denominator: Tensor,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return backward_impl(grad_output, x, weight, bias, mean, rstd, numerator, denominator, backend, WRAP)


def parameter_grads(weight, bias, grads):
    """(dx, d_weight, d_bias, d_num, d_den) -> gradients of (x, weight, bias, eps, num, den); None where
    a parameter is absent. Shared with the eager channel mixer (kat.models.channel_mixer)."""
    dx, d_weight, d_bias, d_num, d_den = grads
    return (
        dx,
        d_weight if weight is not None else None,
        d_bias if bias is not None else None,
        None,
        d_num,
        d_den,
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps, numerator, denominator, out_dtype, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd, numerator, denominator)  # x in its own dtype
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # no zero tensors for mean/rstd's (absent) gradients
    ctx.backend = backend


def _backward(ctx, grad_output, _grad_mean, _grad_rstd):
    x, weight, bias, mean, rstd, numerator, denominator = ctx.saved_tensors
    grads = _layer_norm_rational_bwd(
        grad_output, x, weight, bias, mean, rstd, numerator, denominator, ctx.backend
    )
    return *parameter_grads(weight, bias, grads), None, None


_layer_norm_rational_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerLayerNormRational(torch.autograd.Function):
    """The same forward and backward as the custom ops without the custom-op dispatch, which costs several
    times the host time of an autograd.Function (measured: see kat.rational.op._EagerGroupRational)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, numerator, denominator, out_dtype, backend):
        y, mean, rstd = forward_impl(x, weight, bias, eps, numerator, denominator, out_dtype, backend)
        ctx.save_for_backward(x, weight, bias, mean, rstd, numerator, denominator)
        ctx.backend = backend
        return y

    @staticmethod
    def backward(ctx, grad_output):
        x, weight, bias, mean, rstd, numerator, denominator = ctx.saved_tensors
        grads = backward_impl(grad_output, x, weight, bias, mean, rstd, numerator, denominator, ctx.backend)
        return *parameter_grads(weight, bias, grads), None, None


# ---------------------------------------------------------------------------------------------------------
# Public API.


def check_inputs(x, weight, bias, eps, numerator, denominator, out_dtype) -> None:
    """Clear errors for what `layer_norm_rational` cannot compute (types, dtypes, devices, shapes)."""
    named = {"x": x, "weight": weight, "bias": bias, "numerator": numerator, "denominator": denominator}
    for name, t in named.items():
        if t is None and name in ("weight", "bias"):
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"layer_norm_rational: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"layer_norm_rational: {name} has dtype {t.dtype}; use float32, bfloat16, float16 or float64 "
                f"(e.g. {name}.float())"
            )
        if t.device != x.device:
            raise ValueError(
                f"layer_norm_rational: {name} is on {t.device} but x is on {x.device}; move them to one "
                "device"
            )
    if out_dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"layer_norm_rational: out_dtype={out_dtype} is not float32, bfloat16, float16 or float64"
        )
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"layer_norm_rational: eps must be a float >= 0, got {eps!r}")
    if numerator.dim() != 2 or numerator.shape[1] != 6:
        raise ValueError(
            f"layer_norm_rational: numerator must have shape (Gn, 6), got {tuple(numerator.shape)}"
        )
    if denominator.dim() != 2 or denominator.shape[1] != 4:
        raise ValueError(
            f"layer_norm_rational: denominator must have shape (Gd, 4), got {tuple(denominator.shape)}"
        )
    groups = max(numerator.shape[0], denominator.shape[0])
    for name, t in (("numerator", numerator), ("denominator", denominator)):
        if t.shape[0] not in (1, groups):
            raise ValueError(
                f"layer_norm_rational: {name} has {t.shape[0]} rows but the groups are {groups}: each "
                f"coefficient tensor must have 1 row (shared by all groups) or one row per group"
            )
    if x.dim() == 0 or x.shape[-1] == 0 or x.shape[-1] % groups != 0:
        channels = x.shape[-1] if x.dim() else None
        raise ValueError(
            f"layer_norm_rational: x must be [..., C] with C >= 1 divisible by the {groups} groups; got x of "
            f"shape {tuple(x.shape)} (C = {channels})"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (x.shape[-1],):
            raise ValueError(
                f"layer_norm_rational: {name} must have shape (C,) = ({x.shape[-1]},) like LayerNorm's, got "
                f"{tuple(t.shape)}"
            )


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
    eps = float(eps)
    if torch.compiler.is_compiling():
        return _layer_norm_rational_fwd(x, weight, bias, eps, numerator, denominator, out_dtype, backend)[0]
    return _EagerLayerNormRational.apply(x, weight, bias, eps, numerator, denominator, out_dtype, backend)


def layer_norm_rational_reference(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, numerator: Tensor, denominator: Tensor
) -> Tensor:
    """The unfused composition F.layer_norm -> reference group-rational, differentiated by autograd: the
    oracle the fused op is tested against (run it in float64)."""
    h = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return reference.group_rational_reference(h, numerator, denominator)
