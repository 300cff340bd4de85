"""Triton kernels of the fused LayerNorm -> group-rational op (kat.rational.norm_rational).

x is viewed as a row-major [N, C] matrix. A program holds BLOCK_N whole rows as a [BLOCK_N, GP, GSP] tile: the
C = G * GS channels are G groups of GS contiguous channels, each axis padded to a power of two (GP >= G,
GSP >= GS) and masked. Row statistics are then sums over the last two axes, and the per-group sums of the
coefficient-gradient terms are sums over the last axis (no per-group loops).
  forward:  one row tile per program: mean and rstd of each row (two passes over the tile in registers),
            h = xhat * gamma + beta, y = P(h)/Q(h) stored in the output dtype; mean and rstd stored in fp32.
  backward: a fixed grid of a few programs per SM, each walking a strided set of row tiles. Per tile it
            recomputes h, dh = dy F'(h), dx = rstd (g - mean(g) - xhat mean(g xhat)) with g = dh gamma, and
            adds the tile's column sums of the 12 parameter-gradient terms (dh xhat, dh, dy h^i / Q,
            dy F |h|^j / Q) to per-channel fp32 accumulators. At the end it writes per-channel d_gamma /
            d_beta partials and per-group sums of the 10 rational terms to row `program` of a
            [programs, 2C + 10G] buffer.
  reduce:   one small kernel sums that buffer over programs in a fixed order in float64 (channel blocks of
            d_gamma and d_beta, one program per rational term) and applies dF/db = -sign(b)(...). No atomics:
            parameter gradients are bitwise identical run to run.
All math is fp32; x, dy and the parameters are loaded in their own dtypes, y and dx stored in theirs.

Tile sizes come from a fixed heuristic of the padded channel count, not triton.autotune: autotuning may pick
different configs in different processes, which would change the reduction order (and the bits).
"""

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from kat.rational.kernels import (
    accumulate_coefficient_terms,
    coefficient_groups,
    rational_backward_terms,
    rational_value,
)
from kat.triton_utils import cdiv, check_device, device_guard, direct, num_sms

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_CHANNELS = 8192  # beyond this a row no longer fits a program's registers (accumulators spill badly)


@triton.jit
def _channels(G: tl.constexpr, GS: tl.constexpr, GP: tl.constexpr, GSP: tl.constexpr):
    """Channel index [GP, GSP] of (group, position in group) and its mask."""
    group = tl.arange(0, GP)[:, None]
    position = tl.arange(0, GSP)[None, :]
    return group * GS + position, (group < G) & (position < GS)


@triton.jit
def _row_tile(tile, n_rows, cols, col_mask, C: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows [BLOCK_N] of row tile `tile`, element offsets and mask [BLOCK_N, GP, GSP]."""
    rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offsets = rows.to(tl.int64)[:, None, None] * C + cols[None, :, :]
    mask = (rows < n_rows)[:, None, None] & col_mask[None, :, :]
    return rows, offsets, mask


@triton.jit
def _coefficient(ptr, k, row_stride, G: tl.constexpr, GP: tl.constexpr):
    """Coefficient k of every group as fp32 [1, GP, 1] (row_stride 0: one row shared by all groups)."""
    group = tl.arange(0, GP)
    return tl.load(ptr + group * row_stride + k, mask=group < G, other=0.0).to(tl.float32)[None, :, None]


@triton.jit
def _coefficients(num_ptr, den_ptr, NUM_ROW_STRIDE, DEN_ROW_STRIDE, G: tl.constexpr, GP: tl.constexpr):
    """a_0..a_5 and c_j = |b_j| of every group, each [1, GP, 1] (fp32)."""
    a0 = _coefficient(num_ptr, 0, NUM_ROW_STRIDE, G, GP)
    a1 = _coefficient(num_ptr, 1, NUM_ROW_STRIDE, G, GP)
    a2 = _coefficient(num_ptr, 2, NUM_ROW_STRIDE, G, GP)
    a3 = _coefficient(num_ptr, 3, NUM_ROW_STRIDE, G, GP)
    a4 = _coefficient(num_ptr, 4, NUM_ROW_STRIDE, G, GP)
    a5 = _coefficient(num_ptr, 5, NUM_ROW_STRIDE, G, GP)
    c1 = tl.abs(_coefficient(den_ptr, 0, DEN_ROW_STRIDE, G, GP))
    c2 = tl.abs(_coefficient(den_ptr, 1, DEN_ROW_STRIDE, G, GP))
    c3 = tl.abs(_coefficient(den_ptr, 2, DEN_ROW_STRIDE, G, GP))
    c4 = tl.abs(_coefficient(den_ptr, 3, DEN_ROW_STRIDE, G, GP))
    return a0, a1, a2, a3, a4, a5, c1, c2, c3, c4


@triton.jit
def _channel_vector(ptr, cols, col_mask):
    """A per-channel parameter (gamma or beta) as fp32 [1, GP, GSP]; 0 in padded lanes."""
    return tl.load(ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :, :]


@triton.jit
def _affine(xhat, w_ptr, b_ptr, cols, col_mask, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    h = xhat
    if HAS_WEIGHT:
        h = h * _channel_vector(w_ptr, cols, col_mask)
    if HAS_BIAS:
        h = h + _channel_vector(b_ptr, cols, col_mask)
    return h


@triton.jit
def _forward_kernel(
    x_ptr, w_ptr, b_ptr, num_ptr, den_ptr, y_ptr, mean_ptr, rstd_ptr, n_rows, eps,
    G: tl.constexpr, GS: tl.constexpr, GP: tl.constexpr, GSP: tl.constexpr,
    NUM_ROW_STRIDE: tl.constexpr, DEN_ROW_STRIDE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    C = G * GS
    cols, col_mask = _channels(G, GS, GP, GSP)
    rows, offsets, mask = _row_tile(tl.program_id(0), n_rows, cols, col_mask, C, BLOCK_N)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(tl.sum(x, axis=2), axis=1) / C  # [BLOCK_N]
    centered = tl.where(mask, x - mean[:, None, None], 0.0)
    var = tl.sum(tl.sum(centered * centered, axis=2), axis=1) / C
    rstd = 1.0 / tl.sqrt_rn((var + eps).to(tl.float32))  # torch.compile passes the float eps as fp64
    h = _affine(centered * rstd[:, None, None], w_ptr, b_ptr, cols, col_mask, HAS_WEIGHT, HAS_BIAS)

    a0, a1, a2, a3, a4, a5, c1, c2, c3, c4 = _coefficients(num_ptr, den_ptr, NUM_ROW_STRIDE, DEN_ROW_STRIDE, G, GP)
    y = rational_value(h, a0, a1, a2, a3, a4, a5, c1, c2, c3, c4)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)
    row_mask = rows < n_rows
    tl.store(mean_ptr + rows, mean, mask=row_mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _backward_kernel(
    x_ptr, dy_ptr, w_ptr, b_ptr, num_ptr, den_ptr, mean_ptr, rstd_ptr, dx_ptr, partial_ptr, n_rows, n_tiles,
    G: tl.constexpr, GS: tl.constexpr, GP: tl.constexpr, GSP: tl.constexpr,
    NUM_ROW_STRIDE: tl.constexpr, DEN_ROW_STRIDE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
):  # fmt: skip
    C = G * GS
    cols, col_mask = _channels(G, GS, GP, GSP)
    a0, a1, a2, a3, a4, a5, c1, c2, c3, c4 = _coefficients(num_ptr, den_ptr, NUM_ROW_STRIDE, DEN_ROW_STRIDE, G, GP)
    # Elementwise running sums over this program's row tiles (reduced over rows once, after the loop): d_gamma, d_beta terms, then dy h^i / Q (i = 0..5)
    # and dy F |h|^j / Q (j = 1..4).
    acc_gamma = tl.zeros((BLOCK_N, GP, GSP), tl.float32)
    acc_beta = tl.zeros((BLOCK_N, GP, GSP), tl.float32)
    acc_a0 = tl.zeros((BLOCK_N, GP, GSP), tl.float32)
    acc_a1 = tl.zeros((BLOCK_N, GP, GSP), tl.float32)
    acc_a2 = tl.zeros((BLOCK_N, GP, GSP), tl.float32)
    acc_a3 = tl.zeros((BLOCK_N, GP, GSP), tl.float32)
    acc_a4 = tl.zeros((BLOCK_N, GP, GSP), tl.float32)
    acc_a5 = tl.zeros((BLOCK_N, GP, GSP), tl.float32)
    acc_b1 = tl.zeros((BLOCK_N, GP, GSP), tl.float32)
    acc_b2 = tl.zeros((BLOCK_N, GP, GSP), tl.float32)
    acc_b3 = tl.zeros((BLOCK_N, GP, GSP), tl.float32)
    acc_b4 = tl.zeros((BLOCK_N, GP, GSP), tl.float32)
    # Pipelined loop (NUM_STAGES row tiles of x and dy in flight): the loads, not the math, bound this kernel.
    for tile in tl.range(tl.program_id(0), n_tiles, tl.num_programs(0), num_stages=NUM_STAGES):
        rows, offsets, mask = _row_tile(tile, n_rows, cols, col_mask, C, BLOCK_N)
        row_mask = rows < n_rows
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)  # 0 where masked: adds nothing
        mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)[:, None, None]
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)[:, None, None]
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        h = _affine(xhat, w_ptr, b_ptr, cols, col_mask, HAS_WEIGHT, HAS_BIAS)
        f, inv_q, q_df, ah = rational_backward_terms(h, a0, a1, a2, a3, a4, a5, c1, c2, c3, c4)
        dy_over_q = dy * inv_q
        dh = dy_over_q * q_df

        # LayerNorm backward of row r: dx = rstd (g - mean_c(g) - xhat mean_c(g xhat)), g = dh gamma.
        acc_gamma += dh * xhat
        acc_beta += dh
        g = dh
        if HAS_WEIGHT:
            g = g * _channel_vector(w_ptr, cols, col_mask)
        mean_g = tl.sum(tl.sum(g, axis=2), axis=1) / C
        mean_gx = tl.sum(tl.sum(g * xhat, axis=2), axis=1) / C
        dx = rstd * (g - mean_g[:, None, None] - xhat * mean_gx[:, None, None])
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)

        acc_a0, acc_a1, acc_a2, acc_a3, acc_a4, acc_a5, acc_b1, acc_b2, acc_b3, acc_b4 = accumulate_coefficient_terms(
            dy_over_q, f, h, ah, acc_a0, acc_a1, acc_a2, acc_a3, acc_a4, acc_a5, acc_b1, acc_b2, acc_b3, acc_b4
        )  # fmt: skip

    # Row `program` of the partials: [d_gamma (C) | d_beta (C) | term k of group g at 2C + k G + g].
    out = partial_ptr + tl.program_id(0) * (2 * C + 10 * G)
    acc_gamma, acc_beta = tl.sum(acc_gamma, axis=0), tl.sum(acc_beta, axis=0)  # [GP, GSP]
    acc_a0, acc_a1, acc_a2 = tl.sum(acc_a0, axis=0), tl.sum(acc_a1, axis=0), tl.sum(acc_a2, axis=0)
    acc_a3, acc_a4, acc_a5 = tl.sum(acc_a3, axis=0), tl.sum(acc_a4, axis=0), tl.sum(acc_a5, axis=0)
    acc_b1, acc_b2 = tl.sum(acc_b1, axis=0), tl.sum(acc_b2, axis=0)
    acc_b3, acc_b4 = tl.sum(acc_b3, axis=0), tl.sum(acc_b4, axis=0)
    tl.store(out + cols, acc_gamma, mask=col_mask)
    tl.store(out + C + cols, acc_beta, mask=col_mask)
    group = tl.arange(0, GP)
    terms = out + 2 * C + group
    group_mask = group < G
    tl.store(terms + 0 * G, tl.sum(acc_a0, axis=1), mask=group_mask)
    tl.store(terms + 1 * G, tl.sum(acc_a1, axis=1), mask=group_mask)
    tl.store(terms + 2 * G, tl.sum(acc_a2, axis=1), mask=group_mask)
    tl.store(terms + 3 * G, tl.sum(acc_a3, axis=1), mask=group_mask)
    tl.store(terms + 4 * G, tl.sum(acc_a4, axis=1), mask=group_mask)
    tl.store(terms + 5 * G, tl.sum(acc_a5, axis=1), mask=group_mask)
    tl.store(terms + 6 * G, tl.sum(acc_b1, axis=1), mask=group_mask)
    tl.store(terms + 7 * G, tl.sum(acc_b2, axis=1), mask=group_mask)
    tl.store(terms + 8 * G, tl.sum(acc_b3, axis=1), mask=group_mask)
    tl.store(terms + 9 * G, tl.sum(acc_b4, axis=1), mask=group_mask)


@triton.jit
def _sum_over_programs(ptr, n_programs, row_stride, index, index_mask, BLOCK_P: tl.constexpr):
    """sum_p ptr[p * row_stride + index] in float64, blocks of BLOCK_P programs in a fixed order."""
    acc = tl.zeros((BLOCK_P, index.shape[0]), tl.float64)
    for start in range(0, n_programs, BLOCK_P):
        programs = start + tl.arange(0, BLOCK_P)
        mask = (programs < n_programs)[:, None] & index_mask[None, :]
        values = tl.load(ptr + programs[:, None] * row_stride + index[None, :], mask=mask, other=0.0)
        acc += values.to(tl.float64)
    return tl.sum(acc, axis=0)


@triton.jit
def _reduce_channels(
    partial_ptr, d_weight_ptr, d_bias_ptr, pid, n_programs,
    C: tl.constexpr, G: tl.constexpr, CHANNEL_BLOCKS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    which = pid // CHANNEL_BLOCKS  # 0: d_gamma, 1: d_beta
    cols = (pid % CHANNEL_BLOCKS) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    total = _sum_over_programs(partial_ptr + which * C, n_programs, 2 * C + 10 * G, cols, col_mask, BLOCK_P)
    tl.store(d_weight_ptr + cols, total.to(tl.float32), mask=col_mask & (which == 0))
    tl.store(d_bias_ptr + cols, total.to(tl.float32), mask=col_mask & (which == 1))


@triton.jit
def _reduce_term(
    partial_ptr, den_ptr, d_num_ptr, d_den_ptr, k, n_programs,
    C: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, DEN_ROW_STRIDE: tl.constexpr,
    NUM_SHARED: tl.constexpr, DEN_SHARED: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """d_num / d_den entry k (0..5: a_k, 6..9: b_(k-5)) of every group, or their sum for a shared row."""
    group = tl.arange(0, GP)
    group_mask = group < G
    terms = partial_ptr + 2 * C + k * G
    per_group = _sum_over_programs(terms, n_programs, 2 * C + 10 * G, group, group_mask, BLOCK_P)  # [GP]
    if k < 6:
        if NUM_SHARED:
            tl.store(d_num_ptr + k, tl.sum(per_group, axis=0).to(tl.float32))
        else:
            tl.store(d_num_ptr + group * 6 + k, per_group.to(tl.float32), mask=group_mask)
    else:
        b = tl.load(den_ptr + group * DEN_ROW_STRIDE + (k - 6), mask=group_mask, other=0.0)
        signed = tl.where(b >= 0, -per_group, per_group)  # dF/db = -sign(b) (...), sign(0) = +1
        if DEN_SHARED:
            tl.store(d_den_ptr + (k - 6), tl.sum(signed, axis=0).to(tl.float32))
        else:
            tl.store(d_den_ptr + group * 4 + (k - 6), signed.to(tl.float32), mask=group_mask)


@triton.jit
def _reduce_kernel(
    partial_ptr, den_ptr, d_weight_ptr, d_bias_ptr, d_num_ptr, d_den_ptr, n_programs,
    C: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, DEN_ROW_STRIDE: tl.constexpr,
    NUM_SHARED: tl.constexpr, DEN_SHARED: tl.constexpr, CHANNEL_BLOCKS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Programs [0, CHANNEL_BLOCKS): d_gamma of a channel block; [CHANNEL_BLOCKS, 2 CHANNEL_BLOCKS): d_beta;
    the last 10: rational term k (a_0..a_5, b_1..b_4). Each sums the partials over programs in float64, in a
    fixed order; a shared (1, k) coefficient row gets the sum over groups."""
    pid = tl.program_id(0)
    if pid < 2 * CHANNEL_BLOCKS:
        _reduce_channels(
            partial_ptr, d_weight_ptr, d_bias_ptr, pid, n_programs, C, G, CHANNEL_BLOCKS, BLOCK_P, BLOCK_C
        )
    else:
        k = pid - 2 * CHANNEL_BLOCKS
        _reduce_term(
            partial_ptr, den_ptr, d_num_ptr, d_den_ptr, k, n_programs,
            C, G, GP, DEN_ROW_STRIDE, NUM_SHARED, DEN_SHARED, BLOCK_P,
        )  # fmt: skip


@functools.cache
def layout(channels: int, groups: int) -> dict:
    """Compile-time tile layout of C = groups x group size channels (see the module docstring)."""
    group_size = channels // groups
    return {
        "G": groups,
        "GS": group_size,
        "GP": triton.next_power_of_2(groups),
        "GSP": triton.next_power_of_2(group_size),
    }


@functools.cache
def forward_config(channels: int, groups: int) -> dict:
    """Row tiles of ~16 padded elements per thread at 4 warps (best in bench_norm_rational.py --sweep on an
    H200 at C = 192, 384, 768), more warps for wider rows."""
    lay = layout(channels, groups)
    padded = lay["GP"] * lay["GSP"]
    num_warps = 4 if padded <= 1024 else (8 if padded <= 4096 else 16)
    return {"BLOCK_N": max(1, 512 * num_warps // padded), "num_warps": num_warps}


# (BLOCK_N, num_warps, programs_per_sm, num_stages) by padded row width: the fastest of bench_norm_rational.py
# --sweep on an H200 (Triton 3.6); 256 and 512 (C = 192, 384) re-swept with pipelining (3 stages: 17-19% faster
# than the best unpipelined configs), 1024 (C = 768) not yet. Other widths: one row per tile, ~4 padded
# elements per thread.
_BACKWARD_MEASURED = {256: (4, 4, 2, 3), 512: (2, 4, 2, 3), 1024: (1, 8, 2, 1)}


@functools.cache
def backward_config(channels: int, groups: int) -> dict:
    """Each thread holds BLOCK_N * padded / (32 num_warps) tile elements and as many elements of each of the 12
    accumulators; 2-8 keeps a program's registers without spills (ptxas, sm_90)."""
    lay = layout(channels, groups)
    padded = lay["GP"] * lay["GSP"]
    num_warps = max(4, min(16, padded // 128))
    default = (1, num_warps, max(1, 16 // num_warps), 1)
    block_n, num_warps, per_sm, stages = _BACKWARD_MEASURED.get(padded, default)
    return {"BLOCK_N": block_n, "num_warps": num_warps, "programs_per_sm": per_sm, "num_stages": stages}


_REDUCE = {"BLOCK_P": 64, "BLOCK_C": 64, "num_warps": 4}


def check_runnable(x: Tensor, out_dtype: torch.dtype) -> None:
    """Errors for inputs the kernels cannot run (the caller has checked shapes and devices)."""
    for name, dtype in (("x", x.dtype), ("out_dtype", out_dtype)):
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"layer_norm_rational backend='triton' supports float32, bfloat16 and float16 {name}, got "
                f"{dtype}; use backend='torch' for float64"
            )
    if x.shape[-1] > MAX_CHANNELS:
        raise ValueError(
            f"layer_norm_rational backend='triton' supports up to {MAX_CHANNELS} channels, got "
            f"{x.shape[-1]}; use backend='torch' (or the unfused LayerNorm + group_rational)"
        )
    check_device(x, "layer_norm_rational")


def _contiguous(t: Tensor | None) -> Tensor | None:
    return t if t is None or t.is_contiguous() else t.contiguous()


def _parameter_args(x: Tensor, weight, bias, numerator: Tensor, denominator: Tensor) -> tuple[tuple, dict]:
    """(pointer arguments w, b, num, den; constexpr arguments). A missing weight/bias passes x as a
    placeholder pointer that the kernel never reads (HAS_WEIGHT / HAS_BIAS = False)."""
    constants = {
        **layout(int(x.shape[-1]), coefficient_groups(numerator, denominator)),
        "NUM_ROW_STRIDE": 0 if numerator.shape[0] == 1 else 6,
        "DEN_ROW_STRIDE": 0 if denominator.shape[0] == 1 else 4,
        "HAS_WEIGHT": weight is not None,
        "HAS_BIAS": bias is not None,
    }
    weight, bias = _contiguous(weight), _contiguous(bias)
    pointers = (
        x if weight is None else weight,
        x if bias is None else bias,
        _contiguous(numerator),
        _contiguous(denominator),
    )
    return pointers, constants


def forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    numerator: Tensor,
    denominator: Tensor,
    out_dtype: torch.dtype,
    config: dict | None = None,
    wrap=direct,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y [x.shape] in out_dtype, mean and rstd [x.shape[:-1]] fp32). `config` overrides `forward_config`;
    `wrap` is torch.library.wrap_triton inside the triton_op (see kat.triton_utils.direct)."""
    check_runnable(x, out_dtype)
    x = _contiguous(x)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    mean = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    n_rows = mean.numel()
    if n_rows > 0:
        cfg = config or forward_config(int(x.shape[-1]), coefficient_groups(numerator, denominator))
        pointers, constants = _parameter_args(x, weight, bias, numerator, denominator)
        with device_guard(x.device):
            wrap(_forward_kernel)[(cdiv(n_rows, cfg["BLOCK_N"]),)](
                x, *pointers, y, mean, rstd, n_rows, eps,
                **constants, BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
            )  # fmt: skip
    return y, mean, rstd


def backward(
    grad_output: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    numerator: Tensor,
    denominator: Tensor,
    config: dict | None = None,
    wrap=direct,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx in x's dtype, d_weight, d_bias (C,), d_numerator, d_denominator); deterministic.

    d_weight / d_bias are the gradients of gamma and beta (weight/bias dtype; fp32 for an absent one, as the
    gradient of gamma = 1 / beta = 0). `config` overrides `backward_config` (benchmarks only)."""
    check_runnable(x, x.dtype)
    x, grad_output = _contiguous(x), _contiguous(grad_output)
    channels = int(x.shape[-1])
    groups = coefficient_groups(numerator, denominator)
    n_rows = mean.numel()
    cfg = config or backward_config(channels, groups)
    n_tiles = cdiv(n_rows, cfg["BLOCK_N"])
    n_programs = min(n_tiles, num_sms(x.device) * cfg["programs_per_sm"])
    device = x.device
    dx = torch.empty(x.shape, dtype=x.dtype, device=device)
    partials = torch.empty(n_programs, 2 * channels + 10 * groups, dtype=torch.float32, device=device)
    d_weight = torch.empty(channels, dtype=torch.float32, device=device)
    d_bias = torch.empty(channels, dtype=torch.float32, device=device)
    d_num = torch.empty(numerator.shape, dtype=torch.float32, device=device)
    d_den = torch.empty(denominator.shape, dtype=torch.float32, device=device)
    pointers, constants = _parameter_args(x, weight, bias, numerator, denominator)
    channel_blocks = cdiv(channels, _REDUCE["BLOCK_C"])
    with device_guard(device):
        if n_programs > 0:
            wrap(_backward_kernel)[(n_programs,)](
                x, grad_output, *pointers, mean, rstd, dx, partials, n_rows, n_tiles, **constants,
                BLOCK_N=cfg["BLOCK_N"], NUM_STAGES=cfg.get("num_stages", 1), num_warps=cfg["num_warps"],
            )  # fmt: skip
        wrap(_reduce_kernel)[(2 * channel_blocks + 10,)](
            partials, pointers[3], d_weight, d_bias, d_num, d_den, n_programs,
            C=channels, G=groups, GP=constants["GP"], DEN_ROW_STRIDE=constants["DEN_ROW_STRIDE"],
            NUM_SHARED=constants["NUM_ROW_STRIDE"] == 0, DEN_SHARED=constants["DEN_ROW_STRIDE"] == 0,
            CHANNEL_BLOCKS=channel_blocks, **_REDUCE,
        )  # fmt: skip
    if weight is not None:
        d_weight = d_weight.to(weight.dtype)
    if bias is not None:
        d_bias = d_bias.to(bias.dtype)
    return dx, d_weight, d_bias, d_num.to(numerator.dtype), d_den.to(denominator.dtype)
