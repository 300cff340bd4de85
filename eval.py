"""Evaluate a checkpoint on an ImageFolder split: top-1, top-5, loss, images/s.

    python eval.py --checkpoint checkpoints/<run>                        # a run dir: its latest checkpoint
    python eval.py --checkpoint checkpoints/<run>/step-00001234 --ema    # one checkpoint, its EMA weights
    python eval.py --checkpoint kat_small.pth --model kat_small_patch16_224 --data_dir /data/imagenet
    accelerate launch --num_processes 8 eval.py --checkpoint ... --json results.json
    accelerate launch --multi_gpu --num_processes 2 eval.py --cpu ...     # several CPU processes (gloo)

Our own checkpoints carry the model name, its kwargs, the class names, the data config and the data dir in
meta.json, and the checksums their files are verified against. Any other weight file (.pth/.pt/.bin/
.safetensors, e.g. a published KAT checkpoint, or a ViT .npz) needs --model and --data_dir. Weights are read by
kat.weights (the loader training uses too), as data, never code, and the model is built through timm's
pretrained path so the model's checkpoint filter can handle wrapper keys and position-embedding resizing. Images
go through the training pipeline's eval transform (kat.data.build_transforms). Flags share train.py's names
(--data_dir, --mixed_precision, --batch_size, --workers, --crop_pct, ...). Counts are exact under several
processes (see kat.evaluation.evaluate).

Bad input (missing or corrupt checkpoint, wrong architecture, dataset that does not match the head, missing
split folder) ends with one line on stderr and exit code 2.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import timm
import torch
import yaml
from accelerate import Accelerator
from tqdm.auto import tqdm

import kat.weights
from kat.data import DataError, DeviceLoader, ImageFolderDataset, build_transforms, resolve_data_config
from kat.evaluation import evaluate
from kat.models.pretrained import MissingWeightsError
from kat.rational import GroupRational, active_backend
from kat.training.config import TrainConfig

AMP_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class EvalError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--checkpoint",
        required=True,
        help="run dir (-> its latest checkpoint), step-XXXXXXXX dir, or a weight file",
    )
    p.add_argument("--model", help="timm model name; required for weight files without meta.json")
    p.add_argument(
        "--model_kwargs",
        "--model-kwargs",
        type=_yaml_mapping,
        default={},
        help="timm.create_model kwargs for --model, as a YAML mapping: '{img_size: 384}'",
    )
    p.add_argument(
        "--data_dir",
        "--data-dir",
        "--data",
        help="dataset root holding <split>/<class>/<image>; default: the training run's data_dir",
    )
    p.add_argument("--split", default="val", help="split folder under --data_dir (default: val)")
    p.add_argument(
        "--ema", action="store_true", help="evaluate the EMA weights (error if the checkpoint has none)"
    )
    p.add_argument("--batch_size", "--batch-size", type=int, default=128, help="per-process batch size")
    p.add_argument("--workers", type=int, default=4, help="data-loading processes per evaluating process")
    p.add_argument(
        "--mixed_precision",
        "--mixed-precision",
        choices=sorted(AMP_DTYPES),
        default="no",
        help="autocast dtype for the forward pass (default: no = fp32)",
    )
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], help="old name of --mixed_precision (none = no)")
    p.add_argument("--img_size", "--img-size", type=int, help="override the input resolution")
    p.add_argument("--crop_pct", "--crop-pct", type=float, help="override the center-crop fraction")
    p.add_argument("--interpolation", help="override the resize interpolation (bicubic, bilinear, ...)")
    p.add_argument("--mean", type=float, nargs=3, help="override the normalisation mean")
    p.add_argument("--std", type=float, nargs=3, help="override the normalisation std")
    p.add_argument("--cpu", action="store_true", help="evaluate on CPU even when a GPU is present")
    p.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    p.add_argument("--no_progress", "--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.amp is not None:
        args.mixed_precision = "no" if args.amp == "none" else args.amp
    if args.batch_size < 1:
        p.error(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.workers < 0:
        p.error(f"--workers must be >= 0, got {args.workers}")
    return args


# ---------------------------------------------------------------------------------------------------------
# Resolving what to evaluate


def load_checkpoint(args) -> tuple[torch.nn.Module, dict, dict | None]:
    """Returns (model, identity, meta): identity says which weights these are; meta is None for foreign files."""
    try:
        model, weights = kat.weights.create_model(
            args.checkpoint, model=args.model, model_kwargs=args.model_kwargs, ema=args.ema
        )
    except MissingWeightsError as e:  # unlike timm's loader, never fall back to the other weights
        raise EvalError(f"{e}; {'drop' if args.ema else 'pass'} --ema") from None
    except ValueError as e:  # CheckpointError, or a ViT .npz that timm cannot read
        raise EvalError(kat.weights.first_line(e)) from None
    meta = weights.meta
    identity = dict(
        model=meta["model"] if meta else args.model,
        checkpoint=weights.description,
        step=meta.get("step") if meta else None,
        epoch=weights.epoch,
        ema=weights.ema,
    )
    return model, identity, meta


def resolve_eval_data_config(model, meta: dict | None, args) -> dict:
    """The checkpoint's data config (ours) or the model's (as training resolves it), then the flags."""
    data_config = (
        dict(meta["data_config"]) if meta and meta.get("data_config") else resolve_data_config(model, args)
    )
    for key in ("crop_pct", "interpolation", "mean", "std"):
        if getattr(args, key) is not None:
            data_config[key] = getattr(args, key)
    if args.img_size:
        data_config["input_size"] = [data_config["input_size"][0], args.img_size, args.img_size]
    return data_config


def check_input_size(model, data_config: dict) -> None:
    """ViTs without dynamic_img_size take one input size; say so instead of failing in the first forward."""
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    wanted = tuple(data_config["input_size"][1:])
    if size is not None and getattr(patch_embed, "strict_img_size", False) and tuple(size) != wanted:
        raise EvalError(
            f"the model takes {size[0]}x{size[1]} inputs, not {wanted[0]}x{wanted[1]}; to evaluate at another "
            "size, build it for that size with --model_kwargs '{img_size: N}' (the position embedding is resampled)"
        )


def data_dir_of(meta: dict | None, args) -> Path:
    if args.data_dir:
        return Path(args.data_dir)
    data_dir = ((meta or {}).get("config") or {}).get("data_dir")  # the training run's
    if not data_dir:
        raise EvalError("no dataset given: pass --data_dir DIR (a folder holding <split>/<class>/<image>)")
    return Path(data_dir)


def build_dataset(data_dir: Path, split: str, data_config: dict) -> ImageFolderDataset:
    """The training pipeline's ImageFolder (same class order), with no tolerance for unreadable images."""
    split_dir = data_dir / split
    if not split_dir.is_dir():
        raise EvalError(
            f"split folder {split_dir} does not exist (expected {data_dir}/<split>/<class>/<image>); "
            "check --data_dir and --split"
        )
    # uint8 out, as in training: DeviceLoader normalises on the device. The default config only shapes the
    # training transform, which is not used here.
    _, transform = build_transforms(TrainConfig(), data_config)
    try:
        dataset = ImageFolderDataset(split_dir, transform, max_bad_images=0)
    except (DataError, FileNotFoundError) as e:
        raise EvalError(kat.weights.first_line(e)) from e
    if len(dataset) == 0:
        raise EvalError(f"{split_dir} holds no images (expected {split_dir}/<class>/<image>)")
    return dataset


def check_classes(dataset: ImageFolderDataset, model, meta: dict | None, split_dir: Path) -> None:
    """The dataset's labels must mean what the head's outputs mean, or the accuracy is meaningless."""
    num_classes = model.num_classes
    if len(dataset.classes) != num_classes:
        raise EvalError(
            f"{split_dir} has {len(dataset.classes)} class folders but the model head has "
            f"{num_classes} outputs; evaluate on the dataset the model was trained for"
        )
    class_names = (meta or {}).get("class_names")
    if class_names and list(class_names) != dataset.classes:
        differ = [
            f"{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(dataset.classes, class_names)) if a != b
        ]
        raise EvalError(
            f"{split_dir} class folders differ from the checkpoint's class_names "
            f"(dataset vs checkpoint) at {_abbrev(differ)}"
        )


# ---------------------------------------------------------------------------------------------------------
# Running and reporting


def rational_backend(model, device, amp_dtype) -> str | None:
    """Which GR-KAN implementation runs (KAT models only)."""
    if not any(isinstance(m, GroupRational) for m in model.modules()):
        return None
    return active_backend(torch.zeros(1, 8, device=device, dtype=amp_dtype or torch.float32))


def format_table(r: dict) -> str:
    ident = (
        f"{r['model']}"
        + (f", step {r['step']}" if r["step"] is not None else "")
        + (f", epoch {r['epoch']}" if r["epoch"] is not None else "")
        + (", EMA weights" if r["ema"] else "")
    )
    dc = r["data_config"]
    rows = [
        ("checkpoint", r["checkpoint"]),
        ("model", ident),
        ("data", f"{r['data_dir']}/{r['split']}: {r['num_images']} images, {r['num_classes']} classes"),
        (
            "transform",
            f"{dc['input_size'][1]}x{dc['input_size'][2]} {dc['interpolation']}, crop {dc['crop_pct']:.3f}",
        ),
        (
            "device",
            f"{r['device']} x {r['num_processes']} process(es), mixed precision {r['mixed_precision']}"
            + (f", GR-KAN backend {r['rational_backend']}" if r["rational_backend"] else ""),
        ),
        ("top-1", f"{r['top1']:.3f} %"),
        ("top-5", f"{r['top5']:.3f} %"),
        ("loss", f"{r['loss']:.4f}"),
        ("images/s", f"{r['images_per_sec']:.1f}"),
    ]
    return "\n".join(f"  {k:<12}{v}" for k, v in rows)


def write_json(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def run(args) -> dict:
    model, identity, meta = load_checkpoint(args)
    data_config = resolve_eval_data_config(model, meta, args)
    check_input_size(model, data_config)
    data_dir = data_dir_of(meta, args)
    dataset = build_dataset(data_dir, args.split, data_config)
    check_classes(dataset, model, meta, data_dir / args.split)

    # Created after the input checks, so that bad input fails before any process group exists.
    accelerator = Accelerator(cpu=args.cpu)

    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=False,
        num_workers=args.workers,
        pin_memory=accelerator.device.type == "cuda",
    )
    loader = accelerator.prepare_data_loader(loader)  # shards across processes; evaluate() de-duplicates
    loader = DeviceLoader(loader, data_config["mean"], data_config["std"], accelerator.device)
    model = model.to(accelerator.device)

    bar = tqdm(
        total=len(loader),
        desc="eval",
        unit="batch",
        file=sys.stderr,
        disable=args.no_progress or not accelerator.is_main_process,
    )
    metrics = evaluate(
        model, loader, accelerator, amp_dtype=AMP_DTYPES[args.mixed_precision], progress=lambda _: bar.update(1)
    )
    bar.close()
    if dataset.num_bad_images:  # kat.data substituted the next readable image for each; the counts are off
        raise EvalError(
            f"{dataset.num_bad_images} image(s) under {data_dir / args.split} could not be read (named in the "
            "warnings above); fix or remove them and evaluate again"
        )

    results = {
        **{k: metrics[k] for k in ("top1", "top5", "loss", "images_per_sec", "num_images")},
        **identity,
        "split": args.split,
        "data_dir": str(data_dir),
        "num_classes": len(dataset.classes),
        "data_config": data_config,
        "batch_size": args.batch_size,
        "mixed_precision": args.mixed_precision,
        "device": str(accelerator.device),
        "num_processes": accelerator.num_processes,
        "rational_backend": rational_backend(model, accelerator.device, AMP_DTYPES[args.mixed_precision]),
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
    }
    if accelerator.is_main_process:
        print(format_table(results))
        if args.json:
            write_json(Path(args.json), results)
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except EvalError as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        return 2
    return 0


def _yaml_mapping(text: str) -> dict:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a mapping like '{{img_size: 384}}', got {text!r}")
    return value


def _abbrev(items: list, limit: int = 5) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


if __name__ == "__main__":
    sys.exit(main())
