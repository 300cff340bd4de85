"""Benchmark the GR-KAN operator on one CUDA GPU against the memory floor.

Shapes are the KAT activations [128, 197, C], C in 192, 384, 768, 1536, 3072 (KAT-T/S/B act1 and act2), 8
groups, fp32 and bf16. For each shape it first checks the Triton op against the float64 reference on the GPU
(outputs within rounding, coefficient-gradient relative error, bitwise run-to-run determinism), then times
forward and forward+backward (median, triton.testing) of:
  triton         our Triton kernels through the custom op (kat.rational.group_rational, backend='triton')
  torch          our PyTorch path (backend='torch'), eager
  torch.compile  the PyTorch reference (autograd.Function) under torch.compile (--compile-channels only:
                 compiling every shape would take minutes)
  gelu           torch.nn.functional.gelu: an element-wise op with the same memory traffic, as a yardstick
  kat_rational   the public KAT CUDA kernel, only if the package happens to be importable
Times are taken inside CUDA graphs (GPU time, no Python/launch overhead: what a training step that keeps the
GPU busy sees); the "eager" column for triton adds launch overhead (plain do_bench).
Memory floor: every input read once and every output written once (forward: x, y; forward+backward: x, y,
then x, dy, dx), divided by the device-to-device copy bandwidth measured in the same run.

Run (about 2-3 minutes on an H100):  python bench/bench_rational.py --json $OUT/bench_rational.json
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _report import environment, finish  # noqa: E402

from kat.rational import group_rational, kernels  # noqa: E402
from kat.rational.coefficients import init_coefficients  # noqa: E402
from kat.rational.reference import group_rational_reference  # noqa: E402
from kat.triton_utils import INTERPRETED  # noqa: E402

GROUPS = 8
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HALF_ULP = {torch.float32: 0.0, torch.bfloat16: 2.0**-8}


def median_ms(fn, graph=True):
    if graph:
        return do_bench_cudagraph(fn, rep=100, return_mode="median")
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


SHAPE = [128, 197]  # [batch, tokens] in front of C (--batch / --tokens change it for quick runs)


def make_inputs(channels, dtype, device, requires_grad=True):
    gen = torch.Generator(device=device).manual_seed(channels)
    x = torch.randn(*SHAPE, channels, device=device, generator=gen).to(dtype)
    numerator, denominator = init_coefficients("swish")
    num = torch.tensor([numerator], device=device)
    den = torch.tensor([denominator], device=device).repeat(GROUPS, 1)
    den += 0.05 * torch.randn(den.shape, device=device, generator=gen)  # distinct groups, some b < 0
    dy = torch.randn(x.shape, device=device, generator=gen).to(dtype)
    for t in (x, num, den):
        t.requires_grad_(requires_grad)
    return x, num, den, dy


def check_correctness(channels, dtype, device) -> dict:
    """Triton op vs the float64 reference on the same inputs; determinism of two backward passes."""
    x, num, den, dy = make_inputs(channels, dtype, device)
    y = group_rational(x, num, den, backend="triton")
    grads = torch.autograd.grad(y, (x, num, den), dy)
    grads_again = torch.autograd.grad(group_rational(x, num, den, backend="triton"), (x, num, den), dy)
    x64, num64, den64 = (t.detach().double().requires_grad_(True) for t in (x, num, den))
    y64 = group_rational_reference(x64, num64, den64)
    dx64, dnum64, dden64 = torch.autograd.grad(y64, (x64, num64, den64), dy.double())

    def excess(actual, expected):  # > 0: outside half an ulp plus 1e-5 x max|expected|
        bound = HALF_ULP[dtype] * expected.abs() + 1e-5 * expected.abs().max()
        return ((actual.double() - expected).abs() - bound).max().item()

    def rel(actual, expected):
        return ((actual.double() - expected).norm() / expected.norm()).item()

    result = {
        "y_excess": excess(y, y64),
        "dx_excess": excess(grads[0], dx64),
        "d_num_rel_err": rel(grads[1], dnum64),
        "d_den_rel_err": rel(grads[2], dden64),
        "deterministic": all(torch.equal(a, b) for a, b in zip(grads, grads_again)),
    }
    result["ok"] = (
        result["y_excess"] <= 0
        and result["dx_excess"] <= 0
        and result["d_num_rel_err"] <= 1e-6
        and result["d_den_rel_err"] <= 1e-6
        and result["deterministic"]
    )
    return result


def public_kat_rational(device):
    """The public `kat_rational` KAT_Group module, or (None, reason)."""
    try:
        from kat_rational import KAT_Group

        return KAT_Group(num_groups=GROUPS, mode="swish").to(device), None
    except Exception as error:  # optional comparison: any failure just skips it
        return None, f"{type(error).__name__}: {error}"


def time_methods(channels, dtype, device, compile_it, public) -> dict:
    x, num, den, dy = make_inputs(channels, dtype, device)
    inputs = (x, num, den)

    def fwd_bwd(forward):
        return lambda: torch.autograd.grad(forward(), inputs, dy)

    methods = {
        "triton": lambda: group_rational(x, num, den, backend="triton"),
        "torch": lambda: group_rational(x, num, den, backend="torch"),
        "gelu": lambda: F.gelu(x),
    }
    if compile_it:
        compiled = torch.compile(group_rational_reference, fullgraph=True, dynamic=False)
        methods["torch.compile"] = lambda: compiled(x, num, den)
    if public is not None:
        methods["kat_rational"] = lambda: public(x)
    results = {}
    for name, forward in methods.items():
        grad_fn = (
            (lambda forward=forward: torch.autograd.grad(forward(), [x], dy))
            if name in ("gelu", "kat_rational")
            else fwd_bwd(forward)
        )
        try:
            start = time.perf_counter()
            forward(), grad_fn()  # warm up / compile
            torch.cuda.synchronize(device)
            setup_s = time.perf_counter() - start
            # Forward in training mode (inputs require grad), as in a training step.
            results[name] = {
                "fwd_ms": median_ms(forward),
                "fwd_bwd_ms": median_ms(grad_fn),
                "setup_s": setup_s,
            }
            if name == "triton":
                results[name]["fwd_eager_ms"] = median_ms(forward, graph=False)
                results[name]["fwd_bwd_eager_ms"] = median_ms(grad_fn, graph=False)
        except Exception as error:
            results[name] = {"error": f"{type(error).__name__}: {error}"}
    return results


def sweep_shape(channels, dtype_name, dtype, device, bandwidth):
    """Forward and backward kernel times over tile configurations, with fc1's bias fused (KANMlp's act2)."""
    x, num, den, dy = make_inputs(channels, dtype, device, requires_grad=False)
    bias = torch.randn(channels, device=device)
    size = x.numel() * x.element_size()
    block_c = kernels.block_channels(channels // GROUPS)
    fwd_default = kernels.forward_config(channels // GROUPS)
    bwd_default = kernels.backward_config(channels // GROUPS)
    for elements in (4096, 8192, 16384):
        for warps in (4, 8):
            cfg = {"BLOCK_N": elements // block_c, "BLOCK_C": block_c, "num_warps": warps}
            ms = median_ms(lambda cfg=cfg: kernels.rational_forward(x, num, den, bias, config=cfg))
            mark = "*" if cfg == fwd_default else " "
            pct = 2 * size / bandwidth / ms / 1e-5
            print(f" {mark}fwd C={channels} {dtype_name} {cfg}: {ms:.4f} ms, {pct:.0f}%", flush=True)
    for elements in (1024, 2048):
        for warps in (4, 8):
            for stages in (1, 2, 3):
                for per_sm in (2, 4, 8):
                    cfg = {"BLOCK_N": max(1, elements // block_c), "BLOCK_C": block_c, "num_warps": warps,
                           "programs_per_sm": per_sm, "num_stages": stages}  # fmt: skip
                    ms = median_ms(lambda cfg=cfg: kernels.rational_backward(dy, x, num, den, bias, config=cfg))
                    mark = "*" if cfg == bwd_default else " "
                    pct = 3 * size / bandwidth / ms / 1e-5
                    print(f" {mark}bwd C={channels} {dtype_name} {cfg}: {ms:.4f} ms, {pct:.0f}%", flush=True)


def sweep(device, bandwidth, channels_list, dtype_names):
    """Times the Triton kernels alone over a few tile configurations (to tune the heuristics in kernels.py)."""
    print("\nsweep of tile configurations (graph-timed, % of the kernel's own floor; * = current default):")
    for channels in channels_list:
        for dtype_name in dtype_names:
            sweep_shape(channels, dtype_name, DTYPES[dtype_name], device, bandwidth)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, help="write all results to this JSON file")
    parser.add_argument("--channels", default="192,384,768,1536,3072", help="comma-separated C values")
    parser.add_argument("--compile-channels", default="1536", help="C values that also time torch.compile")
    parser.add_argument("--sweep", action="store_true", help="also time kernel tile configurations (minutes)")
    parser.add_argument("--sweep_channels", default="768,1536,3072", help="C values of the sweep (act2's)")
    parser.add_argument("--sweep_dtypes", default="bf16,fp32", help="dtypes of the sweep")
    parser.add_argument("--sweep_only", action="store_true", help="skip the checks and method timings")
    parser.add_argument("--device", default="cuda", help="e.g. cuda:1 (the kernels run on any CUDA device)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=197)
    args = parser.parse_args()
    SHAPE[:] = [args.batch, args.tokens]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_rational.py needs a CUDA GPU")
    if device.type == "cuda" and INTERPRETED:
        sys.exit("TRITON_INTERPRET=1 is set: unset it to benchmark the compiled kernels")
    channels_list = [int(c) for c in args.channels.split(",")]
    compile_channels = {int(c) for c in args.compile_channels.split(",") if c}
    info, bandwidth = environment(device, rep=200)
    public, reason = public_kat_rational(device)
    if public is None:
        print(f"kat_rational (public kernel): not timed ({reason})")

    if args.sweep_only:
        channels_list = []
    print(f"\ncorrectness of the Triton op vs float64 reference ([{SHAPE[0]}, {SHAPE[1]}, C], 8 groups):")
    correctness = {}
    for channels in channels_list:
        for dtype_name, dtype in DTYPES.items():
            result = check_correctness(channels, dtype, device)
            correctness[f"{channels}/{dtype_name}"] = result
            print(
                f"  C={channels:5d} {dtype_name}: {'OK  ' if result['ok'] else 'FAIL'} "
                f"y excess {result['y_excess']:.2e}  dx excess {result['dx_excess']:.2e}  "
                f"d_num rel {result['d_num_rel_err']:.1e}  d_den rel {result['d_den_rel_err']:.1e}  "
                f"deterministic {result['deterministic']}"
            )
    torch.cuda.empty_cache()

    print("\ntimes in ms (median); % = memory floor / time")
    header = f"{'C':>5} {'dtype':5} {'method':14} {'fwd':>8} {'%':>4} {'fwd+bwd':>8} {'%':>4}  notes"
    print(header + "\n" + "-" * len(header))
    timings = []
    for channels in channels_list:
        for dtype_name, dtype in DTYPES.items():
            size = SHAPE[0] * SHAPE[1] * channels * torch.tensor([], dtype=dtype).element_size()
            floor_fwd_ms = 2 * size / bandwidth * 1e3
            floor_fwd_bwd_ms = 5 * size / bandwidth * 1e3
            print(
                f"{channels:5d} {dtype_name:5} {'floor':14} {floor_fwd_ms:8.4f} {'':4} {floor_fwd_bwd_ms:8.4f}"
            )
            results = time_methods(channels, dtype, device, channels in compile_channels, public)
            for name, r in results.items():
                row = {"channels": channels, "dtype": dtype_name, "method": name,
                       "floor_fwd_ms": floor_fwd_ms, "floor_fwd_bwd_ms": floor_fwd_bwd_ms, **r}  # fmt: skip
                timings.append(row)
                if "error" in r:
                    print(f"{channels:5d} {dtype_name:5} {name:14} error: {r['error'][:80]}")
                    continue
                row["fwd_pct_floor"] = 100 * floor_fwd_ms / r["fwd_ms"]
                row["fwd_bwd_pct_floor"] = 100 * floor_fwd_bwd_ms / r["fwd_bwd_ms"]
                notes = ""
                if "fwd_eager_ms" in r:
                    notes = f"eager (launch overhead incl.): {r['fwd_eager_ms']:.4f} / {r['fwd_bwd_eager_ms']:.4f}"
                print(
                    f"{channels:5d} {dtype_name:5} {name:14} {r['fwd_ms']:8.4f} {row['fwd_pct_floor']:4.0f} "
                    f"{r['fwd_bwd_ms']:8.4f} {row['fwd_bwd_pct_floor']:4.0f}  {notes}"
                )
            torch.cuda.empty_cache()
    if args.sweep or args.sweep_only:
        sweep_channels = [int(c) for c in args.sweep_channels.split(",")]
        sweep(device, bandwidth, sweep_channels, args.sweep_dtypes.split(","))
    finish(args.json, info, correctness, timings)


if __name__ == "__main__":
    main()
