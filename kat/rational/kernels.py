"""Triton forward and backward kernels of the group-rational activation (FlashKAT-style, deterministic).

x is viewed as a row-major [N, C] matrix (channels last). A program owns a block of BLOCK_C channels, so it
loads the coefficients of those channels once (a channel's group is c // (C/G)) and streams rows:
  forward:  one [BLOCK_N, BLOCK_C] tile per program; reads x, writes y.
  backward: a grid of (row programs x channel blocks); each row program walks a strided set of row tiles,
            accumulating the 10 coefficient-gradient terms per element in fp32 registers, and writes its
            per-channel partial sums to a [programs, 10, C] buffer. No atomics: the partials are then summed
            in a fixed order (over programs, then over the channels of each group) in float64 by torch, so
            coefficient gradients are bitwise identical run to run (and accurate to ~1e-7).
Loads are in the input dtype, all math is fp32 (Horner), y and dx are stored in the input dtype.

Tile sizes are chosen by a heuristic of C rather than by triton.autotune: autotuning may pick different
configs in different processes, which would change the reduction order and break run-to-run determinism.
"""

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

from kat.rational.reference import sign_plus

try:  # triton >= 3.0
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # pragma: no cover
    InterpretedFunction = ()

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INTERPRETER_PROGRAMS = 4  # stands in for the SM count under TRITON_INTERPRET=1 (exercises the tile loop)


@triton.jit
def _load_coefficients(num_ptr, den_ptr, cols, col_mask, group_size, num_row_stride, den_row_stride):
    """Per-channel coefficients [BLOCK_C] in fp32; a row stride of 0 means one row shared by all groups."""
    group = cols // group_size
    num = num_ptr + group * num_row_stride
    den = den_ptr + group * den_row_stride
    a0 = tl.load(num + 0, mask=col_mask, other=0.0).to(tl.float32)
    a1 = tl.load(num + 1, mask=col_mask, other=0.0).to(tl.float32)
    a2 = tl.load(num + 2, mask=col_mask, other=0.0).to(tl.float32)
    a3 = tl.load(num + 3, mask=col_mask, other=0.0).to(tl.float32)
    a4 = tl.load(num + 4, mask=col_mask, other=0.0).to(tl.float32)
    a5 = tl.load(num + 5, mask=col_mask, other=0.0).to(tl.float32)
    c1 = tl.abs(tl.load(den + 0, mask=col_mask, other=0.0).to(tl.float32))
    c2 = tl.abs(tl.load(den + 1, mask=col_mask, other=0.0).to(tl.float32))
    c3 = tl.abs(tl.load(den + 2, mask=col_mask, other=0.0).to(tl.float32))
    c4 = tl.abs(tl.load(den + 3, mask=col_mask, other=0.0).to(tl.float32))
    return a0, a1, a2, a3, a4, a5, c1, c2, c3, c4


@triton.jit
def _forward_kernel(
    x_ptr, y_ptr, num_ptr, den_ptr, group_size, num_row_stride, den_row_stride,
    n_rows, n_cols,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < n_cols
    a0, a1, a2, a3, a4, a5, c1, c2, c3, c4 = _load_coefficients(
        num_ptr, den_ptr, cols, col_mask, group_size, num_row_stride, den_row_stride
    )
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    mask = (rows < n_rows)[:, None] & col_mask[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    ax = tl.abs(x)
    p = ((((a5[None, :] * x + a4[None, :]) * x + a3[None, :]) * x + a2[None, :]) * x + a1[None, :]) * x
    p += a0[None, :]
    q = 1.0 + ax * (c1[None, :] + ax * (c2[None, :] + ax * (c3[None, :] + ax * c4[None, :])))
    tl.store(y_ptr + offsets, (p / q).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(
    grad_ptr, x_ptr, dx_ptr, partial_ptr, num_ptr, den_ptr, group_size, num_row_stride, den_row_stride,
    n_rows, n_cols, n_row_tiles,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    n_row_programs = tl.num_programs(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < n_cols
    a0, a1, a2, a3, a4, a5, c1, c2, c3, c4 = _load_coefficients(
        num_ptr, den_ptr, cols, col_mask, group_size, num_row_stride, den_row_stride
    )
    a0, a1, a2, a3, a4, a5 = a0[None, :], a1[None, :], a2[None, :], a3[None, :], a4[None, :], a5[None, :]
    c1, c2, c3, c4 = c1[None, :], c2[None, :], c3[None, :], c4[None, :]
    # Sums over rows of g x^i / Q (i = 0..5) and of g |x|^j P / Q^2 (j = 1..4), per channel.
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
    for tile in range(pid_n, n_row_tiles, n_row_programs):
        rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
        mask = (rows < n_rows)[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)  # 0 where masked: adds nothing
        ax = tl.abs(x)
        p = (((((a5 * x + a4) * x + a3) * x + a2) * x + a1) * x) + a0
        dp = (((5.0 * a5 * x + 4.0 * a4) * x + 3.0 * a3) * x + 2.0 * a2) * x + a1  # P'(x)
        q = 1.0 + ax * (c1 + ax * (c2 + ax * (c3 + ax * c4)))
        dq = c1 + ax * (2.0 * c2 + ax * (3.0 * c3 + ax * (4.0 * c4)))  # dQ/d|x|
        dq = tl.where(x >= 0, dq, -dq)  # sign(0) = +1
        g_over_q = g / q
        f = p / q
        tl.store(dx_ptr + offsets, (g_over_q * (dp - dq * f)).to(dx_ptr.dtype.element_ty), mask=mask)
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
    # partial[pid_n, k, c] = sum over this program's rows of term k at channel c.
    out = partial_ptr + pid_n * 10 * n_cols + cols
    tl.store(out + 0 * n_cols, tl.sum(acc_a0, axis=0), mask=col_mask)
    tl.store(out + 1 * n_cols, tl.sum(acc_a1, axis=0), mask=col_mask)
    tl.store(out + 2 * n_cols, tl.sum(acc_a2, axis=0), mask=col_mask)
    tl.store(out + 3 * n_cols, tl.sum(acc_a3, axis=0), mask=col_mask)
    tl.store(out + 4 * n_cols, tl.sum(acc_a4, axis=0), mask=col_mask)
    tl.store(out + 5 * n_cols, tl.sum(acc_a5, axis=0), mask=col_mask)
    tl.store(out + 6 * n_cols, tl.sum(acc_b1, axis=0), mask=col_mask)
    tl.store(out + 7 * n_cols, tl.sum(acc_b2, axis=0), mask=col_mask)
    tl.store(out + 8 * n_cols, tl.sum(acc_b3, axis=0), mask=col_mask)
    tl.store(out + 9 * n_cols, tl.sum(acc_b4, axis=0), mask=col_mask)


INTERPRETED = isinstance(_forward_kernel, InterpretedFunction)


def block_channels(n_cols: int) -> int:
    """Channels per program: the largest power of two <= 256 dividing C (no masked lanes), else a masked block."""
    block = 256
    while block >= 32:
        if n_cols % block == 0:
            return block
        block //= 2
    return min(256, triton.next_power_of_2(n_cols))


def forward_config(n_cols: int, dtype: torch.dtype) -> dict:
    """Tile of about 8K elements (32 KB fp32 / 16 KB bf16 per program), 8 warps."""
    block_c = block_channels(n_cols)
    return {"BLOCK_N": max(1, 8192 // block_c), "BLOCK_C": block_c, "num_warps": 8}


def backward_config(n_cols: int, dtype: torch.dtype) -> dict:
    """Row tiles of about 2K elements (10 fp32 accumulators each), ~4 programs per SM in total."""
    block_c = block_channels(n_cols)
    return {"BLOCK_N": max(1, 2048 // block_c), "BLOCK_C": block_c, "num_warps": 8, "programs_per_sm": 4}


_SM_COUNT: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRETER_PROGRAMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _check_runnable(x: Tensor) -> None:
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(
            f"group_rational backend='triton' supports float32, bfloat16 and float16 x, got {x.dtype}; "
            "use backend='torch' for float64"
        )
    if x.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "group_rational backend='triton' on a CPU tensor needs the Triton interpreter: set the environment "
            "variable TRITON_INTERPRET=1 before triton is first imported (e.g. before `import kat`), move x to "
            "a CUDA device, or use backend='torch'"
        )
    if x.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"group_rational backend='triton' does not support {x.device.type} tensors")


def _device_guard(device: torch.device):
    # Launch on x's device (Triton launches on the current device; kernels on cuda:1 need this guard).
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _coefficient_args(numerator: Tensor, denominator: Tensor, group_size: int) -> tuple:
    num = numerator.detach().float().contiguous()
    den = denominator.detach().float().contiguous()
    num_row_stride = 0 if numerator.shape[0] == 1 else 6
    den_row_stride = 0 if denominator.shape[0] == 1 else 4
    return num, den, group_size, num_row_stride, den_row_stride


def rational_forward(x: Tensor, numerator: Tensor, denominator: Tensor, config: dict | None = None) -> Tensor:
    """y = F(x) (x's shape and dtype, contiguous). `config` overrides `forward_config` (benchmarks only)."""
    _check_runnable(x)
    n_cols = x.shape[-1]
    groups = max(numerator.shape[0], denominator.shape[0])
    x2d = x.contiguous().view(-1, n_cols)  # [N, C]
    y = torch.empty_like(x2d)
    n_rows = x2d.shape[0]
    if x.numel() > 0:
        cfg = config or forward_config(n_cols, x.dtype)
        grid = (triton.cdiv(n_rows, cfg["BLOCK_N"]), triton.cdiv(n_cols, cfg["BLOCK_C"]))
        with _device_guard(x.device):
            _forward_kernel[grid](
                x2d, y, *_coefficient_args(numerator, denominator, n_cols // groups), n_rows, n_cols,
                BLOCK_N=cfg["BLOCK_N"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"],
            )  # fmt: skip
    return y.view(x.shape)


def rational_backward(
    grad_output: Tensor, x: Tensor, numerator: Tensor, denominator: Tensor, config: dict | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx in x's dtype, d numerator, d denominator in the coefficients' dtypes); deterministic."""
    _check_runnable(x)
    n_cols = x.shape[-1]
    groups = max(numerator.shape[0], denominator.shape[0])
    x2d = x.contiguous().view(-1, n_cols)  # [N, C]
    grad2d = grad_output.to(x.dtype).contiguous().view(-1, n_cols)
    dx = torch.empty_like(x2d)
    n_rows = x2d.shape[0]
    cfg = config or backward_config(n_cols, x.dtype)
    n_col_blocks = triton.cdiv(n_cols, cfg["BLOCK_C"])
    n_row_tiles = triton.cdiv(n_rows, cfg["BLOCK_N"])
    target = max(1, (_num_sms(x.device) * cfg["programs_per_sm"]) // n_col_blocks)
    n_row_programs = max(1, min(n_row_tiles, target))
    partials = torch.zeros(n_row_programs, 10, n_cols, device=x.device, dtype=torch.float32)
    if x.numel() > 0:
        with _device_guard(x.device):
            _backward_kernel[(n_row_programs, n_col_blocks)](
                grad2d, x2d, dx, partials, *_coefficient_args(numerator, denominator, n_cols // groups),
                n_rows, n_cols, n_row_tiles,
                BLOCK_N=cfg["BLOCK_N"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"],
            )  # fmt: skip
    # Fixed-order reduction: over programs, then over each group's channels, in float64.
    sums = partials.sum(0, dtype=torch.float64).view(10, groups, n_cols // groups).sum(-1)  # [10, G]
    d_num = sums[:6].t()  # [G, 6]
    d_den = -sums[6:].t() * sign_plus(denominator.detach().double())  # [G, 4]
    if numerator.shape[0] == 1:
        d_num = d_num.sum(0, keepdim=True)
    if denominator.shape[0] == 1:
        d_den = d_den.sum(0, keepdim=True)
    return dx.view(x.shape), d_num.to(numerator.dtype).contiguous(), d_den.to(denominator.dtype).contiguous()
