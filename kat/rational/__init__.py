"""GR-KAN operator: the group-rational activation F(x) = P(x)/Q(x) of KAT (docs/MODELS.md, GR-KAN function).

- `group_rational(x, numerator, denominator, backend=None)`: the differentiable op (a torch.library op; torch.compile
  traces into its Triton kernels on CUDA);
- `GroupRational(channels, groups=8, init=...)`: the module with checkpoint-compatible parameters;
- `layer_norm_rational(x, weight, bias, eps, numerator, denominator)`: F(LayerNorm(x)) fused into one op (the
  KAT block's norm2 -> act1 pair), same function as the two ops in sequence;
- `active_backend(x)`: 'triton' or 'torch', what `group_rational` runs for x (env KAT_RATIONAL_BACKEND);
- `coefficients`: fitted inits and the variance-preserving gain `vp_gain(name)`;
- `reference.group_rational_reference`: plain-PyTorch oracle (float64-capable), the spec for the kernels;
- `library.GradOp`: how each op is defined once (checks, torch.library ops, eager Function, export reference).
"""

from kat.rational import coefficients
from kat.rational.coefficients import vp_gain
from kat.rational.module import GroupRational
from kat.rational.norm_rational import layer_norm_rational
from kat.rational.op import active_backend, group_rational

__all__ = ["GroupRational", "active_backend", "coefficients", "group_rational", "layer_norm_rational", "vp_gain"]
