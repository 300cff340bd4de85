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
from timm.layers import Mlp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kat.models import KANMlp  # noqa: E402
from kat.models.channel_mixer import channel_mixer  # noqa: E402
from kat.rational import GroupRational, layer_norm_rational  # noqa: E402


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
    # The shapes of one KAT-S block's calls, shrunk to 8 rows (GPU time negligible): act2 on fc1's bf16 output
    # with fc1's bias inside, and the fused norm2 -> act1 on the fp32 residual stream, bf16 out.
    hidden = torch.randn(8, 1536, device=device, dtype=torch.bfloat16, requires_grad=True)
    stream = torch.randn(8, 384, device=device, requires_grad=True)
    act2 = GroupRational(1536, groups=8, init="swish").to(device)
    fc1_bias = torch.nn.Parameter(torch.zeros(1536, device=device))
    norm = torch.nn.LayerNorm(384).to(device)
    act1 = GroupRational(384, groups=8, init="identity").to(device)

    def rational_step(t):
        act2(t, bias=fc1_bias).sum().backward()

    def norm_rational_step(t):
        layer_norm_rational(t, norm.weight, norm.bias, norm.eps, act1.weight_numerator, act1.weight_denominator,
                            torch.bfloat16).sum().backward()

    def gelu_step(t):
        F.gelu(t).sum().backward()

    def norm_step(t):
        norm(t).sum().backward()

    def sum_step(t):
        t.sum().backward()

    print(f"{'op (forward + backward)':40s} {'host us':>8s} {'minus sum().backward()':>24s}")
    for name, fn, x in [
        ("group_rational + bias [8,1536] bf16", rational_step, hidden),
        ("gelu [8,1536] bf16", gelu_step, hidden),
        ("layer_norm_rational [8,384] fp32->bf16", norm_rational_step, stream),
        ("layer_norm [8,384] fp32", norm_step, stream),
    ]:
        us, base = per_call_us(fn, x), per_call_us(sum_step, x)
        print(f"{name:40s} {us:8.1f} {us - base:24.1f}")

    # A whole KAT-T channel mixer (norm2 -> act1 -> fc1 -> act2 -> fc2, bf16 autocast) as one autograd node
    # (kat.models.channel_mixer, what fused=True runs in eager mode) and as plain modules (fused=False), against
    # ViT-T's norm2 -> Mlp.
    tiny = torch.randn(8, 192, device=device, requires_grad=True)
    grad = torch.randn(8, 192, device=device, dtype=torch.bfloat16)
    norm2 = torch.nn.LayerNorm(192).to(device)
    kan_mlp = KANMlp(192, 768).to(device)
    vit_mlp = Mlp(192, 768).to(device)

    def mixer_step(fused: bool):
        def step(t):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = channel_mixer(t, norm2, kan_mlp) if fused else kan_mlp(norm2(t))
            y.backward(grad)

        return step

    def vit_mixer_step(t):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = vit_mlp(norm2(t))
        y.backward(grad)

    print(f"\n{'channel mixer [8,192] (forward + backward)':44s} {'host us':>8s}")
    for name, fn in [("KAT-T, one autograd node", mixer_step(True)), ("KAT-T, plain modules", mixer_step(False)),
                     ("ViT-T (LayerNorm, Mlp)", vit_mixer_step)]:
        print(f"{name:44s} {per_call_us(fn, tiny):8.1f}")

    for name, fn, x in [("group_rational", rational_step, hidden), ("layer_norm_rational", norm_rational_step, stream)]:
        print(f"\n--- cProfile of {name} forward + backward, 200 calls ---")
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(200):
            fn(x)
        torch.cuda.synchronize()
        profiler.disable()
        stats = pstats.Stats(profiler)
        stats.sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    with torch.autograd.set_multithreading_enabled(False):  # backward on this thread, as train.py runs it
        main()
