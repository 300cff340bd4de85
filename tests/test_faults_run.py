"""Faults around a training run (docs/ERRORS.md "During training"): changed settings on resume, two runs into one
run dir, runs without a finite result, patches that do not tile the image, stopping after an explicit --resume
or during start-up, bad data mid-run, a checkpoint that cannot be written. Tiny model, 40 train digits."""

import errno
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train as train_script
from kat.training import engine
from kat.training.build import choose_resume
from kat.training.checkpoint import checkpoint_name, list_checkpoints
from kat.training.config import ConfigError, parse_config
from kat.training.engine import Interrupted, NonFiniteError, Trainer, train
from kat.training.run_control import LOCK_FILE, STALE_AFTER, RunDirLocked, RunLock

REPO = Path(__file__).resolve().parents[1]
TINY_DEMO = (
    "--config demo --cpu true --mixed_precision no --workers 0 --wandb_mode disabled --plot_rationals false "
    "--model_kwargs.depth 1 --model_kwargs.embed_dim 32 --model_kwargs.num_heads 2 --batch_size 8 --log_interval 1"
)
FLAGS = TINY_DEMO.split()


@pytest.fixture(scope="module")
def digits(demo_digits) -> Path:
    """40 train / 11 val digits: 5 steps per epoch."""
    return demo_digits(train=4, val=1)


def config(tmp_path: Path, digits: Path, *flags: str):
    return parse_config([*FLAGS, "--data_dir", str(digits), "--output_dir", str(tmp_path), *flags])


def argv(tmp_path: Path, digits: Path, *flags: str) -> list[str]:
    return [*FLAGS, "--data_dir", str(digits), "--output_dir", str(tmp_path), *flags]


def last_line(stderr: str) -> str:
    """The last line of stderr, after any progress-bar redraws (\r) on it."""
    return stderr.rstrip("\n").split("\n")[-1].split("\r")[-1]


def strict_records(run_dir: Path, kind: str) -> list[dict]:
    """metrics.jsonl records; a NaN or Infinity anywhere (not JSON) fails."""

    def refuse(constant):
        raise ValueError(f"metrics.jsonl holds {constant}")

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in (json.loads(line, parse_constant=refuse) for line in lines) if r["type"] == kind]


def test_resume_takes_changed_lr_and_batch_size_from_the_config(tmp_path, digits, caplog):
    changes = ["--lr", "4e-3", "--batch_size", "4", "--weight_decay", "0.1"]
    train(config(tmp_path, digits, "--run_name", "changed", "--max_steps", "2"))
    with caplog.at_level(logging.INFO):
        resumed = Trainer(config(tmp_path, digits, "--run_name", "changed", "--max_steps", "4", *changes))
    assert "lr: 0.002 -> 0.004" in caplog.text and "batch_size: 8 -> 4" in caplog.text
    assert {g["weight_decay"] for g in resumed.parts.optimizer.param_groups} == {
        0.0,
        0.1,
    }  # not the saved 0.05
    resumed.fit()
    train(config(tmp_path, digits, "--run_name", "fresh", "--max_steps", "4", *changes))
    # From the resumed step on, the schedule is the one a run started with the new values follows.
    lrs = {r["step"]: r["lr"] for r in strict_records(tmp_path / "changed", "step")}
    expected = {r["step"]: r["lr"] for r in strict_records(tmp_path / "fresh", "step")}
    assert [lrs[s] for s in (3, 4)] == [expected[s] for s in (3, 4)]
    with pytest.raises(ConfigError, match="cannot resume from .* it holds kat_tiny"):
        Trainer(
            config(tmp_path, digits, "--run_name", "changed", "--max_steps", "6", "--model_kwargs.depth", "2")
        )


def test_run_lock_refuses_a_live_holder_and_takes_over_an_abandoned_one(tmp_path, caplog):
    lock_file = tmp_path / LOCK_FILE
    host = socket.gethostname()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock_file.write_text(json.dumps({"host": host, "pid": sleeper.pid, "started": 0}))
        with pytest.raises(RunDirLocked, match=f"in use by another run \\(pid {sleeper.pid} on this host"):
            RunLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    lock = RunLock(tmp_path)
    with caplog.at_level(logging.WARNING):
        lock.acquire()  # the holder's pid is gone now
    assert f"its process {sleeper.pid} is gone" in caplog.text
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    lock.release()
    assert not lock_file.exists()

    lock_file.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": 0}))
    with pytest.raises(RunDirLocked, match="in use by a run on host elsewhere"):
        RunLock(tmp_path).acquire()
    old = time.time() - STALE_AFTER - 10
    os.utime(lock_file, (old, old))
    RunLock(tmp_path).acquire()  # not refreshed for longer than STALE_AFTER: taken over
    assert "host elsewhere has not refreshed it" in caplog.text


def test_second_run_into_a_locked_run_dir_is_refused(tmp_path, digits, capsys):
    run_dir = tmp_path / "demo"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).write_text(
        json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "started": 0})
    )
    assert train_script.main(argv(tmp_path, digits, "--max_steps", "1")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: run dir ") and "is in use by another run" in err and "Traceback" not in err
    assert not (run_dir / "config.yaml").exists()  # nothing written into the other run's dir

    (run_dir / LOCK_FILE).unlink()
    train(config(tmp_path, digits, "--max_steps", "1"))
    assert not (run_dir / LOCK_FILE).exists()  # released at the end


def test_run_without_a_finite_result_is_not_reported_as_finished(tmp_path, digits):
    t = Trainer(config(tmp_path, digits, "--max_steps", "2", "--run_name", "nan"))
    t.parts.raw_model.head.bias.data.fill_(math.nan)  # every logit, loss and val loss NaN
    with pytest.raises(
        NonFiniteError, match="ended at step 2 without a finite result \\(val loss nan, 2 of 2"
    ):
        t.fit()
    assert [r["loss"] for r in strict_records(t.run_dir, "step")] == [None, None]
    assert strict_records(t.run_dir, "eval")[-1]["val"]["loss"] is None

    # Finite weights, but not one step was applied: not a result either.
    t = Trainer(config(tmp_path, digits, "--max_steps", "2", "--run_name", "skipped"))
    loss_fn = t.parts.train_loss_fn
    t.parts.train_loss_fn = lambda output, target: loss_fn(output, target) * math.nan
    with pytest.raises(NonFiniteError, match="2 of 2 steps skipped"):
        t.fit()


def test_patches_that_do_not_tile_the_image_are_refused_before_the_run_dir(tmp_path, digits):
    with pytest.raises(
        ConfigError, match=r"'model_kwargs': img_size \(30, 30\) is not a multiple of patch_size"
    ):
        Trainer(config(tmp_path, digits, "--model_kwargs.img_size", "30"))  # demo: patch_size 7
    assert not (tmp_path / "demo").exists()


def preempt(t: Trainer, at_step: int) -> Interrupted:
    """fit() with a SIGTERM recorded during step `at_step`, as the handler records it; the Interrupted raised."""
    loss_fn = t.parts.train_loss_fn

    def loss(output, target):
        if t.step + 1 == at_step:
            t.stop.received = signal.SIGTERM
        return loss_fn(output, target)

    t.parts.train_loss_fn = loss
    with pytest.raises(Interrupted) as stopped:
        t.fit()
    assert stopped.value.exit_code == 143
    return stopped.value


def test_stop_after_an_explicit_resume_names_a_command_that_resumes(tmp_path, digits):
    run_dir = tmp_path / "demo"
    keep = ["--max_steps", "6", "--checkpoint_interval", "1", "--keep_checkpoints", "1"]
    preempt(Trainer(config(tmp_path, digits, *keep)), at_step=2)  # no evaluation yet: no best to keep
    explicit = str(run_dir / checkpoint_name(2))
    message = str(preempt(Trainer(config(tmp_path, digits, "--resume", explicit, *keep)), at_step=4))
    assert f"stopped at step 4 with checkpoint {run_dir / checkpoint_name(4)}" in message
    assert f"rerun the command without --resume {explicit} (resume: auto)" in message
    with pytest.raises(
        ConfigError, match="config key 'resume'"
    ):  # the same command: its checkpoint is pruned
        choose_resume(config(tmp_path, digits, "--resume", explicit), run_dir)
    assert Trainer(config(tmp_path, digits, *keep)).step == 4  # the advised command resumes


def test_sigterm_during_start_up_stops_cleanly(tmp_path, digits):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "train.py", *argv(tmp_path, digits, "--max_steps", "2")],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)  # importing torch, parsing, building: seconds
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-2000:]
    assert "stopped: SIGTERM received during start-up: stopped at step 0 before training" in err, err[-2000:]
    assert "Traceback" not in err and not list_checkpoints(tmp_path / "demo", warn=False)


def test_bad_images_mid_run_stop_with_their_own_exit_code(tmp_path, digits, capsys):
    data = tmp_path / "data"
    shutil.copytree(digits, data)
    (data / "train" / "3" / "broken.png").write_bytes(b"not a png")
    code = train_script.main(
        [
            *FLAGS,
            "--data_dir",
            str(data),
            "--output_dir",
            str(tmp_path),
            "--max_steps",
            "5",
            "--max_bad_images",
            "0",
        ]
    )
    err = capsys.readouterr().err
    assert code == engine.RUN_FAULT_EXIT_CODE == 4, err[-2000:]
    line = last_line(err)
    assert line.startswith("stopped: ") and "could not be read" in line and "stopped at step " in line
    assert "Traceback" not in err


def test_a_checkpoint_that_cannot_be_written_ends_the_run_in_one_line(tmp_path, digits, capsys, monkeypatch):
    def disk_full(run_dir, step, **_):
        raise OSError(errno.ENOSPC, "No space left on device", str(run_dir / f".tmp-{checkpoint_name(step)}"))

    monkeypatch.setattr(engine, "save_checkpoint", disk_full)
    assert train_script.main(argv(tmp_path, digits, "--max_steps", "2", "--checkpoint_interval", "1")) == 4
    err = capsys.readouterr().err
    line = last_line(err)
    assert line.startswith("stopped: could not write the checkpoint of step 1: [Errno 28] No space left on device")
    assert "no checkpoint was written yet" in line and "Traceback" not in err
    assert not (tmp_path / "demo" / LOCK_FILE).exists()

    # An output_dir that cannot hold a run dir is bad input, found before training.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert train_script.main([*FLAGS, "--data_dir", str(digits), "--output_dir", str(blocker)]) == 2
    assert "error: cannot write the run dir" in capsys.readouterr().err
