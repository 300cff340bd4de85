"""Run records: metrics.jsonl in the run directory and Weights & Biases (main process only; wandb_mode).

metrics.jsonl has one JSON object per line, `type` says which kind:
  step   every log_interval optimizer steps: step, epoch, loss, lr, grad_norm, images_per_sec, step_time,
         data_time (+ peak_memory_gb on CUDA)
  eval   after each evaluation: step, epoch, epoch_time, train_loss, val {top1, top5, loss, ...}, val_ema {...}
  run    once per launch: what was started or resumed, with which rational backend
A number that is not finite (a skipped step's NaN loss) is written as null: every line stays strict JSON.
The step and eval records are also appended to steps.csv and evals.csv (fixed columns, nested val/val_ema
results flattened to val_top1, ...; empty where a value is absent or not finite), for spreadsheets and pandas.
W&B gets the same numbers as train/*, val/*, val_ema/* charts against our own `step` axis (so a resumed run's
curves continue instead of restarting), the resolved config, and the rational-function plots as images.
wandb is a requirement; it is imported only when a run uses it (wandb_mode not disabled), as it is slow to import.
"""

import csv
import json
import logging
import math
import netrc
import os
import secrets
from pathlib import Path
from urllib.parse import urlparse

logger = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb_run_id"
STEP_COLUMNS = (
    "step",
    "epoch",
    "loss",
    "lr",
    "grad_norm",
    "skipped_steps",
    "images_per_sec",
    "step_time",
    "data_time",
    "peak_memory_gb",
)
_RESULTS = ("top1", "top5", "loss", "num_images", "images_per_sec")
EVAL_COLUMNS = (
    "step",
    "epoch",
    "epoch_time",
    "train_loss",
    *(f"{split}_{k}" for split in ("val", "val_ema") for k in _RESULTS),
)


class CsvLog:
    """Rows appended to a CSV file with fixed columns; the header is written when the file is new (a resumed run
    continues the same file)."""

    def __init__(self, path: Path, columns: tuple[str, ...]):
        new = not path.is_file() or path.stat().st_size == 0
        self.file = open(path, "a", newline="", buffering=1)  # noqa: SIM115 (closed in close)
        self.writer = csv.DictWriter(self.file, columns, restval="", extrasaction="ignore")
        if new:
            self.writer.writeheader()

    def write(self, record: dict) -> None:
        flat = {}
        for key, value in record.items():
            if isinstance(value, dict):  # val / val_ema results
                flat |= {f"{key}_{k}": v for k, v in value.items()}
            else:
                flat[key] = value
        self.writer.writerow(
            {k: "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else v for k, v in flat.items()}
        )

    def close(self) -> None:
        self.file.close()


def _finite_or_null(value):
    """The record with every non-finite float (in nested dicts too) replaced by None."""
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _wandb_logged_in() -> bool:
    """True when W&B credentials exist (env or ~/.netrc, where `wandb login` stores them); no network access."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(mode: str) -> str:
    """'auto' becomes WANDB_MODE if set, else 'online' when logged in and 'offline' otherwise."""
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("online", "offline", "disabled"):
        return env
    return "online" if _wandb_logged_in() else "offline"


class RunTracker:
    def __init__(self, run_dir: Path, cfg, *, is_main: bool):
        self.run_dir, self.is_main = run_dir, is_main
        self.wandb = None
        if not is_main:
            return
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 (closed in finish)
        self.step_csv = CsvLog(run_dir / "steps.csv", STEP_COLUMNS)
        self.eval_csv = CsvLog(run_dir / "evals.csv", EVAL_COLUMNS)
        mode = resolve_wandb_mode(cfg.wandb_mode)
        if mode == "disabled":
            return
        import wandb

        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        self.wandb = wandb.init(
            project=cfg.wandb_project,
            entity=cfg.wandb_entity,
            name=cfg.run_name,
            tags=cfg.wandb_tags,
            config=cfg.to_dict(),
            id=run_id,
            resume="allow",  # the same id continues the same W&B run after a restart
            mode=mode,
            dir=os.environ.get("WANDB_DIR") or str(run_dir),
        )
        self.wandb.define_metric("step")
        self.wandb.define_metric("*", step_metric="step")
        logger.info("W&B run %s (%s mode)", run_id, mode)

    def _write(self, record: dict) -> None:
        self.jsonl.write(json.dumps(_finite_or_null(record), allow_nan=False) + "\n")

    def log_run(self, record: dict) -> None:
        """Facts about this launch (resumed from, rational backend, processes, ...); W&B keeps them in its config."""
        if not self.is_main:
            return
        self._write({"type": "run", **record})
        if self.wandb is not None:
            self.wandb.config.update({"launch": record}, allow_val_change=True)

    def log_step(self, record: dict) -> None:
        if not self.is_main:
            return
        self._write({"type": "step", **record})
        self.step_csv.write(record)
        if self.wandb is not None:
            skip = ("step", "epoch")
            self.wandb.log(
                {"step": record["step"], "epoch": record["epoch"]}
                | {f"train/{k}": v for k, v in record.items() if k not in skip}
            )

    def log_eval(self, record: dict, images: dict[str, Path] | None = None) -> None:
        if not self.is_main:
            return
        self._write({"type": "eval", **record})
        self.eval_csv.write(record)
        if self.wandb is not None:
            import wandb

            data = {"step": record["step"], "epoch": record["epoch"]}
            for key, value in record.items():
                if isinstance(value, dict):  # val / val_ema results
                    data |= {f"{key}/{k}": v for k, v in value.items()}
                elif key not in data:
                    data["train/epoch_loss" if key == "train_loss" else key] = value
            data |= {key: wandb.Image(str(path)) for key, path in (images or {}).items()}
            self.wandb.log(data)

    def finish(self) -> None:
        if not self.is_main:
            return
        self.jsonl.close()
        self.step_csv.close()
        self.eval_csv.close()
        if self.wandb is not None:
            self.wandb.finish()
