"""uint8 image batches to the device, normalised there (timm's "prefetcher" pattern).

The loader workers only decode and augment: the timm transforms end in uint8 [3, H, W] (use_prefetcher=True),
so the host->device copy is a quarter of float32's. The device computes (x / 255 - mean) / std with the same
float32 operations ToTensor + Normalize did on the CPU, so the values are bitwise those of the old path.

Not timm.data.PrefetchLoader, which does the same with a side stream, because:
- it always reads one batch ahead. With num_workers=0 the transforms run in this process on the global RNG,
  so batch k+1's augmentation would be drawn before a checkpoint at step k saves that RNG, and a resumed run
  would differ. Here the next batch is read ahead only on CUDA with worker processes (whose RNG is their own);
- it folds 255 into mean and std, which moves some values by a rounding step from ToTensor + Normalize;
- its random erasing runs in the read-ahead too; the training loop erases at consumption instead.
"""

import torch


class DeviceLoader:
    """Iterate `loader`'s (uint8 images, targets) as (normalised float32 images, targets) on `device`.

    prefetch: copy and normalise batch k+1 on a side CUDA stream while the caller works on batch k (ignored
    off CUDA, where there is nothing to overlap). Only for loaders whose transforms do not run in this process
    (num_workers > 0), and not for an Accelerate-prepared loader, whose end-of-data flag (which
    gather_for_metrics reads to drop padding) would then be set a batch early.
    """

    def __init__(self, loader, mean, std, device, *, prefetch: bool = False):
        self.loader, self.device = loader, torch.device(device)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.prefetch = prefetch and self.device.type == "cuda"
        self.stream = None  # one for the loader's lifetime: the caching allocator pools blocks per stream

    def __len__(self) -> int:
        return len(self.loader)

    def to_device(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dtype != torch.uint8:
            raise TypeError(
                f"DeviceLoader expects uint8 images (timm transforms built with use_prefetcher=True), got "
                f"{images.dtype}; build the dataset's transforms with kat.data.build_transforms"
            )
        images = images.to(self.device, non_blocking=True).float().div_(255).sub_(self.mean).div_(self.std)
        return images, targets.to(self.device, non_blocking=True)

    def __iter__(self):
        # The loader's iterator (and its workers) start now, as iter(DataLoader) would, not at the first next().
        batches = iter(self.loader)
        return self._prefetched(batches) if self.prefetch else (self.to_device(*b) for b in batches)

    def _prefetched(self, batches):
        if self.stream is None:
            self.stream = torch.cuda.Stream(self.device)
        consumer, ready = torch.cuda.current_stream(self.device), None
        for images, targets in batches:
            # Blocks the caller freed may be handed to the allocations below: let the copy start only after
            # the caller's queued work (which may still read them) is done.
            self.stream.wait_stream(consumer)
            with torch.cuda.stream(self.stream):
                upcoming = self.to_device(images, targets)
            if ready is not None:
                yield ready
            consumer = torch.cuda.current_stream(self.device)
            consumer.wait_stream(self.stream)  # the caller's next kernels see the finished copy
            ready = upcoming
        if ready is not None:
            yield ready
