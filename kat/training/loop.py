"""The training loop: DeiT recipe pieces from timm, processes and precision from Accelerate.

One optimizer step = `grad_accum_steps` micro-batches of `batch_size` images on each process. The learning
rate follows timm's cosine schedule stepped per update; the EMA (timm ModelEmaV3, kat.training.ema) is updated after every
step. At every epoch end (and at the end of the run) the model and its EMA are evaluated on val/ and a
checkpoint is written; checkpoints are also written every `checkpoint_interval` steps. Everything needed to
continue exactly (weights, EMA, optimizer, scheduler, loss scaler, RNG, position in the epoch's data order)
is in the checkpoint, so rerunning the same command resumes.

Two ways a run ends early, both agreed by all processes (one all-reduce per step) and raised as TrainingStopped
(train.py prints its one-line message and exits with its exit_code):
- non-finite loss or gradients, per the `nonfinite` config key (docs/ERRORS.md): NonFiniteError, exit code 3;
- SIGTERM/SIGINT (a preempted cluster job, Ctrl-C): a checkpoint at the next step boundary, then Interrupted,
  exit code 128 + signal (143/130), the shell convention, so schedulers see the job did not finish and requeue.
"""

import difflib
import logging
import math
import os
import random
import signal
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import accelerate
import numpy as np
import timm
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, TorchDynamoPlugin, gather_object, set_seed
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

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
from kat.evaluation import evaluate
from kat.models.from_vit import (
    is_kat_state_dict,
    kat_from_vit,
    load_weights_except_head,
    vit_from_npz,
    vit_from_timm_name,
)
from kat.models.pretrained import load_checkpoint_file
from kat.rational import GroupRational, active_backend
from kat.training.checkpoint import (
    OPTIMIZER_SHARDS,
    begin_checkpoint,
    checkpoint_name,
    checkpoint_tmp_dir,
    list_checkpoints,
    read_checkpoint,
    read_training_state,
    resolve_checkpoint,
    save_checkpoint,
)
from kat.training.config import ConfigError, TrainConfig, save_config
from kat.training.ema import ModelEma
from kat.training.fsdp import (
    fsdp_plugin,
    full_state_dict,
    load_full_state_dict,
    load_optimizer_shards,
    save_optimizer_shards,
    shard_like,
    unsharded,
    wrap_blocks_of,
)
from kat.training.plots import plot_rationals
from kat.training.tracking import RunTracker

logger = logging.getLogger(__name__)

STATE_FORMAT = "kat-training-state/1"
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}
NONFINITE_EXIT_CODE = 3


class TrainingStopped(RuntimeError):
    """Training ended before its last step on purpose; the message says why and what to do next."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class NonFiniteError(TrainingStopped):
    def __init__(self, message: str):
        super().__init__(message, NONFINITE_EXIT_CODE)


class Interrupted(TrainingStopped):
    """SIGTERM/SIGINT: the checkpoint is saved; rerunning the same command resumes."""

    def __init__(self, message: str, signum: int):
        super().__init__(message, 128 + signum)


def train(cfg: TrainConfig) -> dict:
    """Train as configured; returns the last evaluation: {'val': {top1, top5, loss, ...}, 'val_ema': {...}}."""
    return Trainer(cfg).fit()


def create_model(cfg: TrainConfig, num_classes: int) -> torch.nn.Module:
    if not timm.is_model(cfg.model):
        close = difflib.get_close_matches(cfg.model, timm.list_models(), n=3)
        raise ConfigError(
            f"config key 'model': unknown timm model '{cfg.model}'; closest: {', '.join(close)}"
        )
    try:
        return timm.create_model(
            cfg.model, num_classes=num_classes, drop_path_rate=cfg.drop_path, **cfg.model_kwargs
        )
    except (TypeError, ValueError, AssertionError) as error:  # timm checks shapes with assert (num_heads)
        raise ConfigError(
            f"config key 'model_kwargs' {cfg.model_kwargs} is not accepted by {cfg.model}: {error or type(error).__name__}"
        ) from error


def init_weights_from(model: torch.nn.Module, cfg: TrainConfig) -> None:
    """Load `cfg.init_from` into a fresh model: our run/checkpoint dir, a KAT weights file, or a ViT's (KAT*) as
    a .safetensors/.pth/.npz file or a timm ViT name whose weights are the local file `cfg.init_from_file`.

    Everything but the head must fit; a head of another class count keeps its fresh init (fine-tuning).
    """
    path = Path(cfg.init_from)
    source = str(path)
    is_kat = any(isinstance(m, GroupRational) for m in model.modules())
    try:
        if cfg.init_from_file is not None and (path.exists() or not timm.is_model(cfg.init_from)):
            raise ValueError(
                f"init_from_file ({cfg.init_from_file}) is only read when init_from is a timm model name, but "
                f"init_from is {cfg.init_from!r}: set init_from_file: null"
            )
        if path.is_dir():
            source = str(resolve_checkpoint(path, weights_only=True))
            state_dict, _ = read_checkpoint(source)
        elif path.suffix == ".npz":
            state_dict = vit_from_npz(path).state_dict()
        elif path.exists() or not timm.is_model(cfg.init_from):
            state_dict = load_checkpoint_file(path)
        else:
            source = f"{cfg.init_from} weights from {cfg.init_from_file}"
            state_dict = vit_from_timm_name(cfg.init_from, cfg.init_from_file).state_dict()
        if is_kat and not is_kat_state_dict(state_dict):
            if getattr(model, "act_init", None) != "gelu":
                raise ValueError(
                    f"{source} holds ViT weights (no rational coefficients): KAT* sets every act2 to GELU, the "
                    "ViT's activation, so the run must say so: set model_kwargs.act_init: gelu"
                )
            head = kat_from_vit(model, state_dict, source)
        else:
            head = load_weights_except_head(model, state_dict, source)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"config key 'init_from': {error}") from error
    logger.info("initialised from %s (%s)", source, "all weights" if head else "all but the head")


def rng_state() -> dict:
    """This process' RNG state as tensors/tuples (training_state.pt must load with weights_only=True)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


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


class Trainer:
    """The live training objects and counters. __init__ builds (and resumes) everything; fit() trains."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.launch_time = time.perf_counter()
        self.precision = cfg.mixed_precision
        if (cfg.cpu or not torch.cuda.is_available()) and self.precision == "fp16":
            logger.warning("fp16 autocast needs a GPU: training in full precision (bf16 works on CPU too)")
            self.precision = "no"
        self.amp_dtype = _AMP_DTYPES[self.precision]
        dynamo = TorchDynamoPlugin(backend="inductor", mode=cfg.compile_mode) if cfg.compile else None
        self.fsdp = cfg.fsdp
        # DDP keeps the gradients in its all-reduce buckets instead of copying them in and out every step: KAT-S
        # on 2 H200s with CUDA graphs scales with efficiency 0.93 instead of 0.90 (docs/BENCHMARKS.md section 6).
        ddp = DistributedDataParallelKwargs(gradient_as_bucket_view=True)
        self.accelerator = Accelerator(
            mixed_precision=self.precision,
            cpu=cfg.cpu,
            dynamo_plugin=dynamo,
            fsdp_plugin=self._fsdp_plugin(),
            kwargs_handlers=[ddp],
        )
        accelerator = self.accelerator
        self.device, self.is_main = accelerator.device, accelerator.is_main_process
        self.run_dir = Path(cfg.output_dir) / cfg.run_name
        resume_dir = choose_resume(cfg, self.run_dir)

        # The data layout first: a wrong data_dir should fail before anything slow happens.
        self.class_names = check_layout(cfg.data_dir)
        self.num_classes = len(self.class_names)
        if cfg.num_classes is not None and cfg.num_classes != self.num_classes:
            raise ConfigError(
                f"num_classes: {cfg.num_classes}, but {cfg.data_dir}/train has {self.num_classes} classes"
            )
        set_seed(cfg.seed)  # the same initial weights on every process
        model = create_model(cfg, self.num_classes)
        if self.fsdp:
            try:
                wrap_blocks_of(accelerator.state.fsdp_plugin, model)
            except ValueError as error:
                raise ConfigError(f"config key 'fsdp': {error}") from error
        if cfg.init_from and resume_dir is None:  # a resumed run has its own weights
            init_weights_from(model, cfg)
        model = model.to(self.device)
        set_seed(cfg.seed, device_specific=True)  # different augmentation on every process
        self.data_config = resolve_data_config(model, cfg)
        self._build_data()

        self.lr = cfg.scaled_lr(accelerator.num_processes)
        adam = dict(betas=tuple(cfg.opt_betas), eps=cfg.opt_eps) if "adam" in cfg.opt.lower() else {}
        # layer_decay: timm puts each group_matcher layer in a param group with an 'lr_scale' that its schedulers
        # apply at every update.
        # torch's fused Adam(W) kernels on CUDA: timm's default foreach step costs ~6 ms of host time per KAT-S
        # step on the H200 host, which under CUDA graphs is step time (docs/BENCHMARKS.md section 3). Not under
        # FSDP (sharded DTensor parameters), nor on CPU, where the foreach step keeps the tested numerics.
        if cfg.opt.lower() in ("adam", "adamw") and self.device.type == "cuda" and not self.fsdp:
            adam["fused"] = True
        optimizer = create_optimizer_v2(
            model, opt=cfg.opt, lr=self.lr, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay, **adam
        )
        self.scheduler, _ = create_scheduler_v2(
            optimizer,
            sched="cosine",
            num_epochs=cfg.epochs,
            warmup_epochs=cfg.warmup_epochs,
            warmup_lr=cfg.warmup_lr,
            min_lr=cfg.min_lr,
            step_on_epochs=False,  # per optimizer update, as DeiT's recipe does
            updates_per_epoch=self.steps_per_epoch,
        )
        self.ema = None
        if cfg.model_ema:
            self.ema = ModelEma(model, decay=cfg.model_ema_decay, use_warmup=cfg.model_ema_warmup)
        self.mixup = build_mixup(cfg, self.num_classes)
        self.train_loss_fn = build_train_loss(cfg, self.mixup)

        self.raw_model = model  # the plain module: timm state_dict keys whatever wraps it (DDP, compile)
        self.model, self.optimizer, val_loader = accelerator.prepare(model, optimizer, self.val_loader)
        # The prepared loader shards and copies to the device; normalised there, batch by batch (DeviceLoader
        # says why not ahead).
        self.val_loader = DeviceLoader(
            val_loader, self.data_config["mean"], self.data_config["std"], self.device
        )
        if self.fsdp and self.ema is not None:
            shard_like(self.ema.module, self.raw_model)

        self.step, self.epoch, self.samples_in_epoch = 0, 0, 0
        self.best_top1, self.last_eval, self.resume_rng = -math.inf, {}, None
        self.skipped_steps, self.skipped_in_a_row = 0, 0  # non-finite steps not applied (nonfinite: skip)
        self.signal_received, self.saved_step = 0, None
        self.resume_dir = resume_dir
        if resume_dir is not None:
            self._restore(resume_dir)
        self.scheduler.step_update(self.step)
        if self.is_main:  # only once resuming is known to work: a failed resume leaves the run as it was
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        accelerator.wait_for_everyone()

    def _fsdp_plugin(self):
        """Accelerate's FSDP plugin when the config asks for FSDP; None for DDP (or one process)."""
        cfg = self.cfg
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not cfg.fsdp:
            raise ConfigError(
                "accelerate was launched with FSDP (distributed_type: FSDP in its config file, or --use_fsdp), "
                "but the training config has fsdp: false; train.py sets FSDP up itself: set fsdp: true (or "
                "--fsdp) and launch without accelerate's FSDP options"
            )
        if not cfg.fsdp:
            return None
        if cfg.cpu or not torch.cuda.is_available():
            raise ConfigError(
                "fsdp: true shards the model over GPUs (Accelerate runs FSDP on CUDA devices only), and this run "
                f"has none{' (cpu: true)' if cfg.cpu else ''}; set fsdp: false"
            )
        try:
            return fsdp_plugin()
        except TypeError as error:  # no fsdp_version argument: an Accelerate from before FSDP2 support
            raise ConfigError(
                f"fsdp: true needs Accelerate with FSDP2 support (>= 1.6), this is {accelerate.__version__} "
                f"({error}); pip install -U accelerate"
            ) from error

    def _build_data(self) -> None:
        cfg, accelerator = self.cfg, self.accelerator
        train_transform, eval_transform = build_transforms(cfg, self.data_config)
        augment_config = None
        if cfg.device_augment:  # workers only read files: decoding and augmentation run on self.device
            try:
                augment_config = DeviceAugmentConfig(cfg, self.data_config)
            except ValueError as error:
                raise ConfigError(str(error)) from error
        self.train_set, self.val_set = build_datasets(
            cfg.data_dir,
            train_transform,
            eval_transform,
            cfg.max_bad_images,
            draw_train_params=augment_config.draw_params if augment_config else None,
        )
        augment = DeviceAugment(augment_config, self.train_set, self.device) if augment_config else None
        self.images_per_step = cfg.global_batch_size(accelerator.num_processes)
        self.steps_per_epoch = len(self.train_set) // self.images_per_step
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"train/ has {len(self.train_set)} images, fewer than one optimizer step ({self.images_per_step} ="
                f" batch_size x grad_accum_steps x {accelerator.num_processes} processes); lower batch_size"
            )
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.stop_step = min(self.total_steps, cfg.max_steps) if cfg.max_steps else self.total_steps

        self.sampler = ResumableSampler(
            len(self.train_set),
            num_replicas=accelerator.num_processes,
            rank=accelerator.process_index,
            seed=cfg.seed,
        )
        # Worker seeds come from these generators, not from the global RNG, so that neither starting an epoch
        # nor evaluating shifts the training RNG (a resumed run continues exactly).
        self.worker_seed = torch.Generator()
        pin = self.device.type == "cuda"
        loader = DataLoader(
            self.train_set,
            cfg.batch_size,
            sampler=self.sampler,
            num_workers=cfg.workers,
            pin_memory=pin,
            drop_last=True,
            generator=self.worker_seed,
            collate_fn=collate_encoded if augment is not None else None,
        )
        # uint8 batches (or with device_augment, encoded JPEGs decoded and augmented there), normalised on the
        # device; on CUDA the next ones are prepared by a thread while this step runs. Not with workers 0: the
        # transforms would then draw this process' RNG a batch early (exact resume).
        mean, std = self.data_config["mean"], self.data_config["std"]
        prefetch = cfg.workers > 0 and self.device.type == "cuda"
        self.train_loader = DeviceLoader(loader, mean, std, self.device, prefetch=prefetch, augment=augment)
        self.random_erasing = build_random_erasing(cfg, self.device)
        self.val_loader = DataLoader(
            self.val_set,
            cfg.eval_batch_size or 2 * cfg.batch_size,
            shuffle=False,
            num_workers=cfg.workers,
            pin_memory=pin,
            generator=torch.Generator().manual_seed(cfg.seed),
        )

    def _restore(self, checkpoint_dir: Path) -> None:
        cfg, accelerator = self.cfg, self.accelerator
        state_dict, meta = read_checkpoint(checkpoint_dir)
        arch = {k: v for k, v in meta["model_kwargs"].items() if k != "drop_path_rate"}
        if (meta["model"], arch, meta["num_classes"]) != (cfg.model, cfg.model_kwargs, self.num_classes):
            raise ConfigError(
                f"cannot resume from {checkpoint_dir}: it holds {meta['model']} {arch} with {meta['num_classes']} "
                f"classes, the config asks for {cfg.model} {cfg.model_kwargs} with {self.num_classes}; use a new "
                "--run_name (or --resume none) to train this model from scratch"
            )
        if bool(meta.get("optimizer_shards")) != self.fsdp:
            raise ConfigError(
                f"cannot resume from {checkpoint_dir} with fsdp: {str(self.fsdp).lower()}: it was written by "
                f"{'an FSDP' if meta.get('optimizer_shards') else 'a DDP'} run, whose optimizer state is saved "
                f"differently; resume it with fsdp: {str(not self.fsdp).lower()}, or start a new --run_name with "
                f"init_from: {checkpoint_dir} (weights only)"
            )
        # Under FSDP every process reads the full weights and keeps its shard.
        load = load_full_state_dict if self.fsdp else torch.nn.Module.load_state_dict
        load(self.raw_model, state_dict)
        if self.ema is not None:
            if meta.get("has_ema"):
                load(self.ema.module, read_checkpoint(checkpoint_dir, ema=True)[0])
            else:
                logger.warning("%s has no EMA weights; the EMA restarts from the model's", checkpoint_dir)
                load(self.ema.module, state_dict)
        state = read_training_state(checkpoint_dir)
        if self.fsdp:
            load_optimizer_shards(self.raw_model, self.optimizer.optimizer, checkpoint_dir / OPTIMIZER_SHARDS)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if accelerator.scaler is not None and state["scaler"] is not None:
            accelerator.scaler.load_state_dict(state["scaler"])
        if state["global_batch_size"] != self.images_per_step:
            logger.warning(
                "the global batch changed from %d to %d images: steps before and after count different data",
                state["global_batch_size"],
                self.images_per_step,
            )
        if len(state["rng"]) == accelerator.num_processes:
            self.resume_rng = state["rng"][accelerator.process_index]
        else:
            logger.warning(
                "the checkpoint was saved by %d processes, this run has %d: random streams start afresh",
                len(state["rng"]),
                accelerator.num_processes,
            )
        self.step, self.epoch, self.samples_in_epoch = (
            state["step"],
            state["epoch"],
            state["samples_in_epoch"],
        )
        self.best_top1, self.last_eval = state["best_top1"], meta.get("metrics") or {}
        self.skipped_steps = state.get("skipped_steps", 0)
        self.skipped_in_a_row = state.get("skipped_in_a_row", 0)
        logger.info(
            "resumed from %s (step %d, epoch %d + %d images)",
            checkpoint_dir,
            self.step,
            self.epoch,
            self.samples_in_epoch,
        )

    def _announce(self, tracker: RunTracker) -> None:
        cfg, accelerator = self.cfg, self.accelerator
        backend = active_backend(torch.zeros(1, 8, device=self.device, dtype=self.amp_dtype or torch.float32))
        num_params = sum(p.numel() for p in self.raw_model.parameters())
        logger.info(
            "%s: %.2fM params, GR-KAN backend: %s | %d x %s, %s precision | %d train / %d val images, %d classes "
            "| global batch %d, lr %.3g, %d steps/epoch, %d steps | run dir %s",
            cfg.model,
            num_params / 1e6,
            backend,
            accelerator.num_processes,
            self.device.type,
            {"no": "fp32"}.get(self.precision, self.precision),
            len(self.train_set),
            len(self.val_set),
            self.num_classes,
            self.images_per_step,
            self.lr,
            self.steps_per_epoch,
            self.total_steps,
            self.run_dir,
        )
        tracker.log_run(
            {
                "step": self.step,
                "resumed_from": str(self.resume_dir) if self.resume_dir else None,
                "rational_backend": backend,
                "num_processes": accelerator.num_processes,
                "device": self.device.type,
                "mixed_precision": self.precision,
                "global_batch_size": self.images_per_step,
                "lr": self.lr,
                "params": num_params,
            }
        )

    def fit(self) -> dict:
        cfg, accelerator = self.cfg, self.accelerator
        tracker = RunTracker(self.run_dir, cfg, is_main=self.is_main)
        self._announce(tracker)
        if self.step >= self.stop_step:
            accelerator.print(
                f"Nothing to train: {self.resume_dir} is at step {self.step} of {self.stop_step}. Raise --epochs "
                "or --max_steps to go further, or use a new --run_name to train again."
            )
            tracker.finish()
            return self.last_eval
        if self.resume_rng is not None:
            set_rng_state(self.resume_rng)  # last, after everything that draws random numbers while building

        progress = tqdm(
            total=self.stop_step, initial=self.step, disable=not self.is_main, unit="step", dynamic_ncols=True
        )
        progress.set_description(cfg.run_name)
        handlers = self._catch_stop_signals()
        try:
            while self.step < self.stop_step:
                self._train_epoch(tracker, progress)
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            progress.close()
            tracker.finish()

        last, elapsed = self.last_eval, time.perf_counter() - self.launch_time
        ema_text = f"EMA {last['val_ema']['top1']:.1f}%, " if "val_ema" in last else ""
        accelerator.print(
            f"Training finished: val top-1 {last['val']['top1']:.1f}% ({ema_text}chance {100 / self.num_classes:.1f}%)"
            f" after {self.step} steps in {elapsed:.0f} s; checkpoints in {self.run_dir} (best: {self.run_dir}/best)"
        )
        return last

    def _catch_stop_signals(self) -> dict:
        """SIGTERM/SIGINT only set a flag: the loop saves at the next step boundary. A second one acts at once."""
        if threading.current_thread() is not threading.main_thread():
            return {}  # Python delivers signals to the main thread only

        def request_stop(signum, frame):
            self.signal_received = signum
            signal.signal(signum, handlers[signum])

        handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for signum in handlers:
            signal.signal(signum, request_stop)
        return handlers

    def _train_epoch(self, tracker: RunTracker, progress: tqdm) -> None:
        """Train from the current position to the end of the epoch (or stop_step), evaluating and saving."""
        cfg, accelerator = self.cfg, self.accelerator
        epoch_clock = time.perf_counter()
        self.sampler.set_epoch(self.epoch, start=self.samples_in_epoch)
        self.worker_seed.manual_seed(
            hash((cfg.seed, self.epoch, self.samples_in_epoch, accelerator.process_index)) % 2**62
        )
        batches = iter(self.train_loader)
        updates = len(self.train_loader) // cfg.grad_accum_steps
        loss_sum, applied = torch.zeros((), device=self.device), 0
        log_clock, log_step, data_time = time.perf_counter(), self.step, 0.0
        self.model.train()
        for update in range(updates):
            loss, grad_norm, lr, waited, stop_signal = self._train_step(batches)
            if self.skipped_in_a_row == 0:  # a skipped step's loss is not finite everywhere
                loss_sum, applied = loss_sum + loss, applied + 1
            data_time += waited
            end_of_epoch, final = update == updates - 1, self.step >= self.stop_step

            if self.step % cfg.log_interval == 0 or final:
                loss_value = accelerator.reduce(loss, "mean").item()
                now, steps = time.perf_counter(), self.step - log_step
                record = {
                    "step": self.step,
                    "epoch": self.epoch
                    + self.samples_in_epoch / (self.steps_per_epoch * self.images_per_step),
                    "loss": _finite_or_none(loss_value),  # null, not NaN: metrics.jsonl stays strict JSON
                    "lr": lr,
                    "grad_norm": _finite_or_none(grad_norm.item()),
                    "skipped_steps": self.skipped_steps,  # non-finite steps not applied, in all
                    "images_per_sec": steps * self.images_per_step / (now - log_clock),  # all processes
                    "step_time": (now - log_clock) / steps,
                    "data_time": data_time / steps,
                }
                if self.device.type == "cuda":
                    record["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                tracker.log_step(record)
                progress.set_postfix(
                    loss=f"{loss_value:.4f}",
                    lr=f"{lr:.2e}",
                    img_s=f"{record['images_per_sec']:.0f}",
                    refresh=False,
                )
                log_clock, log_step, data_time = now, self.step, 0.0
            progress.update(1)

            if end_of_epoch:
                self.epoch, self.samples_in_epoch = self.epoch + 1, 0
            if end_of_epoch or final:
                train_loss = accelerator.reduce(loss_sum, "mean").item() / applied if applied else math.nan
                self._evaluate(tracker, progress, time.perf_counter() - epoch_clock, train_loss)
            if (
                end_of_epoch
                or final
                or (cfg.checkpoint_interval and self.step % cfg.checkpoint_interval == 0)
            ):
                self._save(evaluated=end_of_epoch or final)
            if end_of_epoch or final:  # throughput excludes evaluating and saving
                log_clock, log_step, data_time = time.perf_counter(), self.step, 0.0
            if final:
                return
            if stop_signal:
                if self.saved_step != self.step:
                    self._save(evaluated=False)
                name = signal.Signals(stop_signal).name
                raise Interrupted(
                    f"{name} received: stopped at step {self.step} with checkpoint {self.run_dir / checkpoint_name(self.step)}"
                    "; rerun the same command to resume",
                    stop_signal,
                )

    def _train_step(self, batches) -> tuple[torch.Tensor, torch.Tensor, float, float, int]:
        """One optimizer step over grad_accum_steps micro-batches.

        Returns (mean loss, grad norm, lr used, data wait, signal to stop at or 0), the last agreed by all processes.
        """
        cfg, accelerator = self.cfg, self.accelerator
        step_loss, data_time = torch.zeros((), device=self.device), 0.0
        for micro in range(cfg.grad_accum_steps):
            wait = time.perf_counter()
            images, targets = next(batches)  # normalised, on the device
            data_time += time.perf_counter() - wait
            if self.random_erasing is not None:  # here, not in the loader: it draws RNG for this step
                images = self.random_erasing(images)
            if self.mixup is not None:
                images, targets = self.mixup(images, targets)
            # Gradients are all-reduced across processes only on the last micro-batch.
            last = micro == cfg.grad_accum_steps - 1
            with nullcontext() if last else accelerator.no_sync(self.model):
                if cfg.compile:
                    torch.compiler.cudagraph_mark_step_begin()  # a new step for CUDA-graph trees (else a no-op)
                # prepare() put forward in autocast, except under FSDP (Accelerate leaves casting to FSDP's
                # mixed-precision policy, which we keep at fp32: fsdp.fsdp_plugin says why)
                with accelerator.autocast() if self.fsdp else nullcontext():
                    loss = self.train_loss_fn(self.model(images), targets)
                # On the calling thread, not autograd's per-device worker: each Python autograd.Function in
                # the backward (two GR-KAN ops per block) otherwise costs a thread hand-off; measured on an
                # H200, eager KAT-S issued its step in 25.8 ms instead of 36.8 (docs/BENCHMARKS.md section 1).
                # PyTorch is moving to this default (pytorch#192082); torchtitan sets it too.
                with torch.autograd.set_multithreading_enabled(False):
                    accelerator.backward(loss / cfg.grad_accum_steps)
            step_loss += loss.detach() / cfg.grad_accum_steps
        grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), cfg.clip_grad or math.inf)
        if isinstance(grad_norm, DTensor):  # FSDP: the norm of sharded gradients, replicated
            grad_norm = grad_norm.full_tensor()
        lr = max(group["lr"] for group in self.optimizer.param_groups)  # the head's when layer_decay is on

        # One all-reduce (max over processes) decides for everyone: is the loss / are the gradients non-finite
        # anywhere, and has any process been asked to stop? With fp16 the GradScaler owns non-finite gradients
        # (it skips those steps and lowers the scale), so they are not counted twice.
        scaler = accelerator.scaler
        nonfinite = [~torch.isfinite(step_loss), ~torch.isfinite(grad_norm) & (scaler is None)]
        flags = torch.stack(nonfinite).to(self.device, torch.float32)
        signal_flag = torch.tensor([float(self.signal_received)], device=self.device)
        bad_loss, bad_grads, stop_signal = accelerator.reduce(torch.cat([flags, signal_flag]), "max").tolist()
        if bad_loss or bad_grads:
            self._nonfinite_step("loss" if bad_loss else "gradients", step_loss, grad_norm)
            self.optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.update()  # what accelerate's optimizer.step() would have done after unscaling
        else:
            self.skipped_in_a_row = 0
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.samples_in_epoch += self.images_per_step
        self.scheduler.step_update(self.step)
        if self.ema is not None and not self.skipped_in_a_row:
            self.ema.update(self.raw_model, step=self.step)
        self.train_set.check_bad_images()
        return step_loss, grad_norm, lr, data_time, int(stop_signal)

    def _nonfinite_step(self, what: str, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Skip step self.step + 1 (policy 'skip'), or raise NonFiniteError (policy 'stop', or too many skips)."""
        cfg, step = self.cfg, self.step + 1
        found = f"non-finite {what} at step {step} (loss {loss.item()}, grad norm {grad_norm.item()}"
        found += ", on some process)" if self.accelerator.num_processes > 1 else ")"
        checkpoints = list_checkpoints(self.run_dir, warn=False)
        kept = (
            f"the last good checkpoint is {checkpoints[-1]} (rerunning the command resumes from it)"
            if checkpoints
            else "no checkpoint was written yet"
        )
        fix = "lower lr, set clip_grad, use bf16 rather than fp16, or check the data"
        if cfg.nonfinite == "stop":
            raise NonFiniteError(f"{found}; stopped (nonfinite: stop) without applying it; {kept}; {fix}")
        self.skipped_steps, self.skipped_in_a_row = self.skipped_steps + 1, self.skipped_in_a_row + 1
        if self.skipped_in_a_row >= cfg.max_nonfinite_steps:
            raise NonFiniteError(
                f"{found}: {self.skipped_in_a_row} non-finite steps in a row (max_nonfinite_steps="
                f"{cfg.max_nonfinite_steps}), the run has diverged; {kept}; {fix}"
            )
        logger.warning("%s: step skipped (%d skipped in all, nonfinite: skip)", found, self.skipped_steps)

    def _evaluate(self, tracker: RunTracker, progress: tqdm, epoch_time: float, train_loss: float) -> None:
        cfg = self.cfg
        models = {"val": self.model} | ({"val_ema": self.ema.module} if self.ema is not None else {})
        results = {name: self._evaluate_model(model, name) for name, model in models.items()}
        if self.val_set.num_bad_images:
            logger.warning(
                "val metrics count %d substitutes for unreadable images", self.val_set.num_bad_images
            )
        images = {}
        if cfg.plot_rationals:
            with unsharded(self.raw_model) if self.fsdp else nullcontext():  # every process gathers (FSDP)
                path = self.run_dir / "plots" / f"rationals-{checkpoint_name(self.step)}.png"
                if self.is_main and plot_rationals(self.raw_model, path, title=f"(step {self.step})"):
                    images["rationals"] = path
        tracker.log_eval(
            {
                "step": self.step,
                "epoch": self.epoch,
                "epoch_time": epoch_time,
                "train_loss": train_loss,
                **results,
            },
            images,
        )
        val = results["val"]
        ema_text = f" | EMA top-1 {results['val_ema']['top1']:.2f}%" if "val_ema" in results else ""
        progress.write(
            f"epoch {self.epoch}/{cfg.epochs} (step {self.step}): train loss {train_loss:.4f} | val top-1 "
            f"{val['top1']:.2f}% top-5 {val['top5']:.2f}% loss {val['loss']:.4f}{ema_text} | {epoch_time:.0f} s"
        )
        self.last_eval = results

    def _evaluate_model(self, model: torch.nn.Module, name: str) -> dict:
        with tqdm(total=len(self.val_loader), desc=name, leave=False, disable=not self.is_main) as bar:
            return evaluate(
                model,
                self.val_loader,
                self.accelerator,
                amp_dtype=self.amp_dtype,
                progress=lambda _: bar.update(),
            )

    def _save(self, evaluated: bool) -> None:
        is_best = evaluated and self.last_eval["val"]["top1"] > self.best_top1
        if is_best:
            self.best_top1 = self.last_eval["val"]["top1"]
        rng_states = gather_object([rng_state()])  # one entry per process; every process takes part
        tmp = None
        if self.fsdp:  # collectives: every process gathers the weights and writes its optimizer shard
            model_state = full_state_dict(self.raw_model)
            ema_state = full_state_dict(self.ema.module) if self.ema is not None else None
            tmp = checkpoint_tmp_dir(self.run_dir, self.step)
            if self.is_main:
                begin_checkpoint(self.run_dir, self.step)
            self.accelerator.wait_for_everyone()
            save_optimizer_shards(self.raw_model, self.optimizer.optimizer, tmp / OPTIMIZER_SHARDS)
        elif self.is_main:
            model_state = self.raw_model.state_dict()
            ema_state = self.ema.module.state_dict() if self.ema is not None else None
        if self.is_main:
            scaler = self.accelerator.scaler
            training_state = {
                "format": STATE_FORMAT,
                "step": self.step,
                "epoch": self.epoch,  # epochs completed
                "samples_in_epoch": self.samples_in_epoch,  # position in the next one (all processes)
                "global_batch_size": self.images_per_step,
                "best_top1": self.best_top1,
                "skipped_steps": self.skipped_steps,
                "skipped_in_a_row": self.skipped_in_a_row,
                "optimizer": None if self.fsdp else self.optimizer.state_dict(),  # FSDP: in optimizer/
                "scheduler": self.scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rng_states,
            }
            meta = {
                "model": self.cfg.model,
                "model_kwargs": {**self.cfg.model_kwargs, "drop_path_rate": self.cfg.drop_path},
                "num_classes": self.num_classes,
                "class_names": self.class_names,
                "step": self.step,
                "epoch": self.epoch,
                "data_config": self.data_config,
                "config": self.cfg.to_dict(),
                "metrics": self.last_eval,
            }
            save_checkpoint(
                self.run_dir,
                self.step,
                model_state=model_state,
                ema_state=ema_state,
                training_state=training_state,
                meta=meta,
                keep=self.cfg.keep_checkpoints,
                is_best=is_best,
                tmp=tmp,
            )
        self.saved_step = self.step
        self.accelerator.wait_for_everyone()


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
