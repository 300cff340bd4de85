"""GR-KAN operator: the group-rational activation F(x) = P(x)/Q(x) of KAT (see KAT_FACTS section 2).

- `group_rational(x, numerator, denominator, backend=None)`: the differentiable op (torch.library custom op);
- `GroupRational(channels, groups=8, init=...)`: the module with checkpoint-compatible parameters;
- `active_backend(x)`: 'triton' or 'torch', what `group_rational` runs for x (env KAT_RATIONAL_BACKEND);
- `coefficients`: fitted inits and the variance-preserving gain `vp_gain(name)`;
- `reference.group_rational_reference`: plain-PyTorch oracle (float64-capable), the spec for the kernels.
"""

from kat.rational import coefficients
from kat.rational.coefficients import vp_gain
from kat.rational.module import GroupRational
from kat.rational.op import active_backend, group_rational

__all__ = ["GroupRational", "active_backend", "coefficients", "group_rational", "vp_gain"]
