"""Host (CPU) time to issue one GR-KAN forward+backward, against torch ops with the same role.

An eager training step is launch-bound when the host takes longer to issue its kernels than the GPU takes to
run them; then every microsecond of Python around our kernels shows up in images/s. This times the issue of
forward+backward on a tiny CUDA tensor (GPU time negligible) and prints where the host time goes (cProfile).

    python bench/bench_host_overhead.py
"""

import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kat.rational import GroupRational  # noqa: E402


def per_call_us(fn, x, calls: int = 300) -> float:
    for _ in range(20):
        fn(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn(x)
    torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - start) / calls


def main():
    device = torch.device("cuda")
    x = torch.randn(8, 384, device=device, requires_grad=True)
    rational = GroupRational(384, groups=8, init="swish").to(device)
    norm = torch.nn.LayerNorm(384).to(device)

    def rational_step(t):
        rational(t).sum().backward()

    def gelu_step(t):
        F.gelu(t).sum().backward()

    def norm_step(t):
        norm(t).sum().backward()

    def sum_step(t):
        t.sum().backward()

    base = per_call_us(sum_step, x)
    print(f"{'op (forward + backward)':32s} {'host us':>8s} {'minus sum().backward()':>24s}")
    for name, fn in [("group_rational", rational_step), ("gelu", gelu_step), ("layer_norm", norm_step)]:
        us = per_call_us(fn, x)
        print(f"{name:32s} {us:8.1f} {us - base:24.1f}")

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(200):
        rational_step(x)
    torch.cuda.synchronize()
    profiler.disable()
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(20)
    stats.sort_stats("cumulative").print_stats(30)


if __name__ == "__main__":
    main()
