"""The training loop: DeiT recipe pieces from timm, processes and precision from Accelerate.

One optimizer step = `grad_accum_steps` micro-batches of `batch_size` images on each process. The learning
rate follows timm's cosine schedule stepped per update; the EMA (timm ModelEmaV3) is updated after every
step. Every epoch end (and at the end of the run) the model and its EMA are evaluated on val/ and a checkpoint
is written; checkpoints are also written every `checkpoint_interval` steps. Everything needed to continue
exactly (weights, EMA, optimizer, scheduler, loss scaler, RNG, position in the epoch's data order) is in the
checkpoint, so rerunning the same command resumes.
"""

import logging
import math
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import timm
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import kat  # noqa: F401  (registers the KAT models with timm)
from kat.data import (
    ResumableSampler,
    build_datasets,
    build_mixup,
    build_train_loss,
    build_transforms,
    check_layout,
    resolve_data_config,
)
from kat.evaluation import evaluate
from kat.rational import active_backend
from kat.training.checkpoint import (
    checkpoint_name,
    list_checkpoints,
    read_checkpoint,
    read_training_state,
    resolve_checkpoint,
    save_checkpoint,
)
from kat.training.config import ConfigError, TrainConfig, save_config
from kat.training.plots import plot_rationals
from kat.training.tracking import RunTracker

logger = logging.getLogger(__name__)

STATE_FORMAT = "kat-training-state/1"
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}


def create_model(cfg: TrainConfig, num_classes: int) -> torch.nn.Module:
    if not timm.is_model(cfg.model):
        import difflib

        close = difflib.get_close_matches(cfg.model, timm.list_models(), n=3)
        raise ConfigError(f"config key 'model': unknown timm model '{cfg.model}'; closest: {', '.join(close)}")
    try:
        return timm.create_model(cfg.model, num_classes=num_classes, drop_path_rate=cfg.drop_path, **cfg.model_kwargs)
    except TypeError as error:
        raise ConfigError(f"config key 'model_kwargs' {cfg.model_kwargs} not accepted by {cfg.model}: {error}") from error


def _rng_state() -> dict:
    """This process' RNG state in plain tensors/tuples (training_state.pt must load with weights_only=True)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _choose_resume(cfg: TrainConfig, run_dir: Path) -> Path | None:
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


def train(cfg: TrainConfig) -> dict:
    """Train as configured; returns the final evaluation ({'val': {...}, 'val_ema': {...}} or {} if nothing ran)."""
    launch_time = time.perf_counter()
    on_cpu = cfg.cpu or not torch.cuda.is_available()
    precision = cfg.mixed_precision
    if on_cpu and precision == "fp16":
        logger.warning("fp16 autocast needs a GPU; training in full precision on CPU (bf16 works on CPU too)")
        precision = "no"
    accelerator = Accelerator(
        mixed_precision=precision, cpu=cfg.cpu, dynamo_backend="inductor" if cfg.compile else "no"
    )
    is_main, device = accelerator.is_main_process, accelerator.device
    num_processes, rank = accelerator.num_processes, accelerator.process_index
    amp_dtype = _AMP_DTYPES[precision]

    run_dir = Path(cfg.output_dir) / cfg.run_name
    resume_dir = _choose_resume(cfg, run_dir)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")

    # Data layout first: a wrong data_dir should fail before anything slow happens.
    class_names = check_layout(cfg.data_dir)
    num_classes = len(class_names)
    if cfg.num_classes is not None and cfg.num_classes != num_classes:
        raise ConfigError(f"num_classes: {cfg.num_classes}, but {cfg.data_dir}/train has {num_classes} classes")

    set_seed(cfg.seed)  # same initial weights on every process
    model = create_model(cfg, num_classes).to(device)
    set_seed(cfg.seed, device_specific=True)  # different augmentation per process
    data_config = resolve_data_config(model, cfg)
    train_transform, eval_transform = build_transforms(cfg, data_config)
    train_set, val_set = build_datasets(cfg.data_dir, train_transform, eval_transform, cfg.max_bad_images)

    images_per_step = cfg.global_batch_size(num_processes)
    steps_per_epoch = len(train_set) // images_per_step
    if steps_per_epoch == 0:
        raise ConfigError(
            f"train/ has {len(train_set)} images, fewer than one optimizer step ({images_per_step} = batch_size x "
            f"grad_accum_steps x {num_processes} processes); lower batch_size"
        )
    total_steps = cfg.epochs * steps_per_epoch
    stop_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps

    sampler = ResumableSampler(len(train_set), num_replicas=num_processes, rank=rank, seed=cfg.seed)
    loader_seed = torch.Generator()  # worker seeds come from here, not from the global RNG (exact resume)
    pin = device.type == "cuda"
    train_loader = DataLoader(
        train_set, cfg.batch_size, sampler=sampler, num_workers=cfg.workers, pin_memory=pin, drop_last=True,
        generator=loader_seed,
    )
    val_loader = DataLoader(
        val_set, cfg.eval_batch_size or 2 * cfg.batch_size, shuffle=False, num_workers=cfg.workers, pin_memory=pin
    )

    lr = cfg.scaled_lr(num_processes)
    adam_kwargs = dict(betas=tuple(cfg.opt_betas), eps=cfg.opt_eps) if "adam" in cfg.opt.lower() else {}
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, **adam_kwargs)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, step_on_epochs=False, updates_per_epoch=steps_per_epoch,
    )
    ema = ModelEmaV3(model, decay=cfg.model_ema_decay, use_warmup=cfg.model_ema_warmup) if cfg.model_ema else None
    mixup = build_mixup(cfg, num_classes)
    train_loss_fn = build_train_loss(cfg, mixup)

    raw_model = model  # the plain module: its state_dict has timm keys whatever wraps it (DDP, compile)
    model, optimizer, val_loader = accelerator.prepare(model, optimizer, val_loader)

    step, epoch, samples_in_epoch, best_top1, last_eval = 0, 0, 0, -math.inf, {}
    if resume_dir is not None:
        step, epoch, samples_in_epoch, best_top1, last_eval, rng = _restore(
            resume_dir, cfg, raw_model, ema, optimizer, scheduler, accelerator, num_classes, images_per_step
        )
    scheduler.step_update(step)

    tracker = RunTracker(run_dir, cfg, is_main=is_main)
    backend = active_backend(torch.zeros(1, 8, device=device, dtype=amp_dtype or torch.float32))
    num_params = sum(p.numel() for p in raw_model.parameters())
    logger.info(
        "%s (%.2fM params, GR-KAN backend: %s) on %d x %s, %s precision | %d train / %d val images, %d classes | "
        "global batch %d, lr %.3g, %d steps/epoch, %d steps in all | run dir %s",
        cfg.model, num_params / 1e6, backend, num_processes, device.type, precision, len(train_set),
        len(val_set), num_classes, images_per_step, lr, steps_per_epoch, total_steps, run_dir,
    )
    tracker.log_run({
        "step": step, "resumed_from": str(resume_dir) if resume_dir else None, "rational_backend": backend,
        "num_processes": num_processes, "device": device.type, "mixed_precision": precision,
        "global_batch_size": images_per_step, "lr": lr, "params": num_params,
    })
    tracker.log_summary({"rational_backend": backend, "params": num_params})

    if step >= stop_step:
        accelerator.print(f"Nothing to train: {resume_dir} is at step {step} of {stop_step}. "
                          "To train again, use a new --run_name (or --max_steps / --epochs to go further).")
        tracker.finish()
        return last_eval
    if resume_dir is not None:
        _set_rng_state(rng)  # last, after everything above that draws random numbers

    meta_base = {
        "model": cfg.model, "model_kwargs": {**cfg.model_kwargs, "drop_path_rate": cfg.drop_path},
        "num_classes": num_classes, "class_names": class_names, "data_config": data_config,
        "config": cfg.to_dict(),
    }

    def run_evaluation(epoch_time: float, train_loss: float) -> dict:
        results = {"val": evaluate(model, val_loader, accelerator, amp_dtype=amp_dtype)}
        if ema is not None:
            results["val_ema"] = evaluate(ema.module, val_loader, accelerator, amp_dtype=amp_dtype)
        if val_set.num_bad_images:
            logger.warning("val metrics count %d substitutes for unreadable images", val_set.num_bad_images)
        images = {}
        if is_main and cfg.plot_rationals:
            png = plot_rationals(raw_model, run_dir / "plots" / f"rationals-{checkpoint_name(step)}.png",
                                 title=f"(step {step})")
            images = {"rationals": png} if png else {}
        tracker.log_eval({"step": step, "epoch": epoch, "epoch_time": epoch_time, "train_loss": train_loss,
                          **results}, images)
        ema_text = f", EMA {results['val_ema']['top1']:.2f}%" if ema is not None else ""
        progress.write(
            f"epoch {epoch}/{cfg.epochs} step {step}: train loss {train_loss:.4f} | val top-1 "
            f"{results['val']['top1']:.2f}% top-5 {results['val']['top5']:.2f}% loss {results['val']['loss']:.4f}"
            f"{ema_text} | {epoch_time:.0f} s"
        )
        return results

    def save(evaluated: bool) -> None:
        nonlocal best_top1
        is_best = evaluated and last_eval["val"]["top1"] > best_top1
        if is_best:
            best_top1 = last_eval["val"]["top1"]
        rng_states = gather_object([_rng_state()])  # one entry per process, all processes take part
        if is_main:
            training_state = {
                "format": STATE_FORMAT, "step": step, "epoch": epoch, "samples_in_epoch": samples_in_epoch,
                "global_batch_size": images_per_step, "best_top1": best_top1,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "rng": rng_states,
            }
            save_checkpoint(
                run_dir, step, model_state=raw_model.state_dict(),
                ema_state=ema.module.state_dict() if ema is not None else None, training_state=training_state,
                meta={**meta_base, "step": step, "epoch": epoch, "metrics": last_eval}, keep=cfg.keep_checkpoints,
                is_best=is_best,
            )
        accelerator.wait_for_everyone()

    progress = tqdm(total=stop_step, initial=step, disable=not is_main, unit="step", dynamic_ncols=True,
                    desc=cfg.run_name)
    log_clock, log_step = time.perf_counter(), step
    try:
        while step < stop_step:
            epoch_clock = time.perf_counter()
            sampler.set_epoch(epoch, samples_in_epoch)
            loader_seed.manual_seed(hash((cfg.seed, epoch, samples_in_epoch, rank)) % 2**62)
            batches = iter(train_loader)
            updates_this_epoch = len(train_loader) // cfg.grad_accum_steps
            loss_total, data_time = torch.zeros((), device=device), 0.0
            model.train()
            for update in range(updates_this_epoch):
                step_loss = torch.zeros((), device=device)
                for micro in range(cfg.grad_accum_steps):
                    wait = time.perf_counter()
                    images, targets = next(batches)
                    data_time += time.perf_counter() - wait
                    images = images.to(device, non_blocking=True)
                    targets = targets.to(device, non_blocking=True)
                    if mixup is not None:
                        images, targets = mixup(images, targets)
                    last_micro = micro == cfg.grad_accum_steps - 1
                    # Gradients are all-reduced only on the last micro-batch of a step.
                    with nullcontext() if last_micro else accelerator.no_sync(model):
                        loss = train_loss_fn(model(images), targets)  # prepare() wrapped forward in autocast
                        accelerator.backward(loss / cfg.grad_accum_steps)
                    step_loss += loss.detach() / cfg.grad_accum_steps
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad or math.inf)
                lr_now = optimizer.param_groups[0]["lr"]
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                samples_in_epoch += images_per_step
                scheduler.step_update(step)
                if ema is not None:
                    ema.update(raw_model, step=step)
                loss_total += step_loss
                train_set.check_bad_images()

                end_of_epoch = update == updates_this_epoch - 1
                final = step >= stop_step
                if step % cfg.log_interval == 0 or final:
                    loss_value = accelerator.reduce(step_loss, "mean").item()
                    if not math.isfinite(loss_value):
                        raise FloatingPointError(
                            f"loss is {loss_value} at step {step}; lower lr, set clip_grad, or use bf16"
                        )
                    now = time.perf_counter()
                    steps_done = step - log_step
                    record = {
                        "step": step, "epoch": epoch + samples_in_epoch / (steps_per_epoch * images_per_step),
                        "loss": loss_value, "lr": lr_now, "grad_norm": grad_norm.item(),
                        "images_per_sec": steps_done * images_per_step / (now - log_clock),
                        "step_time": (now - log_clock) / steps_done, "data_time": data_time / steps_done,
                    }
                    if device.type == "cuda":
                        record["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                    tracker.log_step(record)
                    progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr_now:.2e}",
                                         img_s=f"{record['images_per_sec']:.0f}", refresh=False)
                    log_clock, log_step, data_time = now, step, 0.0
                progress.update(1)

                if end_of_epoch:
                    epoch, samples_in_epoch = epoch + 1, 0
                evaluated = end_of_epoch or final
                if evaluated:
                    train_loss = accelerator.reduce(loss_total, "mean").item() / (update + 1)
                    last_eval = run_evaluation(time.perf_counter() - epoch_clock, train_loss)
                    log_clock = time.perf_counter()  # evaluation time is not training throughput
                if evaluated or (cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0):
                    save(evaluated)
                    log_clock = time.perf_counter()
                if final:
                    break
    finally:
        progress.close()
        tracker.finish()

    elapsed = time.perf_counter() - launch_time
    ema_text = f"EMA {last_eval['val_ema']['top1']:.1f}%, " if "val_ema" in last_eval else ""
    accelerator.print(
        f"Training finished: val top-1 {last_eval['val']['top1']:.1f}% ({ema_text}chance "
        f"{100 / num_classes:.1f}%) after {step} steps ({epoch} epochs + {samples_in_epoch} images) in "
        f"{elapsed:.0f} s; checkpoints in {run_dir} (best: {run_dir / 'best'})"
    )
    return last_eval


def _restore(resume_dir, cfg, raw_model, ema, optimizer, scheduler, accelerator, num_classes, images_per_step):
    """Load a checkpoint into the live objects; returns the counters and this process' RNG state."""
    state_dict, meta = read_checkpoint(resume_dir)
    expected = {"model": cfg.model, "model_kwargs": {**cfg.model_kwargs, "drop_path_rate": cfg.drop_path},
                "num_classes": num_classes}
    differs = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v and k != "model_kwargs"}
    if meta["model_kwargs"] != expected["model_kwargs"]:
        arch = {k: v for k, v in meta["model_kwargs"].items() if k != "drop_path_rate"}
        if arch != cfg.model_kwargs:
            differs["model_kwargs"] = (arch, cfg.model_kwargs)
    if differs:
        detail = "; ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in differs.items())
        raise ConfigError(
            f"cannot resume from {resume_dir}: the model differs ({detail}); use --resume none with a new "
            f"--run_name to train this model from scratch"
        )
    raw_model.load_state_dict(state_dict)
    if ema is not None:
        if meta.get("has_ema"):
            ema.module.load_state_dict(read_checkpoint(resume_dir, ema=True)[0])
        else:
            logger.warning("%s has no EMA weights; the EMA restarts from the current weights", resume_dir)
            ema.module.load_state_dict(state_dict)
    state = read_training_state(resume_dir)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if accelerator.scaler is not None and state["scaler"] is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    if state["global_batch_size"] != images_per_step:
        logger.warning(
            "global batch changed from %d to %d images since the checkpoint: steps and the lr schedule now "
            "count different amounts of data", state["global_batch_size"], images_per_step,
        )
    rng_states = state["rng"]
    if len(rng_states) == accelerator.num_processes:
        rng = rng_states[accelerator.process_index]
    else:
        logger.warning("checkpoint saved by %d processes, running %d: RNG streams start afresh",
                       len(rng_states), accelerator.num_processes)
        rng = _rng_state()
    logger.info("resumed from %s (step %d, epoch %d + %d images)", resume_dir, state["step"], state["epoch"],
                state["samples_in_epoch"])
    metrics = meta.get("metrics") or {}
    return state["step"], state["epoch"], state["samples_in_epoch"], state["best_top1"], metrics, rng
