"""What the operator benchmarks (bench_rational.py, bench_norm_rational.py) report alike: the run's
environment, the copy bandwidth their memory floors divide by, and the JSON file and exit status."""

import json
import platform
import sys
from pathlib import Path

import torch
import triton
from triton.testing import do_bench


def copy_bandwidth(device, rep: int) -> float:
    """Device-to-device copy bandwidth in bytes/s (1 GiB read + 1 GiB written), median over `rep` ms."""
    src = torch.empty(2**28, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=rep, return_mode="median")
    return 2 * src.numel() * 4 / (ms * 1e-3)


def environment(device, rep: int, **extra) -> tuple[dict, float]:
    """Prints the device, versions, command line and `extra`, then measures the copy bandwidth; returns these
    as the JSON file's "info" and the bandwidth in bytes/s."""
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
        **extra,
    }
    print(" | ".join(f"{k}: {v}" for k, v in info.items()))
    bandwidth = copy_bandwidth(device, rep)
    info["copy_bandwidth_GBps"] = bandwidth / 1e9
    print(f"device copy bandwidth: {bandwidth / 1e9:.0f} GB/s")
    return info, bandwidth


def finish(path: Path | None, info: dict, correctness: dict, timings: list) -> None:
    """Writes all results to `path` (if given); exits non-zero if any correctness check failed."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"info": info, "correctness": correctness, "timings": timings}, indent=1))
        print(f"\nwrote {path}")
    if not all(r["ok"] for r in correctness.values()):
        sys.exit("correctness check FAILED (see above)")
