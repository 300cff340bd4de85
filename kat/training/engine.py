"""Stepping a built run (kat.training.build): the optimizer step, the epoch, evaluation, checkpoints, resuming.

One optimizer step = `grad_accum_steps` micro-batches of `batch_size` images on each process. The learning
rate follows timm's cosine schedule stepped per update; the EMA (kat.training.ema) is updated after every
applied step (a skipped non-finite step leaves it as it was). At every epoch end (and at the end of the run) the
model and its EMA are evaluated on val/ and a checkpoint is written; checkpoints are also written every
`checkpoint_interval` steps. Everything needed to continue exactly (weights, EMA, optimizer, loss scaler, RNG,
position in the epoch's data order) is in the checkpoint, so rerunning the same command resumes; the lr
schedule is re-derived from the resumed run's config, so a changed lr or batch size takes effect from there.

How a run ends early (docs/ERRORS.md "How runs end"): TrainingStopped, whose message train.py prints as one line
and whose exit_code it returns:
- non-finite loss or gradients, per the `nonfinite` config key: NonFiniteError, exit code 3;
- a fault once training has started (too many unreadable images, a checkpoint that cannot be written):
  RunFault, exit code 4, naming the last checkpoint;
- SIGTERM/SIGINT (a preempted cluster job, Ctrl-C), from start-up on: a checkpoint at the next step boundary,
  then Interrupted, exit code 128 + signal (143/130), so schedulers see the job did not finish and requeue.
The non-finite check and the stop request are agreed by all processes in one all-reduce per step.
"""

import logging
import math
import random
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import broadcast_object_list, gather_object
from tqdm.auto import tqdm

from kat.data import DataError
from kat.evaluation import evaluate
from kat.models.pretrained import CheckpointError
from kat.rational import active_backend
from kat.training.build import TrainingParts, build, choose_resume
from kat.training.checkpoint import (
    checkpoint_name,
    list_checkpoints,
    read_checkpoint,
    read_training_state,
    save_checkpoint,
)
from kat.training.config import ConfigError, TrainConfig, save_config
from kat.training.plots import plot_rationals
from kat.training.run_control import RunDirLocked, RunLock, StopSignals
from kat.training.tracking import RunTracker

logger = logging.getLogger(__name__)

STATE_FORMAT = "kat-training-state/1"
NONFINITE_EXIT_CODE = 3
RUN_FAULT_EXIT_CODE = 4


class TrainingStopped(RuntimeError):
    """Training ended before its last step; the message says why and what to do next."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class NonFiniteError(TrainingStopped):
    def __init__(self, message: str):
        super().__init__(message, NONFINITE_EXIT_CODE)


class RunFault(TrainingStopped):
    """A fault after training started (bad data, a checkpoint write that failed): what was saved is kept."""

    def __init__(self, message: str):
        super().__init__(message, RUN_FAULT_EXIT_CODE)


class Interrupted(TrainingStopped):
    """SIGTERM/SIGINT: the checkpoint is saved; the message says how to resume."""

    def __init__(self, message: str, signum: int):
        super().__init__(message, 128 + signum)


def train(cfg: TrainConfig, stop: StopSignals | None = None) -> dict:
    """Train as configured; returns the last evaluation: {'val': {top1, top5, loss, ...}, 'val_ema': {...}}."""
    return Trainer(cfg, stop).fit()


class Trainer:
    """A built run plus its counters. __init__ builds (and resumes) it and claims the run dir; fit() trains."""

    def __init__(self, cfg: TrainConfig, stop: StopSignals | None = None):
        """stop: signal handlers installed earlier (train.py); by default from here on."""
        self.cfg, self.launch_time = cfg, time.perf_counter()
        self.stop = stop or StopSignals()
        self.lock = None
        try:
            self.run_dir = Path(cfg.output_dir) / cfg.run_name
            self.resume_dir = choose_resume(cfg, self.run_dir)
            self.parts: TrainingParts = build(cfg, load_init_weights=self.resume_dir is None)
            self.accelerator, self.is_main = self.parts.accelerator, self.parts.accelerator.is_main_process
            self.step, self.epoch, self.samples_in_epoch = 0, 0, 0
            self.best_top1, self.last_eval, self.resume_rng = -math.inf, {}, None
            self.skipped_steps, self.skipped_in_a_row = 0, 0  # non-finite steps not applied (nonfinite: skip)
            self.saved_step = None
            if self.resume_dir is not None:
                self._restore(self.resume_dir)
            self.parts.scheduler.step_update(self.step)
            self._claim_run_dir()  # only once resuming is known to work: a failed resume leaves the run as it was
        except BaseException:
            self.stop.restore()
            raise

    # ------------------------------------------------------------------------------------------------------
    # Training

    def fit(self) -> dict:
        """Train to stop_step; returns the last evaluation. Ends the run: signals and the run dir are released."""
        p, cfg, tracker = self.parts, self.cfg, None
        try:
            tracker = RunTracker(self.run_dir, cfg, is_main=self.is_main)
            self._announce(tracker)
            if self.step >= p.stop_step:
                self.accelerator.print(
                    f"Nothing to train: {self.resume_dir} is at step {self.step} of {p.stop_step}. Raise "
                    "--epochs or --max_steps to go further, or use a new --run_name to train again."
                )
                return self.last_eval
            self._stop_if_asked_during_start_up()
            if self.resume_rng is not None:  # last, after everything that draws random numbers while building
                set_rng_state(self.resume_rng)
            bar = dict(total=p.stop_step, initial=self.step, unit="step", dynamic_ncols=True)
            with tqdm(**bar, desc=cfg.run_name, disable=not self.is_main) as progress:
                while self.step < p.stop_step:
                    self.train_one_epoch(tracker, progress)
        except DataError as error:  # too many unreadable images, found while training
            raise RunFault(f"{error}; stopped at step {self.step}; {self._last_checkpoint_text()}") from error
        finally:
            if tracker is not None:
                tracker.finish()
            self.stop.restore()
            if self.lock is not None:
                self.lock.release()
        self._check_result()
        last, elapsed = self.last_eval, time.perf_counter() - self.launch_time
        ema_text = f"EMA {last['val_ema']['top1']:.1f}%, " if "val_ema" in last else ""
        self.accelerator.print(
            f"Training finished: val top-1 {last['val']['top1']:.1f}% ({ema_text}chance {100 / p.num_classes:.1f}%)"
            f" after {self.step} steps in {elapsed:.0f} s; checkpoints in {self.run_dir} (best: {self.run_dir}/best)"
        )
        return last

    def train_one_epoch(self, tracker: RunTracker, progress: tqdm) -> None:
        """Train from the current position to the end of the epoch (or stop_step), evaluating and saving."""
        p, cfg = self.parts, self.cfg
        epoch_clock = time.perf_counter()
        p.sampler.set_epoch(self.epoch, start=self.samples_in_epoch)
        p.worker_seed.manual_seed(
            hash((cfg.seed, self.epoch, self.samples_in_epoch, self.accelerator.process_index)) % 2**62
        )
        batches = iter(p.train_loader)
        updates = len(p.train_loader) // cfg.grad_accum_steps
        loss_sum, applied = torch.zeros((), device=p.device), 0
        meter = ThroughputMeter(self.step)
        p.model.train()
        for update in range(updates):
            loss, grad_norm, lr, waited, stop_signal = self.train_step(batches)
            if self.skipped_in_a_row == 0:  # a skipped step's loss is not finite everywhere
                loss_sum, applied = loss_sum + loss, applied + 1
            meter.data_time += waited
            end_of_epoch, final = update == updates - 1, self.step >= p.stop_step
            if self.step % cfg.log_interval == 0 or final:
                self._log_step(tracker, progress, meter, loss, grad_norm, lr)
            progress.update(1)

            if end_of_epoch:
                self.epoch, self.samples_in_epoch = self.epoch + 1, 0
            evaluated = end_of_epoch or final
            if evaluated:
                train_loss = (
                    self.accelerator.reduce(loss_sum, "mean").item() / applied if applied else math.nan
                )
                self.evaluate(tracker, progress, time.perf_counter() - epoch_clock, train_loss)
            if evaluated or (cfg.checkpoint_interval and self.step % cfg.checkpoint_interval == 0):
                self.save(evaluated)
            if evaluated:  # throughput excludes evaluating and saving
                meter.restart(self.step)
            if final:
                return
            if stop_signal:
                self._stop_on_signal(stop_signal)

    def train_step(self, batches) -> tuple[torch.Tensor, torch.Tensor, float, float, int]:
        """One optimizer step over grad_accum_steps micro-batches.

        Returns (mean loss, grad norm, lr used, data wait, signal to stop at or 0), the last agreed by all processes.
        """
        p, cfg, accelerator = self.parts, self.cfg, self.accelerator
        step_loss, data_time = torch.zeros((), device=p.device), 0.0
        for micro in range(cfg.grad_accum_steps):
            wait = time.perf_counter()
            images, targets = next(batches)  # normalised, on the device
            data_time += time.perf_counter() - wait
            if p.random_erasing is not None:  # here, not in the loader: it draws RNG for this step
                images = p.random_erasing(images)
            if p.mixup is not None:
                images, targets = p.mixup(images, targets)
            # Gradients are all-reduced across processes only on the last micro-batch.
            with accelerator.no_sync(p.model) if micro < cfg.grad_accum_steps - 1 else nullcontext():
                if cfg.compile:
                    torch.compiler.cudagraph_mark_step_begin()  # a new step for CUDA-graph trees (else a no-op)
                with p.strategy.forward_context(accelerator):
                    loss = p.train_loss_fn(p.model(images), targets)
                # On the calling thread, not autograd's per-device worker: each Python autograd.Function in the
                # backward (two GR-KAN ops per block) otherwise costs a thread hand-off (docs/BENCHMARKS.md
                # section 1).
                with torch.autograd.set_multithreading_enabled(False):
                    accelerator.backward(loss / cfg.grad_accum_steps)
            step_loss += loss.detach() / cfg.grad_accum_steps
        grad_norm = accelerator.clip_grad_norm_(p.model.parameters(), cfg.clip_grad or math.inf)
        grad_norm = p.strategy.full_norm(grad_norm)
        lr = max(group["lr"] for group in p.optimizer.param_groups)  # the head's when layer_decay is on

        # One all-reduce (max over processes) decides for everyone: is the loss / are the gradients non-finite
        # anywhere, and has any process been asked to stop? With fp16 the GradScaler owns non-finite gradients
        # (it skips those steps and lowers the scale), so they are not counted twice.
        scaler = accelerator.scaler
        flags = torch.stack([~torch.isfinite(step_loss), ~torch.isfinite(grad_norm) & (scaler is None)])
        signal_flag = torch.tensor([float(self.stop.received)], device=p.device)
        bad_loss, bad_grads, stop_signal = accelerator.reduce(
            torch.cat([flags.to(p.device, torch.float32), signal_flag]), "max"
        ).tolist()
        if bad_loss or bad_grads:
            self._nonfinite_step("loss" if bad_loss else "gradients", step_loss, grad_norm)
            if scaler is not None:
                scaler.update()  # what accelerate's optimizer.step() would have done after unscaling
        else:
            self.skipped_in_a_row = 0
            p.optimizer.step()
        p.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.samples_in_epoch += p.images_per_step
        p.scheduler.step_update(self.step)
        if p.ema is not None and not self.skipped_in_a_row:
            p.ema.update(p.raw_model, step=self.step)
        p.train_set.check_bad_images()
        return step_loss, grad_norm, lr, data_time, int(stop_signal)

    def _log_step(self, tracker, progress, meter, loss, grad_norm, lr) -> None:
        p = self.parts
        loss_value = self.accelerator.reduce(loss, "mean").item()
        now, steps = time.perf_counter(), self.step - meter.step
        record = {
            "step": self.step,
            "epoch": self.epoch + self.samples_in_epoch / (p.steps_per_epoch * p.images_per_step),
            "loss": loss_value,
            "lr": lr,
            "grad_norm": grad_norm.item(),
            "skipped_steps": self.skipped_steps,  # non-finite steps not applied, in all
            "images_per_sec": steps * p.images_per_step / (now - meter.clock),  # all processes
            "step_time": (now - meter.clock) / steps,
            "data_time": meter.data_time / steps,
        }
        if p.device.type == "cuda":
            record["peak_memory_gb"] = torch.cuda.max_memory_allocated(p.device) / 2**30
        tracker.log_step(record)
        if self.lock is not None:
            self.lock.refresh()
        progress.set_postfix(
            loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", img_s=f"{record['images_per_sec']:.0f}", refresh=False
        )
        meter.restart(self.step)

    def _nonfinite_step(self, what: str, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Skip step self.step + 1 (policy 'skip'), or raise NonFiniteError (policy 'stop', or too many skips)."""
        cfg, step = self.cfg, self.step + 1
        found = f"non-finite {what} at step {step} (loss {loss.item()}, grad norm {grad_norm.item()}"
        found += ", on some process)" if self.accelerator.num_processes > 1 else ")"
        fix = "lower lr, set clip_grad, use bf16 rather than fp16, or check the data"
        if cfg.nonfinite == "stop":
            raise NonFiniteError(
                f"{found}; stopped (nonfinite: stop) without applying it; {self._last_checkpoint_text()}; {fix}"
            )
        self.skipped_steps, self.skipped_in_a_row = self.skipped_steps + 1, self.skipped_in_a_row + 1
        if self.skipped_in_a_row >= cfg.max_nonfinite_steps:
            raise NonFiniteError(
                f"{found}: {self.skipped_in_a_row} non-finite steps in a row (max_nonfinite_steps="
                f"{cfg.max_nonfinite_steps}), the run has diverged; {self._last_checkpoint_text()}; {fix}"
            )
        logger.warning("%s: step skipped (%d skipped in all, nonfinite: skip)", found, self.skipped_steps)

    def _last_checkpoint_text(self) -> str:
        checkpoints = list_checkpoints(self.run_dir, warn=False)
        if not checkpoints:
            return "no checkpoint was written yet"
        return f"the last good checkpoint is {checkpoints[-1]} ({self._how_to_resume()})"

    def _how_to_resume(self) -> str:
        """How to continue from this run dir's newest checkpoint: an explicit --resume source may be pruned."""
        if self.cfg.resume == "auto":
            return "rerunning the command resumes from it"
        return f"rerun the command without --resume {self.cfg.resume} (resume: auto) to resume from it"

    def _stop_on_signal(self, signum: int) -> None:
        if self.saved_step != self.step:
            self.save(evaluated=False)
        checkpoint = self.run_dir / checkpoint_name(self.step)
        how = "rerun the same command to resume" if self.cfg.resume == "auto" else self._how_to_resume()
        raise Interrupted(
            f"{signal.Signals(signum).name} received: stopped at step {self.step} with checkpoint {checkpoint}; {how}",
            signum,
        )

    def _stop_if_asked_during_start_up(self) -> None:
        """A signal while building: stop before the first step (all processes agree), nothing lost."""
        flag = torch.tensor([float(self.stop.received)], device=self.parts.device)
        signum = int(self.accelerator.reduce(flag, "max").item())
        if signum:
            raise Interrupted(
                f"{signal.Signals(signum).name} received during start-up: stopped at step {self.step} before "
                f"training; rerun the same command to {'resume' if self.step else 'start'}",
                signum,
            )

    def _check_result(self) -> None:
        """Never report success for a run whose final numbers are not finite (e.g. inputs normalised to NaN)."""
        val_loss = self.last_eval.get("val", {}).get("loss", math.nan)
        if not math.isfinite(val_loss) or self.skipped_steps == self.step:
            raise NonFiniteError(
                f"the run ended at step {self.step} without a finite result (val loss {val_loss}, {self.skipped_steps}"
                f" of {self.step} steps skipped as non-finite): its weights are not a result; "
                f"{self._last_checkpoint_text()}; check the data and its normalisation (mean/std), lower lr or "
                "set clip_grad"
            )

    # ------------------------------------------------------------------------------------------------------
    # Evaluating and saving

    def evaluate(self, tracker: RunTracker, progress: tqdm, epoch_time: float, train_loss: float) -> None:
        p, cfg = self.parts, self.cfg
        models = {"val": p.model} | ({"val_ema": p.ema.module} if p.ema is not None else {})
        results = {name: self._evaluate_model(model, name) for name, model in models.items()}
        if p.val_set.num_bad_images:
            logger.warning("val metrics count %d substitutes for unreadable images", p.val_set.num_bad_images)
        images = {}
        if cfg.plot_rationals:
            with p.strategy.gathered(p.raw_model):  # every process gathers (FSDP)
                path = self.run_dir / "plots" / f"rationals-{checkpoint_name(self.step)}.png"
                if self.is_main and plot_rationals(p.raw_model, path, title=f"(step {self.step})"):
                    images["rationals"] = path
        record = {"step": self.step, "epoch": self.epoch, "epoch_time": epoch_time, "train_loss": train_loss}
        tracker.log_eval(record | results, images)
        val = results["val"]
        ema_text = f" | EMA top-1 {results['val_ema']['top1']:.2f}%" if "val_ema" in results else ""
        progress.write(
            f"epoch {self.epoch}/{cfg.epochs} (step {self.step}): train loss {train_loss:.4f} | val top-1 "
            f"{val['top1']:.2f}% top-5 {val['top5']:.2f}% loss {val['loss']:.4f}{ema_text} | {epoch_time:.0f} s"
        )
        self.last_eval = results

    def _evaluate_model(self, model: torch.nn.Module, name: str) -> dict:
        p = self.parts
        with tqdm(total=len(p.val_loader), desc=name, leave=False, disable=not self.is_main) as bar:
            return evaluate(
                model, p.val_loader, self.accelerator, amp_dtype=p.amp_dtype, progress=lambda _: bar.update()
            )

    def save(self, evaluated: bool) -> None:
        """A checkpoint of this step (collective). A write that fails ends the run with RunFault."""
        p = self.parts
        is_best = evaluated and self.last_eval["val"]["top1"] > self.best_top1
        if is_best:
            self.best_top1 = self.last_eval["val"]["top1"]
        rng_states = gather_object([rng_state()])  # one entry per process; every process takes part
        try:
            model_state = p.strategy.weights(p.raw_model, self.is_main)
            ema_state = p.strategy.weights(p.ema.module, self.is_main) if p.ema is not None else None
            tmp, optimizer_state = p.strategy.save_optimizer(
                self.accelerator, self.run_dir, self.step, p.raw_model, p.optimizer
            )
            if self.is_main:
                save_checkpoint(
                    self.run_dir,
                    self.step,
                    model_state=model_state,
                    ema_state=ema_state,
                    training_state=self._training_state(optimizer_state, rng_states),
                    meta=self._meta(),
                    keep=self.cfg.keep_checkpoints,
                    is_best=is_best,
                    tmp=tmp,
                )
        except (OSError, CheckpointError) as error:
            raise RunFault(
                f"could not write the checkpoint of step {self.step}: {error}; {self._last_checkpoint_text()}"
            ) from error
        self.saved_step = self.step
        self.accelerator.wait_for_everyone()

    def _training_state(self, optimizer_state: dict | None, rng_states: list) -> dict:
        scaler = self.accelerator.scaler
        return {
            "format": STATE_FORMAT,
            "step": self.step,
            "epoch": self.epoch,  # epochs completed
            "samples_in_epoch": self.samples_in_epoch,  # position in the next one (all processes)
            "global_batch_size": self.parts.images_per_step,
            "best_top1": self.best_top1,
            "skipped_steps": self.skipped_steps,
            "skipped_in_a_row": self.skipped_in_a_row,
            "optimizer": optimizer_state,  # None under FSDP: sharded, in optimizer/
            "scheduler": self.parts.scheduler.state_dict(),  # for the record: resuming re-derives it
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng_states,
        }

    def _meta(self) -> dict:
        p, cfg = self.parts, self.cfg
        return {
            "model": cfg.model,
            "model_kwargs": {**cfg.model_kwargs, "drop_path_rate": cfg.drop_path},
            "num_classes": p.num_classes,
            "class_names": p.class_names,
            "step": self.step,
            "epoch": self.epoch,
            "data_config": p.data_config,
            "config": cfg.to_dict(),
            "metrics": self.last_eval,
        }

    # ------------------------------------------------------------------------------------------------------
    # Starting: resuming, claiming the run dir, announcing

    def _restore(self, checkpoint_dir: Path) -> None:
        p, cfg, accelerator = self.parts, self.cfg, self.accelerator
        state_dict, meta = read_checkpoint(checkpoint_dir)
        arch = {k: v for k, v in meta["model_kwargs"].items() if k != "drop_path_rate"}
        if (meta["model"], arch, meta["num_classes"]) != (cfg.model, cfg.model_kwargs, p.num_classes):
            raise ConfigError(
                f"cannot resume from {checkpoint_dir}: it holds {meta['model']} {arch} with {meta['num_classes']} "
                f"classes, the config asks for {cfg.model} {cfg.model_kwargs} with {p.num_classes}; use a new "
                "--run_name (or --resume none) to train this model from scratch"
            )
        if bool(meta.get("optimizer_shards")) != p.strategy.sharded:
            fsdp = p.strategy.sharded
            raise ConfigError(
                f"cannot resume from {checkpoint_dir} with fsdp: {str(fsdp).lower()}: it was written by "
                f"{'an FSDP' if meta.get('optimizer_shards') else 'a DDP'} run, whose optimizer state is saved "
                f"differently; resume it with fsdp: {str(not fsdp).lower()}, or start a new --run_name with "
                f"init_from: {checkpoint_dir} (weights only)"
            )
        p.strategy.load_weights(p.raw_model, state_dict)
        if p.ema is not None:
            if meta.get("has_ema"):
                p.strategy.load_weights(p.ema.module, read_checkpoint(checkpoint_dir, ema=True)[0])
            else:
                logger.warning("%s has no EMA weights; the EMA restarts from the model's", checkpoint_dir)
                p.strategy.load_weights(p.ema.module, state_dict)
        state = read_training_state(checkpoint_dir)
        # The optimizer's moments come from the checkpoint, its hyperparameters (lr, weight decay, betas, layer
        # scales) from this config; the schedule was built from this config too and is stepped to the resumed step.
        groups = [{k: v for k, v in group.items() if k != "params"} for group in p.optimizer.param_groups]
        p.strategy.load_optimizer(checkpoint_dir, state, p.raw_model, p.optimizer)
        for group, hyperparameters in zip(p.optimizer.param_groups, groups):
            group.update(hyperparameters)
        if accelerator.scaler is not None and state["scaler"] is not None:
            accelerator.scaler.load_state_dict(state["scaler"])
        changed = changed_settings(meta.get("config") or {}, cfg.to_dict())
        if changed:
            logger.info("resuming with changed settings, in effect from step %d: %s", state["step"], changed)
        if state["global_batch_size"] != p.images_per_step:
            logger.warning(
                "the global batch changed from %d to %d images: steps before and after count different data",
                state["global_batch_size"],
                p.images_per_step,
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

    def _claim_run_dir(self) -> None:
        """Create the run dir, lock it for this run and write config.yaml (main process); every process learns
        whether that worked, so that all of them stop with the same one-line error if not."""
        problem = None
        if self.is_main:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                lock = RunLock(self.run_dir)
                lock.acquire()
                self.lock = lock
                save_config(self.cfg, self.run_dir / "config.yaml")
            except RunDirLocked as error:
                problem = str(error)
            except OSError as error:
                problem = f"cannot write the run dir {self.run_dir} (output_dir/run_name): {error}"
        problem = broadcast_object_list([problem])[0]
        if problem is not None:
            if self.lock is not None:
                self.lock.release()
            raise ConfigError(problem)

    def _announce(self, tracker: RunTracker) -> None:
        p, cfg, accelerator = self.parts, self.cfg, self.accelerator
        backend = active_backend(torch.zeros(1, 8, device=p.device, dtype=p.amp_dtype or torch.float32))
        num_params = sum(param.numel() for param in p.raw_model.parameters())
        logger.info(
            "%s: %.2fM params, GR-KAN backend: %s | %d x %s, %s precision | %d train / %d val images, %d classes "
            "| global batch %d, lr %.3g, %d steps/epoch, %d steps | run dir %s",
            cfg.model,
            num_params / 1e6,
            backend,
            accelerator.num_processes,
            p.device.type,
            {"no": "fp32"}.get(p.precision, p.precision),
            len(p.train_set),
            len(p.val_set),
            p.num_classes,
            p.images_per_step,
            p.lr,
            p.steps_per_epoch,
            p.total_steps,
            self.run_dir,
        )
        tracker.log_run(
            {
                "step": self.step,
                "resumed_from": str(self.resume_dir) if self.resume_dir else None,
                "rational_backend": backend,
                "num_processes": accelerator.num_processes,
                "device": p.device.type,
                "mixed_precision": p.precision,
                "global_batch_size": p.images_per_step,
                "lr": p.lr,
                "params": num_params,
            }
        )


class ThroughputMeter:
    """Wall clock and data-wait time since the last logged step."""

    def __init__(self, step: int):
        self.restart(step)

    def restart(self, step: int) -> None:
        self.clock, self.step, self.data_time = time.perf_counter(), step, 0.0


def changed_settings(saved: dict, current: dict) -> str:
    """'key: old -> new, ...' for the config values that differ from the checkpoint's (not `resume`)."""
    keys = sorted(
        k for k in current.keys() | saved.keys() if k != "resume" and saved.get(k) != current.get(k)
    )
    return ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys)


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
