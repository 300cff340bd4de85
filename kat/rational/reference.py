"""The group-rational activation in plain PyTorch: the spec the Triton kernels are tested against.

F(x + bias) (bias optional, per channel: the preceding linear layer's bias, added inside the op) with
F(x) = P(x) / Q(x) with P(x) = sum_{i=0..5} a_i x^i and Q(x) = 1 + sum_{j=1..4} |b_j| |x|^j, applied to
G contiguous groups of C/G channels (x is channels-last, [..., C]); numerator (Gn, 6), denominator (Gd, 4),
Gn and Gd each 1 (shared) or G. The gradients are written out rather than left to autograd, because
autograd's abs() has gradient 0 at 0 and we take sign(0) = +1 (for x and for b): otherwise an
identity-initialised activation (b = 0) never trains its denominator.

Math runs in float32 for float32/bfloat16/float16 inputs (as in the kernels) and in float64 when any input is
float64, so the same code is the fp64 ground truth.
"""

import torch
from torch import Tensor


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (absent optional inputs, None, are skipped)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def sign_plus(t: Tensor) -> Tensor:
    """sign(t) with sign(0) = +1."""
    return torch.where(t >= 0, 1.0, -1.0).to(t.dtype)


def _grouped(x: Tensor, groups: int, dtype: torch.dtype) -> Tensor:
    return x.reshape(-1, groups, x.shape[-1] // groups).to(dtype)  # [..., C] -> [N, G, C/G]


def _columns(coefficients: Tensor, dtype: torch.dtype) -> list[Tensor]:
    """(Gc, k) -> k tensors of shape (Gc, 1), broadcasting against [N, G, C/G] (Gc is 1 or G)."""
    return list(coefficients.to(dtype).unsqueeze(-1).unbind(1))


def _numerator_and_denominator(xg: Tensor, a: list[Tensor], c: list[Tensor]) -> tuple[Tensor, Tensor]:
    """P(x) and Q(x) by Horner; c are |b_j|."""
    p = a[5]
    for k in (4, 3, 2, 1, 0):
        p = p * xg + a[k]
    ax = xg.abs()
    q = 1.0 + ax * (c[0] + ax * (c[1] + ax * (c[2] + ax * c[3])))
    return p, q


def _shifted(x: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """x + bias in the compute dtype (bias (C,) broadcast over rows)."""
    return x.to(dtype) if bias is None else x.to(dtype) + bias.to(dtype)


def rational_forward(x: Tensor, numerator: Tensor, denominator: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = F(x + bias), same shape and dtype as x (contiguous)."""
    groups = max(numerator.shape[0], denominator.shape[0])
    dtype = compute_dtype(x, numerator, denominator, bias)
    xg = _grouped(_shifted(x, bias, dtype), groups, dtype)
    p, q = _numerator_and_denominator(xg, _columns(numerator, dtype), _columns(denominator.abs(), dtype))
    return (p / q).to(x.dtype).reshape(x.shape)


def rational_backward(
    grad_output: Tensor, x: Tensor, numerator: Tensor, denominator: Tensor, bias: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(dx, d numerator, d denominator, d bias or None) with the sign(0) = +1 convention; x is the input
    before the bias is added, and d bias is dx (in the compute dtype) summed over rows.

    dF/dx = R/Q - S P/Q^2, R = P'(x), S = sign(x) (|b1| + 2|b2||x| + 3|b3||x|^2 + 4|b4||x|^3);
    dF/da_i = x^i / Q;  dF/db_j = -sign(b_j) |x|^j P/Q^2. Coefficient gradients are summed in the compute
    dtype over every element of a group (and over all groups for a shared (1, k) coefficient row).
    """
    groups = max(numerator.shape[0], denominator.shape[0])
    dtype = compute_dtype(x, numerator, denominator, bias)
    xg = _grouped(_shifted(x, bias, dtype), groups, dtype)
    g = _grouped(grad_output, groups, dtype)
    a = _columns(numerator, dtype)
    c = _columns(denominator.abs(), dtype)
    p, q = _numerator_and_denominator(xg, a, c)
    ax = xg.abs()
    r = a[1] + xg * (2 * a[2] + xg * (3 * a[3] + xg * (4 * a[4] + xg * 5 * a[5])))
    s = sign_plus(xg) * (c[0] + ax * (2 * c[1] + ax * (3 * c[2] + ax * 4 * c[3])))
    g_over_q = g / q
    f = p / q
    dh = g_over_q * (r - s * f)  # [N, G, C/G], compute dtype
    dx = dh.to(x.dtype).reshape(x.shape)
    d_bias = None if bias is None else dh.reshape(-1, x.shape[-1]).sum(0).to(bias.dtype)

    def group_sums(t: Tensor, count: int, base: Tensor) -> Tensor:
        sums, term = [], t
        for _ in range(count):
            sums.append(term.sum(dim=(0, 2)))  # [G]
            term = term * base
        return torch.stack(sums, dim=1)  # [G, count]

    d_num = group_sums(g_over_q, 6, xg)  # sum g x^i / Q
    d_den = -group_sums(g_over_q * f * ax, 4, ax) * sign_plus(denominator.to(dtype))  # -sum g |x|^j P/Q^2
    if numerator.shape[0] == 1:
        d_num = d_num.sum(0, keepdim=True)
    if denominator.shape[0] == 1:
        d_den = d_den.sum(0, keepdim=True)
    return dx, d_num.to(numerator.dtype), d_den.to(denominator.dtype), d_bias


class _GroupRationalReference(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, numerator, denominator, bias):
        ctx.save_for_backward(x, numerator, denominator, bias)
        return rational_forward(x, numerator, denominator, bias)

    @staticmethod
    def backward(ctx, grad_output):
        return rational_backward(grad_output, *ctx.saved_tensors)


def group_rational_reference(
    x: Tensor, numerator: Tensor, denominator: Tensor, bias: Tensor | None = None
) -> Tensor:
    """Differentiable F(x + bias) by the formulas above (no custom op, no validation): the test oracle."""
    return _GroupRationalReference.apply(x, numerator, denominator, bias)
