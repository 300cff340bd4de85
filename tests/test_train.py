"""train.py end to end on CPU: the demo config through the real pipeline, resume, DDP over gloo, bad data.

Tiny models (1 block of width 32) and small copies of the committed demo digits keep this to about a minute
on 2 cores. Most runs call train() in-process (no interpreter start-up); the two that test the command lines
users type (`python train.py`, `accelerate launch`) run them as subprocesses.
"""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import train as train_script
from kat.training.checkpoint import read_checkpoint, resolve_checkpoint
from kat.training.config import parse_config
from kat.training.engine import train

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"


def cli(text: str) -> list[str]:
    return text.split()


TINY = cli("--model_kwargs.depth 1 --model_kwargs.embed_dim 32 --model_kwargs.num_heads 2")
QUIET = cli("--wandb_mode disabled --plot_rationals false --workers 0")


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


@pytest.fixture(scope="module")
def digits(demo_digits) -> Path:
    """160 train / 101 val demo digits."""
    return demo_digits(train=16, val=10)


def env(tmp_path: Path) -> dict:
    return {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
    }


def test_demo_config_with_python_train_py(tmp_path):
    """The README command shape, shortened: checkpoints, metrics.jsonl, W&B offline run, plots, summary line."""
    argv = [sys.executable, "train.py", *cli(f"--config demo.yaml --output_dir {tmp_path} --max_steps 4")]
    argv += cli("--checkpoint_interval 2 --keep_checkpoints 1 --wandb_mode offline") + TINY
    result = subprocess.run(argv, cwd=REPO, env=env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Training finished: val top-1" in result.stdout and "chance 10.0%" in result.stdout
    assert "GR-KAN backend: torch" in result.stderr

    run_dir = tmp_path / "demo"
    steps = records(run_dir, "step")
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert {
            "step",
            "epoch",
            "loss",
            "lr",
            "grad_norm",
            "images_per_sec",
            "step_time",
            "data_time",
        } <= set(r)
        assert r["images_per_sec"] > 0 and r["step_time"] >= r["data_time"] >= 0
    (final,) = records(run_dir, "eval")
    assert (
        final["step"] == 4 and final["val"]["num_images"] == 1000 and final["val_ema"]["num_images"] == 1000
    )
    assert records(run_dir, "run")[0]["rational_backend"] == "torch"
    # The same records as CSV: one row per record, the same numbers (peak_memory_gb is empty on a CPU).
    with open(run_dir / "steps.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4] and rows[0]["peak_memory_gb"] == ""
    assert [float(r["loss"]) for r in rows] == [r["loss"] for r in steps]
    with open(run_dir / "evals.csv", newline="") as f:
        (row,) = csv.DictReader(f)
    assert float(row["val_top1"]) == final["val"]["top1"] and int(row["val_ema_num_images"]) == 1000

    assert parse_config(["--config", str(run_dir / "config.yaml")]).max_steps == 4
    # keep_checkpoints 1: step-2 was pruned after step-4 was complete; latest and best name step-4.
    assert sorted(p.name for p in run_dir.glob("step-*")) == ["step-00000004"]
    assert (
        (run_dir / "latest").read_text().strip() == (run_dir / "best").read_text().strip() == "step-00000004"
    )
    checkpoint = resolve_checkpoint(run_dir)
    state_dict, meta = read_checkpoint(run_dir)
    ema_state, _ = read_checkpoint(checkpoint, ema=True)
    assert meta["format"] == "kat-checkpoint/1" and meta["model"] == "kat_tiny" and meta["step"] == 4
    assert meta["class_names"] == [str(i) for i in range(10)] and meta["num_classes"] == 10
    assert meta["data_config"]["input_size"] == [3, 28, 28] and meta["model_kwargs"]["depth"] == 1
    assert meta["metrics"]["val"]["top1"] == final["val"]["top1"]
    assert "blocks.0.mlp.act1.weight_denominator" in state_dict and set(ema_state) == set(state_dict)
    assert all(v.dtype == torch.float32 for v in state_dict.values())
    state = torch.load(checkpoint / "training_state.pt", weights_only=True)
    assert state["step"] == 4 and state["epoch"] == 0 and state["samples_in_epoch"] == 4 * 64

    assert list(run_dir.glob("plots/rationals-step-00000004.png"))
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert list(run_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))


@pytest.fixture(scope="module")
def jpeg_digits(digits, tmp_path_factory) -> Path:
    """The digits with every other train image re-encoded as JPEG (device_augment decodes those on the device;
    the worker decodes the PNGs)."""
    root = tmp_path_factory.mktemp("jpeg_digits")
    shutil.copytree(digits, root, dirs_exist_ok=True)
    for path in sorted((root / "train").rglob("*.png"))[::2]:
        Image.open(path).save(path.with_suffix(".jpg"), quality=90)
        path.unlink()
    return root


@pytest.mark.parametrize("device_augment", [False, True])
def test_resumed_run_continues_exactly(tmp_path, digits, jpeg_digits, device_augment):
    """Stop at step 3 (mid-epoch) and rerun the same command: identical to one uninterrupted run.

    With the ImageNet recipe's random pieces on (RandAugment, flips, random erasing, Mixup/CutMix), so the
    restored python/numpy/torch RNG states and the data position all have to be right; also with the
    augmentation on the device, whose random draws the dataset makes.
    """
    data = jpeg_digits if device_augment else digits
    common = cli(f"--config demo --data_dir {data} --output_dir {tmp_path} --batch_size 16 --epochs 2")
    recipe = cli("--aa rand-m9-mstd0.5 --hflip 0.5 --reprob 0.25 --mixup 0.8 --cutmix 1.0")
    recipe += cli(f"--device_augment {str(device_augment).lower()}")

    def run(name, max_steps):
        argv = [*common, "--run_name", name, "--max_steps", str(max_steps), "--checkpoint_interval", "3"]
        return train(parse_config(argv + TINY + QUIET + recipe))

    straight = run("straight", 6)
    run("resumed", 3)
    resumed = run("resumed", 6)  # the same command with more steps picks up step-00000003

    a, b = tmp_path / "straight", tmp_path / "resumed"
    assert [r["step"] for r in records(b, "step")] == [1, 2, 3, 4, 5, 6]
    assert records(b, "run")[1]["resumed_from"].endswith("step-00000003")
    assert [r["loss"] for r in records(a, "step")] == [r["loss"] for r in records(b, "step")]
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = load_file(a / "step-00000006" / name), load_file(b / "step-00000006" / name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    assert straight["val"] == {**resumed["val"], "images_per_sec": straight["val"]["images_per_sec"]}

    # Nothing left to do: the rerun says so and returns the checkpoint's metrics.
    again = run("resumed", 6)
    assert again["val"]["top1"] == resumed["val"]["top1"]
    assert len(records(b, "step")) == 6
    with open(b / "steps.csv", newline="") as f:  # one header, the resumed rows appended
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4, 5, 6]
    # --resume none never touches an existing run.
    assert train_script.main([*common, "--run_name", "resumed", "--resume", "none", *TINY, *QUIET]) == 2


def test_loss_falls_on_a_fixed_tiny_set(tmp_path, digits):
    """20 digits, no augmentation, full batch: a working loop memorises them."""
    tiny = tmp_path / "tiny"
    for split, per_class in (("train", 2), ("val", 1)):
        for c in range(10):
            (tiny / split / str(c)).mkdir(parents=True)
            for f in sorted((digits / "train" / str(c)).glob("*.png"))[:per_class]:
                shutil.copy(f, tiny / split / str(c) / f.name)
    argv = cli(
        f"--config demo --data_dir {tiny} --output_dir {tmp_path} --batch_size 20 --epochs 40 --scale [1,1] "
        "--ratio [1,1] --smoothing 0 --lr 3e-3 --warmup_epochs 0 --model_ema false --checkpoint_interval null"
    )
    argv += TINY + QUIET
    result = train(parse_config(argv))
    losses = [r["loss"] for r in records(tmp_path / "demo", "step")]
    assert len(losses) == 40
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert first > 2.0 and last < 0.5 * first, losses
    assert result["val"]["top1"] > 10  # val digits are the first training digit of each class


def test_accelerate_launch_two_cpu_processes(tmp_path, digits):
    """DDP over gloo: global images/s, an exact evaluation over 101 images, per-process RNG in checkpoints."""
    # accelerate's own --cpu flag means one process (or mpirun); its torchrun launcher (--multi_gpu) plus our
    # `--cpu true` gives 2 CPU processes over gloo.
    launcher = "accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no"
    launcher += " --dynamo_backend no --main_process_port 29517"
    argv = cli(launcher) + [
        "train.py",
        *cli(f"--config demo --cpu true --data_dir {digits} --output_dir {tmp_path}"),
    ]
    argv += cli("--batch_size 16 --max_steps 3") + TINY + QUIET
    result = subprocess.run(argv, cwd=REPO, env=env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "demo"
    assert [r["step"] for r in records(run_dir, "step")] == [1, 2, 3]  # one writer, not two
    (run_record,) = records(run_dir, "run")
    assert run_record["num_processes"] == 2 and run_record["global_batch_size"] == 32
    (final,) = records(run_dir, "eval")
    assert final["val"]["num_images"] == final["val_ema"]["num_images"] == 101
    state = torch.load(run_dir / "step-00000003" / "training_state.pt", weights_only=True)
    assert len(state["rng"]) == 2 and state["samples_in_epoch"] == 3 * 32
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])


def test_bad_data_is_a_clear_error(tmp_path, capsys):
    shutil.copytree(DEMO / "train" / "0", tmp_path / "data" / "train" / "0")
    argv = ["--config", "demo", "--data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path), *QUIET]
    assert train_script.main(argv) == 2
    assert f"'{tmp_path / 'data' / 'val'}' is missing" in capsys.readouterr().err
