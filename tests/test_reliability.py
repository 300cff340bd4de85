"""Reliability promises, tested on the real train.py: crash-safe checkpoints and exact resume after SIGKILL,
SIGTERM/SIGINT stop cleanly with a checkpoint, the non-finite guard, and no secrets or code in run files.

The kill test runs a tiny demo training (CPU, fp32, one thread, workers 0) as a subprocess and interrupts it
several times (SIGKILL at random moments inside steps, SIGKILL inside checkpoint writes, SIGTERM, SIGINT),
rerunning the same command until it finishes; the weights and the per-step losses must be bitwise identical to
an uninterrupted run's. Kills inside checkpoint writes use no hook in our code: a small launcher (HARNESS)
wraps kat.training.checkpoint._fsync_path so the process SIGKILLs itself just before its n-th fsync, i.e.
with some files of a checkpoint written and others not, before or after the rename, or between a pointer's
temp file and its rename.
"""

import ast
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kat.training.checkpoint import checkpoint_name, list_checkpoints
from kat.training.config import parse_config
from kat.training.engine import NonFiniteError, Trainer

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"
STEPS = 40  # 2 epochs of 20 steps: epoch ends (evaluation, best pointer) and mid-epoch checkpoints
FLAGS = (
    "--config demo --cpu true --mixed_precision no --workers 0 --wandb_mode disabled --plot_rationals false "
    "--model_kwargs.depth 1 --model_kwargs.embed_dim 32 --model_kwargs.num_heads 2 "
    "--batch_size 8 --epochs 2 --checkpoint_interval 2 --keep_checkpoints 2 --hflip 0.5 --reprob 0.25"
)
ARGS = FLAGS.split()

HARNESS = """
import os, signal, sys
import kat.training.checkpoint as checkpoint
die_at, calls, fsync = int(sys.argv[1]), [0], checkpoint._fsync_path
def fsync_or_die(path):
    calls[0] += 1
    if calls[0] == die_at:
        os.kill(os.getpid(), signal.SIGKILL)
    fsync(path)
checkpoint._fsync_path = fsync_or_die
import train
sys.exit(train.main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """160 train / 50 val demo digits."""
    root = tmp_path_factory.mktemp("digits")
    for split, per_class in (("train", 16), ("val", 5)):
        for c in range(10):
            (root / split / str(c)).mkdir(parents=True)
            for f in sorted((DEMO / split / str(c)).glob("*.png"))[:per_class]:
                shutil.copy(f, root / split / str(c) / f.name)
    return root


def launch(run_dir: Path, digits: Path, die_at_fsync: int = 0) -> subprocess.Popen:
    argv = [*ARGS, "--data_dir", str(digits), "--output_dir", str(run_dir.parent), "--run_name", run_dir.name]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("WANDB_API_KEY", None)
    log = run_dir.parent / f"{run_dir.name}.stderr"
    with open(log, "w") as stderr:  # a file, not a pipe: it never fills up while we wait for steps
        process = subprocess.Popen(
            [sys.executable, "-c", HARNESS, str(die_at_fsync), *argv],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    process.log = log
    return process


def finish(process: subprocess.Popen) -> str:
    """Wait for the process; its stderr."""
    process.wait(timeout=300)
    return process.log.read_text()


def records(run_dir: Path, kind: str) -> list[dict]:
    if not (run_dir / "metrics.jsonl").is_file():
        return []
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]  # every line must be whole JSON


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """Per-step losses; a step logged again after a restart counts with its last value."""
    return {r["step"]: r["loss"] for r in records(run_dir, "step")}


def wait_for_steps(process: subprocess.Popen, run_dir: Path, count: int) -> None:
    """Until metrics.jsonl holds `count` step records (or the process has exited)."""
    while process.poll() is None and len(records(run_dir, "step")) < count:
        time.sleep(0.02)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    step = run_dir / checkpoint_name(STEPS)
    return {
        f"{name}:{k}": v
        for name in ("model", "ema")
        for k, v in load_file(step / f"{name}.safetensors").items()
    }


def test_killed_and_stopped_runs_resume_bitwise_identical(tmp_path, digits):
    reference = launch(tmp_path / "straight", digits)  # runs alongside the interrupted one
    run_dir = tmp_path / "interrupted"
    rng = random.Random(9)
    # (how, parameter): SIGKILL before the n-th fsync of the launch (inside a checkpoint write or a pointer
    # update; a launch makes ~8 fsyncs per checkpoint, ~10 with the best pointer), or a signal at a random
    # moment a few training steps into the launch.
    plan = [
        ("signal", signal.SIGKILL),
        ("fsync", rng.randint(1, 9)),  # inside the launch's first checkpoint write
        ("signal", signal.SIGTERM),
        ("fsync", rng.randint(1, 18)),  # inside its first or second
        ("signal", signal.SIGINT),
        ("signal", signal.SIGKILL),
        ("fsync", rng.randint(1, 9)),
    ]
    outcomes = []
    for how, parameter in [*plan, ("finish", 0)]:
        seen = len(records(run_dir, "step"))
        process = launch(run_dir, digits, die_at_fsync=parameter if how == "fsync" else 0)
        if how == "signal":
            # A random moment 1-4 steps into the launch: counted in steps, so that how far a launch gets
            # does not depend on the machine's speed.
            wait_for_steps(process, run_dir, seen + rng.randint(1, 4))
            time.sleep(rng.uniform(0, 0.02))
            if process.poll() is None:
                process.send_signal(parameter)
        stderr = finish(process)
        outcomes.append((how, parameter, process.returncode, max(losses_by_step(run_dir), default=0)))
        if process.returncode in (143, 130):  # SIGTERM, SIGINT: a checkpoint at the step reached, then exit
            stopped_at = max(losses_by_step(run_dir))
            name = signal.Signals(process.returncode - 128).name
            assert f"stopped: {name} received: stopped at step {stopped_at}" in stderr, stderr[-2000:]
            assert (run_dir / "latest").read_text().strip() == checkpoint_name(stopped_at)
            assert list_checkpoints(run_dir)[-1].name == checkpoint_name(stopped_at)
        else:
            assert process.returncode in (0, -signal.SIGKILL), stderr[-3000:]
        if process.returncode == 0:
            break
    codes = [outcome[2] for outcome in outcomes]
    assert codes[-1] == 0 and 143 in codes and 130 in codes, outcomes
    assert codes.count(-signal.SIGKILL) >= 3, outcomes
    # Each launch after a SIGTERM/SIGINT resumed from the checkpoint that stop wrote.
    resumed = [r["resumed_from"] for r in records(run_dir, "run")]
    for code, (_, _, _, step) in zip(codes, outcomes):
        if code in (143, 130):
            assert any(r and r.endswith(checkpoint_name(step)) for r in resumed), (step, resumed)

    stderr = finish(reference)
    assert reference.returncode == 0, stderr[-3000:]
    expected = losses_by_step(tmp_path / "straight")
    assert sorted(expected) == list(range(1, STEPS + 1)) and all(math.isfinite(v) for v in expected.values())
    assert losses_by_step(run_dir) == expected, outcomes
    a, b = final_weights(tmp_path / "straight"), final_weights(run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), outcomes
    assert not list(run_dir.glob(".tmp-*")) and not list(run_dir.glob(".*.tmp"))  # leftovers cleaned


# ------------------------------------------------------------------------------------------------------
# Non-finite loss or gradients


def trainer(tmp_path, digits, *flags) -> Trainer:
    argv = [*ARGS, "--data_dir", str(digits), "--output_dir", str(tmp_path), "--max_steps", "4"]
    return Trainer(parse_config([*argv, "--checkpoint_interval", "1", "--keep_checkpoints", "10", *flags]))


def poison_loss(t: Trainer, steps: set[int]) -> None:
    """The loss (and so every gradient) is NaN at these steps: a fault injected into a real run."""
    loss_fn = t.parts.train_loss_fn

    def loss(output, target):
        value = loss_fn(output, target)
        return value * math.nan if t.step + 1 in steps else value

    t.parts.train_loss_fn = loss


def test_nonfinite_steps_are_skipped_counted_and_logged(tmp_path, digits, caplog):
    t = trainer(tmp_path, digits, "--nonfinite", "skip")
    poison_loss(t, {2, 3})
    t.fit()
    run_dir = t.run_dir
    steps = records(run_dir, "step")
    assert [(r["step"], r["loss"] is None, r["skipped_steps"]) for r in steps] == [
        (1, False, 0),
        (2, True, 1),
        (3, True, 2),
        (4, False, 2),
    ]
    assert "non-finite loss at step 2" in caplog.text and "step skipped" in caplog.text
    # A skipped step changes neither the weights nor the EMA; the step after it does.
    for name in ("model", "ema"):
        w = [load_file(run_dir / checkpoint_name(s) / f"{name}.safetensors") for s in (1, 2, 3, 4)]
        assert all(torch.equal(w[0][k], w[1][k]) and torch.equal(w[0][k], w[2][k]) for k in w[0])
        assert not all(torch.equal(w[0][k], w[3][k]) for k in w[0])
    assert math.isfinite(records(run_dir, "eval")[-1]["train_loss"])
    state = torch.load(run_dir / checkpoint_name(4) / "training_state.pt", weights_only=True)
    assert (state["skipped_steps"], state["skipped_in_a_row"]) == (2, 0)


def test_nonfinite_stop_policy_keeps_the_last_good_checkpoint(tmp_path, digits):
    t = trainer(tmp_path, digits, "--nonfinite", "stop")
    poison_loss(t, {3})
    with pytest.raises(NonFiniteError) as error:
        t.fit()
    message = str(error.value)
    assert "non-finite loss at step 3" in message and "nonfinite: stop" in message
    assert f"last good checkpoint is {t.run_dir / checkpoint_name(2)}" in message and "lower lr" in message
    assert error.value.exit_code == 3
    assert [p.name for p in list_checkpoints(t.run_dir)] == [checkpoint_name(1), checkpoint_name(2)]


def test_too_many_nonfinite_steps_in_a_row_stop_the_run(tmp_path, digits):
    t = trainer(tmp_path, digits, "--max_nonfinite_steps", "2")
    poison_loss(t, {2, 3, 4})
    with pytest.raises(
        NonFiniteError, match=r"at step 3 .*2 non-finite steps in a row \(max_nonfinite_steps=2\)"
    ):
        t.fit()


def test_nonfinite_gradients_with_a_finite_loss(tmp_path, digits):
    t = trainer(tmp_path, digits, "--nonfinite", "stop")
    weight = t.parts.raw_model.head.weight
    weight.register_hook(lambda grad: grad * math.inf if t.step + 1 == 2 else grad)
    with pytest.raises(
        NonFiniteError, match=r"non-finite gradients at step 2 \(loss \d.*grad norm (inf|nan)\)"
    ):
        t.fit()


# ------------------------------------------------------------------------------------------------------
# Security: checkpoints and configs are data, never code; API keys are never written down


def test_loaders_never_unpickle_code():
    """Every torch.load call in the repo passes weights_only=True; no yaml.load/unsafe_load, no pickle.load."""
    unsafe = {
        ("yaml", "load"),
        ("yaml", "unsafe_load"),
        ("yaml", "full_load"),
        ("pickle", "load"),
        ("pickle", "loads"),
    }
    calls = 0
    for path in (p for p in REPO.rglob("*.py") if not any(part.startswith(".") for part in p.parts)):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            assert (owner, node.func.attr) not in unsafe, where
            if (owner, node.func.attr) == ("torch", "load"):
                calls += 1
                safe = [k for k in node.keywords if k.arg == "weights_only"]
                assert safe and isinstance(safe[0].value, ast.Constant) and safe[0].value.value is True, where
    assert calls >= 3  # the checkpoint readers are found


def test_api_keys_are_not_written_to_run_files(tmp_path, digits, monkeypatch):
    secret = "kat-test-secret-0123456789abcdef0123456789abcdef"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-files"))
    t = trainer(tmp_path, digits, "--wandb_mode", "offline", "--max_steps", "2")
    t.fit()
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in written) and any(p.suffix == ".wandb" for p in written)
    leaked = [p for p in written if secret.encode() in p.read_bytes()]
    assert not leaked
