"""Data-parallel scaling: DDP images/s on N GPUs against one GPU, both timed in the same processes.

Each timed step is what train.py does per optimizer step: forward under bf16 autocast, backward and a timm
AdamW update, on a fixed synthetic batch already on the device (the data loader is out of the picture).
Per timm name, two models from the same seed: a plain model on rank 0 alone (no DDP: what one GPU trains
without any distribution, the baseline) and a DDP model over all N ranks (bucketed gradient all-reduce over
NCCL, overlapped with the backward pass). Scaling efficiency = DDP images/s / (N x baseline images/s).

Why one launch with the two interleaved: in eager mode these steps are bound by the host's kernel-launch
rate, and the host's speed drifted by up to 38% between two torchrun launches (1 process, then 2), which
made the "efficiencies" of separate launches range from 0.84 to 1.49. Here baseline rounds (rank 0 trains
alone while the other ranks wait idle in a CPU barrier) and DDP rounds (all ranks) alternate `--rounds`
times in the same processes; the medians are compared, and min/max over the rounds show the drift left.
A DDP round's total is world x batch / the slowest rank's step time, the pace the all-reduce sets for all.
Step times come from CUDA events on each rank; warm-up steps (and so compilation) are never timed.

Before timing, each rank checks that the GR-KAN ops (group_rational and the fused layer_norm_rational,
forward and backward) give the float64 torch reference's results on its own device cuda:LOCAL_RANK, also
while another device is current: no kernel may assume cuda:0.

    torchrun --standalone --nproc_per_node 2 bench/bench_ddp.py --json $OUT/ddp.json
    torchrun --standalone --nproc_per_node 2 bench/bench_ddp.py --compile_mode reduce-overhead --json ...

`--compile_mode` compiles both models with torch.compile(mode=...), the DDP one as torch.compile(ddp_model),
the supported order (graphs are split at DDP's bucket boundaries so the all-reduce still overlaps).

NVLink multicast (NVLS) must stay off: NCCL_NVLS_ENABLE=0 is set here unless the environment already says
otherwise; on shared hosts NVLS has put GPUs out of service. `--cpu` runs the same code over gloo on CPU
processes: a smoke test of the script (tiny shapes), not a benchmark.
"""

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
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

DROP_PATH = 0.1  # the recipe's for S (configs/kat_s.yaml, docs/MODELS.md); also for ViT, as in bench_train.py
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # norm-wise relative error against float64
COMPILE_MODES = ["none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


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


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


class Runner:
    """A model (plain, or DDP over all ranks), its optimizer and a fixed synthetic batch, warmed up.

    `resident` is what the model keeps allocated between steps (weights, optimizer state, DDP buckets,
    CUDA-graph pools), so that a round's peak can be told apart from the other model living on the device.
    """

    def __init__(self, name, batch, img_size, device, rank, ddp: dict | None, compile_mode: str | None, warmup):
        self.name, self.device, self.compiled = name, device, compile_mode is not None
        before = allocated(device)
        torch.manual_seed(0)  # the same initial weights for both models and on every rank
        model = timm.create_model(name, num_classes=1000, img_size=img_size, drop_path_rate=DROP_PATH)
        model = model.to(device)
        self.optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
        if ddp is not None:  # DistributedDataParallel keyword arguments
            device_ids = [device.index] if device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=device_ids, **ddp)
        self.model = torch.compile(model, mode=compile_mode) if compile_mode else model
        gen = torch.Generator(device=device).manual_seed(rank)  # each rank its own data, as in training
        self.images = torch.randn(batch, 3, img_size, img_size, device=device, generator=gen)
        self.targets = torch.randint(0, 1000, (batch,), device=device, generator=gen)

        clock = time.perf_counter()
        for _ in range(warmup):  # compilation, autotuning and CUDA-graph recording happen here, untimed
            self.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.warmup_s = time.perf_counter() - clock
        self.resident = allocated(device) - before

    def step(self) -> torch.Tensor:
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()  # one new step for CUDA-graph trees (no-op otherwise)
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            logits = self.model(self.images)
        loss = F.cross_entropy(logits.float(), self.targets)
        with torch.autograd.set_multithreading_enabled(False):  # as train.py runs it (kat/training/engine.py)
            loss.backward()  # under DDP, the gradients are all-reduced here, overlapped with the backward pass
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def timed(self, steps: int) -> tuple[float, float | None]:
        """Mean ms per step over `steps` steps (CUDA events; wall clock on CPU), and this model's peak GiB."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            others = allocated(self.device) - self.resident  # the other model's, on rank 0
            torch.cuda.reset_peak_memory_stats(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        clock = time.perf_counter()
        for _ in range(steps):
            loss = self.step()
        if cuda:
            end.record()
            torch.cuda.synchronize(self.device)
            ms = start.elapsed_time(end)
            peak = (torch.cuda.max_memory_allocated(self.device) - others) / 2**30
        else:
            ms, peak = 1e3 * (time.perf_counter() - clock), None
        if not torch.isfinite(loss):
            raise RuntimeError(f"{self.name}: non-finite loss {loss.item()} during the benchmark")
        return ms / steps, peak


def gather(value) -> list:
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def ddp_options(args) -> dict:
    """DistributedDataParallel's keyword arguments from the command line (its defaults unless given)."""
    options = {"bucket_cap_mb": args.bucket_cap_mb} if args.bucket_cap_mb is not None else {}
    return options | ({"gradient_as_bucket_view": True} if args.gradient_as_bucket_view else {})


def bench_model(name: str, args, device: torch.device, host_group) -> dict:
    """Alternate timed rounds: the plain model on rank 0 alone, then DDP on all ranks; summarise on rank 0."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mode = None if args.compile_mode == "none" else args.compile_mode
    make = lambda ddp: Runner(name, args.batch, args.img_size, device, rank, ddp, mode, args.warmup)
    base = make(ddp=None) if rank == 0 else None  # the other ranks wait in the barrier below
    dist.barrier(group=host_group)
    ddp = make(ddp=ddp_options(args))
    base_rounds, ddp_rounds = [], []
    for _ in range(args.rounds):
        dist.barrier(group=host_group)  # rank 0 alone on the host and GPUs, the others idle on the CPU
        if base is not None:
            base_rounds.append(base.timed(args.steps))
        dist.barrier(group=host_group)
        ddp_rounds.append(ddp.timed(args.steps))
    peak = lambda rounds: max(p for _, p in rounds) if device.type == "cuda" and rounds else None
    per_rank = gather(
        {
            "rank": rank,
            "device": str(device),
            "ddp_step_ms": [ms for ms, _ in ddp_rounds],
            "ddp_peak_mem_gib": peak(ddp_rounds),
            "ddp_warmup_s": ddp.warmup_s,
        }
    )
    base_ms = [ms for ms, _ in base_rounds]
    base_warmup_s = base.warmup_s if base is not None else None
    del base, ddp
    if mode:
        torch._dynamo.reset()  # drop the compiled graphs (and CUDA-graph pools) before the next model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if rank != 0:
        return {}

    base_ips = [args.batch / (ms / 1e3) for ms in base_ms]
    ddp_total = [
        world * args.batch / (max(r["ddp_step_ms"][i] for r in per_rank) / 1e3) for i in range(args.rounds)
    ]
    efficiency = [total / (world * one) for total, one in zip(ddp_total, base_ips)]  # adjacent rounds
    return {
        "model": name,
        "baseline": {
            "step_ms": base_ms,
            "images_per_sec": base_ips,
            "peak_mem_gib": peak(base_rounds),
            "warmup_s": base_warmup_s,
        },
        "ddp": {"per_rank": per_rank, "total_images_per_sec": ddp_total},
        "baseline_images_per_sec": spread(base_ips),
        "ddp_total_images_per_sec": spread(ddp_total),
        "ddp_images_per_sec_per_gpu": statistics.median(ddp_total) / world,
        "scaling_efficiency": statistics.median(ddp_total) / (world * statistics.median(base_ips)),
        "scaling_efficiency_per_round": {
            "min": min(efficiency),
            "max": max(efficiency),
            "values": efficiency,
        },
    }


def worker(args) -> None:
    """One rank: check the ops on this device, time every model, rank 0 prints the table and writes JSON."""
    nvls = os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if nvls != "0":
        print(
            f"WARNING: NCCL_NVLS_ENABLE={nvls}: NVLink multicast can put shared GPUs out of service; "
            "set NCCL_NVLS_ENABLE=0",
            file=sys.stderr,
            flush=True,
        )
    if "LOCAL_RANK" not in os.environ:
        sys.exit(
            "bench_ddp.py runs under torchrun: torchrun --standalone --nproc_per_node 2 bench/bench_ddp.py"
        )
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
    timeout = timedelta(seconds=args.timeout)
    dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world < 2:
        sys.exit(
            f"bench_ddp.py needs at least 2 processes (world size {world}): the 1-GPU baseline is timed "
            "inside the same launch; use torchrun --nproc_per_node 2 (or more)"
        )
    host_group = dist.new_group(backend="gloo", timeout=timeout)  # round barriers that leave GPUs idle

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
        run = bench_model(name, args, device, host_group)
        if rank == 0:
            runs.append(run)
            print(
                f"{name}: 1 GPU {run['baseline_images_per_sec']['median']:.0f} img/s, {world} GPUs "
                f"{run['ddp_total_images_per_sec']['median']:.0f} img/s, efficiency "
                f"{run['scaling_efficiency']:.3f} (warm-up {run['baseline']['warmup_s']:.1f} s alone, "
                f"{max(r['ddp_warmup_s'] for r in run['ddp']['per_rank']):.1f} s DDP)",
                flush=True,
            )

    checks = gather(
        {"rank": rank, "device": str(device), "backend": backend_used, "max_rel_err": check, "ok": check_ok}
    )
    if rank == 0:
        print_table(runs, world, args.compile_mode)
    if rank == 0 and args.json:
        result = {
            "method": "1-GPU baseline (rank 0 alone, no DDP) and DDP rounds interleaved in one launch",
            "world_size": world,
            "backend": backend,
            "nccl_nvls_enable": os.environ["NCCL_NVLS_ENABLE"],
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "timm": timm.__version__,
            "triton": _version("triton"),
            "python": platform.python_version(),
            "command": " ".join(sys.argv),
            "compile_mode": args.compile_mode,
            "ddp_options": ddp_options(args),
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
        print(f"wrote {args.json}")
    dist.destroy_process_group()
    if not all(c["ok"] for c in checks):
        sys.exit("GR-KAN op check failed on some rank (see above)")


def print_table(runs: list[dict], world: int, compile_mode: str) -> None:
    """Medians with (min-max) over the rounds; peak memory of the baseline and of DDP on each rank."""
    rng = lambda s, fmt: f"{s['median']:{fmt}} ({s['min']:{fmt}}-{s['max']:{fmt}})"
    gib = lambda v: "-" if v is None else f"{v:.1f}"
    print(
        f"\n{'model':24s} {'compile':>15s} {'1 GPU img/s':>20s} {f'{world} GPUs img/s':>20s} "
        f"{'per GPU':>8s} {'efficiency':>20s}  peak GiB 1 GPU | DDP per rank"
    )
    for run in runs:
        per_rank = " ".join(gib(r["ddp_peak_mem_gib"]) for r in run["ddp"]["per_rank"])
        print(
            f"{run['model']:24s} {compile_mode:>15s} {rng(run['baseline_images_per_sec'], '.0f'):>20s} "
            f"{rng(run['ddp_total_images_per_sec'], '.0f'):>20s} {run['ddp_images_per_sec_per_gpu']:8.0f} "
            f"{run['scaling_efficiency']:7.3f} ({run['scaling_efficiency_per_round']['min']:.2f}-"
            f"{run['scaling_efficiency_per_round']['max']:.2f})  "
            f"{gib(run['baseline']['peak_mem_gib'])} | {per_rank}"
        )
    print("efficiency: median DDP total / (GPUs x median 1 GPU); (min-max) over adjacent round pairs")


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "absent"


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", default="kat_small,vit_small_patch16_224", help="comma list of timm names"
    )
    parser.add_argument("--batch", type=int, default=128, help="images per GPU per step")
    parser.add_argument("--img_size", type=int, default=224)
    parser.add_argument(
        "--warmup", type=int, default=10, help="untimed steps per model and kind (compilation happens here)"
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument(
        "--rounds", type=int, default=5, help="baseline/DDP round pairs per model, alternating in time"
    )
    parser.add_argument(
        "--compile_mode", default="none", choices=COMPILE_MODES, help="torch.compile mode for both models"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=600,
        help="seconds a rank waits for the others (rank 0 warms up, and compiles, its baseline alone)",
    )
    parser.add_argument(
        "--cpu", action="store_true", help="smoke-test on CPU processes over gloo (timings meaningless)"
    )
    parser.add_argument("--bucket_cap_mb", type=float, default=None, help="DDP gradient bucket size (DDP: 25)")
    parser.add_argument(
        "--gradient_as_bucket_view", action="store_true", help="DDP: gradients live in the buckets (no copy)"
    )
    parser.add_argument("--json", type=Path, default=None)
    worker(parser.parse_args(argv))


if __name__ == "__main__":
    main()
