"""One way in for weights: any source -> a state dict and what is known about it -> a model.

Sources (`load`):
- one of our runs or checkpoints: a run directory (its newest complete checkpoint), a step-XXXXXXXX
  directory, or its model.safetensors / ema.safetensors. meta.json describes the model; every file read is
  checked against the checksum meta.json recorded (kat.training.checkpoint).
- a weights file: a published KAT .pth, a timm or DeiT training checkpoint, a bare state dict in .safetensors
  or .pth. Read as data (kat.models.pretrained.read_checkpoint_file), training wrappers unwrapped.
- a timm ViT as a JAX .npz (Google's augreg release), read by timm's own npz reader.
- a timm model name plus a local file of its weights; nothing is ever downloaded.

`init_from` loads a source into a fresh model for training (train.py's `init_from`: all but a head of another
class count; ViT weights into a KAT make the paper's KAT*). `create_model` builds the model a source
describes, through timm's pretrained path so that the model's own checkpoint filter adapts the weights
(eval.py and exports).
"""

from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import Tensor, nn

from kat.models.from_vit import (
    is_kat_state_dict,
    kat_from_vit,
    load_weights_except_head,
    vit_from_npz,
    vit_from_timm_name,
)
from kat.models.pretrained import (
    CheckpointError,
    CheckpointMismatchError,
    MissingWeightsError,
    describe_mismatch,
    read_checkpoint_file,
    unwrap_state_dict,
)
from kat.rational import GroupRational
from kat.training.checkpoint import EMA_FILE, META_FILE, MODEL_FILE, read_checkpoint, resolve_checkpoint

__all__ = ["CheckpointError", "Weights", "create_model", "init_from", "load"]


@dataclass
class Weights:
    """What a source holds: the weights, and what is known about where they come from."""

    state_dict: dict[str, Tensor]
    # Our checkpoint's meta.json (model, model_kwargs, num_classes, data_config, ...); None for other sources.
    meta: dict | None
    # For messages and logs: the checkpoint directory, the file, or "<name> weights from <file>".
    description: str
    kind: str  # "checkpoint" (ours), "file" (a weights file), "npz" (a JAX ViT), "timm" (a timm name + file)
    ema: bool = False  # the EMA weights of a training checkpoint
    epoch: int | None = None  # epochs trained, where the source says


def load(source: str | Path, file: str | Path | None = None, ema: bool | None = None) -> Weights:
    """The weights at `source` (see the module docstring), on CPU.

    file: the local weights file of a timm model name `source`. ema: True takes a training checkpoint's EMA
    weights, False its other weights, None the other weights where there are any (MissingWeightsError when
    the asked-for ones are absent); our ema.safetensors named as the source is the EMA weights either way.
    Raises CheckpointError (a ValueError) with a one-line message.
    """
    source = str(source)
    path = Path(source)
    if file is not None and (path.exists() or not timm.is_model(source)):
        raise CheckpointError(
            f"init_from_file ({file}) is only read when init_from is a timm model name, but init_from is "
            f"{source!r}: set init_from_file: null"
        )
    if path.is_dir():
        return _from_checkpoint_dir(path, bool(ema))
    if path.is_file() and (path.parent / META_FILE).is_file():  # a file inside one of our checkpoints
        if path.name not in (MODEL_FILE, EMA_FILE) or (ema and path.name == MODEL_FILE):
            raise CheckpointError(
                f"{path}: pass the checkpoint directory {path.parent} (with ema for its EMA weights)"
            )
        return _from_checkpoint_dir(path.parent, path.name == EMA_FILE)
    if path.is_file() and path.suffix == ".npz":
        if ema:
            raise MissingWeightsError(f"{path} holds no EMA weights (a ViT .npz holds one set of weights)")
        return Weights(vit_from_npz(path).state_dict(), None, source, "npz")
    if path.is_file():
        checkpoint = read_checkpoint_file(path)
        epoch = checkpoint.get("epoch")
        return Weights(
            unwrap_state_dict(checkpoint, ema=ema, source=str(path)),
            None,
            source,
            "file",
            ema=bool(ema),
            epoch=epoch if isinstance(epoch, int) else None,
        )
    if not timm.is_model(source):
        raise CheckpointError(f"{source} does not exist (and is not a timm model name either)")
    if ema:
        raise MissingWeightsError(f"{source} weights from {file}: a timm model's file holds no EMA weights")
    try:
        model = vit_from_timm_name(source, file)
    except FileNotFoundError as error:
        raise CheckpointError(str(error)) from None
    return Weights(model.state_dict(), None, f"{source} weights from {file}", "timm")


def _from_checkpoint_dir(path: Path, ema: bool) -> Weights:
    try:
        checkpoint_dir = resolve_checkpoint(path, weights_only=True)  # training_state.pt is not needed here
    except FileNotFoundError as error:
        raise CheckpointError(str(error)) from None
    state_dict, meta = read_checkpoint(checkpoint_dir, ema=ema)
    return Weights(state_dict, meta, str(checkpoint_dir), "checkpoint", ema=ema, epoch=meta.get("epoch"))


def init_from(model: nn.Module, source: str, file: str | None = None) -> str:
    """Load `source` into a fresh `model`: everything must fit but a head of another class count, which keeps
    its fresh init (fine-tuning). ViT weights into a KAT make a KAT* (kat.models.from_vit), which needs the
    model built with act_init 'gelu'. Returns what was loaded, for the log: "<source> (all but the head)".
    """
    weights = load(source, file)
    if any(isinstance(m, GroupRational) for m in model.modules()) and not is_kat_state_dict(
        weights.state_dict
    ):
        if getattr(model, "act_init", None) != "gelu":
            raise CheckpointError(
                f"{weights.description} holds ViT weights (no rational coefficients): KAT* sets every act2 to "
                "GELU, the ViT's activation, so the run must say so: set model_kwargs.act_init: gelu"
            )
        head = kat_from_vit(model, weights.state_dict, weights.description)
    else:
        head = load_weights_except_head(model, weights.state_dict, weights.description)
    return f"{weights.description} ({'all weights' if head else 'all but the head'})"


def create_model(
    source: str | Path, *, model: str | None = None, model_kwargs: dict | None = None, ema: bool | None = None
) -> tuple[nn.Module, Weights]:
    """The model `source` holds, with its weights, in eval mode, on CPU; and the Weights it was built from.

    Our checkpoints name their model in meta.json (`model` and `model_kwargs` must then be left out or agree);
    other sources need the timm model name `model` (and its `model_kwargs`). The head gets the class count of
    the weights. Everything must fit: CheckpointMismatchError names the mismatched keys.
    """
    weights = load(source, ema=ema)
    meta = weights.meta
    if meta is not None:
        if model and model != meta["model"]:
            raise CheckpointError(f"{weights.description} holds a {meta['model']} model, not {model}")
        if model_kwargs:
            raise CheckpointError(
                f"{weights.description} describes its model in {META_FILE}: drop model_kwargs"
            )
        name, kwargs, num_classes = meta["model"], dict(meta["model_kwargs"]), meta["num_classes"]
    elif not model:
        raise CheckpointError(
            f"{weights.description} has no {META_FILE} beside it, so name its model (a timm model name: --model)"
        )
    else:
        name, kwargs = model, dict(model_kwargs or {})
        num_classes = _head_num_classes(name, weights.state_dict)
    if not timm.is_model(name):
        raise CheckpointError(f"unknown model {name!r}: not a registered timm model (see timm.list_models())")
    head = {"num_classes": num_classes} if num_classes is not None else {}
    # The overlay's num_classes tells timm that the head in the weights is the one to keep (it drops heads
    # whose class count differs from the pretrained config's, and then loads non-strictly).
    overlay = dict(state_dict=weights.state_dict, **head)
    try:
        built = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs, **head)
    except (
        RuntimeError,
        KeyError,
        ValueError,
    ) as error:  # load_state_dict, or a checkpoint filter, refused it
        reference = timm.create_model(name, **kwargs, **head)
        mismatch = "; ".join(describe_mismatch(reference.state_dict(), weights.state_dict))
        raise CheckpointMismatchError(
            f"{weights.description} does not fit model {name}: {mismatch or first_line(error)}"
        ) from None
    built.pretrained_cfg.pop("state_dict", None)  # do not keep a second reference to the weights
    return built.eval(), weights


def _head_num_classes(model_name: str, state_dict: dict) -> int | None:
    """Class count of the weights' classifier, read from its weight (None if it has no such key)."""
    cfg = timm.models.get_pretrained_cfg(model_name)
    classifiers = (cfg.classifier if cfg else None) or "head"
    for name in (classifiers,) if isinstance(classifiers, str) else classifiers:
        weight = state_dict.get(f"{name}.weight")
        if isinstance(weight, torch.Tensor):
            return weight.shape[0]
    return None


def first_line(error: BaseException) -> str:
    """An exception's message as one line (its type's name if it has none), for one-line errors."""
    return (str(error).strip() or type(error).__name__).splitlines()[0]
