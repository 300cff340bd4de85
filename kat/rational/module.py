"""GroupRational: the GR-KAN learnable activation as an nn.Module (the KAT channel-mixer activation)."""

import torch
from torch import Tensor, nn

from kat.rational.coefficients import init_coefficients
from kat.rational.op import group_rational


class GroupRational(nn.Module):
    """F(x) = P(x)/Q(x) on `groups` contiguous channel groups of x [..., channels].

    Parameters are named and shaped like the published KAT checkpoints: `weight_numerator` (1, 6), shared by all
    groups, and `weight_denominator` (groups, 4), one row per group; both float32 whatever the activation dtype.
    `init` names a fitted activation from kat.rational.coefficients ('identity', 'swish'/'silu', 'gelu', 'relu').
    """

    def __init__(self, channels: int, groups: int = 8, init: str = "identity", backend: str | None = None):
        super().__init__()
        if groups < 1 or channels % groups != 0:
            raise ValueError(f"GroupRational: channels={channels} is not divisible by groups={groups}")
        self.channels, self.groups, self.init, self.backend = channels, groups, init, backend
        init_coefficients(init)  # fail early on an unknown init name
        self.weight_numerator = nn.Parameter(torch.empty(1, 6))
        self.weight_denominator = nn.Parameter(torch.empty(groups, 4))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        numerator, denominator = init_coefficients(self.init)
        self.weight_numerator.copy_(torch.tensor(numerator).expand(1, 6))
        self.weight_denominator.copy_(torch.tensor(denominator).expand(self.groups, 4))

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """F(x + bias); `bias` (C,) is the preceding linear layer's, added inside the op (see group_rational)."""
        return group_rational(x, self.weight_numerator, self.weight_denominator, backend=self.backend, bias=bias)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, groups={self.groups}, init={self.init!r}"
