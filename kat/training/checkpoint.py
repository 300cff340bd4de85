"""Checkpoints that are complete or absent, never half-written (format: /tmp/team_brief.md, "Checkpoint format").

    <run_dir>/step-00001234/{model.safetensors, ema.safetensors, meta.json, training_state.pt}
    <run_dir>/step-00001234/optimizer/    FSDP runs only: the optimizer state, one shard per process (DCP)
    <run_dir>/latest, <run_dir>/best      text files naming a checkpoint directory

A checkpoint is written into a hidden temp directory, every file fsynced, then renamed into place (rename is
atomic); the `latest`/`best` pointers are replaced the same way, last. Older checkpoints are pruned only after
the new one is in place. A checkpoint damaged afterwards (a partial copy, a full disk, a truncated file) is
recognised without loading it: every file must be present and whole (safetensors: header and size agree;
training_state.pt: a complete zip archive; optimizer/: DCP's .metadata, written last), and resuming skips such a
checkpoint with a warning. Reading weights (eval.py, init_from) needs only meta.json and the weights files, so
a checkpoint shared without training_state.pt and optimizer/ still evaluates. Under FSDP every process writes
its optimizer shard into the same temp directory (`begin_checkpoint`, whose name depends only on the step)
before rank 0 completes it with `save_checkpoint`.
"""

import json
import logging
import os
import re
import shutil
import struct
import time
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

FORMAT = "kat-checkpoint/1"
MODEL_FILE, EMA_FILE, META_FILE, STATE_FILE, OPTIMIZER_SHARDS = (
    "model.safetensors",
    "ema.safetensors",
    "meta.json",
    "training_state.pt",
    "optimizer",
)
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_TMP_PREFIX = ".tmp-step-"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_path(path: Path) -> None:
    """Flush a file or directory entry to disk (directories can't be opened for fsync on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (IsADirectoryError, PermissionError):
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_pointer(run_dir: Path, name: str, target: str) -> None:
    tmp = run_dir / f".{name}.tmp"
    tmp.write_text(target + "\n")
    _fsync_path(tmp)
    os.replace(tmp, run_dir / name)
    _fsync_path(run_dir)


def _safetensors_whole(path: Path) -> bool:
    """The file is as long as its header says (8-byte length, JSON header, then the tensor data)."""
    try:
        with open(path, "rb") as f:
            (header_size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_size))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return path.stat().st_size == 8 + header_size + end
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return False


def damaged_file(checkpoint_dir: Path, weights_only: bool = False) -> Path | None:
    """The first missing, truncated or unreadable file of a checkpoint; None when it is complete.

    weights_only: only what reading the weights needs (meta.json, model.safetensors) must be whole.
    """
    try:
        meta = json.loads((checkpoint_dir / META_FILE).read_text())
        if meta.get("format") != FORMAT:
            return checkpoint_dir / META_FILE
    except (OSError, ValueError, AttributeError):
        return checkpoint_dir / META_FILE
    for name in [MODEL_FILE] + ([EMA_FILE] if meta.get("has_ema") and not weights_only else []):
        if not _safetensors_whole(checkpoint_dir / name):
            return checkpoint_dir / name
    if weights_only:
        return None
    if not zipfile.is_zipfile(checkpoint_dir / STATE_FILE):  # torch.save's format; the index is at the end
        return checkpoint_dir / STATE_FILE
    if meta.get("optimizer_shards") and not (checkpoint_dir / OPTIMIZER_SHARDS / ".metadata").is_file():
        return checkpoint_dir / OPTIMIZER_SHARDS
    return None


def is_complete(checkpoint_dir: Path) -> bool:
    return damaged_file(checkpoint_dir) is None


def list_checkpoints(run_dir: Path, warn: bool = True, weights_only: bool = False) -> list[Path]:
    """Complete checkpoints of a run, oldest first; incomplete ones are skipped (with a warning if `warn`).

    weights_only: complete enough to read the weights (see damaged_file), not necessarily to resume.
    """
    found = []
    if not run_dir.is_dir():
        return found
    for path in run_dir.iterdir():
        if path.name.startswith(_TMP_PREFIX):
            if warn:
                logger.warning(
                    "ignoring %s: an interrupted checkpoint write (removed by the next save)", path
                )
        elif _STEP_DIR.match(path.name) and path.is_dir():
            damaged = damaged_file(path, weights_only)
            if damaged is None:
                found.append(path)
            elif warn:
                logger.warning(
                    "ignoring incomplete checkpoint %s: %s is missing, truncated or unreadable",
                    path,
                    damaged.name,
                )
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def resolve_checkpoint(path: str | Path, weights_only: bool = False) -> Path:
    """A checkpoint directory as itself; a run directory as its newest complete checkpoint.

    weights_only: the checkpoint is only read for its weights (see damaged_file).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path '{path}' does not exist")
    if (path / META_FILE).is_file():
        damaged = damaged_file(path, weights_only)
        if damaged is not None:
            raise ValueError(
                f"checkpoint '{path}' is incomplete: {damaged} is missing, truncated or corrupt; use another "
                "checkpoint (the run directory resumes from its newest complete one)"
            )
        return path
    checkpoints = list_checkpoints(path, weights_only=weights_only) if path.is_dir() else []
    if not checkpoints:
        raise ValueError(
            f"'{path}' is neither a checkpoint directory (with {META_FILE}) nor a run directory holding a "
            f"complete step-XXXXXXXX checkpoint"
        )
    return checkpoints[-1]


def read_checkpoint(path: str | Path, ema: bool = False) -> tuple[dict, dict]:
    """(state_dict, meta) of a checkpoint or run directory; ema=True returns the EMA weights."""
    checkpoint_dir = resolve_checkpoint(path, weights_only=True)
    meta = json.loads((checkpoint_dir / META_FILE).read_text())
    if ema and not meta.get("has_ema"):
        raise ValueError(f"checkpoint '{checkpoint_dir}' has no EMA weights (the run had model_ema: false)")
    if ema and not _safetensors_whole(checkpoint_dir / EMA_FILE):
        raise ValueError(
            f"checkpoint '{checkpoint_dir}': {checkpoint_dir / EMA_FILE} is missing, truncated or corrupt"
        )
    return load_file(checkpoint_dir / (EMA_FILE if ema else MODEL_FILE)), meta


def read_training_state(checkpoint_dir: Path) -> dict:
    return torch.load(checkpoint_dir / STATE_FILE, map_location="cpu", weights_only=True)


def _cpu_fp32(state_dict: dict) -> dict:
    return {
        k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
        for k, v in state_dict.items()
    }


def checkpoint_tmp_dir(run_dir: Path, step: int) -> Path:
    """Where step's checkpoint is written before it is renamed into place (the same for every process)."""
    return run_dir / f"{_TMP_PREFIX}{step:08d}"


def begin_checkpoint(run_dir: Path, step: int) -> Path:
    """An empty checkpoint_tmp_dir, after removing leftovers of interrupted saves (on rank 0 only)."""
    for stale in run_dir.glob(f"{_TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = checkpoint_tmp_dir(run_dir, step)
    tmp.mkdir(parents=True)
    return tmp


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model_state: dict,
    ema_state: dict | None,
    training_state: dict,
    meta: dict,
    keep: int,
    is_best: bool,
    tmp: Path | None = None,
) -> Path:
    """Write step-XXXXXXXX atomically, then update `latest` (and `best`), then prune old checkpoints.

    tmp: a begin_checkpoint directory that already holds the optimizer shards (FSDP); None starts afresh.
    """
    name = checkpoint_name(step)
    tmp = tmp or begin_checkpoint(run_dir, step)
    optimizer_shards = (tmp / OPTIMIZER_SHARDS).is_dir()

    save_file(_cpu_fp32(model_state), tmp / MODEL_FILE, metadata={"format": "pt"})
    if ema_state is not None:
        save_file(_cpu_fp32(ema_state), tmp / EMA_FILE, metadata={"format": "pt"})
    torch.save(training_state, tmp / STATE_FILE)
    (tmp / META_FILE).write_text(
        json.dumps(
            {"format": FORMAT, **meta, "has_ema": ema_state is not None, "optimizer_shards": optimizer_shards},
            indent=2,
        )
    )
    for path in [*tmp.rglob("*"), tmp]:
        _fsync_path(path)

    final = run_dir / name
    if final.exists():
        # A resume from an older checkpoint is overwriting history: keep the old one, renamed, rather than lose it.
        aside = run_dir / f"{name}.replaced-{int(time.time())}"
        logger.warning("%s already exists (from an earlier run); moving it to %s", final, aside)
        os.replace(final, aside)
    os.replace(tmp, final)
    _fsync_path(run_dir)

    _write_pointer(run_dir, "latest", name)
    if is_best:
        _write_pointer(run_dir, "best", name)
    _prune(run_dir, keep)
    return final


def _prune(run_dir: Path, keep: int) -> None:
    protected = {(run_dir / p).read_text().strip() for p in ("latest", "best") if (run_dir / p).is_file()}
    checkpoints = list_checkpoints(run_dir, warn=False)
    for old in checkpoints[: max(len(checkpoints) - keep, 0)]:
        if old.name not in protected:
            shutil.rmtree(old)
