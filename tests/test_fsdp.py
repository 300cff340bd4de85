"""FSDP2 pieces of training (kat/training/fsdp.py) on CPU processes over gloo.

Accelerate turns FSDP on for GPUs only, so here the tiny KAT is sharded by fully_shard directly, the way
Accelerate does it (one unit per block, then the root). Two processes train it with per-process batches; one
unsharded reference copy trains on both batches at once, which gives the same gradients (the mean over the
union of two equal halves). Checked: weights and EMA (sharded like the model) follow the reference; a checkpoint
written by both processes (optimizer shards through DCP, full weights by rank 0) is complete, and a model
restored from it, in the same 2 processes and in 1 process (DCP reshards), continues exactly; `unsharded`
exposes the full rational coefficients. About 20 s.
"""

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOL = dict(rtol=1e-5, atol=1e-6)


def tiny_kat():
    import timm

    import kat  # noqa: F401

    return timm.create_model(
        "kat_tiny", img_size=16, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=5, drop_path_rate=0
    )


def shard(model):
    """As Accelerate's FSDP2 prepare does for us: each block a unit, then the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    for block in model.blocks:
        fully_shard(block, mp_policy=MixedPrecisionPolicy())
    fully_shard(model, mp_policy=MixedPrecisionPolicy())


def adamw(model):
    """A large eps: the key bias gets only rounding-noise gradients (softmax ignores a shift), which Adam with a
    small eps would blow up into lr-sized steps that differ between any two summation orders."""
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(model, "adamw", lr=1e-2, weight_decay=0.05, layer_decay=0.8, eps=1e-3)


def batch(rank: int):
    import torch

    gen = torch.Generator().manual_seed(100 + rank)
    return torch.randn(3, 3, 16, 16, generator=gen), torch.randint(0, 5, (3,), generator=gen)


def train_step(model, optimizer, images, targets):
    import torch.nn.functional as F

    F.cross_entropy(model(images), targets).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def worker(out: Path, mode: str) -> None:
    """Run by torchrun: `save` (2 processes) trains and checkpoints; `resume` (1 or 2) continues from it."""
    import torch
    import torch.distributed as dist
    from timm.utils import ModelEmaV3

    from kat.training.checkpoint import (
        OPTIMIZER_SHARDS,
        begin_checkpoint,
        checkpoint_tmp_dir,
        list_checkpoints,
        read_checkpoint,
        save_checkpoint,
    )
    from kat.training.fsdp import (
        full_state_dict,
        load_full_state_dict,
        load_optimizer_shards,
        save_optimizer_shards,
        shard_like,
        unsharded,
    )

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = tiny_kat()
    report = {}
    if mode == "save":
        reference = copy.deepcopy(model)
        ema, reference_ema = ModelEmaV3(model, decay=0.5), ModelEmaV3(reference, decay=0.5)
        shard(model)
        shard_like(ema.module, model)
        optimizer, reference_optimizer = adamw(model), adamw(reference)
        for step in (1, 2):
            train_step(model, optimizer, *batch(rank))
            both = [batch(r) for r in range(world)]
            train_step(
                reference,
                reference_optimizer,
                torch.cat([b[0] for b in both]),
                torch.cat([b[1] for b in both]),
            )
            ema.update(model, step=step)
            reference_ema.update(reference, step=step)

        weights, ema_weights = full_state_dict(model), full_state_dict(ema.module)  # collective
        if rank == 0:
            expected, expected_ema = reference.state_dict(), reference_ema.module.state_dict()
            report["weights_match"] = all(torch.allclose(weights[k], v, **TOL) for k, v in expected.items())
            report["ema_match"] = all(torch.allclose(ema_weights[k], v, **TOL) for k, v in expected_ema.items())
            report["same_keys"] = sorted(weights) == sorted(expected)
        else:
            report["empty_off_rank0"] = weights == {} and ema_weights == {}
        name = "blocks.1.mlp.act2.weight_denominator"
        with unsharded(model):
            coefficients = dict(model.named_parameters())[name]
            report["unsharded_full"] = (
                not hasattr(coefficients, "device_mesh")
                and coefficients.shape == reference.get_parameter(name).shape
                and torch.allclose(coefficients, reference.get_parameter(name), **TOL)
            )
        report["resharded"] = hasattr(dict(model.named_parameters())[name], "device_mesh")

        run_dir = out / "run"
        if rank == 0:
            begin_checkpoint(run_dir, 2)
        dist.barrier()
        tmp = checkpoint_tmp_dir(run_dir, 2)
        save_optimizer_shards(model, optimizer, tmp / OPTIMIZER_SHARDS)
        if rank == 0:
            save_checkpoint(
                run_dir,
                2,
                model_state=weights,
                ema_state=ema_weights,
                training_state={"step": 2},
                meta={"model": "tiny", "model_kwargs": {}, "num_classes": 5},  # what read_checkpoint requires
                keep=2,
                is_best=False,
                tmp=tmp,
            )
        dist.barrier()
        train_step(model, optimizer, *batch(rank))  # the step a resumed run must reproduce
        after = full_state_dict(model)
        if rank == 0:
            torch.save(after, out / "after-step-3.pt")
    else:
        checkpoint = list_checkpoints(out / "run")[-1]
        shard(model)
        optimizer = adamw(model)
        load_full_state_dict(model, read_checkpoint(checkpoint)[0])
        load_optimizer_shards(model, optimizer, checkpoint / OPTIMIZER_SHARDS)
        # The same data as the saving run's step 3: each of its 2 processes' batch.
        if world == 2:
            train_step(model, optimizer, *batch(rank))
        else:
            both = [batch(r) for r in range(2)]
            train_step(model, optimizer, torch.cat([b[0] for b in both]), torch.cat([b[1] for b in both]))
        after = full_state_dict(model)
        if rank == 0:
            expected = torch.load(out / "after-step-3.pt", weights_only=True)
            tol = {} if world == 2 else TOL  # one process sums the gradients in another order
            report["continues_exactly"] = all(
                torch.allclose(after[k], v, **tol) if tol else torch.equal(after[k], v)
                for k, v in expected.items()
            )
    (out / f"{mode}-{world}-rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def torchrun(out: Path, mode: str, processes: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    result = subprocess.run(
        [*command, __file__, str(out), mode], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    torchrun(out, "save", 2)
    return out


def reports(out: Path, prefix: str) -> dict:
    merged = {}
    for path in sorted(out.glob(f"{prefix}-rank*.json")):
        merged |= {f"{path.stem}:{k}": v for k, v in json.loads(path.read_text()).items()}
    return merged


def test_sharded_training_matches_unsharded_reference(saved):
    results = reports(saved, "save-2")
    assert len(results) == 8 and all(results.values()), results


def test_checkpoint_holds_one_optimizer_shard_per_process(saved):
    from kat.training.checkpoint import damaged_file, list_checkpoints

    (checkpoint,) = list_checkpoints(saved / "run")
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert meta["optimizer_shards"] is True
    assert sorted(p.name for p in (checkpoint / "optimizer").iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    assert not list((saved / "run").glob(".tmp*"))

    damaged = saved / "damaged" / checkpoint.name  # a copy whose shard index never got written
    shutil.copytree(checkpoint, damaged)
    (damaged / "optimizer" / ".metadata").unlink()
    assert damaged_file(damaged) == damaged / "optimizer"


@pytest.mark.parametrize("processes", [2, 1])
def test_resume_continues_exactly(saved, processes):
    torchrun(saved, "resume", processes)
    assert reports(saved, f"resume-{processes}") == {f"resume-{processes}-rank0:continues_exactly": True}


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2])
