"""Data-parallel training throughput: images/s on N GPUs against one, on synthetic data.

Each timed step is what train.py does per optimizer step on every process: forward under bf16 autocast,
backward with DDP's bucketed gradient all-reduce over NCCL, and a timm AdamW update, on a fixed per-rank
synthetic batch already on the GPU (the data loader is out of the picture). Every rank times its own steps
with CUDA events; the total is world_size x batch / the slowest rank's step, the pace DDP's all-reduce
imposes on everyone. Before timing, each rank checks that the GR-KAN ops (group_rational and the fused
layer_norm_rational, forward and backward) give the float64 torch reference's results on its own device
cuda:LOCAL_RANK, also while another device is current: no kernel may assume cuda:0.

One command runs the 1-GPU baseline, then N GPUs, and prints the scaling efficiency
(images/s on N) / (N x images/s on 1); the baseline is this script with one process (DDP over one rank):

    python bench/bench_ddp.py --launch 1,2 --json $OUT/ddp.json
    # the same by hand, one launch per process count:
    torchrun --standalone --nproc_per_node 2 bench/bench_ddp.py --json $OUT/ddp-2.json

NVLink multicast (NVLS) must stay off: NCCL_NVLS_ENABLE=0 is set here unless the environment already says
otherwise; on shared hosts NVLS has put GPUs out of service. `--cpu` runs the same code over gloo on CPU
processes: a smoke test of the script (tiny shapes), not a benchmark.
"""

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kat  # noqa: E402  (registers the KAT models)
from kat.rational import layer_norm_rational  # noqa: E402
from kat.rational.norm_rational import layer_norm_rational_reference  # noqa: E402
from kat.rational.reference import group_rational_reference  # noqa: E402

DROP_PATH = 0.1  # the recipe's for S (KAT_FACTS section 4); also for ViT, as in bench_train.py
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # norm-wise relative error against float64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check_ops_on(device: torch.device) -> dict:
    """Worst relative error of the GR-KAN ops (forward and every gradient) on `device` against float64.

    Run with `device` current and, when this process sees another GPU, with that one current: the kernels
    must launch on their inputs' device, not on whichever is current.
    """
    currents = [device]
    if device.type == "cuda" and torch.cuda.device_count() > 1:
        currents.append(torch.device("cuda", (device.index + 1) % torch.cuda.device_count()))
    gen = torch.Generator(device=device).manual_seed(1234)
    c, groups = 64, 8
    x = torch.randn(4, 50, c, device=device, generator=gen) * 2
    x.view(-1)[:4] = torch.tensor([0.0, -1e-3, 30.0, -30.0])  # edge values: zero, tiny, large
    weight = 1 + 0.1 * torch.randn(c, device=device, generator=gen)
    bias = 0.1 * torch.randn(c, device=device, generator=gen)
    numerator = torch.randn(1, 6, device=device, generator=gen) * 0.5
    denominator = torch.randn(groups, 4, device=device, generator=gen) * 0.5
    grad_out = torch.randn(x.shape, device=device, generator=gen)

    def run(fn, inputs, dtype):
        leaves = [t.detach().to(dtype if i == 0 else t.dtype).requires_grad_() for i, t in enumerate(inputs)]
        out = fn(*leaves)
        out.backward(grad_out.to(out.dtype))
        return [out, *(t.grad for t in leaves)]

    def in_float64(reference):
        return lambda *t: reference(*[u.double() for u in t])

    backend = (
        "triton" if device.type == "cuda" else None
    )  # on GPUs, the kernels whatever the environment says
    worst = {}
    for name, fast, reference, inputs in [
        (
            "group_rational",
            lambda x, n, d: kat.rational.group_rational(x, n, d, backend=backend),
            group_rational_reference,
            (x, numerator, denominator),
        ),
        (
            "layer_norm_rational",
            lambda x, w, b, n, d: layer_norm_rational(x, w, b, 1e-6, n, d, backend=backend),
            lambda x, w, b, n, d: layer_norm_rational_reference(x, w, b, 1e-6, n, d),
            (x, weight, bias, numerator, denominator),
        ),
    ]:
        expected = run(in_float64(reference), inputs, torch.float32)
        for dtype in CHECK_TOLERANCE:
            for current in currents:
                with torch.cuda.device(current) if current.type == "cuda" else contextlib.nullcontext():
                    got = run(fast, inputs, dtype)
                if any(g.device != device for g in got):
                    raise RuntimeError(f"{name} on {device} returned tensors on {[g.device for g in got]}")
                err = max(rel_err(g, e) for g, e in zip(got, expected))
                key = f"{name} {str(dtype).removeprefix('torch.')}"
                worst[key] = max(worst.get(key, 0.0), err)
    return worst


class Runner:
    """One DDP-wrapped model, its optimizer and a fixed synthetic batch for this rank."""

    def __init__(self, name: str, batch: int, img_size: int, device: torch.device, rank: int):
        self.name, self.device = name, device
        torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
        model = timm.create_model(name, num_classes=1000, img_size=img_size, drop_path_rate=DROP_PATH)
        model = model.to(device)
        device_ids = [device.index] if device.type == "cuda" else None
        self.model = DistributedDataParallel(model, device_ids=device_ids)
        self.optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
        gen = torch.Generator(device=device).manual_seed(rank)  # each rank its own data, as in training
        self.images = torch.randn(batch, 3, img_size, img_size, device=device, generator=gen)
        self.targets = torch.randint(0, 1000, (batch,), device=device, generator=gen)

    def step(self) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            logits = self.model(self.images)
        loss = F.cross_entropy(logits.float(), self.targets)
        loss.backward()  # DDP all-reduces the gradients here, overlapped with the backward pass
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def timed(self, steps: int) -> float:
        """Mean seconds per step on this rank over `steps` steps (CUDA events; wall clock on CPU)."""
        cuda = self.device.type == "cuda"
        dist.barrier()  # all ranks start together
        if cuda:
            torch.cuda.synchronize(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        clock = time.perf_counter()
        for _ in range(steps):
            loss = self.step()
        if cuda:
            end.record()
            torch.cuda.synchronize(self.device)
            seconds = start.elapsed_time(end) / 1e3
        else:
            seconds = time.perf_counter() - clock
        if not torch.isfinite(loss):
            raise RuntimeError(f"{self.name}: non-finite loss {loss.item()} during the benchmark")
        return seconds / steps


def gather(value) -> list:
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def worker(args) -> None:
    """One rank of a torchrun launch: check the ops on this device, time every model, rank 0 writes JSON."""
    nvls = os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if nvls != "0":
        print(
            f"WARNING: NCCL_NVLS_ENABLE={nvls}: NVLink multicast can put shared GPUs out of service; "
            "set NCCL_NVLS_ENABLE=0",
            file=sys.stderr,
            flush=True,
        )
    if "LOCAL_RANK" not in os.environ:
        sys.exit("bench_ddp.py runs under torchrun (or use --launch 1,2 to have it start torchrun itself)")
    local_rank = int(os.environ["LOCAL_RANK"])
    if args.cpu:
        device, backend = torch.device("cpu"), "gloo"
    elif torch.cuda.is_available():
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        sys.exit("bench_ddp.py times GPU training steps: no CUDA device found (--cpu for a smoke test)")
    dist.init_process_group(
        backend, timeout=timedelta(seconds=120), device_id=device if device.type == "cuda" else None
    )
    rank, world = dist.get_rank(), dist.get_world_size()

    check = check_ops_on(device)
    check_ok = all(err <= CHECK_TOLERANCE[getattr(torch, key.split()[1])] for key, err in check.items())
    backend_used = kat.rational.active_backend(torch.empty(1, 8, device=device))
    print(
        f"rank {rank} on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}):"
        f" GR-KAN {backend_used} vs float64 reference: "
        + ", ".join(f"{k} {v:.1e}" for k, v in check.items())
        + (" OK" if check_ok else " FAILED"),
        flush=True,
    )

    runs = []
    for name in args.models.split(","):
        runner = Runner(name, args.batch, args.img_size, device, rank)
        clock = time.perf_counter()
        for _ in range(args.warmup):
            runner.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        warm_s = time.perf_counter() - clock
        step_s = [runner.timed(args.steps) for _ in range(args.rounds)]
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        per_rank = gather(
            {"rank": rank, "device": str(device), "step_ms": [1e3 * s for s in step_s], "peak_mem_gib": peak}
        )
        slowest = max(min(r["step_ms"]) for r in per_rank) / 1e3  # each rank's best round, then the slowest
        run = {
            "model": name,
            "warmup_s": warm_s,
            "per_rank": per_rank,
            "per_gpu_images_per_sec": [args.batch / (min(r["step_ms"]) / 1e3) for r in per_rank],
            "total_images_per_sec": world * args.batch / slowest,
        }
        runs.append(run)
        if rank == 0:
            print(
                f"{name:24s} world {world}: {run['total_images_per_sec']:8.0f} img/s total, per GPU "
                + " ".join(f"{v:.0f}" for v in run["per_gpu_images_per_sec"])
                + f" (step {1e3 * slowest:.1f} ms, warm-up {warm_s:.1f} s)",
                flush=True,
            )
        del runner
        if device.type == "cuda":
            torch.cuda.empty_cache()

    checks = gather(
        {"rank": rank, "device": str(device), "backend": backend_used, "max_rel_err": check, "ok": check_ok}
    )
    if rank == 0 and args.json:
        result = {
            "world_size": world,
            "backend": backend,
            "nccl_nvls_enable": os.environ["NCCL_NVLS_ENABLE"],
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "timm": timm.__version__,
            "triton": _version("triton"),
            "python": platform.python_version(),
            "command": " ".join(sys.argv),
            "batch_per_gpu": args.batch,
            "img_size": args.img_size,
            "warmup": args.warmup,
            "steps": args.steps,
            "rounds": args.rounds,
            "op_checks": checks,
            "runs": runs,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    dist.destroy_process_group()
    if not all(c["ok"] for c in checks):
        sys.exit("GR-KAN op check failed on some rank (see above)")


def run_torchrun(command: list[str], env: dict, timeout: float) -> int | str:
    """torchrun's exit status, or why it gave none; it and every rank it started are stopped on the way out."""
    # A session of its own, so that one signal to the group reaches torchrun and all its ranks.
    proc = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"no result after {timeout} s (--launch_timeout)"
    finally:  # also on SIGTERM (e.g. `timeout 170 python bench/bench_ddp.py ...`): no orphaned ranks on the GPUs
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def scaling(results: dict) -> list[dict]:
    """Per model and process count: total and per-GPU images/s, efficiency against the 1-process launch."""
    rows = []
    for i, run in enumerate(results.get(1, {}).get("runs", [])):
        base = run["total_images_per_sec"]
        for n, result in results.items():
            total = result["runs"][i]["total_images_per_sec"]
            rows.append(
                {
                    "model": run["model"],
                    "gpus": n,
                    "total_images_per_sec": total,
                    "images_per_sec_per_gpu": total / n,
                    "scaling_efficiency": total / (n * base),
                }
            )
    return rows


def launch(args, argv: list[str]) -> None:
    """Run torchrun once per process count, then report scaling efficiency against the first (1 GPU)."""
    counts = [int(n) for n in args.launch.split(",")]
    if counts[0] != 1:
        sys.exit(f"--launch {args.launch}: the first count must be 1 (the baseline for scaling efficiency)")
    if not args.cpu and torch.cuda.device_count() < max(counts):
        sys.exit(
            f"--launch {args.launch} needs {max(counts)} GPUs, this host has {torch.cuda.device_count()}"
        )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench_ddp.py: terminated"))
    passed = _without_option(argv, ["--launch", "--json", "--launch_timeout"])
    env = {**os.environ, "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE", "0")}
    results, failures = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            out = Path(tmp) / f"ddp-{n}.json"
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                str(n),
                __file__,
                *passed,
                "--json",
                str(out),
            ]
            print(f"\n$ {' '.join(command)}", flush=True)
            rc = run_torchrun(command, env, args.launch_timeout)
            if rc != 0:
                failures.append(f"{n} processes: {rc if isinstance(rc, str) else f'exit status {rc}'}")
            if out.exists():  # written even when an op check failed: the timings still count
                results[n] = json.loads(out.read_text())
            if args.json:  # after every launch: what was measured survives a later failure
                args.json.parent.mkdir(parents=True, exist_ok=True)
                report = {"summary": scaling(results), "failures": failures, "launches": results}
                args.json.write_text(json.dumps(report, indent=2))

    print(f"\n{'model':24s} {'GPUs':>4s} {'total img/s':>12s} {'img/s per GPU':>14s} {'efficiency':>10s}")
    for row in scaling(results):
        print(
            f"{row['model']:24s} {row['gpus']:4d} {row['total_images_per_sec']:12.0f} "
            f"{row['images_per_sec_per_gpu']:14.0f} {row['scaling_efficiency']:10.3f}"
        )
    if args.json:
        print(f"wrote {args.json}")
    if failures:
        sys.exit("failed: " + "; ".join(failures))


def _without_option(argv: list[str], names: list[str]) -> list[str]:
    """argv minus the given options and their values (`--name value` or `--name=value`)."""
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item in names:
            skip = True
        elif not any(item.startswith(n + "=") for n in names):
            kept.append(item)
    return kept


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "absent"


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", default="kat_small,vit_small_patch16_224", help="comma list of timm names"
    )
    parser.add_argument("--batch", type=int, default=128, help="images per GPU per step")
    parser.add_argument("--img_size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per model (kernel compilation)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=1, help="timed rounds per model; the best round counts")
    parser.add_argument(
        "--cpu", action="store_true", help="smoke-test on CPU processes over gloo (no timing)"
    )
    parser.add_argument(
        "--launch",
        default=None,
        help="comma list of process counts, e.g. 1,2: start torchrun for each, report scaling",
    )
    parser.add_argument("--launch_timeout", type=float, default=120, help="seconds per torchrun launch")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.launch:
        launch(args, argv)
    else:
        worker(args)


if __name__ == "__main__":
    main()
