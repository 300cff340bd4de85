"""Export a trained run: a timm hub folder (`--format hf`) or an ONNX model (`--format onnx`).

    python -m kat.export --checkpoint checkpoints/<run> --format hf --out kat-run  # newest checkpoint
    python -m kat.export --checkpoint checkpoints/<run>/step-00001234 --ema --format onnx --out kat.onnx

The hf folder (config.json, model.safetensors, README.md) is what `timm.create_model('local-dir:DIR',
pretrained=True)` loads after `import kat`, and what `huggingface_hub.upload_folder` publishes: config.json
names the architecture, its kwargs, the classes and the preprocessing (input size, interpolation, mean/std,
crop); the README is a model card with the run's config and its last eval metrics.

The ONNX model takes normalised images [batch, 3, H, W] (any batch) and returns logits; its metadata holds the
preprocessing and class names. It needs `pip install onnx onnxscript` (onnxruntime to run it).

An existing --out is never replaced without --force; the output is written beside it and moved into place
only when complete, so a failed export leaves what was there. Bad input ends with one line and exit code 2.
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from timm.models._hub import save_for_hf  # timm.models exports it from 1.0.16; _hub has it from 1.0.15 on

import kat.weights
from kat.models.pretrained import CheckpointError, MissingWeightsError

# Opset 18: the dynamo exporter's native one; onnxruntime >= 1.14 runs it, recent TensorRT parsers read it.
ONNX_OPSET = 18
HF_FILES = ("config.json", "model.safetensors", "README.md")


class ExportError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


def load_run(checkpoint: str | Path, ema: bool = False) -> tuple[torch.nn.Module, dict, Path]:
    """(model in eval mode, meta, checkpoint dir) of a run dir (newest complete checkpoint) or a step dir."""
    try:
        model, weights = kat.weights.create_model(checkpoint, ema=ema)
    except MissingWeightsError as e:
        raise ExportError(f"{e}; drop --ema") from None
    except CheckpointError as e:
        raise ExportError(str(e).splitlines()[0]) from None
    if weights.meta is None:  # a bare weights file: no classes, preprocessing or run to describe
        raise ExportError(
            f"{checkpoint} is not one of our runs or checkpoints (no meta.json): pass a run dir"
        )
    return model, weights.meta, Path(weights.description)


def architecture_args(meta: dict) -> dict:
    """The run's model kwargs without the drop rates: those only regularise training (timm drops them too)."""
    return {
        k: v
        for k, v in (meta.get("model_kwargs") or {}).items()
        if k not in ("drop_rate", "drop_path_rate", "drop_block_rate") and not k.endswith("_drop_rate")
    } | {"num_classes": meta["num_classes"]}


def run_pretrained_cfg(model: torch.nn.Module, meta: dict) -> dict:
    """The model's timm cfg describing the run's weights: its classes and eval preprocessing, no source."""
    data = meta["data_config"]
    source = ("url", "hf_hub_id", "hf_hub_filename", "file", "state_dict", "tag")
    cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in source}
    return cfg | {
        "num_classes": meta["num_classes"],
        "input_size": tuple(data["input_size"]),
        "interpolation": data["interpolation"],
        "mean": tuple(data["mean"]),
        "std": tuple(data["std"]),
        "crop_pct": data["crop_pct"],
        "crop_mode": "center",
    }


def model_card(meta: dict, ckpt_dir: Path, ema: bool) -> str:
    """README.md for the hub: front matter, how to load, the last eval metrics and the run's config."""
    name = meta.get("config", {}).get("run_name") or ckpt_dir.parent.name
    weights = "EMA weights" if ema else "weights"
    lines = [
        "---",
        "tags:",
        "- image-classification",
        "- timm",
        "- kat",
        "library_name: timm",
        "pipeline_tag: image-classification",
        "---",
        f"# {name}",
        "",
        f"A Kolmogorov-Arnold Transformer ({meta['model']}, arXiv:2409.10594) trained with kat, "
        f"{meta['num_classes']} classes: the {weights} of checkpoint `{ckpt_dir.name}` (step "
        f"{meta.get('step')}, epoch {meta.get('epoch')}).",
        "",
        "## Use",
        "",
        "```python",
        "import timm",
        "import kat  # registers the KAT models with timm (pip install the kat repository)",
        "",
        "model = timm.create_model('local-dir:PATH_TO_THIS_FOLDER', pretrained=True).eval()  # timm >= 1.0.16",
        "# or, once uploaded: timm.create_model('hf-hub:USER/REPO', pretrained=True)",
        "cfg = timm.data.resolve_model_data_config(model)  # input size, interpolation, mean/std, crop",
        "transform = timm.data.create_transform(**cfg)",
        "```",
        "",
        "## Last evaluation",
        "",
    ]
    metrics = meta.get("metrics") or {}
    if metrics:
        lines += ["| weights | top-1 (%) | top-5 (%) | loss | images |", "|---|---|---|---|---|"]
        for split, m in metrics.items():
            label = "EMA" if split == "val_ema" else "model"
            exported = " (exported)" if (split == "val_ema") == ema else ""
            lines.append(
                f"| {label}{exported} | {m['top1']:.2f} | {m['top5']:.2f} | {m['loss']:.4f} | "
                f"{m.get('num_images', '')} |"
            )
    else:
        lines.append("This checkpoint was saved before any evaluation.")
    lines += [
        "",
        "## Training config",
        "",
        "```yaml",
        yaml.safe_dump(meta.get("config", {})).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_hf_folder(model: torch.nn.Module, meta: dict, ckpt_dir: Path, ema: bool, folder: Path) -> None:
    """config.json and model.safetensors through timm's save_for_hf, then the model card."""
    model.pretrained_cfg = run_pretrained_cfg(model, meta)
    labels = {"label_names": list(meta["class_names"])} if meta.get("class_names") else {}
    save_for_hf(
        model, str(folder), model_config=labels, model_args=architecture_args(meta), safe_serialization=True
    )
    (folder / "README.md").write_text(model_card(meta, ckpt_dir, ema), encoding="utf-8")


def write_onnx(model: torch.nn.Module, meta: dict, path: Path) -> None:
    """Torch's dynamo exporter with a dynamic batch; the preprocessing and classes go in the metadata."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (the dynamo exporter translates with it)
    except ImportError as e:
        raise ExportError(
            f"ONNX export needs onnx and onnxscript ({e}): pip install onnx onnxscript"
        ) from None
    images = torch.zeros(2, *meta["data_config"]["input_size"])  # batch 2: a batch of 1 would be specialised
    with torch.no_grad():
        torch.onnx.export(
            model,
            (images,),
            str(path),
            dynamo=True,
            external_data=False,  # one file; KAT-B's fp32 weights are far below protobuf's 2 GB limit
            opset_version=ONNX_OPSET,
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )
    proto = onnx.load(str(path))
    props = {k: json.dumps(v) for k, v in meta["data_config"].items()}
    props |= {"model": meta["model"], "class_names": json.dumps(meta.get("class_names"))}
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, str(path))


def check_out(out: Path, fmt: str, force: bool) -> None:
    if out.exists() and not force:
        raise ExportError(f"--out {out} exists; pass --force to replace it, or choose another path")
    if fmt == "hf" and out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; the hf format writes a folder: choose another path")
    if fmt == "onnx" and out.is_dir():
        raise ExportError(
            f"--out {out} is a folder; the onnx format writes a file such as {out / 'model.onnx'}"
        )
    if not out.parent.is_dir():
        raise ExportError(f"--out {out}: the folder {out.parent} does not exist")


def export(checkpoint: str | Path, fmt: str, out: str | Path, ema: bool = False, force: bool = False) -> Path:
    """Write `checkpoint`'s model to `out` in format 'hf' (a folder) or 'onnx' (a file); returns `out`."""
    out = Path(out)
    check_out(out, fmt, force)
    model, meta, ckpt_dir = load_run(checkpoint, ema)
    # Written into a temp dir beside `out` (same file system, so the moves below are renames).
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        tmp = Path(tmp)
        if fmt == "onnx":
            write_onnx(model, meta, tmp / out.name)
            os.replace(tmp / out.name, out)
        elif out.is_dir():  # --force: replace our three files, keep anything else the user put there
            write_hf_folder(model, meta, ckpt_dir, ema, tmp)
            for name in HF_FILES:
                os.replace(tmp / name, out / name)
        else:
            write_hf_folder(model, meta, ckpt_dir, ema, tmp / out.name)
            os.replace(tmp / out.name, out)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kat.export", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--checkpoint", required=True, help="run dir (-> its newest complete checkpoint) or step dir"
    )
    p.add_argument("--ema", action="store_true", help="export the EMA weights (error if the run kept none)")
    p.add_argument(
        "--format", choices=("hf", "onnx"), required=True, help="hf: a timm hub folder; onnx: a file"
    )
    p.add_argument("--out", required=True, help="folder (hf) or file (onnx) to write")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        out = export(args.checkpoint, args.format, args.out, ema=args.ema, force=args.force)
    except ExportError as e:
        print(f"kat.export: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
