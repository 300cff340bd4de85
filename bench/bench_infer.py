"""Inference speed of KAT against the ViT of its size: throughput at a large batch, latency at batch 1.

Forward passes only, under torch.no_grad and bf16 autocast (as `eval.py --amp bf16` runs), on synthetic
images already on the device; eager and torch.compile (one static-shape graph per batch size). Throughput is
images/s over `--steps` back-to-back batches of `--batch`; latency is the median of `--steps` single-image
forwards, each timed with CUDA events after `--warmup` untimed ones (wall clock on a CPU).

    python bench/bench_infer.py --json $OUT/infer.json                  # T/S/B, batch 256, eager + compile
    python bench/bench_infer.py --device cpu --sizes tiny --img_size 32 --batch 4 --steps 2 --modes eager
"""

import argparse
import json
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kat  # noqa: E402  (registers the KAT models)

PAIRS = {
    "tiny": ("kat_tiny", "vit_tiny_patch16_224"),
    "small": ("kat_small", "vit_small_patch16_224"),
    "base": ("kat_base", "vit_base_patch16_224"),
}


def elapsed_ms(fn, calls: int, device: torch.device) -> float:
    """Milliseconds for `calls` back-to-back calls of fn, on the device's clock."""
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return 1e3 * (time.perf_counter() - start)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def bench_model(name: str, compiled: bool, args, device: torch.device) -> dict:
    model = timm.create_model(name, img_size=args.img_size, num_classes=1000).to(device).eval()
    forward = torch.compile(model, dynamic=False) if compiled else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
    batches = {b: torch.randn(b, 3, args.img_size, args.img_size, device=device) for b in (args.batch, 1)}

    def run(batch: int) -> torch.Tensor:
        with torch.no_grad(), autocast:
            return forward(batches[batch])

    result = {"model": name, "mode": "compile" if compiled else "eager"}
    for batch in batches:
        elapsed_ms(partial(run, batch), args.warmup, device)  # compilation, autotuning, allocator warm-up
        if not torch.isfinite(run(batch)).all():
            raise RuntimeError(f"{name} ({result['mode']}): non-finite logits at batch {batch}")
    ms = elapsed_ms(partial(run, args.batch), args.steps, device)
    result["images_per_sec"] = args.batch * args.steps / (ms / 1e3)
    result["latency_ms"] = statistics.median(
        elapsed_ms(partial(run, 1), 1, device) for _ in range(args.steps)
    )
    return result


def print_table(rows: list[dict], batch: int) -> None:
    print(
        f"\n| model | mode | img/s at batch {batch} | batch-1 latency (ms) | KAT/ViT img/s | KAT/ViT latency |"
    )
    print("|---|---|---|---|---|---|")
    by_key = {(r["model"], r["mode"]): r for r in rows}
    for r in rows:
        kat_vit = ("", "")
        for kat_name, vit_name in PAIRS.values():
            vit = by_key.get((vit_name, r["mode"]))
            if r["model"] == kat_name and vit:
                kat_vit = (
                    f"{r['images_per_sec'] / vit['images_per_sec']:.2f}",
                    f"{r['latency_ms'] / vit['latency_ms']:.2f}",
                )
        print(
            f"| {r['model']} | {r['mode']} | {r['images_per_sec']:,.0f} | {r['latency_ms']:.2f} | "
            f"{kat_vit[0]} | {kat_vit[1]} |"
        )


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="tiny,small,base", help="comma list of tiny,small,base")
    p.add_argument("--modes", default="eager,compile", help="comma list of eager,compile")
    p.add_argument("--batch", type=int, default=256, help="batch size of the throughput runs")
    p.add_argument("--img_size", type=int, default=224)
    p.add_argument(
        "--steps", type=int, default=50, help="timed batches (throughput) and timed calls (latency)"
    )
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--no_bf16", dest="bf16", action="store_false", help="fp32 instead of bf16 autocast")
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_infer.py: no CUDA device found (pass --device cpu for a trial run)")
    unknown = set(args.sizes.split(",")) - set(PAIRS) or set(args.modes.split(",")) - {"eager", "compile"}
    if unknown:
        sys.exit(f"bench_infer.py: unknown --sizes/--modes entries {sorted(unknown)}")

    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "kat": kat.__version__,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
        **{k: getattr(args, k) for k in ("batch", "img_size", "steps", "warmup", "bf16")},
    }
    print(" | ".join(f"{k}: {v}" for k, v in info.items()), flush=True)
    rows = []
    for size in args.sizes.split(","):
        for mode in args.modes.split(","):
            for name in PAIRS[size]:
                rows.append(bench_model(name, mode == "compile", args, device))
                print(json.dumps(rows[-1]), flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    print_table(rows, args.batch)
    results = {"info": info, "runs": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    main()
