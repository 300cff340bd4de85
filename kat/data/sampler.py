"""A seeded, sharded shuffle that can start mid-epoch, so a resumed run sees exactly the data it would have.

Each epoch is one permutation of the dataset drawn from (seed, epoch). The first `start` entries are the
samples already consumed (by all processes together), the rest is dealt round-robin to the processes.
Because every process' first b batches together are a prefix of the permutation, the position is a single
number that stays meaningful even if the run resumes with a different number of processes.
We deliberately do not use torch's DistributedSampler (cannot start mid-epoch) or accelerate's seedable
sampler (seeds follow torch.initial_seed(), which differs per process after a device-specific set_seed).
"""

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    def __init__(self, num_samples: int, *, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        self.num_samples, self.num_replicas, self.rank, self.seed = num_samples, num_replicas, rank, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch `epoch`, skipping the first `start` samples (summed over processes) of its order."""
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start={start} is outside the dataset (0..{self.num_samples})")
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return (self.num_samples - self.start) // self.num_replicas

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator)[self.start :]
        # Round-robin over processes; every process gets the same count (the tail is dropped).
        return iter(order[self.rank : len(self) * self.num_replicas : self.num_replicas].tolist())
