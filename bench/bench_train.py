"""Steady-state training-step throughput of KAT against the ViT it replaces, on one GPU.

Each timed step is forward, backward and an AdamW update under bf16 autocast, on synthetic inputs already on
the GPU (the data loader is out of the picture). Models are timed in alternation (round-robin, several
rounds) so that clock or thermal drift hits every model alike; the median round counts.

    python bench/bench_train.py --json $OUT/train.json               # kat/vit tiny, small, base; eager + compile
    python bench/bench_train.py --models kat_small,vit_small_patch16_224 --compile off --profile
    python bench/bench_train.py --models kat_small,kat_small@fused=0,vit_small_patch16_224  # a variant

Peak memory is the step's peak of allocated memory attributable to that model: everything this model holds
(parameters, gradients, optimizer state) plus its activations, excluding the other resident models.
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kat  # noqa: E402  (registers the KAT models)

PAIRS = {"tiny": ("kat_tiny", "vit_tiny_patch16_224"), "small": ("kat_small", "vit_small_patch16_224"),
         "base": ("kat_base", "vit_base_patch16_224")}
DROP_PATH = {"tiny": 0.1, "small": 0.1, "base": 0.4}  # the training recipe's (configs/kat_*.yaml), same for ViT


def size_of(name: str) -> str:
    return next(size for size, pair in PAIRS.items() if name.split("@")[0] in pair)


def model_kwargs(name: str) -> dict:
    """'kat_small@fused=0' -> {'fused': False}: a variant of a model, timed beside it."""
    kwargs = {}
    for item in name.split("@")[1:]:
        key, value = item.split("=")
        kwargs[key] = bool(int(value)) if value in ("0", "1") else value
    return kwargs


class Runner:
    """One model, its optimizer and a fixed synthetic batch, ready to take timed steps."""

    def __init__(self, name: str, batch: int, img_size: int, compile_mode: str | None, adamw: str, device):
        self.name, self.batch, self.compiled = name, batch, compile_mode
        model = timm.create_model(name.split("@")[0], num_classes=1000, img_size=img_size,
                                  drop_path_rate=DROP_PATH[size_of(name)], **model_kwargs(name)).to(device)
        self.model = torch.compile(model, mode=compile_mode) if compile_mode else model
        self.raw_model = model
        # adamw 'fused' (torch's fused kernels) is what train.py uses on a GPU; 'foreach' is timm's default.
        impl = {"fused": True} if adamw == "fused" else {}
        self.optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, **impl)
        gen = torch.Generator(device=device).manual_seed(0)
        self.images = torch.randn(batch, 3, img_size, img_size, device=device, generator=gen)
        self.targets = torch.randint(0, 1000, (batch,), device=device, generator=gen)

    def step(self):
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()  # one new step for CUDA-graph trees (no-op otherwise)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = self.model(self.images)
        loss = F.cross_entropy(logits.float(), self.targets)
        with torch.autograd.set_multithreading_enabled(False):  # as train.py runs it (kat/training/engine.py)
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def state_bytes(self) -> int:
        """Bytes this model keeps between steps: parameters and optimizer state (grads are freed)."""
        total = sum(p.numel() * p.element_size() for p in self.raw_model.parameters())
        for state in self.optimizer.state.values():
            total += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
        return total

    def timed(self, steps: int) -> tuple[float, int]:
        """Mean seconds per step over `steps` steps, and the peak bytes attributable to this model."""
        torch.cuda.synchronize()
        others = torch.cuda.memory_allocated() - self.state_bytes()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            loss = self.step()
        end.record()
        torch.cuda.synchronize()
        if not torch.isfinite(loss):
            raise RuntimeError(f"{self.name}: non-finite loss {loss.item()} during the benchmark")
        return start.elapsed_time(end) / 1e3 / steps, torch.cuda.max_memory_allocated() - others


def profile_step(runner: Runner, top: int) -> dict:
    """Per-kernel CUDA time of one training step, grouped into a few categories."""
    from torch.profiler import ProfilerActivity, profile

    # Host time to issue one step: when it exceeds the GPU time, the step is launch-bound, not GPU-bound.
    torch.cuda.synchronize()
    host = time.perf_counter()
    runner.step()
    host = time.perf_counter() - host
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        runner.step()
        torch.cuda.synchronize()
    kernels, launches = {}, 0
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name] = kernels.get(event.name, 0.0) + event.device_time / 1e3  # ms
            launches += 1
    # Where the host's time goes: ops by their own CPU time (autograd nodes, Python autograd.Functions and
    # launch calls show up by name).
    host_ops = sorted(((e.key, e.count, e.self_cpu_time_total / 1e3) for e in prof.key_averages()
                       if e.self_cpu_time_total > 0), key=lambda t: -t[2])[:top]

    def category(name: str) -> str:
        lowered = name.lower()
        for key, words in [("rational", ["rational"]), ("attention", ["flash", "fmha", "attention", "sdpa"]),
                           ("gemm", ["gemm", "sm90_xmma", "cutlass", "matmul", "nvjet"]),
                           ("layernorm", ["layer_norm", "layernorm"]),
                           ("optimizer", ["adam", "foreach", "multi_tensor"]),
                           ("cast", ["to_copy", "copy_kernel", "cast"]), ("softmax/loss", ["softmax", "nll"]),
                           ("gelu", ["gelu"])]:
            if any(w in lowered for w in words):
                return key
        return "other elementwise/reduction"

    by_category = {}
    for name, ms in kernels.items():
        by_category[category(name)] = by_category.get(category(name), 0.0) + ms
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1])[:top]
    return {"host_ms": 1e3 * host, "total_ms": sum(kernels.values()), "kernels_launched": launches,
            "by_category_ms": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
            "top_kernels_ms": ranked, "top_host_ops_self_ms": host_ops}


def check_fused_against_unfused(name: str, device, batch: int = 16) -> dict:
    """Outputs and gradients of the fused model (fused=True, the default) against the plain one (fused=False).

    Same weights and inputs, bf16 autocast as in training; errors are norm-wise relative differences.
    """
    torch.manual_seed(0)
    fused = timm.create_model(name, num_classes=1000).to(device)
    plain = timm.create_model(name, num_classes=1000, fused=False).to(device)
    plain.load_state_dict(fused.state_dict())
    images = torch.randn(batch, 3, 224, 224, device=device)
    outputs, grads = [], []
    for model in (fused, plain):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(images)
        logits.float().logsumexp(-1).mean().backward()
        outputs.append(logits.float())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    return {"model": name, "logits_rel_err": rel(*outputs), "grads_rel_err": rel(*grads)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,small,base", help="comma list of tiny,small,base")
    parser.add_argument("--models", default=None, help="explicit comma list of model names (overrides --sizes)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--img_size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model per round")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", choices=["off", "on", "both"], default="both")
    parser.add_argument("--compile_mode", default="default",
                        help="torch.compile mode for --compile on/both: default, reduce-overhead (CUDA graphs), ...")
    parser.add_argument("--adamw", choices=["fused", "foreach"], default="fused",
                        help="AdamW implementation: fused (what train.py uses on a GPU) or foreach (timm's default)")
    parser.add_argument("--profile", action="store_true", help="per-kernel breakdown of one KAT and one ViT step")
    parser.add_argument("--no_check", action="store_true", help="skip the fused-vs-unfused KAT check")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_train.py times GPU training steps: no CUDA device found")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    device = torch.device("cuda")

    names = args.models.split(",") if args.models else [n for s in args.sizes.split(",") for n in PAIRS[s]]
    modes = {"off": [None], "on": [args.compile_mode], "both": [None, args.compile_mode]}[args.compile]
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "timm": timm.__version__,
               "triton": _version("triton"), "python": platform.python_version(), "command": " ".join(sys.argv),
               "batch": args.batch, "img_size": args.img_size, "steps": args.steps, "rounds": args.rounds, "adamw": args.adamw,
               "rational_backend": kat.rational.active_backend(torch.empty(1, device=device)), "runs": []}

    if not args.no_check:
        for name in names:
            if name.startswith("kat") and "@" not in name:
                check = check_fused_against_unfused(name, device)
                results.setdefault("fused_check", []).append(check)
                print(f"fused vs unfused {name}: logits rel err {check['logits_rel_err']:.2e}, "
                      f"grads rel err {check['grads_rel_err']:.2e} (bf16 autocast)", flush=True)
        torch.cuda.empty_cache()

    for compiled in modes:
        runners = [Runner(n, args.batch, args.img_size, compiled, args.adamw, device) for n in names]
        for r in runners:  # warm-up (and compilation) outside the timed rounds
            t0 = time.perf_counter()
            for _ in range(args.warmup):
                r.step()
            torch.cuda.synchronize()
            print(f"warmed {r.name} compile={compiled} in {time.perf_counter() - t0:.1f} s", flush=True)
        times = {r.name: [] for r in runners}
        peaks = {r.name: 0 for r in runners}
        for _ in range(args.rounds):
            for r in runners:
                seconds, peak = r.timed(args.steps)
                times[r.name].append(seconds)
                peaks[r.name] = max(peaks[r.name], peak)
        for r in runners:
            step = statistics.median(times[r.name])
            results["runs"].append({"model": r.name, "compile": compiled, "step_ms": 1e3 * step,
                                    "images_per_sec": args.batch / step, "peak_mem_gib": peaks[r.name] / 2**30,
                                    "round_step_ms": [1e3 * t for t in times[r.name]]})
        if args.profile:  # the first KAT/ViT pair that was timed (small, when sizes are the defaults)
            pair = next((p for size, p in PAIRS.items() if set(p) <= set(names) and size == "small"),
                        next((p for p in PAIRS.values() if set(p) <= set(names)), ()))
            for r in runners:
                if r.name in pair:
                    results.setdefault("profile", {})[f"{r.name} compile={compiled}"] = profile_step(r, 15)
        del runners
        torch.cuda.empty_cache()

    print_table(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "absent"


def print_table(results: dict):
    print(f"\n{results['device']}  torch {results['torch']}  triton {results['triton']}  timm {results['timm']}  "
          f"batch {results['batch']}  img {results['img_size']}")
    runs = {(r["model"], r["compile"]): r for r in results["runs"]}
    print(f"{'model':24s} {'compile':>15s} {'step ms':>8s} {'img/s':>8s} {'peak GiB':>9s} {'vs ViT img/s':>12s} {'vs ViT mem':>10s}")
    for (name, compiled), r in runs.items():
        vit = runs.get((PAIRS[size_of(name)][1], compiled))
        ratio = f"{r['images_per_sec'] / vit['images_per_sec']:.3f}" if vit and vit is not r else ""
        mem = f"{r['peak_mem_gib'] / vit['peak_mem_gib']:.3f}" if vit and vit is not r else ""
        print(f"{name:24s} {compiled or 'eager':>15s} {r['step_ms']:8.2f} {r['images_per_sec']:8.0f} "
              f"{r['peak_mem_gib']:9.2f} {ratio:>12s} {mem:>10s}")
    for key, prof in results.get("profile", {}).items():
        print(f"\nprofile {key}: {prof['total_ms']:.2f} ms of kernels ({prof['kernels_launched']} launched), "
              f"{prof['host_ms']:.2f} ms to issue the step")
        for cat, ms in prof["by_category_ms"].items():
            print(f"  {cat:28s} {ms:8.2f} ms")


if __name__ == "__main__":
    main()
