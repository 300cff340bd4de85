"""The KAT block's channel mixer in eager mode as one autograd node: norm2 -> act1 -> fc1 -> act2 -> fc2.

Why: an eager KAT-T/S training step is bound by the host issuing kernels, not by the GPU. Composed of modules,
the mixer is about eight autograd nodes (the fused norm2 -> act1 op, fc1's and fc2's weight casts and matmuls,
act2 with fc1's bias, fc2's bias cast), each with its own dispatch, autocast and autograd-engine cost on the
host. As one autograd.Function the host issues the same kernels with less of that bookkeeping. Measured on an
H200 (2026-12-01; docs/BENCHMARKS.md sections 1 and 3): host time of one KAT-T mixer forward+backward 1687 ->
1487 us; eager KAT-S 1.018 -> 1.061x ViT-S's images/s on one host, 0.879 -> 0.911x on a slower one.

It computes the composed path's function with the same kernels and saves the same activations (x, the
LayerNorm statistics, fc1's input, act2's input, fc2's input and the low-precision weight copies), so memory is
unchanged. One deliberate difference: fc2's bias gradient is summed in the bias's dtype (fp32), where autocast's
composed path sums it in bf16 and casts. Under torch.compile the composed ops run instead (the compiler traces
into them and fuses around them; see kat.rational.op).
"""

import torch
from torch import Tensor, nn

from kat.rational import norm_rational, op
from kat.rational.module import GroupRational

_NORM_INPUTS = (0, 1, 2, 4, 5)  # positions of x, norm weight/bias and act1's coefficients among the inputs


class _ChannelMixer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, num1, den1, fc1_weight, fc1_bias, num2, den2, fc2_weight,
                fc2_bias, dtype, backends):  # fmt: skip
        rows = x.reshape(-1, x.shape[-1])  # [N, C]
        h, mean, rstd = norm_rational.forward_impl(rows, norm_weight, norm_bias, eps, num1, den1, dtype, backends[0])
        w1, w2 = fc1_weight.to(dtype), fc2_weight.to(dtype)  # what autocast's casts would make
        z = torch.mm(h, w1.t())  # [N, H]: fc1 without its bias, which act2 adds
        op.check_inputs(z, num2, den2, fc1_bias)
        a = op.forward_impl(z, num2, den2, fc1_bias, backends[1])
        out = torch.mm(a, w2.t()) if fc2_bias is None else torch.addmm(fc2_bias.to(dtype), a, w2.t())  # [N, C_out]
        ctx.save_for_backward(rows, norm_weight, norm_bias, mean, rstd, num1, den1, h, w1, z, fc1_bias, num2, den2,
                              a, w2)  # fmt: skip
        ctx.shape, ctx.backends = x.shape, backends
        ctx.dtypes = (fc1_weight.dtype, fc2_weight.dtype, None if fc2_bias is None else fc2_bias.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        rows, norm_weight, norm_bias, mean, rstd, num1, den1, h, w1, z, fc1_bias, num2, den2, a, w2 = ctx.saved_tensors
        needs = ctx.needs_input_grad
        fc1_dtype, fc2_dtype, fc2_bias_dtype = ctx.dtypes
        grad = grad.reshape(-1, grad.shape[-1])  # [N, C_out]
        d_fc2_bias = grad.sum(0, dtype=fc2_bias_dtype) if needs[11] else None
        d_fc2_weight = torch.mm(grad.t(), a).to(fc2_dtype) if needs[10] else None
        norm_grads = (None,) * 6  # gradients of x, norm weight/bias, eps, act1's numerator/denominator
        d_fc1_weight = d_fc1_bias = d_num2 = d_den2 = None
        if any(needs[:10]):
            d_z, d_num2, d_den2, d_fc1_bias = op.backward_impl(torch.mm(grad, w2), z, num2, den2, fc1_bias,
                                                               ctx.backends[1])  # fmt: skip
            if needs[6]:
                d_fc1_weight = torch.mm(d_z.t(), h).to(fc1_dtype)
            if any(needs[i] for i in _NORM_INPUTS):
                dx, *rest = norm_rational.backward_impl(
                    torch.mm(d_z, w1), rows, norm_weight, norm_bias, mean, rstd, num1, den1, ctx.backends[0]
                )
                norm_grads = norm_rational.parameter_grads(norm_weight, norm_bias, (dx.view(ctx.shape), *rest))
        return (*norm_grads, d_fc1_weight, d_fc1_bias, d_num2, d_den2, d_fc2_weight, d_fc2_bias, None, None)


def channel_mixer(
    x: Tensor, norm: nn.LayerNorm, act1: GroupRational, fc1: nn.Linear, act2: GroupRational, fc2: nn.Linear
) -> Tensor:
    """fc2(act2(fc1(act1(norm(x))))) for x [..., C] as one autograd node, with fc1's bias added inside act2.

    The eager path of KANMlp.forward_fused_norm (dropout off, no norm before fc2). Runs in the autocast dtype
    when autocast is on for x's device type, else in x's dtype, as the modules would.
    """
    dtype = norm_rational.default_out_dtype(x)
    numerator1, denominator1 = act1.weight_numerator, act1.weight_denominator
    norm_rational.check_inputs(x, norm.weight, norm.bias, norm.eps, numerator1, denominator1, dtype)
    backends = (op.active_backend(x, act1.backend), op.active_backend(x, act2.backend))
    return _ChannelMixer.apply(
        x, norm.weight, norm.bias, float(norm.eps), numerator1, denominator1, fc1.weight, fc1.bias,
        act2.weight_numerator, act2.weight_denominator, fc2.weight, fc2.bias, dtype, backends,
    )  # fmt: skip
