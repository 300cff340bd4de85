"""Train a KAT (or any timm image classifier) on an ImageFolder dataset.

    python train.py --config demo.yaml                              # the embedded MNIST demo, CPU, minutes
    accelerate launch train.py --config kat_s.yaml                  # ImageNet, published recipe, all GPUs
    python train.py --config kat_t.yaml --data_dir /data/imagenet --batch_size 64 --wandb_mode offline

Every config key is a flag (`python train.py --help`). Rerunning a command resumes its run from the newest
complete checkpoint in output_dir/run_name; `--resume none` refuses to touch an existing run. Exit codes
(docs/ERRORS.md "How runs end"): 0 finished, 2 bad input (nothing trained), 3 non-finite, 4 stopped by a fault
during training (checkpoints kept), 128 + signal for SIGTERM/SIGINT.
"""

import logging
import os
import signal
import sys

STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def main(argv: list[str] | None = None) -> int:
    # A SIGTERM/SIGINT while the imports below run (seconds) waits until StopSignals handles it: a preempted
    # start-up then stops cleanly, with the documented message and exit code, instead of dying silently.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        from kat.training.run_control import StopSignals

        stop = StopSignals()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    try:
        return run(argv, stop)
    finally:
        stop.restore()


def run(argv: list[str] | None, stop) -> int:
    from kat.training.config import ConfigError, parse_config

    # NVLink multicast (NCCL's NVLS algorithms) has put the GPUs of shared hosts out of service; NCCL's ring/tree
    # all-reduce is what we measure (docs/DISTRIBUTED.md). Export NCCL_NVLS_ENABLE=1 to have it anyway.
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    rank = int(os.environ.get("RANK", "0"))  # set by accelerate launch / torchrun; only rank 0 says much
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        cfg = parse_config(argv)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    # heavy imports only once the config is good
    from tqdm.contrib.logging import logging_redirect_tqdm

    from kat.data import DataError
    from kat.models.pretrained import CheckpointError
    from kat.training.engine import TrainingStopped, train

    try:
        with logging_redirect_tqdm():
            train(cfg, stop)
    except (ConfigError, DataError, CheckpointError) as error:  # before training started
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingStopped as stopped:  # non-finite (3), a fault mid-run (4), SIGTERM (143), SIGINT (130)
        print(f"stopped: {stopped}", file=sys.stderr)
        return stopped.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
