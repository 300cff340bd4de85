"""Faults in checkpoints: bit rot, damaged run state, and writes that fail (full disk, read-only, a file).

One 1-step run of a 1-block KAT (a few seconds) is the source; each test damages a copy of it the way disks and
people do, then checks that eval.py, init_from, timm's pretrained path and resuming refuse it with one line
naming the file and what is wrong.
"""

import json
import os
import shutil
import struct
import subprocess
import zipfile
from pathlib import Path

import pytest
import timm
import torch
import yaml

import eval as eval_cli
import kat.weights
from kat.models.pretrained import CheckpointError
from kat.training.checkpoint import (
    CheckpointWriteError,
    list_checkpoints,
    read_checkpoint,
    read_training_state,
    save_checkpoint,
)
from kat.training.config import parse_config
from kat.training.engine import Trainer, train

ARCH = "{img_size: 28, patch_size: 14, depth: 1, embed_dim: 32, num_heads: 2}"
QUIET = ["--wandb_mode", "disabled", "--plot_rationals", "false", "--workers", "0"]


def config(data: Path, output: Path, *extra: str):
    argv = ["--config", "demo", "--data_dir", str(data), "--output_dir", str(output), "--run_name", "run"]
    argv += ["--model_kwargs", ARCH, "--batch_size", "10", "--max_steps", "1", "--mixed_precision", "no"]
    return parse_config([*argv, *QUIET, *extra])


@pytest.fixture(scope="module")
def source(tmp_path_factory, demo_digits) -> tuple[Path, Path]:
    """(data dir, run dir) of a finished 1-step run with one checkpoint (model, EMA, training state)."""
    data = demo_digits(1, 1)
    output = tmp_path_factory.mktemp("source")
    train(config(data, output))
    return data, output / "run"


@pytest.fixture
def run(source, tmp_path) -> tuple[Path, Path]:
    """(data dir, a copy of the source run to damage)."""
    data, run_dir = source
    shutil.copytree(run_dir, tmp_path / "run")
    return data, tmp_path / "run"


def flip_byte_in_tensor(path: Path) -> None:
    """Flip one bit in the middle of the largest tensor's data: the file keeps its size and its header."""
    raw = bytearray(path.read_bytes())
    (header_size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_size])
    begin, end = max(
        (v["data_offsets"] for k, v in header.items() if k != "__metadata__"), key=lambda o: o[1] - o[0]
    )
    raw[8 + header_size + (begin + end) // 2] ^= 0x40
    path.write_bytes(bytes(raw))


def one_line(message: str) -> str:
    assert "\n" not in message.strip(), message
    assert "weights_only=False" not in message and "Traceback" not in message, message
    return message


def resume_error(data: Path, run_dir: Path) -> str:
    with pytest.raises(CheckpointError) as error:
        Trainer(config(data, run_dir.parent))
    return one_line(str(error.value))


def eval_error(capsys, *argv) -> str:
    assert eval_cli.main([str(a) for a in argv] + ["--workers", "0", "--no_progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eval.py: error: "), lines
    return one_line(lines[0])


def test_a_flipped_bit_is_refused_everywhere(run, capsys):
    data, run_dir = run
    (step,) = list_checkpoints(run_dir)
    flip_byte_in_tensor(step / "model.safetensors")
    named = [str(step / "model.safetensors"), "is damaged: its checksum (xxh3-64) is", "use another checkpoint"]

    messages = [
        eval_error(capsys, "--checkpoint", run_dir, "--data_dir", data),
        resume_error(data, run_dir),
    ]
    fresh = timm.create_model("kat_tiny", num_classes=10, **yaml.safe_load(ARCH))
    with pytest.raises(CheckpointError) as error:
        kat.weights.init_from(fresh, str(run_dir))
    messages.append(one_line(str(error.value)))
    with pytest.raises(CheckpointError) as error:  # timm's pretrained path, with our file named
        timm.create_model(
            "kat_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(step / "model.safetensors"))
        )
    messages.append(one_line(str(error.value)))
    for message in messages:
        for text in named:
            assert text in message, (text, message)

    # The EMA weights were not touched: they still evaluate.
    argv = ["--checkpoint", run_dir, "--data_dir", data, "--ema", "--workers", "0", "--no_progress"]
    assert eval_cli.main([str(a) for a in argv]) == 0


def test_a_flipped_bit_in_the_training_state_is_refused_on_resume(run):
    data, run_dir = run
    (step,) = list_checkpoints(run_dir)
    path = step / "training_state.pt"
    with zipfile.ZipFile(path) as archive:  # torch.save's zip stores each record uncompressed
        record = max(
            archive.infolist(), key=lambda info: info.file_size
        )  # a tensor's storage (optimizer state)
    raw = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack(
        "<HH", raw[record.header_offset + 26 : record.header_offset + 30]
    )
    raw[record.header_offset + 30 + name_length + extra_length + record.file_size // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    message = resume_error(data, run_dir)
    assert f"{path} is damaged: its checksum (xxh3-64) is" in message


def test_checkpoints_without_checksums_still_load(run, capsys):
    """Checkpoints written before meta.json had checksums are read unchecked: resume and eval work."""
    data, run_dir = run
    (step,) = list_checkpoints(run_dir)
    meta = json.loads((step / "meta.json").read_text())
    del meta["xxh3_64"]
    (step / "meta.json").write_text(json.dumps(meta))
    state_dict, _ = read_checkpoint(step)
    assert read_training_state(step)["step"] == 1
    trainer = Trainer(config(data, run_dir.parent, "--max_steps", "2"))
    assert trainer.step == 1 and torch.equal(
        trainer.parts.raw_model.state_dict()["pos_embed"], state_dict["pos_embed"]
    )
    argv = ["--checkpoint", run_dir, "--data_dir", data, "--workers", "0", "--no_progress"]
    assert eval_cli.main([str(a) for a in argv]) == 0


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda m: m.update(num_classes="10"), ["meta.json: 'num_classes' is '10' (str), not an integer"]),
        (lambda m: m.pop("model_kwargs"), ["meta.json lacks the key(s) model_kwargs"]),
        (lambda m: m.update(model_kwargs=[1, 2]), ["'model_kwargs' is [1, 2] (list), not a mapping"]),
    ],
    ids=["wrong-type", "missing-key", "list-for-mapping"],
)
def test_damaged_meta_json_is_named_on_resume_and_eval(run, capsys, damage, words):
    data, run_dir = run
    (step,) = list_checkpoints(run_dir)
    meta = json.loads((step / "meta.json").read_text())
    damage(meta)
    (step / "meta.json").write_text(json.dumps(meta))
    for message in (
        resume_error(data, run_dir),
        eval_error(capsys, "--checkpoint", step, "--data_dir", data),
    ):
        for text in [str(step / "meta.json"), *words]:
            assert text in message, (text, message)


def test_damaged_training_state_is_named_on_resume(run):
    data, run_dir = run
    (step,) = list_checkpoints(run_dir)
    path = step / "training_state.pt"
    state = torch.load(path, weights_only=True)

    torch.save({"step": 1}, path)  # a torch file, but not ours
    message = resume_error(data, run_dir)
    assert f"{path} lacks the entries epoch, samples_in_epoch" in message and "--resume" in message

    torch.save({**state, "epoch": "0"}, path)
    assert f"{path}: 'epoch' is '0' (str), not an integer" in resume_error(data, run_dir)

    torch.save({**state, "loss_fn": torch.nn.CrossEntropyLoss()}, path)  # a pickle carrying code
    message = resume_error(data, run_dir)
    assert f"{path} holds Python objects (torch.nn.modules.loss.CrossEntropyLoss)" in message
    assert "never code" in message and "truncated" not in message and "corrupt" not in message


# ---------------------------------------------------------------------------------------------------------
# Writes that fail


def small_save(run_dir: Path, step: int, size: int = 4, state_size: int = 1) -> Path:
    weights = {"w": torch.full((size,), float(step))}
    state = {"step": step, "optimizer": torch.zeros(state_size)}
    meta = {"model": "m", "model_kwargs": {}, "num_classes": 3}
    return save_checkpoint(
        run_dir,
        step,
        model_state=weights,
        ema_state=None,
        training_state=state,
        meta=meta,
        keep=5,
        is_best=False,
    )


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "runs").write_text("not a directory")
    for run_dir in (tmp_path / "runs", tmp_path / "runs" / "demo"):
        with pytest.raises(CheckpointWriteError) as error:
            small_save(run_dir, 1)
        message = one_line(str(error.value))
        assert f"cannot write checkpoint {run_dir}/step-00000001: {tmp_path / 'runs'} is a file" in message


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (needs root and a kernel that lets this process mount, as in CI); unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def assert_previous_intact(run_dir: Path, step: int) -> None:
    assert [p.name for p in list_checkpoints(run_dir)] == [f"step-{step:08d}"]
    assert (run_dir / "latest").read_text().strip() == f"step-{step:08d}"
    assert torch.equal(read_checkpoint(run_dir)[0]["w"], torch.full((4,), float(step)))  # checksum verified
    leftovers = [p.name for p in run_dir.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers


def test_full_disk_and_read_only_disk(small_disk):
    run_dir = small_disk / "run"
    small_save(run_dir, 1)
    with pytest.raises(CheckpointWriteError) as error:
        small_save(run_dir, 2, size=1 << 20)  # 4 MiB of weights on a 2 MiB disk
    message = one_line(str(error.value))
    assert f"cannot write checkpoint {run_dir}/step-00000002: no space left on device" in message
    assert_previous_intact(run_dir, 1)
    with pytest.raises(CheckpointWriteError) as error:  # torch.save's own words for it differ from safetensors'
        small_save(run_dir, 2, state_size=1 << 20)
    assert f"{run_dir}/step-00000002: no space left on device" in one_line(str(error.value))
    assert_previous_intact(run_dir, 1)

    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(CheckpointWriteError) as error:
        small_save(run_dir, 3)
    message = one_line(str(error.value))
    assert f"cannot write checkpoint {run_dir}/step-00000003: read-only file system" in message
    assert_previous_intact(run_dir, 1)
