"""uint8 image batches to the device, normalised there (timm's "prefetcher" pattern).

The loader workers only decode and augment: the timm transforms end in uint8 [3, H, W] (use_prefetcher=True),
so the host->device copy is a quarter of float32's. The device computes (x / 255 - mean) / std with the same
float32 operations ToTensor + Normalize did on the CPU, so the values are bitwise those of the old path.
With device_augment the workers do not even decode: a kat.data.DeviceAugment turns each batch of encoded
JPEGs into the uint8 images on the device. On CUDA the next batches are prepared by a background thread on a
side stream, so decoding and augmentation overlap the training step.

Not timm.data.PrefetchLoader, which does the same with a side stream, because:
- it always reads one batch ahead. With num_workers=0 the transforms run in this process on the global RNG,
  so batch k+1's augmentation would be drawn before a checkpoint at step k saves that RNG, and a resumed run
  would differ. Here the next batch is read ahead only on CUDA with worker processes (whose RNG is their own);
- it folds 255 into mean and std, which moves some values by a rounding step from ToTensor + Normalize;
- its random erasing runs in the read-ahead too; the training loop erases at consumption instead.
"""

import contextlib
import queue
import threading

import torch

_END = object()


class DeviceLoader:
    """Iterate `loader`'s (uint8 images, targets) as (normalised float32 images, targets) on `device`.

    augment: a kat.data.DeviceAugment; the loader then yields encoded batches (collate_encoded) that it
    decodes and augments on the device into the uint8 images.
    prefetch: prepare the next batches (copy, decode/augment, normalise) on a background thread, on CUDA on a
    side stream, while the caller works on this one. Only for loaders whose transforms do not run in this
    process (num_workers > 0), and not for an Accelerate-prepared loader, whose end-of-data flag (which
    gather_for_metrics reads to drop padding) would then be set early.
    """

    def __init__(self, loader, mean, std, device, *, prefetch: bool = False, augment=None):
        self.loader, self.device, self.augment = loader, torch.device(device), augment
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.prefetch = prefetch
        self.stream = None  # one for the loader's lifetime: the caching allocator pools blocks per stream

    def __len__(self) -> int:
        return len(self.loader)

    def to_device(self, *batch) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = self.augment(*batch) if self.augment is not None else batch
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

    def _side_stream(self):
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        if self.stream is None:
            self.stream = torch.cuda.Stream(self.device)
        stack = contextlib.ExitStack()
        stack.enter_context(torch.cuda.device(self.device))  # the thread's current device and stream
        stack.enter_context(torch.cuda.stream(self.stream))
        return stack

    def _prefetched(self, batches):
        """A producer thread prepares batches (torch ops and nvJPEG decoding release the GIL, so it overlaps the
        caller's step); on CUDA each one is handed over with an event that the caller's stream waits on."""
        ready, stop, cuda = queue.Queue(maxsize=1), threading.Event(), self.device.type == "cuda"

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce():
            try:
                with self._side_stream():
                    for batch in batches:
                        images, targets = self.to_device(*batch)
                        done = torch.cuda.Event() if cuda else None
                        if cuda:
                            done.record(self.stream)
                        if not put((images, targets, done)):
                            return
            except BaseException as error:  # noqa: BLE001  (re-raised in the caller's thread)
                put(error)
                return
            put(_END)

        producer = threading.Thread(target=produce, name="kat-device-loader", daemon=True)
        producer.start()
        try:
            while (item := ready.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                images, targets, done = item
                if cuda:
                    consumer = torch.cuda.current_stream(self.device)
                    consumer.wait_event(done)  # the caller's kernels see the finished batch
                    # Made on the side stream, used on the caller's: not reused before that use ends.
                    images.record_stream(consumer)
                    targets.record_stream(consumer)
                yield images, targets
        finally:
            stop.set()
            producer.join()
