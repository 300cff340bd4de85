"""Plots of every layer's learned rational functions: the point of a KAN is that you can look at them."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from kat.rational import GroupRational, group_rational  # noqa: E402

X_RANGE = (-3.0, 3.0)  # where the initial activations were fitted


@torch.no_grad()
def rational_curves(module: GroupRational, num_points: int = 241) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N] and F_g(x) [N, groups] for each channel group, computed on CPU from the module's coefficients."""
    numerator = module.weight_numerator.detach().float().cpu()
    denominator = module.weight_denominator.detach().float().cpu()
    groups = max(numerator.shape[0], denominator.shape[0])
    x = torch.linspace(*X_RANGE, num_points)
    # One channel per group: input [N, groups], channel g holds x and sees group g's coefficients.
    y = group_rational(x[:, None].expand(-1, groups).contiguous(), numerator, denominator, backend="torch")
    return x, y


def plot_rationals(model: torch.nn.Module, path: Path, title: str = "") -> Path | None:
    """One subplot per block holding rationals (e.g. act1 and act2 of blocks.i.mlp), a curve per group.

    Returns the PNG path, or None when the model has no GroupRational layers (a ViT baseline).
    """
    blocks: dict[str, list[tuple[str, GroupRational]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, GroupRational):
            parent, _, leaf = name.rpartition(".")
            blocks.setdefault(parent, []).append((leaf, module))
    if not blocks:
        return None

    ncols = min(4, len(blocks))
    nrows = -(-len(blocks) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.6 * nrows), squeeze=False, sharex=True)
    colormaps = [plt.cm.Blues, plt.cm.Oranges, plt.cm.Greens, plt.cm.Purples]
    for ax, (parent, activations) in zip(axes.flat, blocks.items()):
        for (leaf, module), cmap in zip(activations, colormaps):
            x, y = rational_curves(module)
            for g in range(y.shape[1]):
                label = leaf if g == 0 else None
                ax.plot(x, y[:, g], color=cmap(0.4 + 0.6 * g / max(y.shape[1] - 1, 1)), lw=1, label=label)
        ax.set_title(parent or "model", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    for ax in list(axes.flat)[len(blocks) :]:
        ax.axis("off")
    fig.suptitle(
        f"learned rational functions on [{X_RANGE[0]:g}, {X_RANGE[1]:g}], one curve per group {title}"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
