"""Training configuration: defaults < YAML file < command line, with errors that say how to fix them.

Every field of `TrainConfig` is a YAML key and a flag (`--batch_size 64` or `--batch-size 64`).
Dict-valued keys merge rather than replace, so `--model_kwargs.depth 2` (or `--model_kwargs "{depth: 2}"`)
changes one entry of the YAML's model_kwargs. The defaults are the published KAT recipe for ImageNet-1k
(the DeiT recipe, as the KAT paper, arXiv 2409.10594, trains it). Every value is checked here, in
`validate`, before anything is written. The shipped configs live in kat/configs/ (package data), so
`--config kat_s` works from any directory and from a non-editable install.

Hand-written, not OmegaConf structured configs (no `Literal` fields; unknown keys without a "did you mean")
or simple-parsing (argparse errors that name neither the YAML file nor the key): both cost error quality.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import timm.data
import timm.optim
import yaml
from PIL import Image
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import str_to_interp_mode

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


def _timm_takes_interpolation(name: str) -> bool:
    try:
        str_to_interp_mode(name)
    except KeyError:
        return False
    return True


# PIL's resize filters that timm's transforms map (not PIL's newest); train_interpolation also takes 'random'.
INTERPOLATIONS = tuple(
    name for name in (mode.name.lower() for mode in Image.Resampling) if _timm_takes_interpolation(name)
)


class ConfigError(ValueError):
    """A config value or flag that cannot be used; the message names the key and the fix."""


def _doc(text: str, default, **kwargs):
    return field(default=default, metadata={"help": text}, **kwargs)


def _doc_factory(text: str, factory):
    return field(default_factory=factory, metadata={"help": text})


@dataclass
class TrainConfig:
    # model
    model: str = _doc("timm model name (`import kat` registers kat_tiny/kat_small/kat_base)", "kat_tiny")
    model_kwargs: dict = _doc_factory("extra timm.create_model kwargs, e.g. {img_size: 28, depth: 4}", dict)
    drop_path: float = _doc("stochastic depth rate (recipe: 0.1 for T/S, 0.4 for B)", 0.1)
    num_classes: int | None = _doc("number of classes; null = the number of class folders in train/", None)
    compile: bool = _doc("torch.compile the model (inductor)", False)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = _doc(
        "torch.compile mode with compile on; 'reduce-overhead' replays CUDA graphs, the fastest for KAT-T/S, whose "
        "eager steps are bound by kernel-launch overhead (docs/BENCHMARKS.md)",
        "default",
    )
    init_from: str | None = _doc(
        "fresh runs start from these weights (ignored on resume): a timm ViT .safetensors/.pth/.npz (JAX augreg) "
        "of the model's size (KAT*: needs model_kwargs.act_init gelu), or a timm ViT name such as "
        "vit_small_patch16_224 with its weights in init_from_file; a KAT weights file; or one of our "
        "run/checkpoint directories; a head of another class count is reset; null = random init",
        None,
    )
    init_from_file: str | None = _doc(
        "local weights file (.safetensors/.pth/.npz) for a timm model name in init_from (timm's "
        "pretrained_cfg_overlay=dict(file=...)); nothing is downloaded",
        None,
    )

    # data
    data_dir: str = _doc("ImageFolder root holding train/<class>/* and val/<class>/*", "data/imagenet")
    workers: int = _doc("data-loading worker processes per training process", 8)
    max_bad_images: int = _doc("stop when more images than this could not be read (each is logged)", 100)
    crop_pct: float | None = _doc("eval center-crop fraction; null = the model's default", 0.875)
    interpolation: str | None = _doc("eval resize interpolation; null = the model's default", "bicubic")
    mean: list[float] | None = _doc("normalisation mean; null = the model's default", None)
    std: list[float] | None = _doc("normalisation std; null = the model's default", None)

    # augmentation (timm.data.create_transform / timm.data.Mixup)
    scale: list[float] = _doc_factory("RandomResizedCrop area range", lambda: [0.08, 1.0])
    ratio: list[float] = _doc_factory("RandomResizedCrop aspect-ratio range", lambda: [3 / 4, 4 / 3])
    hflip: float = _doc("horizontal flip probability", 0.5)
    color_jitter: float = _doc("color jitter strength (timm ignores it while `aa` is set)", 0.4)
    aa: str | None = _doc("timm auto-augment policy; null = none", "rand-m9-mstd0.5")
    train_interpolation: str = _doc("train resize interpolation", "bicubic")
    device_augment: bool = _doc(
        "decode train JPEGs (nvJPEG) and crop/flip/RandAugment them on the training device, not in the loader "
        "workers: for hosts whose CPUs cannot keep the GPU busy (kat/data/gpu/)",
        False,
    )
    reprob: float = _doc("random erasing probability", 0.25)
    remode: str = _doc("random erasing fill mode", "pixel")
    recount: int = _doc("random erasing count", 1)
    mixup: float = _doc("mixup alpha; 0 = off", 0.8)
    cutmix: float = _doc("cutmix alpha; 0 = off", 1.0)
    mixup_prob: float = _doc("probability of applying mixup or cutmix to a batch", 1.0)
    mixup_switch_prob: float = _doc("probability of cutmix instead of mixup when both are on", 0.5)
    mixup_mode: Literal["batch", "pair", "elem"] = _doc("how mixup parameters are drawn", "batch")
    smoothing: float = _doc("label smoothing", 0.1)

    # optimisation
    epochs: int = _doc("training epochs", 300)
    batch_size: int = _doc("images per process per micro-batch", 128)
    eval_batch_size: int | None = _doc("images per process per eval batch; null = 2 x batch_size", None)
    grad_accum_steps: int = _doc("micro-batches per optimizer step", 1)
    opt: str = _doc("timm optimizer name (create_optimizer_v2)", "adamw")
    lr: float = _doc("peak learning rate at a global batch of lr_base_batch_size", 1e-3)
    lr_base_batch_size: int | None = _doc(
        "global batch at which `lr` applies; lr scales linearly with global batch / this; null = no scaling",
        1024,
    )
    weight_decay: float = _doc("decoupled weight decay (not applied to biases, norms, embeddings)", 0.05)
    opt_betas: list[float] = _doc_factory("Adam betas", lambda: [0.9, 0.999])
    opt_eps: float = _doc("Adam epsilon", 1e-8)
    layer_decay: float | None = _doc(
        "layer-wise lr decay for fine-tuning (timm, via the model's group_matcher): the head keeps lr, each "
        "layer below gets this factor more; null = off",
        None,
    )
    clip_grad: float | None = _doc(
        "clip the global grad norm to this; null = no clipping (norm still logged)", None
    )
    nonfinite: Literal["skip", "stop"] = _doc(
        "a step whose loss or gradients are NaN/inf (on any process): 'skip' = do not apply it (the batch and "
        "the lr schedule move on), count and log it, stop after max_nonfinite_steps in a row; 'stop' = stop at "
        "once, keeping the last good checkpoint. With fp16 the loss scaler already skips overflowing gradients, "
        "so then only a non-finite loss counts (docs/ERRORS.md)",
        "skip",
    )
    max_nonfinite_steps: int = _doc(
        "nonfinite: skip stops the run after this many skipped steps in a row", 20
    )
    warmup_epochs: float = _doc("linear warmup length in epochs (stepped per update)", 5)
    warmup_lr: float = _doc("learning rate at the start of warmup", 1e-5)
    min_lr: float = _doc("learning rate at the end of the cosine schedule", 0.0)
    max_steps: int | None = _doc("stop after this many optimizer steps (smoke runs); null = all epochs", None)
    seed: int = _doc("random seed (model init, data order, augmentation)", 0)
    mixed_precision: Literal["no", "bf16", "fp16"] = _doc("autocast dtype; fp16 uses loss scaling", "bf16")
    cpu: bool = _doc("train on CPU even when a GPU is present", False)
    fsdp: bool = _doc(
        "shard weights, gradients, optimizer state and EMA over the processes (FSDP2 through Accelerate, one unit "
        "per transformer block; GPUs only); false = DDP, every process holds everything (docs/DISTRIBUTED.md)",
        False,
    )

    # EMA of the weights (timm ModelEmaV3)
    model_ema: bool = _doc("keep and evaluate an exponential moving average of the weights", True)
    model_ema_decay: float = _doc("EMA decay per optimizer step", 0.9999)
    model_ema_warmup: bool = _doc("ramp the EMA decay up from 0 (useful for short runs)", False)

    # checkpoints and logging
    output_dir: str = _doc("runs are written to output_dir/run_name", "checkpoints")
    run_name: str | None = _doc(
        "run directory name; null = the config file's name (else the model name)", None
    )
    resume: str = _doc(
        "'auto' = newest complete checkpoint of this run if any, 'none' = fresh, or a PATH", "auto"
    )
    checkpoint_interval: int | None = _doc(
        "also checkpoint every N optimizer steps; null = epoch ends only", 1000
    )
    keep_checkpoints: int = _doc(
        "how many of the newest checkpoints to keep (the best one is always kept)", 3
    )
    log_interval: int = _doc("log every N optimizer steps", 1)
    plot_rationals: bool = _doc("plot every layer's learned rational functions at each evaluation", True)
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = _doc(
        "auto = online when logged in to W&B, offline otherwise", "auto"
    )
    wandb_project: str = _doc("W&B project", "kat")
    wandb_entity: str | None = _doc("W&B entity (user or team); null = your default", None)
    wandb_tags: list[str] = _doc_factory("W&B run tags", list)

    def global_batch_size(self, num_processes: int) -> int:
        return self.batch_size * self.grad_accum_steps * num_processes

    def scaled_lr(self, num_processes: int) -> float:
        """The linear scaling rule (Goyal et al.; DeiT): lr is given at lr_base_batch_size images per step."""
        if self.lr_base_batch_size is None:
            return self.lr
        return self.lr * self.global_batch_size(num_processes) / self.lr_base_batch_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES = typing.get_type_hints(TrainConfig)


def _closest(key: str) -> str:
    match = difflib.get_close_matches(key, FIELDS, n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else "; run `python train.py --help` for the keys"


def _coerce(key: str, value, annotation=None):
    """Check `value` against the field's annotation; return it (ints widened to float where a float is due)."""
    annotation = _TYPES[key] if annotation is None else annotation
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, option)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        return [_coerce(key, item, args[0]) for item in value]
    if annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' expects a mapping like {{depth: 4}}, got {value!r}")
        return value
    if annotation is float:
        # PyYAML reads `1e-3` (no dot) as a string, a classic trap: accept it as the number it means.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, annotation):
        return value
    raise ConfigError(
        f"config key '{key}' expects {annotation.__name__}, got {value!r} ({type(value).__name__})"
    )


def _merge(config: dict, updates: dict, source: str) -> None:
    for key, value in updates.items():
        if key not in FIELDS:
            raise ConfigError(f"unknown config key '{key}' in {source}{_closest(key)}")
        value = _coerce(key, value)
        if isinstance(value, dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value


def find_config_file(name: str) -> Path:
    """`kat_s`, `kat_s.yaml`, `configs/kat_s.yaml` or any path: the file users mean."""
    path = Path(name)
    for candidate in (
        path,
        path.with_suffix(".yaml"),
        CONFIGS_DIR / path.name,
        CONFIGS_DIR / f"{path.name}.yaml",
    ):
        if candidate.is_file():
            return candidate
    available = ", ".join(sorted(p.name for p in CONFIGS_DIR.glob("*.yaml"))) or "none"
    raise ConfigError(
        f"config file '{name}' not found (looked in . and {CONFIGS_DIR}); available: {available}"
    )


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # the SafeLoader reports unhashable keys itself
            if key in seen:
                problem = f"key {key!r} is given twice (YAML would keep only the last); keep one"
                raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _safe_load(stream):
    """yaml.safe_load with duplicate keys refused (what yaml.load(stream, _UniqueKeyLoader) does)."""
    loader = _UniqueKeyLoader(stream)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_yaml(path: Path) -> dict:
    try:
        with open(path) as file:  # a stream, so PyYAML's marks name the file rather than '<unicode string>'
            data = _safe_load(file)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        what = " ".join(filter(None, (getattr(error, "context", None), getattr(error, "problem", None))))
        raise ConfigError(f"{path} is not valid YAML{where}: {what or error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping of config keys to values, got {type(data).__name__}")
    return data


def _flag_value(text: str, key: str | None = None):
    """Flags are parsed as YAML scalars/flow collections: `64`, `null`, `true`, `[0.9, 0.95]`, `{depth: 2}`.

    For keys that take text (`--run_name 2024`) a number stays the text it was typed as.
    """
    try:
        value = _safe_load(text)
    except yaml.YAMLError:
        return text
    annotation = _TYPES[key] if key is not None else None
    takes_text = key is not None and (
        annotation is str
        or str in typing.get_args(annotation)
        # Literal choices: `--mixed_precision no` means 'no', not YAML's False
        or (
            typing.get_origin(annotation) is Literal
            and all(isinstance(a, str) for a in typing.get_args(annotation))
        )
    )
    if takes_text and isinstance(value, int | float | bool):
        return text
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a timm/KAT image classifier. Every config key is also a flag; flags beat the YAML.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--config", help="YAML config: a path or a name in kat/configs/ (e.g. kat_s.yaml, demo)"
    )
    for name, f in FIELDS.items():
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        # nargs='?' lets booleans be bare switches: `--compile` means `--compile true`.
        parser.add_argument(
            *flags,
            dest=name,
            nargs="?",
            const="true",
            default=argparse.SUPPRESS,
            help=f"{f.metadata['help']} (default: {default!r})",
        )
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Resolve defaults < --config YAML < flags into a validated TrainConfig."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    config = TrainConfig().to_dict()

    config_name = None
    if args.config:
        path = find_config_file(args.config)
        config_name = path.stem
        _merge(config, load_yaml(path), str(path))

    flags = {key: _flag_value(value, key) for key, value in vars(args).items() if key != "config"}
    # `--model_kwargs.depth 2` style flags for entries of dict-valued keys.
    rest = list(unknown)
    while rest:
        token = rest.pop(0)
        name, _, inline = token.lstrip("-").partition("=")
        name = name.replace("-", "_")
        parent, dot, child = name.partition(".")
        if not token.startswith("--") or not dot or parent not in FIELDS or _TYPES[parent] is not dict:
            raise ConfigError(f"unknown flag '{token}'{_closest(name)}")
        if not inline and not rest:
            raise ConfigError(f"flag '{token}' needs a value")
        flags.setdefault(parent, {})
        flags[parent][child] = _flag_value(inline or rest.pop(0))
    _merge(config, flags, "the command line")

    cfg = TrainConfig(**config)
    if cfg.run_name is None:
        cfg.run_name = config_name or cfg.model
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    positive = [
        "epochs",
        "batch_size",
        "grad_accum_steps",
        "log_interval",
        "keep_checkpoints",
        "max_nonfinite_steps",
    ]
    for key in positive + ["eval_batch_size", "max_steps", "checkpoint_interval", "lr_base_batch_size"]:
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise ConfigError(f"config key '{key}' must be >= 1, got {value}")
    # Numbers outside these ranges do not fail by themselves: they train silently wrong (NaN lr, negative decay).
    for keys, low, high, closed in (
        (("lr", "opt_eps"), 0, math.inf, False),
        (("warmup_lr", "min_lr", "weight_decay", "warmup_epochs", "mixup", "cutmix"), 0, math.inf, True),
        (("hflip", "reprob", "mixup_prob", "mixup_switch_prob", "model_ema_decay"), 0, 1, True),
        (("drop_path", "smoothing"), 0, 1 - 1e-9, True),
    ):
        for key in keys:
            value = getattr(cfg, key)
            inside = low <= value <= high if closed else low < value < high
            if not (inside and math.isfinite(value)):
                limits = {math.inf: ">= 0" if closed else "> 0", 1: "in [0, 1]"}.get(high, "in [0, 1)")
                raise ConfigError(f"config key '{key}' must be a finite number {limits}, got {value}")
    if cfg.clip_grad is not None and not cfg.clip_grad > 0:
        raise ConfigError(
            f"config key 'clip_grad' must be > 0 (or null for no clipping), got {cfg.clip_grad}"
        )
    if cfg.layer_decay is not None and not 0 < cfg.layer_decay <= 1:
        raise ConfigError(f"config key 'layer_decay' must be in (0, 1] (e.g. 0.65), got {cfg.layer_decay}")
    if cfg.workers < 0 or cfg.max_bad_images < 0:
        raise ConfigError("config keys 'workers' and 'max_bad_images' must be >= 0")
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        raise ConfigError(f"mixup/cutmix pair up images, so 'batch_size' must be even, got {cfg.batch_size}")
    if "drop_path_rate" in cfg.model_kwargs or "num_classes" in cfg.model_kwargs:
        raise ConfigError("set 'drop_path' and 'num_classes' as config keys, not inside 'model_kwargs'")
    for key in ("scale", "ratio", "opt_betas"):
        if len(getattr(cfg, key)) != 2:
            raise ConfigError(f"config key '{key}' expects two numbers, got {getattr(cfg, key)}")
    _validate_data(cfg)
    _validate_augmentation(cfg)
    _validate_opt(cfg.opt)
    if cfg.fsdp and cfg.compile:
        raise ConfigError("fsdp: true with compile: true is not supported (untested); set one of them to false")
    if cfg.fsdp and cfg.mixed_precision == "fp16":
        raise ConfigError("fsdp: true trains in bf16 or fp32 (no fp16 loss scaling); set mixed_precision: bf16")
    # output_dir/run_name must stay inside output_dir: no separators, no '.' or '..'.
    separators = {"/", os.sep, os.altsep or "/"}
    if not cfg.run_name or cfg.run_name in (".", "..") or any(c in cfg.run_name for c in separators):
        raise ConfigError(
            "config key 'run_name' must be a plain directory name (no '/', not '.' or '..'), "
            f"got {cfg.run_name!r}"
        )


def _validate_data(cfg: TrainConfig) -> None:
    """Preprocessing values that timm would otherwise change silently (crop_pct 0) or reject mid-setup."""
    if cfg.crop_pct is not None and not (0 < cfg.crop_pct <= 1):
        raise ConfigError(
            "config key 'crop_pct' must be in (0, 1] (e.g. 0.875; null = the model's default), "
            f"got {cfg.crop_pct}"
        )
    for key, choices in (
        ("interpolation", INTERPOLATIONS),
        ("train_interpolation", (*INTERPOLATIONS, "random")),
    ):
        value = getattr(cfg, key)
        if value is not None and value not in choices:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(choices)}")
    channels = cfg.model_kwargs.get("in_chans", 3)
    for key in ("mean", "std"):
        value = getattr(cfg, key)
        if value is None:
            continue
        if len(value) != channels:
            raise ConfigError(
                f"config key '{key}' needs one number per input channel ({channels}), got {value}"
            )
        if not all(math.isfinite(v) and (v > 0 or key == "mean") for v in value):
            limits = "finite numbers" if key == "mean" else "finite numbers > 0 (images are divided by it)"
            raise ConfigError(f"config key '{key}' must hold {limits}, got {value}")
    low, high = cfg.scale
    if not 0 < low <= high <= 1:
        raise ConfigError(
            f"config key 'scale' must be [low, high] with 0 < low <= high <= 1, got {cfg.scale}"
        )
    low, high = cfg.ratio
    if not (0 < low <= high and math.isfinite(high)):
        raise ConfigError(f"config key 'ratio' must be [low, high] with 0 < low <= high, got {cfg.ratio}")
    if not all(0 <= beta < 1 for beta in cfg.opt_betas):
        raise ConfigError(f"config key 'opt_betas' must be two numbers in [0, 1), got {cfg.opt_betas}")


def _validate_augmentation(cfg: TrainConfig) -> None:
    """`aa` and `remode` as timm parses them (it asserts on unknown ones when the transforms are built)."""
    try:
        timm.data.create_transform(8, is_training=True, auto_augment=cfg.aa)
    except (AssertionError, KeyError, ValueError) as error:
        raise ConfigError(
            f"config key 'aa': {cfg.aa!r} is not a timm auto-augment policy ({error}); "
            "e.g. rand-m9-mstd0.5, augmix-m5, v0, original, or null for none"
        ) from error
    try:
        RandomErasing(mode=cfg.remode, device="cpu")
    except AssertionError as error:
        raise ConfigError(
            f"config key 'remode': {cfg.remode!r} is not a random erasing fill mode; use pixel, rand or const"
        ) from error


def _validate_opt(name: str) -> None:
    """Names create_optimizer_v2 takes: a timm-registered optimizer, optionally prefixed 'lookahead_'."""
    *prefix, base = name.lower().split("_")
    known = timm.optim.list_optimizers()
    if base in known and prefix in ([], ["lookahead"]):
        return
    match = difflib.get_close_matches(base, known, n=3, cutoff=0.6)
    hint = f"; closest: {', '.join(match)}" if match else " (timm.optim.list_optimizers() lists them)"
    raise ConfigError(f"config key 'opt': {name!r} is not a timm optimizer{hint}")


def save_config(cfg: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
