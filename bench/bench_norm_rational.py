"""Benchmark the fused LayerNorm -> group-rational op (KAT's norm2 -> act1) against the unfused pair.

Shapes [128, 197, C], C in 192, 384, 768 (KAT-T/S/B), 8 groups, fp32 input (the residual stream) and bf16
output, as in a bf16-autocast training step. Methods:
  fused    kat.rational.norm_rational.layer_norm_rational(x, ..., out_dtype=bf16), backend 'triton'
  unfused  F.layer_norm under autocast (fp32 out) -> group_rational (fp32) -> .to(bf16) (the cast fc1 does)
For each shape it first checks the fused op on the GPU against the float64 unfused reference (y and dx within
rounding, parameter-gradient relative errors), its bitwise run-to-run determinism, and its agreement with the
unfused path; then it reports
  fwd / fwd+bwd  GPU time in ms inside CUDA graphs (no host overhead), median, and % of the memory floor
                 (fused: x read + y written forward; x, dy read + dx written backward; at copy bandwidth);
  eager          the same calls issued eagerly, back to back: includes Python and launch overhead, which is
                 what an eager training step pays when it is launch-bound;
  host           eager fwd+bwd per call at [1, 197, C] (GPU time negligible): the host cost alone;
  saved MB       memory the forward keeps alive for backward beyond its inputs (x is held by the residual
                 stream anyway).

Run (about 30-40 s on an H100, most of it Triton compilation):
    python bench/bench_norm_rational.py --json $OUT/bench_norm_rational.json
    python bench/bench_norm_rational.py --sweep      # also time kernel tile configurations (~2 min more)
"""

import argparse
import functools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _report import environment, finish  # noqa: E402

from kat.rational import group_rational, norm_rational_kernels  # noqa: E402
from kat.rational.coefficients import init_coefficients  # noqa: E402
from kat.rational.norm_rational import layer_norm_rational, layer_norm_rational_reference  # noqa: E402
from kat.triton_utils import INTERPRETED  # noqa: E402

GROUPS = 8
EPS = 1e-6
OUT_DTYPE = torch.bfloat16
SHAPE = [128, 197]  # [batch, tokens] in front of C


def graph_ms(fn):
    """GPU time per call inside a CUDA graph (median): no Python, no launch overhead."""
    return do_bench_cudagraph(fn, rep=50, return_mode="median")


def eager_ms(fn, device, calls=200):
    """Wall time per call of `calls` eager calls issued back to back: max(host issue time, GPU time) per call,
    as in an eager training step. (triton's do_bench clears L2 before each call, which lets the host run
    ahead and hides up to ~0.1 ms of host time.)"""
    for _ in range(10):
        fn()
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize(device)
    return 1e3 * (time.perf_counter() - start) / calls


def make_inputs(channels, device, shape=None):
    """x fp32 [*shape, C]; LayerNorm weight/bias; act1 coefficients (a swish fit, perturbed per group); dy."""
    gen = torch.Generator(device=device).manual_seed(channels)
    x = torch.randn(*(shape or SHAPE), channels, device=device, generator=gen) * 2 + 0.5
    weight = 1 + 0.2 * torch.randn(channels, device=device, generator=gen)
    bias = 0.2 * torch.randn(channels, device=device, generator=gen)
    numerator, denominator = init_coefficients("swish")
    num = torch.tensor([numerator], device=device)
    den = torch.tensor([denominator], device=device).repeat(GROUPS, 1)
    den += 0.05 * torch.randn(den.shape, device=device, generator=gen)  # distinct groups, some b < 0
    dy = torch.randn(x.shape, device=device, generator=gen).to(OUT_DTYPE)
    inputs = [t.requires_grad_(True) for t in (x, weight, bias, num, den)]
    return inputs, dy


def fused(x, weight, bias, num, den):
    return layer_norm_rational(x, weight, bias, EPS, num, den, out_dtype=OUT_DTYPE, backend="triton")


def unfused(x, weight, bias, num, den):
    with torch.autocast("cuda", dtype=OUT_DTYPE):
        h = F.layer_norm(x, (x.shape[-1],), weight, bias, EPS)  # fp32 under autocast
        return group_rational(h, num, den, backend="triton").to(OUT_DTYPE)


def check_correctness(channels, device) -> dict:
    inputs, dy = make_inputs(channels, device)
    y = fused(*inputs)
    grads = torch.autograd.grad(y, inputs, dy)
    grads_again = torch.autograd.grad(fused(*inputs), inputs, dy)
    y_unfused = unfused(*inputs)
    grads_unfused = torch.autograd.grad(y_unfused, inputs, dy)
    inputs64 = [t.detach().double().requires_grad_(True) for t in inputs]
    y64 = layer_norm_rational_reference(inputs64[0], inputs64[1], inputs64[2], EPS, *inputs64[3:])
    grads64 = torch.autograd.grad(y64, inputs64, dy.double())

    def excess(actual, expected, half_ulp):  # > 0: outside half an ulp plus 1e-5 x max|expected|
        bound = half_ulp * expected.abs() + 1e-5 * expected.abs().max()
        return ((actual.double() - expected).abs() - bound).max().item()

    def rel(actual, expected):
        return ((actual.double() - expected).norm() / expected.norm()).item()

    names = ("d_weight", "d_bias", "d_num", "d_den")
    result = {
        "y_excess": excess(y, y64, 2.0**-8),
        "dx_excess": excess(grads[0], grads64[0], 0.0),
        **{f"{n}_rel_err": rel(g, g64) for n, g, g64 in zip(names, grads[1:], grads64[1:])},
        "deterministic": all(torch.equal(a, b) for a, b in zip(grads, grads_again)),
        # The unfused path rounds LayerNorm's output to nothing (fp32) but casts y once: same bound, and its
        # own fp32 error; report the largest relative difference of each gradient to the fused one.
        "vs_unfused_y_max_abs": (y.float() - y_unfused.float()).abs().max().item(),
        "vs_unfused_grad_rel": max(rel(a, b.double()) for a, b in zip(grads, grads_unfused)),
    }
    result["ok"] = (
        result["y_excess"] <= 0
        and result["dx_excess"] <= 0
        and all(result[f"{n}_rel_err"] <= 2e-5 for n in names)
        and result["deterministic"]
    )
    return result


def saved_megabytes(method, channels, device) -> float:
    """Memory held between forward and backward by the op, beyond its inputs."""
    inputs, dy = make_inputs(channels, device)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    y = method(*inputs)
    held = torch.cuda.memory_allocated(device) - before - y.numel() * y.element_size()
    del y
    return held / 2**20


def time_method(method, channels, device) -> dict:
    inputs, dy = make_inputs(channels, device)
    small_inputs, small_dy = make_inputs(channels, device, shape=[1, SHAPE[1]])

    def forward():
        return method(*inputs)

    def forward_backward():
        return torch.autograd.grad(method(*inputs), inputs, dy)

    def small_forward_backward():
        return torch.autograd.grad(method(*small_inputs), small_inputs, small_dy)

    start = time.perf_counter()
    forward_backward(), small_forward_backward()  # compile / warm up
    torch.cuda.synchronize(device)
    return {
        "setup_s": time.perf_counter() - start,
        "fwd_ms": graph_ms(forward),
        "fwd_bwd_ms": graph_ms(forward_backward),
        "fwd_eager_ms": eager_ms(forward, device),
        "fwd_bwd_eager_ms": eager_ms(forward_backward, device),
        "host_fwd_bwd_ms": eager_ms(small_forward_backward, device),
        "saved_MB": saved_megabytes(method, channels, device),
    }


def sweep_shape(channels, device, bandwidth):
    inputs, dy = make_inputs(channels, device)
    x, weight, bias, num, den = (t.detach() for t in inputs)
    elements = x.numel()
    lay = norm_rational_kernels.layout(channels, GROUPS)
    padded = lay["GP"] * lay["GSP"]
    fwd_default = norm_rational_kernels.forward_config(channels, GROUPS)
    bwd_default = norm_rational_kernels.backward_config(channels, GROUPS)
    forward = functools.partial(norm_rational_kernels.forward, x, weight, bias, EPS, num, den, OUT_DTYPE)
    for block_n in (1, 2, 4, 8, 16):
        for warps in (4, 8, 16):
            if not 4 <= block_n * padded // (32 * warps) <= 32:  # tile elements per thread
                continue
            cfg = {"BLOCK_N": block_n, "num_warps": warps}
            ms = graph_ms(functools.partial(forward, config=cfg))
            mark = "*" if cfg == fwd_default else " "
            print(f" {mark}fwd C={channels} {cfg}: {ms:.4f} ms, {6 * elements / bandwidth / ms / 1e-5:.0f}%")
    _, mean, rstd = forward()
    backward = functools.partial(norm_rational_kernels.backward, dy, x, weight, bias, mean, rstd, num, den)
    for block_n in (1, 2, 4, 8):
        for warps in (2, 4, 8, 16):
            # 2-8 tile elements per thread: each is also one element of each of the 12 accumulators
            if not 2 <= block_n * padded // (32 * warps) <= 8:
                continue
            for per_sm in (1, 2, 4, 8):
                if warps * per_sm > 64:  # more warps than an SM holds
                    continue
                for stages in (1, 2, 3):
                    cfg = {"BLOCK_N": block_n, "num_warps": warps, "programs_per_sm": per_sm, "num_stages": stages}
                    ms = graph_ms(functools.partial(backward, config=cfg))
                    mark = "*" if cfg == bwd_default else " "
                    pct = 10 * elements / bandwidth / ms / 1e-5
                    print(f" {mark}bwd C={channels} {cfg}: {ms:.4f} ms, {pct:.0f}%", flush=True)


def sweep(channels_list, device, bandwidth):
    """GPU time of the fused kernels alone over tile configurations (to tune the heuristics in
    kat/rational/norm_rational_kernels.py); configurations that would spill registers are skipped."""
    print("\nsweep of tile configurations (graph-timed, % of the kernel's own floor; * = current default):")
    for channels in channels_list:
        sweep_shape(channels, device, bandwidth)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, help="write all results to this JSON file")
    parser.add_argument("--channels", default="192,384,768", help="comma-separated C values")
    parser.add_argument("--sweep", action="store_true", help="also time kernel tile configurations")
    parser.add_argument("--sweep_only", action="store_true", help="only the sweep (no checks, no method timings)")
    parser.add_argument("--device", default="cuda", help="e.g. cuda:1 (the kernels run on any CUDA device)")
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    SHAPE[0] = args.batch
    if not torch.cuda.is_available():
        sys.exit("bench_norm_rational.py needs a CUDA GPU")
    if INTERPRETED:
        sys.exit("TRITON_INTERPRET=1 is set: unset it to benchmark the compiled kernels")
    device = torch.device(args.device)
    if device.index is None:  # 'cuda' means the current device
        device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(device)
    channels_list = [int(c) for c in args.channels.split(",")]
    info, bandwidth = environment(device, rep=100, shape=[*SHAPE, "C"])

    print(f"\nfused op vs float64 unfused reference ({SHAPE + ['C']}, fp32 in, bf16 out, {GROUPS} groups):")
    correctness = {}
    sweep_channels = channels_list
    if args.sweep_only:
        channels_list = []
    for channels in channels_list:
        r = check_correctness(channels, device)
        correctness[str(channels)] = r
        print(
            f"  C={channels:4d}: {'OK  ' if r['ok'] else 'FAIL'} y excess {r['y_excess']:.1e}  "
            f"dx excess {r['dx_excess']:.1e}  d_weight {r['d_weight_rel_err']:.1e}  "
            f"d_bias {r['d_bias_rel_err']:.1e}  d_num {r['d_num_rel_err']:.1e}  "
            f"d_den {r['d_den_rel_err']:.1e}  "
            f"deterministic {r['deterministic']}  | vs unfused: y max|diff| {r['vs_unfused_y_max_abs']:.1e}, "
            f"grad rel {r['vs_unfused_grad_rel']:.1e}"
        )
    torch.cuda.empty_cache()

    print("\ntimes in ms (median); % = fused memory floor / time; eager and host include Python + launches")
    header = (
        f"{'C':>4} {'method':8} {'fwd':>7} {'%':>4} {'fwd+bwd':>8} {'%':>4} {'eager fwd':>9} "
        f"{'eager f+b':>9} {'host f+b':>8} {'saved MB':>8}"
    )
    print(header + "\n" + "-" * len(header))
    timings = []
    for channels in channels_list:
        elements = SHAPE[0] * SHAPE[1] * channels
        floor_fwd_ms = 6 * elements / bandwidth * 1e3  # x fp32 read, y bf16 written
        floor_fwd_bwd_ms = floor_fwd_ms + 10 * elements / bandwidth * 1e3  # + x, dy read, dx fp32 written
        for name, method in (("fused", fused), ("unfused", unfused)):
            r = time_method(method, channels, device)
            r.update(
                channels=channels, method=name, floor_fwd_ms=floor_fwd_ms, floor_fwd_bwd_ms=floor_fwd_bwd_ms
            )
            r["fwd_pct_floor"] = 100 * floor_fwd_ms / r["fwd_ms"]
            r["fwd_bwd_pct_floor"] = 100 * floor_fwd_bwd_ms / r["fwd_bwd_ms"]
            timings.append(r)
            print(
                f"{channels:4d} {name:8} {r['fwd_ms']:7.4f} {r['fwd_pct_floor']:4.0f} {r['fwd_bwd_ms']:8.4f} "
                f"{r['fwd_bwd_pct_floor']:4.0f} {r['fwd_eager_ms']:9.4f} {r['fwd_bwd_eager_ms']:9.4f} "
                f"{r['host_fwd_bwd_ms']:8.4f} {r['saved_MB']:8.1f}"
            )
        torch.cuda.empty_cache()
    if args.sweep or args.sweep_only:
        sweep(sweep_channels, device, bandwidth)
    finish(args.json, info, correctness, timings)


if __name__ == "__main__":
    main()
