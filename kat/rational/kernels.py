"""Triton forward and backward kernels of the group-rational activation (FlashKAT-style, deterministic).

x is viewed as a row-major [N, C] matrix (channels last). A program owns a block of BLOCK_C channels inside one
group, so its 10 coefficients are scalars loaded once (no per-channel registers), and streams rows:
  forward:  a grid of (row tiles x channel blocks), one [BLOCK_N, BLOCK_C] tile per program; reads x, writes y.
  backward: a grid of (channel blocks x row programs); each row program walks a strided set of row tiles
            (software-pipelined loads), accumulating the 10 coefficient-gradient terms per element in fp32
            registers, and at the end writes their sums over its tiles to a [row programs, channel blocks, 10]
            buffer. No atomics: a second small kernel sums the partials in a fixed order in float64, so
            coefficient gradients are bitwise identical run to run (and accurate to ~1e-7).
An optional per-channel bias (the preceding linear layer's) is added to x on load: F(x + bias). Its gradient,
dx summed over rows, is an 11th accumulator with [row programs, C] partials, reduced the same way.
Loads are in the input dtype, all math is fp32 (Horner), y and dx are stored in the input dtype.

Tile sizes are chosen by a heuristic of the group size rather than by triton.autotune: autotuning may pick different
configs in different processes, which would change the reduction order and break run-to-run determinism.
"""

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from kat.triton_utils import cdiv, check_device, device_guard, direct, num_sms

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _group_columns(block, group_size: tl.constexpr, chunks_per_group: tl.constexpr, BLOCK_C: tl.constexpr):
    """Channel block `block` -> (group, its channel indices [BLOCK_C], mask): blocks never straddle groups."""
    group = block // chunks_per_group
    in_group = (block % chunks_per_group) * BLOCK_C + tl.arange(0, BLOCK_C)
    return group, group * group_size + in_group, in_group < group_size


@triton.jit
def _load_coefficients(num_ptr, den_ptr, group, num_row_stride, den_row_stride):
    """The group's coefficients as fp32 scalars (|b| for the denominator); row stride 0 = one shared row."""
    num = num_ptr + group * num_row_stride
    den = den_ptr + group * den_row_stride
    a0 = tl.load(num + 0).to(tl.float32)
    a1 = tl.load(num + 1).to(tl.float32)
    a2 = tl.load(num + 2).to(tl.float32)
    a3 = tl.load(num + 3).to(tl.float32)
    a4 = tl.load(num + 4).to(tl.float32)
    a5 = tl.load(num + 5).to(tl.float32)
    c1 = tl.abs(tl.load(den + 0).to(tl.float32))
    c2 = tl.abs(tl.load(den + 1).to(tl.float32))
    c3 = tl.abs(tl.load(den + 2).to(tl.float32))
    c4 = tl.abs(tl.load(den + 3).to(tl.float32))
    return a0, a1, a2, a3, a4, a5, c1, c2, c3, c4


@triton.jit
def rational_value(x, a0, a1, a2, a3, a4, a5, c1, c2, c3, c4):
    """F(x) = P(x) / Q(x) in fp32 (Horner); c_j = |b_j|. Shared with the fused LayerNorm kernels."""
    ax = tl.abs(x)
    p = (((((a5 * x + a4) * x + a3) * x + a2) * x + a1) * x) + a0
    q = 1.0 + ax * (c1 + ax * (c2 + ax * (c3 + ax * c4)))
    return p / q


@triton.jit
def rational_backward_terms(x, a0, a1, a2, a3, a4, a5, c1, c2, c3, c4):
    """(F(x), 1/Q(x), Q(x) F'(x) = P'(x) - sign(x) Q'(|x|) F(x), |x|) in fp32, with sign(0) = +1."""
    ax = tl.abs(x)
    p = (((((a5 * x + a4) * x + a3) * x + a2) * x + a1) * x) + a0
    dp = (((5.0 * a5 * x + 4.0 * a4) * x + 3.0 * a3) * x + 2.0 * a2) * x + a1  # P'(x)
    q = 1.0 + ax * (c1 + ax * (c2 + ax * (c3 + ax * c4)))
    dq = c1 + ax * (2.0 * c2 + ax * (3.0 * c3 + ax * (4.0 * c4)))  # dQ/d|x|
    dq = tl.where(x >= 0, dq, -dq)  # sign(0) = +1
    inv_q = 1.0 / q
    f = p * inv_q
    return f, inv_q, dp - dq * f, ax


@triton.jit
def accumulate_coefficient_terms(
    g_over_q, f, x, ax, acc_a0, acc_a1, acc_a2, acc_a3, acc_a4, acc_a5, acc_b1, acc_b2, acc_b3, acc_b4
):
    """Adds the per-element coefficient-gradient terms g x^i / Q (i = 0..5) and g F |x|^j / Q (j = 1..4)."""
    t = g_over_q
    acc_a0 += t
    t *= x
    acc_a1 += t
    t *= x
    acc_a2 += t
    t *= x
    acc_a3 += t
    t *= x
    acc_a4 += t
    t *= x
    acc_a5 += t
    u = g_over_q * f * ax
    acc_b1 += u
    u *= ax
    acc_b2 += u
    u *= ax
    acc_b3 += u
    u *= ax
    acc_b4 += u
    return acc_a0, acc_a1, acc_a2, acc_a3, acc_a4, acc_a5, acc_b1, acc_b2, acc_b3, acc_b4


@triton.jit
def _rational_forward_kernel(
    x_ptr, y_ptr, num_ptr, den_ptr, bias_ptr, num_row_stride, den_row_stride,
    n_rows, n_cols,
    group_size: tl.constexpr, chunks_per_group: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    group, cols, col_mask = _group_columns(tl.program_id(1), group_size, chunks_per_group, BLOCK_C)
    a0, a1, a2, a3, a4, a5, c1, c2, c3, c4 = _load_coefficients(
        num_ptr, den_ptr, group, num_row_stride, den_row_stride
    )
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    mask = (rows < n_rows)[:, None] & col_mask[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    y = rational_value(x, a0, a1, a2, a3, a4, a5, c1, c2, c3, c4)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rational_backward_kernel(
    grad_ptr, x_ptr, dx_ptr, partial_ptr, bias_partial_ptr, num_ptr, den_ptr, bias_ptr, num_row_stride,
    den_row_stride, n_rows, n_cols, n_row_tiles,
    group_size: tl.constexpr, chunks_per_group: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, NUM_STAGES: tl.constexpr,
):  # fmt: skip
    block = tl.program_id(0)
    pid_n = tl.program_id(1)
    n_row_programs = tl.num_programs(1)
    group, cols, col_mask = _group_columns(block, group_size, chunks_per_group, BLOCK_C)
    a0, a1, a2, a3, a4, a5, c1, c2, c3, c4 = _load_coefficients(
        num_ptr, den_ptr, group, num_row_stride, den_row_stride
    )
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    # Element-wise running sums of g x^i / Q (i = 0..5), g |x|^j P / Q^2 (j = 1..4) and dx (for d bias).
    acc_a0 = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
    acc_a1 = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
    acc_a2 = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
    acc_a3 = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
    acc_a4 = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
    acc_a5 = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
    acc_b1 = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
    acc_b2 = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
    acc_b3 = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
    acc_b4 = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
    acc_bias = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
    # Pipelined loop (NUM_STAGES tiles of x and g in flight): the loads, not the math, bound this kernel.
    for tile in tl.range(pid_n, n_row_tiles, n_row_programs, num_stages=NUM_STAGES):
        rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
        mask = (rows < n_rows)[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)  # 0 where masked: adds nothing
        if HAS_BIAS:
            x += bias
        f, inv_q, q_df, ax = rational_backward_terms(x, a0, a1, a2, a3, a4, a5, c1, c2, c3, c4)
        g_over_q = g * inv_q
        dx = g_over_q * q_df
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            acc_bias += dx
        acc_a0, acc_a1, acc_a2, acc_a3, acc_a4, acc_a5, acc_b1, acc_b2, acc_b3, acc_b4 = accumulate_coefficient_terms(
            g_over_q, f, x, ax, acc_a0, acc_a1, acc_a2, acc_a3, acc_a4, acc_a5, acc_b1, acc_b2, acc_b3, acc_b4
        )  # fmt: skip
    # partial[pid_n, block, k]: this program's sum of term k over its tile (one group, no atomics).
    out = partial_ptr + (pid_n * tl.num_programs(0) + block) * 10
    tl.store(out + 0, tl.sum(tl.sum(acc_a0, axis=1), axis=0))
    tl.store(out + 1, tl.sum(tl.sum(acc_a1, axis=1), axis=0))
    tl.store(out + 2, tl.sum(tl.sum(acc_a2, axis=1), axis=0))
    tl.store(out + 3, tl.sum(tl.sum(acc_a3, axis=1), axis=0))
    tl.store(out + 4, tl.sum(tl.sum(acc_a4, axis=1), axis=0))
    tl.store(out + 5, tl.sum(tl.sum(acc_a5, axis=1), axis=0))
    tl.store(out + 6, tl.sum(tl.sum(acc_b1, axis=1), axis=0))
    tl.store(out + 7, tl.sum(tl.sum(acc_b2, axis=1), axis=0))
    tl.store(out + 8, tl.sum(tl.sum(acc_b3, axis=1), axis=0))
    tl.store(out + 9, tl.sum(tl.sum(acc_b4, axis=1), axis=0))
    if HAS_BIAS:  # bias_partial[pid_n, channel]: this program's column sums of dx
        tl.store(bias_partial_ptr + pid_n * n_cols + cols, tl.sum(acc_bias, axis=0), mask=col_mask)


@triton.jit
def _reduce_coefficient(
    partial_ptr, den_ptr, d_num_ptr, d_den_ptr, k, den_row_stride, n_row_programs,
    groups: tl.constexpr, chunks_per_group: tl.constexpr, NUM_SHARED: tl.constexpr, DEN_SHARED: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Sums partial[:, blocks of group g, k] in float64 in a fixed order, for each group; applies
    dF/db = -sign(b) (...) for the denominator; sums over groups for a shared coefficient row."""
    is_num = k < 6
    is_den = k >= 6
    n_items = n_row_programs * chunks_per_group
    b = tl.load(den_ptr + k - 6, mask=is_den, other=0.0)  # shared denominator row (if DEN_SHARED)
    total = tl.zeros((BLOCK,), tl.float64)
    for g in range(groups):
        acc = tl.zeros((BLOCK,), tl.float64)
        for start in range(0, n_items, BLOCK):
            i = start + tl.arange(0, BLOCK)
            block = g * chunks_per_group + i % chunks_per_group
            offsets = ((i // chunks_per_group) * (groups * chunks_per_group) + block) * 10 + k
            acc += tl.load(partial_ptr + offsets, mask=i < n_items, other=0.0).to(tl.float64)
        if not DEN_SHARED:
            b = tl.load(den_ptr + g * den_row_stride + k - 6, mask=is_den, other=0.0)
        factor = tl.where(is_num, 1.0, tl.where(b >= 0, -1.0, 1.0)).to(tl.float64)  # sign(0) = +1
        acc = acc * factor
        value = tl.sum(acc, axis=0).to(tl.float32)
        if not NUM_SHARED:
            tl.store(d_num_ptr + g * 6 + k, value, mask=is_num)
        if not DEN_SHARED:
            tl.store(d_den_ptr + g * 4 + k - 6, value, mask=is_den)
        total += acc
    value = tl.sum(total, axis=0).to(tl.float32)
    if NUM_SHARED:
        tl.store(d_num_ptr + k, value, mask=is_num)
    if DEN_SHARED:
        tl.store(d_den_ptr + k - 6, value, mask=is_den)


@triton.jit
def _rational_reduce_kernel(
    partial_ptr, bias_partial_ptr, den_ptr, d_num_ptr, d_den_ptr, d_bias_ptr, den_row_stride, n_row_programs,
    n_cols, groups: tl.constexpr, chunks_per_group: tl.constexpr, NUM_SHARED: tl.constexpr,
    DEN_SHARED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Programs 0..9: coefficient k (a_0..a_5, b_1..b_4); programs from 10 (with a bias): d bias of a block of
    BLOCK channels, the column sums of bias_partial [row programs, C] in float64 in a fixed order."""
    pid = tl.program_id(0)
    if pid < 10:
        _reduce_coefficient(
            partial_ptr, den_ptr, d_num_ptr, d_den_ptr, pid, den_row_stride, n_row_programs,
            groups, chunks_per_group, NUM_SHARED, DEN_SHARED, BLOCK,
        )  # fmt: skip
    else:
        cols = (pid - 10) * BLOCK + tl.arange(0, BLOCK)
        col_mask = cols < n_cols
        acc = tl.zeros((BLOCK,), tl.float64)
        for p in range(0, n_row_programs):
            acc += tl.load(bias_partial_ptr + p * n_cols + cols, mask=col_mask, other=0.0).to(tl.float64)
        tl.store(d_bias_ptr + cols, acc.to(tl.float32), mask=col_mask)


def block_channels(group_size: int) -> int:
    """Channels per program (blocks never straddle groups, so coefficients are per-program scalars): the
    largest power of two <= 256 dividing C/G if it is >= 32 (no masked lanes), else a masked power of two."""
    block = 256
    while block >= 32:
        if group_size % block == 0:
            return block
        block //= 2
    return min(256, triton.next_power_of_2(group_size))


@functools.cache
def forward_config(group_size: int) -> dict:
    """Tiles of 4K elements (16 KB fp32 / 8 KB bf16 per program), 4 warps: the fastest of
    bench_rational.py --sweep on an H200 (bf16, C = 768 and 1536; 8K-element tiles at 8 warps were 7-9% slower)."""
    block_c = block_channels(group_size)
    return {"BLOCK_N": 4096 // block_c, "BLOCK_C": block_c, "num_warps": 4}


@functools.cache
def backward_config(group_size: int) -> dict:
    """Row tiles of 2K elements (16 per thread at 4 warps, each with 11 fp32 accumulators), 2 programs per SM,
    3 pipeline stages: the fastest of bench_rational.py --sweep on an H200 (bf16, C = 768 and 1536, fc1's bias
    fused): 0.094 / 0.053 ms against 0.152 / 0.089 ms for the earlier 1K tiles, 8 per SM, no pipelining."""
    block_c = block_channels(group_size)
    return {
        "BLOCK_N": max(1, 2048 // block_c),
        "BLOCK_C": block_c,
        "num_warps": 4,
        "programs_per_sm": 2,
        "num_stages": 3,
    }


_REDUCE_BLOCK = 128  # partial sums per step of the reduce kernel (and channels per d bias program)


def _check_runnable(x: Tensor) -> None:
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(
            f"group_rational backend='triton' supports float32, bfloat16 and float16 x, got {x.dtype}; "
            "use backend='torch' for float64"
        )
    check_device(x, "group_rational")


@functools.cache
def _channel_layout(
    n_cols: int, groups: int, shared_num: bool, shared_den: bool, has_bias: bool, block_c: int
) -> tuple[dict, int, int, int]:
    """(constexpr arguments, number of channel blocks, numerator and denominator row strides).

    The group size is a compile-time constant: the compiler then knows each block's start alignment and
    vectorises the loads (a KAT model has only two or three distinct group sizes). A row stride of 0 means
    one coefficient row shared by all groups.
    """
    group_size = n_cols // groups
    chunks_per_group = cdiv(group_size, block_c)
    constants = {
        "group_size": group_size,
        "chunks_per_group": chunks_per_group,
        "HAS_BIAS": has_bias,
        "BLOCK_C": block_c,
    }
    return constants, groups * chunks_per_group, 0 if shared_num else 6, 0 if shared_den else 4


def coefficient_groups(numerator: Tensor, denominator: Tensor) -> int:
    # int(): under torch.compile with dynamic shapes a size is a SymInt; the kernels specialise on it anyway.
    return int(max(numerator.shape[0], denominator.shape[0]))


def _layout(x: Tensor, numerator: Tensor, denominator: Tensor, bias: Tensor | None, block_c: int):
    shared_num, shared_den = bool(numerator.shape[0] == 1), bool(denominator.shape[0] == 1)
    groups = coefficient_groups(numerator, denominator)
    return _channel_layout(int(x.shape[-1]), groups, shared_num, shared_den, bias is not None, block_c)


def rational_forward(
    x: Tensor,
    numerator: Tensor,
    denominator: Tensor,
    bias: Tensor | None = None,
    config: dict | None = None,
    wrap=direct,
) -> Tensor:
    """y = F(x + bias) (x's shape and dtype, contiguous). `config` overrides `forward_config` (benchmarks);
    `wrap`: see `direct`."""
    _check_runnable(x)
    x = x.contiguous()  # read as [N, C] row-major
    y = torch.empty_like(x)
    n_cols = int(x.shape[-1])
    n_rows = x.numel() // n_cols if n_cols else 0
    if n_rows > 0:
        cfg = config or forward_config(n_cols // coefficient_groups(numerator, denominator))
        constants, n_blocks, num_stride, den_stride = _layout(x, numerator, denominator, bias, cfg["BLOCK_C"])
        bias = x if bias is None else bias.contiguous()  # a placeholder pointer the kernel never reads
        grid = (cdiv(n_rows, cfg["BLOCK_N"]), n_blocks)  # rows on axis 0: no 65535 limit
        with device_guard(x.device):
            wrap(_rational_forward_kernel)[grid](
                x, y, numerator.contiguous(), denominator.contiguous(), bias, num_stride, den_stride, n_rows,
                n_cols, **constants, BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
            )  # fmt: skip
    return y


def rational_backward(
    grad_output: Tensor,
    x: Tensor,
    numerator: Tensor,
    denominator: Tensor,
    bias: Tensor | None = None,
    config: dict | None = None,
    wrap=direct,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(dx in x's dtype, d numerator, d denominator, d bias (None without a bias) in the parameters' dtypes);
    deterministic. x is the input before the bias is added; `wrap`: see `direct`."""
    _check_runnable(x)
    groups = coefficient_groups(numerator, denominator)
    channels = int(x.shape[-1])
    x = x.contiguous()  # [N, C] row-major, as grad_output and dx
    grad_output = grad_output.to(x.dtype).contiguous()
    n_rows = x.numel() // channels if channels else 0
    dx = torch.empty_like(x)
    cfg = config or backward_config(channels // groups)
    constants, n_blocks, num_stride, den_stride = _layout(x, numerator, denominator, bias, cfg["BLOCK_C"])
    n_row_tiles = cdiv(n_rows, cfg["BLOCK_N"])
    n_row_programs = max(1, min(n_row_tiles, num_sms(x.device) * cfg["programs_per_sm"] // n_blocks))
    device = x.device
    numerator, denominator = numerator.contiguous(), denominator.contiguous()
    partials = torch.empty(n_row_programs, n_blocks, 10, device=device, dtype=torch.float32)
    d_num = torch.empty(numerator.shape, device=device, dtype=torch.float32)
    d_den = torch.empty(denominator.shape, device=device, dtype=torch.float32)
    if bias is not None:
        bias_partials = torch.empty(n_row_programs, channels, device=device, dtype=torch.float32)
        d_bias = torch.empty(channels, device=device, dtype=torch.float32)
        bias = bias.contiguous()
    else:  # placeholders the kernels never touch (HAS_BIAS = False), not aliases of real outputs
        bias_partials = d_bias = torch.empty(1, device=device, dtype=torch.float32)
        bias = x
    if n_rows == 0:
        partials.zero_()
        bias_partials.zero_()
    reduce_programs = 10 + (cdiv(channels, _REDUCE_BLOCK) if constants["HAS_BIAS"] else 0)
    with device_guard(device):
        if n_rows > 0:
            wrap(_rational_backward_kernel)[(n_blocks, n_row_programs)](
                grad_output, x, dx, partials, bias_partials, numerator, denominator, bias, num_stride,
                den_stride, n_rows, channels, n_row_tiles, **constants, BLOCK_N=cfg["BLOCK_N"],
                NUM_STAGES=cfg.get("num_stages", 1), num_warps=cfg["num_warps"],
            )  # fmt: skip
        wrap(_rational_reduce_kernel)[(reduce_programs,)](
            partials, bias_partials, denominator, d_num, d_den, d_bias, den_stride, n_row_programs, channels,
            groups=groups, chunks_per_group=constants["chunks_per_group"],
            NUM_SHARED=num_stride == 0, DEN_SHARED=den_stride == 0, BLOCK=_REDUCE_BLOCK,
            num_warps=1,
        )  # fmt: skip
    d_bias = None if not constants["HAS_BIAS"] else d_bias.to(bias.dtype)
    return dx, d_num.to(numerator.dtype), d_den.to(denominator.dtype), d_bias
