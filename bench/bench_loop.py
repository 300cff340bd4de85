"""Where train.py's step time goes: Trainer.train_step timed as train.py runs it, then without the EMA update.

bench_train.py times bare training steps; train.py's steps also fetch and normalise the batch, apply random
erasing and Mixup, clip/measure the gradient norm, agree on the non-finite/stop flags (one host sync) and
update the EMA. Under CUDA graphs the GPU part of a step is short, so every millisecond of host work in the
loop shows up in images/s. This builds the real Trainer from train.py's flags, times steps, prints a
profiler table (host time per op) of two steps, and times steps again with the EMA update switched off.

    python bench/bench_loop.py --config kat_s --data_dir data/demo --batch_size 128 --workers 12 \\
        --compile --compile_mode reduce-overhead --wandb_mode disabled --run_name loop
"""

import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kat.training.config import parse_config  # noqa: E402
from kat.training.engine import Trainer  # noqa: E402

STEPS = 10


def main():
    cfg = parse_config(sys.argv[1:])
    trainer = Trainer(cfg)
    parts = trainer.parts
    parts.model.train()
    parts.sampler.set_epoch(0, start=0)
    batches = iter(parts.train_loader)
    needed = 2 * STEPS + 6  # warm-up, timed, profiled, timed
    if len(parts.train_loader) < needed * cfg.grad_accum_steps:
        sys.exit(f"the train split has {len(parts.train_loader)} batches; this needs {needed} in one epoch")

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def timed(label: str):
        sync()
        start = time.perf_counter()
        for _ in range(STEPS):
            trainer.train_step(batches)
        sync()
        ms = (time.perf_counter() - start) / STEPS * 1e3
        print(f"{label:28s} {ms:7.2f} ms/step  {cfg.global_batch_size(1) / ms * 1e3:7.0f} img/s", flush=True)

    for _ in range(4):  # warm-up (and compilation)
        trainer.train_step(batches)
    timed("as train.py")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            trainer.train_step(batches)
        sync()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    parts.ema = None
    timed("without the EMA update")


if __name__ == "__main__":
    main()
