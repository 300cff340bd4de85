"""Checkpoint files: complete or absent, pointers written last, pruning, and the reader eval.py uses."""

import json
import logging

import pytest
import torch
import xxhash

from kat.training.checkpoint import (
    list_checkpoints,
    read_checkpoint,
    read_training_state,
    resolve_checkpoint,
    save_checkpoint,
)


def training_state(step: int) -> dict:
    """The entries the training loop writes and reads back (read_training_state checks them)."""
    return {
        "step": step,
        "epoch": 0,
        "samples_in_epoch": 4 * step,
        "global_batch_size": 4,
        "best_top1": 0.0,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999)}]},
        "scheduler": {"last_epoch": step},
        "scaler": None,
        "rng": [{"python": (3, tuple(range(625)), None), "torch": torch.get_rng_state()}],
    }


def save(run_dir, step, *, best=False, keep=2, ema=True):
    weights = {"w": torch.full((2, 3), float(step)), "n": torch.tensor([step])}
    return save_checkpoint(
        run_dir,
        step,
        model_state=weights,
        ema_state=weights if ema else None,
        training_state=training_state(step),
        meta={"model": "m", "model_kwargs": {}, "num_classes": 3, "step": step},
        keep=keep,
        is_best=best,
    )


def test_layout_pointers_and_reader(tmp_path):
    path = save(tmp_path, 5, best=True)
    assert path == tmp_path / "step-00000005"
    assert sorted(p.name for p in path.iterdir()) == [
        "ema.safetensors",
        "meta.json",
        "model.safetensors",
        "training_state.pt",
    ]
    assert (tmp_path / "latest").read_text() == "step-00000005\n" == (tmp_path / "best").read_text()
    state_dict, meta = read_checkpoint(tmp_path)
    checksums = meta.pop("xxh3_64")
    assert meta == {
        "format": "kat-checkpoint/1",
        "model": "m",
        "model_kwargs": {},
        "num_classes": 3,
        "step": 5,
        "has_ema": True,
        "optimizer_shards": False,
    }
    # The checksums are those of the files as written.
    assert sorted(checksums) == ["ema.safetensors", "model.safetensors", "training_state.pt"]
    for name, value in checksums.items():
        assert value == xxhash.xxh3_64((path / name).read_bytes()).hexdigest(), name
    assert torch.equal(state_dict["w"], torch.full((2, 3), 5.0)) and state_dict["n"].dtype == torch.int64
    assert read_training_state(path)["rng"][0]["python"][1][-1] == 624  # torch.load(weights_only=True)
    assert resolve_checkpoint(path) == path
    assert not list(tmp_path.glob(".*tmp*"))  # no temp files left behind


def test_pruning_keeps_newest_and_best(tmp_path):
    save(tmp_path, 1)
    save(tmp_path, 2, best=True)
    for step in (3, 4, 5):
        save(tmp_path, step)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000004", "step-00000005"]
    assert (tmp_path / "best").read_text().strip() == "step-00000002"


def test_incomplete_checkpoints_are_skipped_with_a_warning(tmp_path, caplog):
    save(tmp_path, 10)
    broken = save(tmp_path, 20)
    (broken / "training_state.pt").unlink()  # e.g. a partial copy
    interrupted = tmp_path / ".tmp-step-00000030-123"
    interrupted.mkdir()
    with caplog.at_level(logging.WARNING):
        assert resolve_checkpoint(tmp_path) == tmp_path / "step-00000010"
    assert "step-00000020" in caplog.text and ".tmp-step-00000030-123" in caplog.text
    with pytest.raises(ValueError, match="incomplete"):
        resolve_checkpoint(broken)
    save(tmp_path, 11)
    assert not interrupted.exists()  # our own leftover temp dir is cleaned by the next save


def test_rewriting_a_step_keeps_the_old_checkpoint(tmp_path):
    save(tmp_path, 7)
    save(tmp_path, 7, keep=5)
    assert len(list(tmp_path.glob("step-00000007.replaced-*"))) == 1


def test_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(tmp_path / "missing")
    with pytest.raises(ValueError, match="neither a checkpoint directory"):
        resolve_checkpoint(tmp_path)
    path = save(tmp_path, 3, ema=False)
    with pytest.raises(ValueError, match="has no EMA weights"):
        read_checkpoint(path, ema=True)
    (path / "meta.json").write_text(json.dumps({"format": "something-else/9"}))
    with pytest.raises(ValueError, match="incomplete"):
        read_checkpoint(path)
