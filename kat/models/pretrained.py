"""Loading published KAT checkpoints and our own training checkpoints into the timm models.

`load_checkpoint_file` reads a local file safely: `.pth`/`.pt` with torch.load(weights_only=True), `.safetensors`
with safetensors. We do not hand local files to timm: timm before 1.0.2x reads them with
torch.load(weights_only=False), which runs whatever code the pickle contains.

`checkpoint_filter_fn` is the timm `pretrained_filter_fn`: it turns a checkpoint (published layout, KAT_FACTS
section 1, or ours) into the model's state dict and fails with the mismatched keys named when it does not fit.
"""

import argparse
import math
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from torch import Tensor, nn

# Training-checkpoint wrappers, in order of preference. Non-EMA weights first: the published KAT accuracies were
# measured on them (timm's validate.py reads 'state_dict' unless asked for the EMA).
_WRAPPER_KEYS = ("model", "state_dict", "state_dict_ema", "model_ema")
# Key prefixes left by DistributedDataParallel and by torch.compile's wrapper module.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_MAX_LISTED = 8


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not fit the model it is loaded into.

    A ValueError, not a TypeError: timm's load_pretrained retries filter functions that raise TypeError.
    """


def unwrap_state_dict(checkpoint: dict) -> dict[str, Tensor]:
    """The model weights inside `checkpoint`, without training wrappers or wrapper-module key prefixes."""
    for key in _WRAPPER_KEYS:
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    state_dict = {}
    for key, value in checkpoint.items():
        for prefix in _WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        state_dict[key] = value
    return state_dict


def load_checkpoint_file(path: str | Path) -> dict[str, Tensor]:
    """Read a local checkpoint (.safetensors, or a torch .pth/.pt) on CPU and return its unwrapped weights."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(
            f"checkpoint {path} is a directory: pass a weights file in it (e.g. model.safetensors)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            checkpoint = load_file(path, device="cpu")
        else:
            # timm's and DeiT's training scripts store their argparse.Namespace next to the weights.
            with torch.serialization.safe_globals([argparse.Namespace]):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"checkpoint {path} holds Python objects that torch.load(weights_only=True) refuses to load. If you "
            "trust the file, re-save just its weights (torch.save(torch.load(path, weights_only=False)"
            f"['state_dict'], 'weights.pth')) and load that.\n{e}"
        ) from e
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path}: {e}") from e
    if not isinstance(checkpoint, dict):
        raise ValueError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a state dict")
    return unwrap_state_dict(checkpoint)


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict[str, Tensor]:
    """timm pretrained_filter_fn: a KAT checkpoint (published or ours) -> `model`'s state dict.

    Unwraps 'model'/'state_dict'/EMA wrappers, strips 'module.' prefixes, resamples the patch embedding and the
    position embedding to the model's patch size and grid as timm's ViT filter does, then checks that every key
    and shape fits (CheckpointMismatchError otherwise).
    """
    out = {}
    for key, value in unwrap_state_dict(state_dict).items():
        if key == "patch_embed.proj.weight":
            kernel = model.patch_embed.proj.weight.shape[-2:]
            if value.ndim == 4 and value.shape[-2:] != kernel:
                value = resample_patch_embed(value, list(kernel), verbose=True)
        elif (
            key == "pos_embed" and model.pos_embed is not None and value.shape[1] != model.pos_embed.shape[1]
        ):
            value = _resample_pos_embed(value, model)
        out[key] = value
    check_state_dict_fits(out, model)
    return out


def _resample_pos_embed(pos_embed: Tensor, model: nn.Module) -> Tensor:
    """Interpolate a learned position embedding [1, prefix + h*w, D] from its square grid to the model's grid."""
    num_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    num_positions = pos_embed.shape[1] - num_prefix
    side = math.isqrt(num_positions)
    if side * side != num_positions:
        raise CheckpointMismatchError(
            f"pos_embed {tuple(pos_embed.shape)} holds {num_positions} patch positions, not a square grid, so its "
            "grid cannot be inferred: build the model with the img_size and patch_size it was trained with"
        )
    return resample_abs_pos_embed(
        pos_embed,
        new_size=list(model.patch_embed.grid_size),
        old_size=[side, side],
        num_prefix_tokens=num_prefix,
        verbose=True,
    )


def check_state_dict_fits(state_dict: dict[str, Tensor], model: nn.Module) -> None:
    """Raise CheckpointMismatchError naming every missing, unexpected and wrongly shaped key.

    The classifier and the first conv are left out: timm's load_pretrained adapts them after this filter
    (drops the head for another num_classes, converts the stem for another in_chans) and torch's strict
    load_state_dict still reports any mismatch it leaves.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    adapted = set()
    for name in (cfg.get("classifier") or "head", cfg.get("first_conv") or "patch_embed.proj"):
        adapted |= {f"{name}.weight", f"{name}.bias"}
    expected = {k: v for k, v in model.state_dict().items() if k not in adapted}
    given = {k: v for k, v in state_dict.items() if k not in adapted}

    mismatched = [
        f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in given.items()
        if k in expected and tuple(getattr(v, "shape", ())) != tuple(expected[k].shape)
    ]
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    if not (mismatched or missing or unexpected):
        return

    def listing(what: str, items: list[str]) -> str:
        more = f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
        return f"\n  {len(items)} {what}: " + ", ".join(items[:_MAX_LISTED]) + more

    arch = (
        f"embed_dim={model.embed_dim}, depth={len(model.blocks)}, "
        f"num_heads={model.blocks[0].attn.num_heads if len(model.blocks) else '?'}"
    )
    raise CheckpointMismatchError(
        f"checkpoint does not fit {type(model).__name__}({arch}):"
        + (listing("shape mismatches (checkpoint vs model)", mismatched) if mismatched else "")
        + (listing("keys missing from the checkpoint", missing) if missing else "")
        + (listing("unexpected keys in the checkpoint", unexpected) if unexpected else "")
        + "\nBuild the model the checkpoint was trained as (published weights: kat_{tiny,small,base}_patch16_224; "
        "our checkpoints: 'model' and 'model_kwargs' in the checkpoint's meta.json)."
    )
