"""The KAT block's channel mixer fused: norm2 -> act1 -> fc1 -> act2 (with fc1's bias) -> fc2.

`channel_mixer(x, norm, mlp)` computes `mlp(norm(x))` for a KANMlp without dropout or a norm before fc2, built on
the GR-KAN ops of kat.rational (`LAYER_NORM_RATIONAL`, `GROUP_RATIONAL`):
- eager: one autograd.Function. An eager KAT-T/S step is bound by the host issuing kernels; composed of modules
  the mixer is about eight autograd nodes (norm2 -> act1, fc1's and fc2's weight casts and matmuls, act2, fc2's
  bias cast), each with its own dispatch, autocast and autograd-engine cost. One node issues the same kernels
  with less of that bookkeeping (docs/BENCHMARKS.md sections 1 and 3).
- torch.compile and exporting: the same function composed of the ops (`layer_norm_rational`, a linear without
  bias, `group_rational` adding fc1's bias, a linear): the compiler traces into them and fuses around them;
  exporters get each op's reference composition.
Fused against composed: norm2 -> act1 is one kernel that neither writes nor saves the LayerNorm output (it
recomputes it from x, which the residual stream keeps) and writes act1's output in the dtype fc1 consumes;
fc1's bias is added inside act2's kernel, whose backward also yields its gradient.

The eager node saves what the composed ops save (x, the LayerNorm statistics, fc1's, act2's and fc2's inputs and
the low-precision weight copies), so memory is unchanged. It runs in the autocast dtype when autocast is on
for x's device type, else in x's dtype, as the modules would; the weights are cast once and the copies saved
for backward, as autocast's composed path does (casting again in backward would add two kernels per block).
One deliberate difference: fc2's bias gradient is summed in the bias's dtype (fp32), where autocast's composed
path sums it in bf16 and casts.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kat.rational import norm_rational, op
from kat.rational.library import exporting
from kat.rational.norm_rational import LAYER_NORM_RATIONAL, layer_norm_rational
from kat.rational.op import GROUP_RATIONAL, group_rational

_NORM_INPUTS = (0, 1, 2, 4, 5)  # positions of x, norm weight/bias and act1's coefficients among the inputs


class _ChannelMixer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, num1, den1, fc1_weight, fc1_bias, num2, den2, fc2_weight,
                fc2_bias, dtype, backends):  # fmt: skip
        h, mean, rstd = LAYER_NORM_RATIONAL.forward(x, norm_weight, norm_bias, eps, num1, den1, dtype, backends[0])
        w1, w2 = fc1_weight.to(dtype), fc2_weight.to(dtype)  # what autocast's casts would make
        z = F.linear(h, w1)  # [..., H]: fc1 without its bias, which act2 adds
        op.check_inputs(z, num2, den2, fc1_bias)
        a = GROUP_RATIONAL.forward(z, num2, den2, fc1_bias, backends[1])
        out = F.linear(a, w2, None if fc2_bias is None else fc2_bias.to(dtype))  # [..., C_out]
        ctx.save_for_backward(x, norm_weight, norm_bias, mean, rstd, num1, den1, h, w1, z, fc1_bias, num2, den2,
                              a, w2)  # fmt: skip
        ctx.backends = backends
        ctx.dtypes = (fc1_weight.dtype, fc2_weight.dtype, None if fc2_bias is None else fc2_bias.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, norm_weight, norm_bias, mean, rstd, num1, den1, h, w1, z, fc1_bias, num2, den2, a, w2 = ctx.saved_tensors
        needs = ctx.needs_input_grad
        fc1_dtype, fc2_dtype, fc2_bias_dtype = ctx.dtypes
        grad = grad.reshape(-1, grad.shape[-1])  # [N, C_out]
        d_fc2_bias = grad.sum(0, dtype=fc2_bias_dtype) if needs[11] else None
        d_fc2_weight = torch.mm(grad.t(), a.reshape(-1, a.shape[-1])).to(fc2_dtype) if needs[10] else None
        norm_grads = (None,) * 6  # gradients of x, norm weight/bias, eps, act1's numerator/denominator
        d_fc1_weight = d_fc1_bias = d_num2 = d_den2 = None
        if any(needs[:10]):
            d_a = torch.mm(grad, w2).view(z.shape)  # [..., H]
            d_z, d_num2, d_den2, d_fc1_bias = GROUP_RATIONAL.backward(d_a, z, num2, den2, fc1_bias, ctx.backends[1])
            d_z = d_z.reshape(-1, d_z.shape[-1])  # [N, H]
            if needs[6]:
                d_fc1_weight = torch.mm(d_z.t(), h.reshape(-1, h.shape[-1])).to(fc1_dtype)
            if any(needs[i] for i in _NORM_INPUTS):
                d_h = torch.mm(d_z, w1).view(h.shape)  # [..., C]
                grads = LAYER_NORM_RATIONAL.backward(
                    d_h, x, norm_weight, norm_bias, num1, den1, mean, rstd, ctx.backends[0]
                )
                norm_grads = LAYER_NORM_RATIONAL.input_grads(
                    len(norm_grads), (x, norm_weight, norm_bias, num1, den1), grads
                )
        return (*norm_grads, d_fc1_weight, d_fc1_bias, d_num2, d_den2, d_fc2_weight, d_fc2_bias, None, None)


def channel_mixer(x: Tensor, norm: nn.LayerNorm, mlp: nn.Module) -> Tensor:
    """mlp(norm(x)) for x [..., C] and a KANMlp `mlp` (no dropout, no norm before fc2), fused (see above)."""
    act1, fc1, act2, fc2 = mlp.act1, mlp.fc1, mlp.act2, mlp.fc2
    if exporting() or torch.compiler.is_compiling():
        h = layer_norm_rational(
            x, norm.weight, norm.bias, norm.eps, act1.weight_numerator, act1.weight_denominator, backend=act1.backend
        )
        a = group_rational(
            F.linear(h, fc1.weight), act2.weight_numerator, act2.weight_denominator, act2.backend, bias=fc1.bias
        )
        return F.linear(a, fc2.weight, fc2.bias)
    dtype = norm_rational.default_out_dtype(x)
    numerator1, denominator1 = act1.weight_numerator, act1.weight_denominator
    norm_rational.check_inputs(x, norm.weight, norm.bias, norm.eps, numerator1, denominator1, dtype)
    backends = (op.active_backend(x, act1.backend), op.active_backend(x, act2.backend))
    return _ChannelMixer.apply(
        x, norm.weight, norm.bias, float(norm.eps), numerator1, denominator1, fc1.weight, fc1.bias,
        act2.weight_numerator, act2.weight_denominator, fc2.weight, fc2.bias, dtype, backends,
    )  # fmt: skip
