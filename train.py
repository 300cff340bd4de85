"""Train a KAT (or any timm image classifier) on an ImageFolder dataset.

    python train.py --config demo.yaml                              # the embedded MNIST demo, CPU, minutes
    accelerate launch train.py --config kat_s.yaml                  # ImageNet, published recipe, all GPUs
    python train.py --config kat_t.yaml --data_dir /data/imagenet --batch_size 64 --wandb_mode offline

Every config key is a flag (`python train.py --help`). Rerunning a command resumes its run from the newest
complete checkpoint in output_dir/run_name; `--resume none` refuses to touch an existing run.
"""

import logging
import os
import sys

from kat.training.config import ConfigError, parse_config


def main(argv: list[str] | None = None) -> int:
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

    from tqdm.contrib.logging import logging_redirect_tqdm

    from kat.data import DataError
    from kat.training.loop import TrainingStopped, train  # heavy imports only once the config is good

    try:
        with logging_redirect_tqdm():
            train(cfg)
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingStopped as stop:  # non-finite loss (3), SIGTERM (143), SIGINT (130): see docs/ERRORS.md
        print(f"stopped: {stop}", file=sys.stderr)
        return stop.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
