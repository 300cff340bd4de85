"""Checkpoints that are complete or absent, never half-written, and checked against bit rot when read.

    <run_dir>/step-00001234/{model.safetensors, ema.safetensors, meta.json, training_state.pt}
    <run_dir>/step-00001234/optimizer/    FSDP runs only: the optimizer state, one shard per process (DCP)
    <run_dir>/latest, <run_dir>/best      text files naming a checkpoint directory

A checkpoint is written into a hidden temp directory, every file fsynced, then renamed into place (rename is
atomic); the `latest`/`best` pointers are replaced the same way, last. Older checkpoints are pruned only after
the new one is in place. A write that fails (full disk, read-only or missing output directory) removes its temp
directory and raises CheckpointWriteError, one line naming the path and the cause; the checkpoints already
there stay as they were.

meta.json records an xxh3-64 checksum of each file (`xxh3_64`), read back once the files are written;
reading a weights file or training_state.pt checks it, so a flipped bit inside a file of the right size is
refused instead of trained on. xxh3 rather than a cryptographic hash or zlib's CRC-32: it adds a fraction of
the write time (docs/BENCHMARKS.md section 8), and bit rot is the concern, not forgery. Checkpoints written
before the checksums existed have no `xxh3_64` and are read unchecked.

A checkpoint damaged afterwards (a partial copy, a full disk, a truncated file) is recognised without loading
it: every file must be present and whole (safetensors: header and size agree; training_state.pt: a complete
zip archive; optimizer/: DCP's .metadata, written last), and resuming skips such a checkpoint with a warning.
Reading weights (eval.py, init_from: see kat.weights) needs only meta.json and the weights files, so a
checkpoint shared without training_state.pt and optimizer/ still evaluates. Under FSDP every process writes its
optimizer shard into the same temp directory (`begin_checkpoint`, whose name depends only on the step) before
rank 0 completes it with `save_checkpoint`.
"""

import contextlib
import errno
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
import xxhash
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kat.models.pretrained import CheckpointError, MissingWeightsError, read_checkpoint_file

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
_POINTERS = ("latest", "best")

# meta.json keys with the types they must have; the required ones are what building the model needs.
_META_TYPES = {
    "format": str,
    "model": str,
    "model_kwargs": dict,
    "num_classes": int,
    "has_ema": bool,
    "optimizer_shards": bool,
    "step": int,
    "epoch": int,
    "class_names": list,
    "data_config": dict,
    "config": dict,
    "metrics": dict,
    "xxh3_64": dict,
}
_META_REQUIRED = ("model", "model_kwargs", "num_classes")
# training_state.pt entries the training loop reads on resume, with their types (None: may be null).
_STATE_TYPES = {
    "step": int,
    "epoch": int,
    "samples_in_epoch": int,
    "global_batch_size": int,
    "best_top1": (int, float),
    "optimizer": (dict, type(None)),
    "scheduler": dict,
    "scaler": (dict, type(None)),
    "rng": list,
}
_TYPE_NAMES = {str: "a string", dict: "a mapping", int: "an integer", bool: "true or false", list: "a list"}
_STATE_FIX = "resume from another checkpoint (--resume <step dir>), or start a new --run_name"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (no space left, read-only or unusable output directory).

    The message is one line naming the path and the cause; nothing half-written is left behind and the
    checkpoints already there are intact.
    """


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


def checksum(path: Path) -> str:
    """xxh3-64 of a file as 16 hex digits, read in 1 MiB pieces into one buffer (no allocation per piece)."""
    digest = xxhash.xxh3_64()
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while size := f.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


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
            raise CheckpointError(
                f"checkpoint '{path}' is incomplete: {damaged} is missing, truncated or corrupt; use another "
                "checkpoint (the run directory resumes from its newest complete one)"
            )
        return path
    checkpoints = list_checkpoints(path, weights_only=weights_only) if path.is_dir() else []
    if not checkpoints:
        raise CheckpointError(
            f"'{path}' is neither a checkpoint directory (with {META_FILE}) nor a run directory holding a "
            f"complete step-XXXXXXXX checkpoint"
        )
    return checkpoints[-1]


def _type_error(where: str, key: str, value, expected) -> str | None:
    """Why `value` is not of type `expected` (None when it is); bool does not count as an integer."""
    types = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, types) and not (isinstance(value, bool) and bool not in types):
        return None
    wanted = " or ".join(_TYPE_NAMES.get(t, "null" if t is type(None) else t.__name__) for t in types)
    return f"{where}: '{key}' is {value!r:.40} ({type(value).__name__}), not {wanted}"


def read_meta(checkpoint_dir: Path) -> dict:
    """meta.json of a checkpoint, its keys checked: CheckpointError naming the key when one is wrong."""
    path = checkpoint_dir / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {path}: {error}; use another checkpoint") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} holds a {type(meta).__name__}, not a mapping; use another checkpoint")
    missing = [key for key in _META_REQUIRED if key not in meta]
    if missing:
        raise CheckpointError(
            f"{path} lacks the key(s) {', '.join(missing)}; restore the file or use another checkpoint"
        )
    for key, expected in _META_TYPES.items():
        if meta.get(key) is not None or key in _META_REQUIRED:
            wrong = _type_error(str(path), key, meta.get(key), expected)
            if wrong:
                raise CheckpointError(f"{wrong}; restore the file or use another checkpoint")
    return meta


def verify_file(checkpoint_dir: Path, name: str, meta: dict) -> None:
    """Check `name` against the checksum meta.json recorded for it (checkpoints from before checksums: none)."""
    expected = (meta.get("xxh3_64") or {}).get(name)
    if expected is None:
        return
    actual = checksum(checkpoint_dir / name)
    if actual != expected:
        raise CheckpointError(
            f"{checkpoint_dir / name} is damaged: its checksum (xxh3-64) is {actual}, meta.json recorded "
            f"{expected} (bit rot or a modified file); use another checkpoint"
        )


def read_checkpoint(path: str | Path, ema: bool = False) -> tuple[dict, dict]:
    """(state_dict, meta) of a checkpoint or run directory, checksum verified; ema=True: the EMA weights."""
    checkpoint_dir = resolve_checkpoint(path, weights_only=True)
    meta = read_meta(checkpoint_dir)
    if ema and not meta.get("has_ema"):
        raise MissingWeightsError(
            f"checkpoint '{checkpoint_dir}' has no EMA weights (the run had model_ema: false)"
        )
    name = EMA_FILE if ema else MODEL_FILE
    if not _safetensors_whole(checkpoint_dir / name):
        raise CheckpointError(
            f"checkpoint '{checkpoint_dir}': {checkpoint_dir / name} is missing, truncated or corrupt"
        )
    verify_file(checkpoint_dir, name, meta)
    return load_file(checkpoint_dir / name), meta


def read_training_state(checkpoint_dir: Path) -> dict:
    """training_state.pt, checksum verified and its entries checked; read as data (weights_only=True)."""
    meta = read_meta(checkpoint_dir)
    path = checkpoint_dir / STATE_FILE
    # Read (as data) and checked before the checksum, so that a file holding code, or a file from elsewhere,
    # is reported as what it is rather than as a checksum mismatch.
    state = read_checkpoint_file(path, code_fix=f"kat writes only tensors and plain values there: {_STATE_FIX}.")
    missing = [key for key in _STATE_TYPES if key not in state]
    if missing:
        raise CheckpointError(f"{path} lacks the entries {', '.join(missing)}; {_STATE_FIX}")
    for key, expected in _STATE_TYPES.items():
        wrong = _type_error(str(path), key, state[key], expected)
        if wrong:
            raise CheckpointError(f"{wrong}; {_STATE_FIX}")
    verify_file(checkpoint_dir, STATE_FILE, meta)
    return state


def _cpu_fp32(state_dict: dict) -> dict:
    return {
        k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
        for k, v in state_dict.items()
    }


def checkpoint_tmp_dir(run_dir: Path, step: int) -> Path:
    """Where step's checkpoint is written before it is renamed into place (the same for every process)."""
    return run_dir / f"{_TMP_PREFIX}{step:08d}"


_CAUSES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


def _write_error(path: Path, error: Exception) -> CheckpointWriteError:
    """One line naming what could not be written and why, in words rather than an errno.

    safetensors (Rust) names the OS error in its message, "(os error 28)"; torch.save does not ("unexpected pos
    ..."), so then the file system itself is asked: read-only, or (next to) no space left.
    """
    code = getattr(error, "errno", None)
    if code is None and (match := re.search(r"\(os error (\d+)\)", str(error))):
        code = int(match.group(1))
    cause = _CAUSES.get(code)
    blocking = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    existing = next(p for p in (path, *path.parents) if p.is_dir())
    if blocking is not None:
        cause = f"{blocking} is a file, not a directory"
    elif cause is None:
        disk = os.statvfs(existing)
        if disk.f_flag & os.ST_RDONLY:
            cause = "read-only file system"
        elif disk.f_bavail * disk.f_frsize < 1 << 20:
            cause = "no space left on device"
        else:
            cause = (str(error).strip() or type(error).__name__).splitlines()[0]
    where = f" (writing {error.filename})" if getattr(error, "filename", None) else ""
    return CheckpointWriteError(
        f"cannot write checkpoint {path}: {cause}{where}; the checkpoints already there are intact"
    )


def _remove_partial(run_dir: Path, tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    for name in _POINTERS:
        with contextlib.suppress(OSError):  # the directory may be read-only: nothing was written there then
            (run_dir / f".{name}.tmp").unlink(missing_ok=True)


def begin_checkpoint(run_dir: Path, step: int) -> Path:
    """An empty checkpoint_tmp_dir, after removing leftovers of interrupted saves (on rank 0 only)."""
    for stale in run_dir.glob(f"{_TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = checkpoint_tmp_dir(run_dir, step)
    try:
        tmp.mkdir(parents=True)
    except OSError as error:
        raise _write_error(run_dir / checkpoint_name(step), error) from None
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
    Raises CheckpointWriteError (after removing the partial write) when a file cannot be written.
    """
    name = checkpoint_name(step)
    final = run_dir / name
    tmp = tmp or begin_checkpoint(run_dir, step)
    try:
        _write_checkpoint(tmp, model_state, ema_state, training_state, meta)
        if final.exists():
            # A resume from an older checkpoint is overwriting history: keep the old one, renamed, rather than
            # lose it.
            aside = run_dir / f"{name}.replaced-{int(time.time())}"
            logger.warning("%s already exists (from an earlier run); moving it to %s", final, aside)
            os.replace(final, aside)
        os.replace(tmp, final)
        _fsync_path(run_dir)
        _write_pointer(run_dir, "latest", name)
        if is_best:
            _write_pointer(run_dir, "best", name)
    except (OSError, SafetensorError, RuntimeError) as error:  # the last two: safetensors' and torch.save's
        failure = _write_error(final, error)  # before the partial write is removed: it may be what filled the disk
        _remove_partial(run_dir, tmp)
        raise failure from None
    _prune(run_dir, keep)
    return final


def _write_checkpoint(tmp: Path, model_state: dict, ema_state: dict | None, training_state: dict, meta: dict):
    """The checkpoint's files in `tmp`, fsynced; meta.json (last) records their checksums.

    The checksums are read back from the written files, which are still in the page cache.
    """
    save_file(_cpu_fp32(model_state), tmp / MODEL_FILE, metadata={"format": "pt"})
    if ema_state is not None:
        save_file(_cpu_fp32(ema_state), tmp / EMA_FILE, metadata={"format": "pt"})
    with open(tmp / STATE_FILE, "wb") as f:  # closed even when a write fails (torch.save(path) leaves it open)
        torch.save(training_state, f)
    checksums = {name: checksum(tmp / name) for name in (MODEL_FILE, EMA_FILE, STATE_FILE) if (tmp / name).is_file()}
    optimizer_shards = (tmp / OPTIMIZER_SHARDS).is_dir()
    (tmp / META_FILE).write_text(
        json.dumps(
            {
                "format": FORMAT,
                **meta,
                "has_ema": ema_state is not None,
                "optimizer_shards": optimizer_shards,
                "xxh3_64": checksums,
            },
            indent=2,
        )
    )
    for path in [*tmp.rglob("*"), tmp]:
        _fsync_path(path)


def _prune(run_dir: Path, keep: int) -> None:
    protected = {(run_dir / p).read_text().strip() for p in _POINTERS if (run_dir / p).is_file()}
    checkpoints = list_checkpoints(run_dir, warn=False)
    for old in checkpoints[: max(len(checkpoints) - keep, 0)]:
        if old.name not in protected:
            shutil.rmtree(old)
