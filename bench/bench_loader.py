"""Images/s that the training data pipeline sustains on this machine's CPUs, for ImageNet-sized JPEGs.

Writes a few thousand synthetic JPEGs with ImageNet's typical sizes (about 400x350 px, quality 90: smooth
colour fields plus noise, so they compress like photos rather than like flat colour or pure noise), then
times train.py's own pipeline (kat.data: ImageFolderDataset + the recipe's timm transforms with RandAugment
ending in uint8, torch DataLoader with pinned memory) at the recipe's batch size. Compare the result with
the GPU's training rate from bench_train.py: a loader slower than the GPU starves it. --device_augment times
the device_augment pipeline instead (workers read files; nvJPEG decoding and the augmentation on the GPU).

    python bench/bench_loader.py --num_images 4000 --json $OUT/loader.json
    python bench/bench_loader.py --num_images 4000 --workers 4,8 --device_augment --stages 20
"""

import argparse
import json
import os
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kat.data import (  # noqa: E402
    DeviceAugment,
    DeviceAugmentConfig,
    DeviceLoader,
    EncodedImageFolderDataset,
    ImageFolderDataset,
    build_transforms,
    collate_encoded,
)
from kat.data.gpu.augment import CROP, FLIP  # noqa: E402
from kat.data.gpu.resized_crop import resized_crops  # noqa: E402
from kat.training.config import parse_config  # noqa: E402


def write_jpeg(args) -> int:
    path, seed = args
    rng = np.random.default_rng(seed)
    width, height = int(rng.normal(440, 70)), int(rng.normal(380, 60))
    width, height = max(200, min(width, 800)), max(200, min(height, 700))
    coarse = rng.uniform(0, 255, size=(height // 32 + 2, width // 32 + 2, 3)).astype(np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(image, dtype=np.int16) + rng.normal(0, 12, size=(height, width, 3)).astype(np.int16)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return path.stat().st_size


def make_images(root: Path, num_images: int, num_classes: int) -> float:
    """Write the JPEGs (in parallel) unless they are there already; returns the mean file size in KB."""
    jobs = []
    for i in range(num_images):
        folder = root / "train" / f"n{i % num_classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((folder / f"img_{i:06d}.JPEG", i))
    with Pool(os.cpu_count()) as pool:
        sizes = pool.map(write_jpeg, jobs, chunksize=16)
    return sum(sizes) / len(sizes) / 1024


def time_loader(dataset, batch: int, workers: int, batches: int, augment=None) -> float:
    """Steady-state images/s: the first two batches per worker (start-up, a full prefetch queue) are not
    timed. Indices are drawn with replacement, so a few thousand JPEGs feed any number of batches.

    With `augment` (a DeviceAugment) the batches go through train.py's DeviceLoader as with device_augment:
    decoded, augmented and normalised on the GPU by its background thread; the rate counts finished batches.
    """
    warmup = max(3, 2 * workers)
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=batch * (warmup + batches))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, sampler=sampler, num_workers=workers, pin_memory=torch.cuda.is_available(),
        drop_last=True, prefetch_factor=4 if workers else None,
        collate_fn=collate_encoded if augment is not None else None,
    )
    if augment is not None:
        loader = DeviceLoader(loader, [0.5] * 3, [0.25] * 3, augment.device, prefetch=workers > 0, augment=augment)
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    count = 0
    for _ in range(batches):
        images, _ = next(iterator)
        count += images.shape[0]
    if augment is not None and augment.device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def time_stages(dataset, augment, batch: int, batches: int) -> dict:
    """Per batch, DeviceAugment's stages as its thread runs them: host ms (the Python thread's time in the calls,
    no synchronisation) and GPU ms (CUDA events on the stream). Batches are read beforehand, untimed."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=4, drop_last=True,
                                         collate_fn=collate_encoded)  # fmt: skip
    collected = [b for b, _ in zip(loader, range(batches + 2))]
    config, names = augment.config, ("decode", "crop_resize_flip", "rand_augment")
    host, gpu = {n: [] for n in names}, {n: [] for n in names}
    for i, (buffer, lengths, decoded, _, params, samples) in enumerate(collected):
        torch.cuda.synchronize()
        marks, clocks = [torch.cuda.Event(enable_timing=True) for _ in range(4)], [time.perf_counter()]
        marks[0].record()
        images = augment._decode(buffer, lengths, decoded, samples)
        clocks.append(time.perf_counter())
        marks[1].record()
        out = resized_crops(images, params[:, CROP].long(), params[:, FLIP].bool(), config.size, config.interpolation)
        clocks.append(time.perf_counter())
        marks[2].record()
        config.rand_augment(out, params[:, FLIP + 1 :].view(len(out), -1, 3))
        clocks.append(time.perf_counter())
        marks[3].record()
        torch.cuda.synchronize()
        if i >= 2:  # the first two: kernel compilation, allocator warm-up
            for k, name in enumerate(names):
                host[name].append(1e3 * (clocks[k + 1] - clocks[k]))
                gpu[name].append(marks[k].elapsed_time(marks[k + 1]))
    median = lambda v: float(np.median(v))  # noqa: E731
    return {"host_ms": {n: median(v) for n, v in host.items()}, "gpu_ms": {n: median(v) for n, v in gpu.items()},
            "batches": batches, "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/tmp/kat_loader_bench"))
    parser.add_argument("--num_images", type=int, default=4000)
    parser.add_argument("--config", default="kat_s.yaml", help="training config whose augmentation is timed")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", default=None, help="comma list of worker counts; default: cpu_count")
    parser.add_argument("--batches", type=int, default=100, help="timed batches per worker count")
    parser.add_argument("--device_augment", action="store_true",
                        help="time device_augment: workers read files, the GPU decodes and augments")
    parser.add_argument("--stages", type=int, default=0,
                        help="with --device_augment on a GPU: also time DeviceAugment's stages over this many batches")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.stages and not (args.device_augment and torch.cuda.is_available()):
        parser.error("--stages times the device_augment stages on a GPU: add --device_augment, run on a GPU")

    cpus = os.cpu_count()
    workers = [int(w) for w in args.workers.split(",")] if args.workers else [cpus]
    mean_kb = make_images(args.root, args.num_images, num_classes=100)
    cfg = parse_config(["--config", args.config])
    data_config = {"input_size": [3, 224, 224], "interpolation": "bicubic", "mean": [0.485, 0.456, 0.406],
                   "std": [0.229, 0.224, 0.225], "crop_pct": 0.875}
    train_transform, _ = build_transforms(cfg, data_config)
    dataset = ImageFolderDataset(args.root / "train", train_transform, cfg.max_bad_images)
    augment = None
    if args.device_augment:
        augment_config = DeviceAugmentConfig(cfg, data_config)
        dataset = EncodedImageFolderDataset(args.root / "train", augment_config.draw_params, cfg.max_bad_images)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        augment = DeviceAugment(augment_config, dataset, device)

    results = {"cpus": cpus, "num_images": len(dataset), "mean_jpeg_kb": mean_kb, "config": args.config,
               "augmentation": {"aa": cfg.aa, "reprob": cfg.reprob, "scale": cfg.scale}, "batch": args.batch,
               "device_augment": args.device_augment, "command": " ".join(sys.argv), "runs": []}
    for w in workers:
        rate = time_loader(dataset, args.batch, w, args.batches, augment)
        results["runs"].append({"workers": w, "images_per_sec": rate})
        print(f"workers {w:3d}: {rate:8.0f} images/s  ({rate / max(w, 1):.0f} per worker)", flush=True)
    if args.stages:
        results["stages"] = time_stages(dataset, augment, args.batch, args.stages)
        print("stages per batch (median):", json.dumps(results["stages"]), flush=True)
    print(f"{len(dataset)} JPEGs, mean {mean_kb:.0f} KB, {cpus} CPUs, augmentation of {args.config}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
