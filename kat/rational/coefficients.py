"""Initial coefficients of the group-rational activation and the variance-preserving gain.

F(x) = P(x) / Q(x), P(x) = sum_i a_i x^i (i = 0..5), Q(x) = 1 + sum_j |b_j| |x|^j (j = 1..4): the form the
kernels evaluate (docs/MODELS.md, GR-KAN function). Each init is P/Q fitted to a target activation on [-3, 3] *under this
Q form* by `fit_rational`; the constants below are its output (re-run `python -m kat.rational.coefficients`
to reproduce them), and tests/test_rational_coefficients.py re-checks every fit.
"""

import math

import numpy as np
import torch

# name -> (numerator a_0..a_5, denominator b_1..b_4), fitted by `fit_rational` (see `_FIT_SETTINGS`).
FITTED: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "identity": ((0.0, 1.0, 0.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 0.0)),
    # max |F - silu| on [-3, 3]: 1.2e-6
    "swish": (
        (
            3.0631537320557617e-07,
            0.5000007764283044,
            0.24999782499709225,
            0.05326613770469818,
            0.00580296683359898,
            0.0002751869369528942,
        ),
        (4.054009210453284e-06, 0.10652876245001723, 1.244816244685124e-06, 0.0005502182122410256),
    ),
    # max |F - gelu| on [-3, 3]: 3.1e-3 (erf-based GELU)
    "gelu": (
        (
            -0.0009606936958469188,
            0.49947217169390473,
            0.40669496171925185,
            0.10978399307827391,
            0.011538447329031289,
            0.000630645183734944,
        ),
        (-0.005294511730545007, 0.2073544962527083, -0.007168158313039943, 4.201220638911542e-18),
    ),
    # max |F - relu| on [-3, 3]: 1.34e-2 (near-minimax; the kink at 0 limits this form, least squares gives 3e-2)
    "relu": (
        (
            0.013391878054985715,
            0.5044725162337739,
            2.7654806262509815,
            4.452422270346518,
            2.522263321693346,
            0.45046637394878963,
        ),
        (-0.07472954870514066, 8.76242478443358, -0.08822419135035922, 0.8843282516089807),
    ),
}
ALIASES = {"silu": "swish"}

# Least squares (p=2) where the form fits the target closely; ReLU's kink at 0 is fitted in the L^p norm with a
# large p (close to minimax): least squares leaves a 0.03 error at the kink, the L^64 fit 0.013.
_FIT_SETTINGS = {
    "swish": {"target": lambda x: x * torch.sigmoid(x), "p": 2},
    "gelu": {"target": lambda x: torch.nn.functional.gelu(x), "p": 2},
    "relu": {"target": lambda x: x.clamp_min(0), "p": 64},
}


def init_names() -> list[str]:
    return sorted([*FITTED, *ALIASES])


def init_coefficients(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(numerator (6,), denominator (4,)) of the fitted init `name` (case-insensitive; 'silu' = 'swish')."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in FITTED:
        raise ValueError(f"unknown rational init {name!r}; choose one of {init_names()}")
    return FITTED[key]


def rational_numpy(x: np.ndarray, numerator, denominator) -> np.ndarray:
    """F(x) in float64 numpy (for fitting checks and the gain integral)."""
    x = np.asarray(x, dtype=np.float64)
    a = np.asarray(numerator, dtype=np.float64)
    b = np.abs(np.asarray(denominator, dtype=np.float64))
    p = np.polynomial.polynomial.polyval(x, a)
    q = 1.0 + np.polynomial.polynomial.polyval(np.abs(x), np.concatenate([[0.0], b]))
    return p / q


def vp_gain(name: str, num_points: int = 100) -> float:
    """alpha = Var[x] / E[F(x)^2] for x ~ N(0, 1) and the fitted init `name` (paper section 4.4).

    F is smooth on each half-line (Q has a kink at 0), so E[F^2] = int_0^inf (F(x)^2 + F(-x)^2) phi(x) dx is
    integrated by Gauss-Legendre on [0, 12] (phi(12) ~ 1e-32): exact to ~1e-14, no Monte-Carlo noise.
    """
    numerator, denominator = init_coefficients(name)
    nodes, weights = np.polynomial.legendre.leggauss(num_points)
    x = 6.0 * (nodes + 1.0)  # [-1, 1] -> [0, 12]
    phi = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    f2 = rational_numpy(x, numerator, denominator) ** 2 + rational_numpy(-x, numerator, denominator) ** 2
    second_moment = 6.0 * float(np.sum(weights * f2 * phi))
    return 1.0 / second_moment


def fit_rational(target, p: int = 2, interval=(-3.0, 3.0), num_points: int = 6001):
    """Fit P/Q (our Q form) to `target` (a torch function) on `interval`, minimising the L^p error.

    Deterministic: starts from the linearised least-squares solution (P - target*Q is linear in a and |b|),
    refines it by float64 Levenberg-Marquardt (least squares), then for p > 2 by L-BFGS on the L^p error with
    p raised in powers of two (continuation: each fit starts the next).
    Returns (numerator, denominator, max_abs_error) as python floats.
    """
    x = torch.linspace(*interval, num_points, dtype=torch.float64)
    y = target(x)
    ax = x.abs()
    powers = torch.stack([x**i for i in range(6)], dim=1)  # [M, 6]
    abs_powers = torch.stack([ax**j for j in range(1, 5)], dim=1)  # [M, 4]
    # P(x) - y * (Q(x) - 1) = y is linear in (a, |b|).
    linear = torch.cat([powers, -y[:, None] * abs_powers], dim=1)
    start = torch.linalg.lstsq(linear, y[:, None]).solution[:, 0]

    def rational(theta):
        return (powers @ theta[:6]) / (1.0 + abs_powers @ theta[6:].abs())

    def jacobian(theta):  # [M, 10]: dF/da_i = x^i / Q, dF/db_j = -sign(b_j) |x|^j P / Q^2
        q = 1.0 + abs_powers @ theta[6:].abs()
        f = (powers @ theta[:6]) / q
        d_den = -(f / q)[:, None] * abs_powers * torch.where(theta[6:] >= 0, 1.0, -1.0)
        return torch.cat([powers / q[:, None], d_den], dim=1)

    # Least squares by Levenberg-Marquardt (L-BFGS stalls where some |b_j| reaches the kink at 0).
    theta = start
    residual = rational(theta) - y
    cost, damping = residual.square().sum().item(), 1e-3
    for _ in range(300):
        jac = jacobian(theta)
        hess, grad = jac.T @ jac, jac.T @ residual
        step = torch.linalg.solve(hess + damping * torch.diag(hess.diagonal() + 1e-30), -grad)
        new_residual = rational(theta + step) - y
        new_cost = new_residual.square().sum().item()
        if new_cost < cost:
            converged = new_cost > cost * (1 - 1e-10)
            theta, residual, cost, damping = theta + step, new_residual, new_cost, max(damping / 3, 1e-12)
            if converged:
                break
        else:
            damping *= 4
    # Towards minimax: L-BFGS on the L^power error, power = 4, 8, ... up to p, each fit starting the next.
    params = theta.clone().requires_grad_(True)
    power = 2
    while power < p:
        power *= 2
        opt = torch.optim.LBFGS(
            [params],
            max_iter=2000,
            tolerance_grad=1e-15,
            tolerance_change=1e-18,
            history_size=50,
            line_search_fn="strong_wolfe",
        )

        def closure(opt=opt, power=power):
            opt.zero_grad()
            err = rational(params) - y
            scale = err.abs().max().detach()  # keeps |err/scale|^power in range
            loss = scale * ((err / scale).abs() ** power).mean() ** (1.0 / power)
            loss.backward()
            return loss

        opt.step(closure)
    theta = params.detach()
    max_error = (rational(theta) - y).abs().max().item()
    return theta[:6].tolist(), theta[6:].tolist(), max_error


if __name__ == "__main__":
    for init_name, settings in _FIT_SETTINGS.items():
        num, den, err = fit_rational(settings["target"], p=settings["p"])
        print(f"{init_name!r}: ({tuple(num)!r}, {tuple(den)!r}),  # max |F - target| on [-3, 3]: {err:.3g}")
