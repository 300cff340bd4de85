"""Reading weight files safely and fitting them to the timm models (kat.weights is the entry point).

`read_checkpoint_file` reads a local file safely: `.pth`/`.pt` with torch.load(weights_only=True),
`.safetensors` with safetensors. We do not hand local files to timm: timm before 1.0.2x reads them with
torch.load(weights_only=False), which runs whatever code the pickle contains. `unwrap_state_dict` finds the
weights inside a training checkpoint, `describe_mismatch` names the keys that do not fit a model.

`checkpoint_filter_fn` is the timm `pretrained_filter_fn`: it turns a checkpoint (the published KAT layout,
which is timm's ViT layout plus the rational coefficients, or ours) into the model's state dict and fails with
the mismatched keys named when it does not fit.
"""

import argparse
import math
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models import clean_state_dict
from torch import Tensor, nn

# Where training scripts nest the weights (DeiT: 'model', timm: 'state_dict') and their EMA.
_WEIGHTS_KEYS = ("model", "state_dict")
_EMA_KEYS = ("state_dict_ema", "model_ema")
# timm's and DeiT's training scripts store their command line (an argparse.Namespace) next to the weights.
_SAFE_GLOBALS = [argparse.Namespace]
_MAX_LISTED = 8
_RESAVE_WEIGHTS = "If you trust the file, re-save just its weights (a dict of tensors) and load that."


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, holding code, or not holding the weights asked for."""


class MissingWeightsError(CheckpointError):
    """The checkpoint lacks the weights asked for: no EMA weights for ema=True, only EMA ones for ema=False."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint's keys or shapes do not fit the model it is loaded into.

    A ValueError, not a TypeError: timm's load_pretrained retries filter functions that raise TypeError.
    """


def read_checkpoint_file(path: str | Path, code_fix: str = _RESAVE_WEIGHTS) -> dict:
    """A local checkpoint file's top-level dict (weights and any training wrappers), read on CPU as data.

    code_fix: what the error for a file holding Python objects (code) tells the user to do.
    """
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
            with torch.serialization.safe_globals(_SAFE_GLOBALS):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = _unsafe_globals(path)
        if not unsafe:
            raise _unreadable(path, e) from None
        raise CheckpointError(
            f"checkpoint {path} holds Python objects ({_abbrev(unsafe)}) that torch.load(weights_only=True) "
            f"refuses to load: checkpoints are data, never code. {code_fix}"
        ) from None
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise _unreadable(path, e) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a state dict")
    return checkpoint


def load_checkpoint_file(path: str | Path) -> dict[str, Tensor]:
    """Read a local checkpoint (.safetensors, or a torch .pth/.pt) on CPU and return its unwrapped weights."""
    return unwrap_state_dict(read_checkpoint_file(path), source=f"checkpoint {path}")


def _unreadable(path: Path, error: Exception) -> CheckpointError:
    reason = (str(error).strip() or type(error).__name__).splitlines()[0].split(". ")[0]
    return CheckpointError(f"cannot read {path}: it is truncated or corrupt ({reason})")


def _unsafe_globals(path: Path) -> list[str]:
    """Names of the non-tensor Python objects a torch.save file would unpickle (scanned, not executed)."""
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except (RuntimeError, ValueError, EOFError, pickle.UnpicklingError):  # not a readable torch.save file
        return []


def unwrap_state_dict(
    checkpoint: dict, ema: bool | None = None, source: str = "checkpoint"
) -> dict[str, Tensor]:
    """The model weights inside `checkpoint`, without training wrappers or wrapper-module key prefixes.

    ema=None takes the first of 'model', 'state_dict', 'state_dict_ema', 'model_ema': non-EMA weights first, as
    the published KAT accuracies were measured on them. ema=True/False takes only the EMA / only the non-EMA
    weights (MissingWeightsError if absent), so that asking for one never silently gives the other.
    """
    keys = {None: _WEIGHTS_KEYS + _EMA_KEYS, True: _EMA_KEYS, False: _WEIGHTS_KEYS}[ema]
    found = next((k for k in keys if isinstance(checkpoint.get(k), dict)), None)
    if found is not None:
        checkpoint = checkpoint[found]
    elif ema:
        raise MissingWeightsError(
            f"{source} holds no EMA weights (no {' or '.join(repr(k) for k in _EMA_KEYS)} entry)"
        )
    elif ema is False and any(isinstance(checkpoint.get(k), dict) for k in _EMA_KEYS):
        raise MissingWeightsError(f"{source} holds only EMA weights")
    state_dict = clean_state_dict(checkpoint)  # drops 'module.' / '_orig_mod.' wrapper prefixes
    non_tensors = [k for k, v in state_dict.items() if not isinstance(v, Tensor)]
    if non_tensors:
        raise CheckpointError(
            f"{source}: entries {_abbrev(non_tensors)} are not tensors; is this a model state_dict?"
        )
    return state_dict


def describe_mismatch(expected: dict[str, Tensor], given: dict[str, Tensor]) -> list[str]:
    """One line per kind of misfit of `given` against `expected`: shapes, missing keys, unexpected keys.

    Empty when `given` fits; each line names up to 8 keys, in the model's order, then how many more.
    """
    mismatched = [
        f"{k} {tuple(given[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in given and tuple(given[k].shape) != tuple(v.shape)
    ]
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    kinds = (
        ("shape mismatches (checkpoint vs model)", mismatched),
        ("keys missing from the checkpoint", missing),
        ("unexpected keys in the checkpoint", unexpected),
    )
    return [f"{len(keys)} {what}: {_abbrev(keys)}" for what, keys in kinds if keys]


def _abbrev(items: list[str]) -> str:
    more = f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


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

    mismatch = describe_mismatch(expected, given)
    if not mismatch:
        return

    arch = (
        f"embed_dim={model.embed_dim}, depth={len(model.blocks)}, "
        f"num_heads={model.blocks[0].attn.num_heads if len(model.blocks) else '?'}"
    )
    raise CheckpointMismatchError(
        f"checkpoint does not fit {type(model).__name__}({arch}): {'; '.join(mismatch)}. Build the model the "
        "checkpoint was trained as (published weights: kat_{tiny,small,base}_patch16_224; our checkpoints: "
        "'model' and 'model_kwargs' in the checkpoint's meta.json)."
    )
