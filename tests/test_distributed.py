"""Several processes on CPU over gloo: the multi-node launch path and data-parallel = gradient accumulation.

Two torchrun agents with --nnodes 2 on one host meet over loopback (c10d rendezvous), exactly as two machines
would (docs/DISTRIBUTED.md); each runs train.py with one process. The same run is then repeated as one
process with grad_accum_steps 2: with the random parts off (augmentation, mixup, drop path), both layouts see
the same global batch at every step (ResumableSampler deals each step's slice of the permutation round-robin,
which is the same set as the two consecutive micro-batches of one process), so the losses must agree to
float32 rounding. Tiny model and data: about 30 s on 2 cores.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kat.training.config import parse_config
from kat.training.engine import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import compare_runs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def cli(text: str) -> list[str]:
    return text.split()


BATCH = 8  # per process per micro-batch
STEPS = 3
# Deterministic data and model: whole-image crops, no flips/colour/RandAugment/erasing/mixup, no drop path; a
# large constant lr (no warmup) so that the later steps depend on the earlier updates.
DETERMINISTIC = cli(
    "--scale [1,1] --ratio [1,1] --hflip 0 --color_jitter 0 --aa null --reprob 0 --mixup 0 --cutmix 0 "
    "--drop_path 0 --lr 3e-3 --warmup_epochs 0 --lr_base_batch_size null"
)
TINY = cli("--model_kwargs.depth 1 --model_kwargs.embed_dim 32 --model_kwargs.num_heads 2")
QUIET = cli("--wandb_mode disabled --plot_rationals false --workers 0 --model_ema false")


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def digits(demo_digits) -> Path:
    """80 train / 21 val demo digits."""
    return demo_digits(train=8, val=2)


def train_args(digits: Path, output_dir: Path) -> list[str]:
    return [
        *f"--config demo --cpu true --data_dir {digits} --output_dir {output_dir}".split(),
        *f"--batch_size {BATCH} --max_steps {STEPS}".split(),
        *DETERMINISTIC,
        *TINY,
        *QUIET,
    ]


@pytest.fixture(scope="module")
def two_nodes(digits, tmp_path_factory) -> tuple[Path, list[subprocess.CompletedProcess]]:
    """train.py on two single-process "nodes" that rendezvous over 127.0.0.1, as on two machines."""
    out = tmp_path_factory.mktemp("two-nodes")
    endpoint = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    # The c10d rendezvous numbers the nodes itself (torchrun ignores --node_rank with it), so either can be
    # rank 0. The same command runs on both.
    argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1"]
    argv += ["--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "kat-test"]
    argv += ["train.py", *train_args(digits, out)]
    nodes = []
    for _ in range(2):
        nodes.append(
            subprocess.Popen(
                argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    results = []
    for node in nodes:
        try:
            stdout, stderr = node.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for n in nodes:
                n.kill()
            raise
        results.append(subprocess.CompletedProcess(node.args, node.returncode, stdout, stderr))
    return out / "demo", results


def test_two_nodes_over_loopback(two_nodes):
    run_dir, results = two_nodes
    for node_rank, result in enumerate(results):
        assert result.returncode == 0, f"node {node_rank}:\n{result.stderr[-3000:]}"
    assert all("Training finished" in r.stdout for r in results)  # accelerator.print: once per node
    assert sum("GR-KAN backend" in r.stderr for r in results) == 1  # train.py logs INFO on global rank 0 only

    assert [r["step"] for r in records(run_dir, "step")] == list(range(1, STEPS + 1))  # one writer
    (run,) = records(run_dir, "run")
    assert run["num_processes"] == 2 and run["global_batch_size"] == 2 * BATCH
    (final,) = records(run_dir, "eval")
    assert final["val"]["num_images"] == 21  # an exact count across the two nodes (21 is odd)
    assert sorted(p.name for p in run_dir.glob("step-*")) == [f"step-{STEPS:08d}"]
    state = torch.load(run_dir / f"step-{STEPS:08d}" / "training_state.pt", weights_only=True)
    assert state["samples_in_epoch"] == STEPS * 2 * BATCH and len(state["rng"]) == 2


def test_two_processes_match_gradient_accumulation(two_nodes, digits, tmp_path):
    """Same global batch by two processes or by one accumulating two micro-batches: the same losses."""
    run_dir, results = two_nodes
    assert all(r.returncode == 0 for r in results)
    train(parse_config([*train_args(digits, tmp_path), "--grad_accum_steps", "2"]))
    one = tmp_path / "demo"
    assert records(one, "run")[0]["global_batch_size"] == 2 * BATCH

    distributed = [r["loss"] for r in records(run_dir, "step")]
    accumulated = [r["loss"] for r in records(one, "step")]
    assert len(accumulated) == STEPS and distributed[0] > 2.0
    # Step 1 is the same global batch through the same initial weights; later steps also need equal updates.
    assert accumulated == pytest.approx(distributed, rel=1e-5), (distributed, accumulated)
    assert distributed[-1] != pytest.approx(distributed[0], rel=1e-3)  # the updates did change the loss

    # bench/compare_runs.py, which compares the GPU runs of docs/DISTRIBUTED.md, reads these runs the same way.
    report = compare_runs.main([str(run_dir), str(one), "--json", str(tmp_path / "compare.json")])
    row = report["runs"][str(one)]
    assert (
        row["steps_compared"] == STEPS and row["num_processes"] == 1 and row["global_batch_size"] == 2 * BATCH
    )
    assert row["max_abs_loss_diff"] == max(abs(a - b) for a, b in zip(distributed, accumulated))
    assert row["evals"][STEPS]["other"]["num_images"] == 21
    assert json.loads((tmp_path / "compare.json").read_text()) == json.loads(json.dumps(report))


def test_bench_ddp_smoke_on_cpu(tmp_path):
    """bench/bench_ddp.py's interleaved 1-process / 2-process timing runs end to end (gloo; no timing value)."""
    out = tmp_path / "ddp.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(REPO / "bench" / "bench_ddp.py"), "--cpu", "--models", "kat_tiny", "--batch", "2"]
    command += ["--img_size", "32", "--warmup", "1", "--steps", "1", "--rounds", "2", "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world_size"] == 2 and all(c["ok"] for c in report["op_checks"])
    assert [r["model"] for r in report["runs"]] == ["kat_tiny"]


# A fault on one process, a stop request on the other: both must act on the same step (the flags are all-reduced).
FAULTS = """
import math, os, signal, sys
from kat.training import engine
rank, original = int(os.environ["RANK"]), engine.Trainer.train_step
def train_step(self, batches):
    if rank == 1 and self.step + 1 == 2:  # a NaN loss on process 1 only
        loss_fn = self.parts.train_loss_fn
        self.parts.train_loss_fn = lambda output, target: loss_fn(output, target) * math.nan
        try:
            return original(self, batches)
        finally:
            self.parts.train_loss_fn = loss_fn
    if rank == 0 and self.step + 1 == 4:  # a preemption notice to process 0 only
        os.kill(os.getpid(), signal.SIGTERM)
    return original(self, batches)
engine.Trainer.train_step = train_step
import train
sys.exit(train.main(sys.argv[1:]))
"""


def test_faults_on_one_process_stop_or_skip_all(digits, tmp_path):
    """NaN on process 1 at step 2: both skip it. SIGTERM to process 0 during step 4: both save step 4 and exit
    143; rerunning the command resumes there."""
    harness = tmp_path / "faults.py"
    harness.write_text(FAULTS)
    out = tmp_path / "runs"
    args = [*train_args(digits, out), "--max_steps", "6", "--checkpoint_interval", "1", "--keep_checkpoints", "10"]
    args += ["--model_ema", "true"]  # later flags win
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    first = subprocess.run(
        [*torchrun, str(harness), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=240
    )
    assert first.returncode != 0, first.stderr[-3000:]
    assert first.stderr.count("stopped: SIGTERM received: stopped at step 4") == 2, first.stderr[-3000:]
    run_dir = out / "demo"
    assert (run_dir / "latest").read_text().strip() == "step-00000004"
    steps = records(run_dir, "step")
    assert [(r["step"], r["loss"] is None, r["skipped_steps"]) for r in steps] == [
        (1, False, 0),
        (2, True, 1),
        (3, False, 1),
        (4, False, 1),
    ]
    # Process 0's weights (the ones saved) did not move at the skipped step: it skipped too.
    step1, step2 = (load_file(run_dir / f"step-0000000{s}" / "model.safetensors") for s in (1, 2))
    assert all(torch.equal(step1[k], step2[k]) for k in step1)
    state = torch.load(run_dir / "step-00000004" / "training_state.pt", weights_only=True)
    assert state["skipped_steps"] == 1 and len(state["rng"]) == 2

    second = subprocess.run(
        [*torchrun, "train.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=240
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr and "step 4" in second.stderr
    assert [r["step"] for r in records(run_dir, "step")][-2:] == [5, 6]
