"""Everything a training run is built from its config: model, data, optimizer and schedule, EMA, accelerator.

`build(cfg)` returns a `TrainingParts`, a plain object of the live parts, in the order they depend on each other
(the data before the schedule, which counts optimizer steps per epoch). kat.training.engine steps them.
"""

import difflib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import accelerate
import timm
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, TorchDynamoPlugin, set_seed
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.utils.data import DataLoader

import kat  # noqa: F401  (registers the KAT models with timm)
from kat.data import (
    DeviceAugment,
    DeviceAugmentConfig,
    DeviceLoader,
    ResumableSampler,
    build_datasets,
    build_mixup,
    build_random_erasing,
    build_train_loss,
    build_transforms,
    check_layout,
    collate_encoded,
    resolve_data_config,
)
from kat.training.checkpoint import list_checkpoints, resolve_checkpoint
from kat.training.config import ConfigError, TrainConfig
from kat.training.ema import ModelEma
from kat.training.fsdp import Replicated, strategy
from kat.weights import init_from

logger = logging.getLogger(__name__)

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}


@dataclass
class TrainingParts:
    """The live objects of a run. `model` is the prepared one (DDP/FSDP/compiled); `raw_model` the plain module,
    whose state_dict has timm's keys."""

    cfg: TrainConfig
    accelerator: Accelerator
    strategy: Replicated
    precision: str  # "bf16", "fp16" or "no"
    amp_dtype: torch.dtype | None
    class_names: list[str]
    data_config: dict
    model: torch.nn.Module
    raw_model: torch.nn.Module
    ema: ModelEma | None
    optimizer: torch.optim.Optimizer
    scheduler: object  # timm's CosineLRScheduler, stepped per optimizer update
    lr: float  # the peak learning rate, scaled to the global batch
    train_set: object
    val_set: object
    sampler: ResumableSampler
    worker_seed: torch.Generator  # seeds the loader workers, not the global RNG (exact resume)
    train_loader: DeviceLoader
    val_loader: DeviceLoader
    random_erasing: object
    mixup: object
    train_loss_fn: object
    images_per_step: int  # all processes
    steps_per_epoch: int
    total_steps: int
    stop_step: int

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def build(cfg: TrainConfig, load_init_weights: bool = True) -> TrainingParts:
    """Build a run from its config; `load_init_weights` False skips cfg.init_from (a resumed run has its own)."""
    precision = cfg.mixed_precision
    if (cfg.cpu or not torch.cuda.is_available()) and precision == "fp16":
        logger.warning("fp16 autocast needs a GPU: training in full precision (bf16 works on CPU too)")
        precision = "no"
    parallel = strategy(cfg.fsdp)
    accelerator = build_accelerator(cfg, precision, parallel)
    device = accelerator.device

    # The data layout first: a wrong data_dir should fail before anything slow happens.
    class_names = check_layout(cfg.data_dir)
    if cfg.num_classes is not None and cfg.num_classes != len(class_names):
        raise ConfigError(
            f"num_classes: {cfg.num_classes}, but {cfg.data_dir}/train has {len(class_names)} classes"
        )
    set_seed(cfg.seed)  # the same initial weights on every process
    model = create_model(cfg, len(class_names))
    try:
        parallel.before_prepare(accelerator, model)
    except ValueError as error:
        raise ConfigError(f"config key 'fsdp': {error}") from error
    if cfg.init_from and load_init_weights:
        init_weights_from(model, cfg)
    model = model.to(device)
    set_seed(cfg.seed, device_specific=True)  # different augmentation on every process
    data_config = resolve_data_config(model, cfg)
    data = build_data(cfg, data_config, accelerator)

    lr = cfg.scaled_lr(accelerator.num_processes)
    optimizer = build_optimizer(cfg, model, lr, parallel.fused_adam(device))
    scheduler = build_schedule(cfg, optimizer, data["steps_per_epoch"])
    ema = (
        ModelEma(model, decay=cfg.model_ema_decay, use_warmup=cfg.model_ema_warmup) if cfg.model_ema else None
    )
    mixup = build_mixup(cfg, len(class_names))

    prepared_model, optimizer = accelerator.prepare(model, optimizer)
    parallel.after_prepare(model, ema.module if ema is not None else None)
    # The prepared loader shards and copies to the device; normalised there, batch by batch (DeviceLoader says
    # why not ahead).
    val_loader = DeviceLoader(
        accelerator.prepare_data_loader(data.pop("val_loader")),
        data_config["mean"],
        data_config["std"],
        device,
    )
    return TrainingParts(
        cfg=cfg,
        accelerator=accelerator,
        strategy=parallel,
        precision=precision,
        amp_dtype=_AMP_DTYPES[precision],
        class_names=class_names,
        data_config=data_config,
        model=prepared_model,
        raw_model=model,
        ema=ema,
        optimizer=optimizer,
        scheduler=scheduler,
        lr=lr,
        val_loader=val_loader,
        mixup=mixup,
        train_loss_fn=build_train_loss(cfg, mixup),
        **data,
    )


def build_accelerator(cfg: TrainConfig, precision: str, parallel: Replicated) -> Accelerator:
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not cfg.fsdp:
        raise ConfigError(
            "accelerate was launched with FSDP (distributed_type: FSDP in its config file, or --use_fsdp), "
            "but the training config has fsdp: false; train.py sets FSDP up itself: set fsdp: true (or "
            "--fsdp) and launch without accelerate's FSDP options"
        )
    if cfg.fsdp and (cfg.cpu or not torch.cuda.is_available()):
        raise ConfigError(
            "fsdp: true shards the model over GPUs (Accelerate runs FSDP on CUDA devices only), and this run "
            f"has none{' (cpu: true)' if cfg.cpu else ''}; set fsdp: false"
        )
    try:
        plugin = parallel.accelerate_plugin()
    except TypeError as error:  # no fsdp_version argument: an Accelerate from before FSDP2 support
        raise ConfigError(
            f"fsdp: true needs Accelerate with FSDP2 support (>= 1.6), this is {accelerate.__version__} "
            f"({error}); pip install -U accelerate"
        ) from error
    # DDP keeps the gradients in its all-reduce buckets instead of copying them in and out every step
    # (docs/BENCHMARKS.md section 6).
    ddp = DistributedDataParallelKwargs(gradient_as_bucket_view=True)
    return Accelerator(
        mixed_precision=precision,
        cpu=cfg.cpu,
        dynamo_plugin=TorchDynamoPlugin(backend="inductor", mode=cfg.compile_mode) if cfg.compile else None,
        fsdp_plugin=plugin,
        kwargs_handlers=[ddp],
    )


def build_data(cfg: TrainConfig, data_config: dict, accelerator: Accelerator) -> dict:
    """Datasets, the resumable train loader and the (unprepared) val loader, and the run's step counts."""
    device, processes = accelerator.device, accelerator.num_processes
    train_transform, eval_transform = build_transforms(cfg, data_config)
    augment_config = None
    if cfg.device_augment:  # workers only read files: decoding and augmentation run on the device
        try:
            augment_config = DeviceAugmentConfig(cfg, data_config)
        except ValueError as error:
            raise ConfigError(str(error)) from error
    train_set, val_set = build_datasets(
        cfg.data_dir,
        train_transform,
        eval_transform,
        cfg.max_bad_images,
        draw_train_params=augment_config.draw_params if augment_config else None,
    )
    augment = DeviceAugment(augment_config, train_set, device) if augment_config else None
    images_per_step = cfg.global_batch_size(processes)
    steps_per_epoch = len(train_set) // images_per_step
    if steps_per_epoch == 0:
        raise ConfigError(
            f"train/ has {len(train_set)} images, fewer than one optimizer step ({images_per_step} ="
            f" batch_size x grad_accum_steps x {processes} processes); lower batch_size"
        )
    total_steps = cfg.epochs * steps_per_epoch
    sampler = ResumableSampler(
        len(train_set), num_replicas=processes, rank=accelerator.process_index, seed=cfg.seed
    )
    # Worker seeds come from this generator, not from the global RNG, so that neither starting an epoch nor
    # evaluating shifts the training RNG (a resumed run continues exactly).
    worker_seed = torch.Generator()
    pin = device.type == "cuda"
    loader = DataLoader(
        train_set,
        cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.workers,
        pin_memory=pin,
        drop_last=True,
        generator=worker_seed,
        collate_fn=collate_encoded if augment is not None else None,
    )
    # uint8 batches (or with device_augment, encoded JPEGs decoded and augmented there), normalised on the
    # device; on CUDA the next ones are prepared by a thread while this step runs. Not with workers 0: the
    # transforms would then draw this process' RNG a batch early (exact resume).
    mean, std = data_config["mean"], data_config["std"]
    prefetch = cfg.workers > 0 and device.type == "cuda"
    val_loader = DataLoader(
        val_set,
        cfg.eval_batch_size or 2 * cfg.batch_size,
        shuffle=False,
        num_workers=cfg.workers,
        pin_memory=pin,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    return {
        "train_set": train_set,
        "val_set": val_set,
        "sampler": sampler,
        "worker_seed": worker_seed,
        "train_loader": DeviceLoader(loader, mean, std, device, prefetch=prefetch, augment=augment),
        "val_loader": val_loader,
        "random_erasing": build_random_erasing(cfg, device),
        "images_per_step": images_per_step,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "stop_step": min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps,
    }


def build_optimizer(
    cfg: TrainConfig, model: torch.nn.Module, lr: float, fused: bool
) -> torch.optim.Optimizer:
    """timm's optimizer; with layer_decay each group_matcher layer is a param group whose 'lr_scale' timm's
    schedulers apply at every update."""
    adam = dict(betas=tuple(cfg.opt_betas), eps=cfg.opt_eps) if "adam" in cfg.opt.lower() else {}
    if cfg.opt.lower() in ("adam", "adamw") and fused:
        adam["fused"] = True
    return create_optimizer_v2(
        model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay, **adam
    )


def build_schedule(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """timm's cosine schedule with warmup, per optimizer update as DeiT's recipe does. A pure function of the
    config and the step, so a resumed run follows its (possibly changed) config from the step it resumes at."""
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched="cosine",
        num_epochs=cfg.epochs,
        warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr,
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    return scheduler


def create_model(cfg: TrainConfig, num_classes: int) -> torch.nn.Module:
    if not timm.is_model(cfg.model):
        close = difflib.get_close_matches(cfg.model, timm.list_models(), n=3)
        raise ConfigError(
            f"config key 'model': unknown timm model '{cfg.model}'; closest: {', '.join(close)}"
        )
    try:
        model = timm.create_model(
            cfg.model, num_classes=num_classes, drop_path_rate=cfg.drop_path, **cfg.model_kwargs
        )
    except (TypeError, ValueError, AssertionError) as error:  # timm checks shapes with assert (num_heads)
        raise ConfigError(
            f"config key 'model_kwargs' {cfg.model_kwargs} is not accepted by {cfg.model}: {error or type(error).__name__}"
        ) from error
    check_patch_grid(cfg, model)
    return model


def check_patch_grid(cfg: TrainConfig, model: torch.nn.Module) -> None:
    """A patch embedding whose patches do not tile the image drops the pixels left over, silently."""
    patch_embed = getattr(model, "patch_embed", None)
    img_size, patch_size = getattr(patch_embed, "img_size", None), getattr(patch_embed, "patch_size", None)
    if img_size is None or patch_size is None or getattr(patch_embed, "dynamic_img_pad", False):
        return  # no fixed size, or padded up to whole patches
    if any(i % p for i, p in zip(img_size, patch_size)):
        fits = tuple(max(p, round(i / p) * p) for i, p in zip(img_size, patch_size))
        raise ConfigError(
            f"config key 'model_kwargs': img_size {tuple(img_size)} is not a multiple of patch_size "
            f"{tuple(patch_size)}: the last {tuple(i % p for i, p in zip(img_size, patch_size))} pixels would be "
            f"dropped; set model_kwargs.img_size to a multiple such as {fits[0]} (or change model_kwargs.patch_size)"
        )


def init_weights_from(model: torch.nn.Module, cfg: TrainConfig) -> None:
    """Load `cfg.init_from` (any source kat.weights reads) into a fresh model; a head of another class count
    keeps its fresh init (fine-tuning)."""
    try:
        loaded = init_from(model, cfg.init_from, cfg.init_from_file)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"config key 'init_from': {error}") from error
    logger.info("initialised from %s", loaded)


def choose_resume(cfg: TrainConfig, run_dir: Path) -> Path | None:
    """The checkpoint to continue from, or None for a fresh run (see the `resume` config key)."""
    if cfg.resume == "auto":
        checkpoints = list_checkpoints(run_dir)
        return checkpoints[-1] if checkpoints else None
    if cfg.resume.lower() == "none":
        existing = list_checkpoints(run_dir, warn=False)
        if existing:
            raise ConfigError(
                f"--resume none, but '{run_dir}' already holds checkpoints (newest: {existing[-1].name}); pick "
                f"another --run_name to start fresh, or drop --resume none to continue that run"
            )
        return None
    try:
        return resolve_checkpoint(cfg.resume)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"config key 'resume': {error}") from error
