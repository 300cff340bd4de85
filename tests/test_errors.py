"""docs/ERRORS.md, tested: every bad input in the catalogue gets the error (type and words) it documents.

One table-driven test: CASES maps each catalogue id to a function that makes the bad input and calls the real
code, the exception type expected, and words the message must contain (the thing named, the fix). Entries
whose behaviour is a recovery rather than an error are tested in test_recovery_* here or in the test files the
catalogue names; test_catalogue_and_tests_agree keeps the document and the tests in step.
"""

import logging
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from kat.data import DataError, ImageFolderDataset, check_layout
from kat.models.pretrained import CheckpointMismatchError, check_state_dict_fits, load_checkpoint_file
from kat.rational import GroupRational, group_rational
from kat.training.checkpoint import (
    begin_checkpoint,
    list_checkpoints,
    read_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from kat.training.config import ConfigError, parse_config
from kat.training.loop import Trainer, choose_resume, create_model, init_weights_from

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"
ERRORS_MD = REPO / "docs" / "ERRORS.md"
TINY = ["--model_kwargs", "{depth: 1, embed_dim: 32, num_heads: 2}"]
QUIET = ["--wandb_mode", "disabled", "--plot_rationals", "false", "--workers", "0"]


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def digits(root: Path, train: int = 2, val: int = 1) -> Path:
    for split, count in (("train", train), ("val", val)):
        for c in range(10):
            (root / split / str(c)).mkdir(parents=True)
            for f in sorted((DEMO / split / str(c)).glob("*.png"))[:count]:
                shutil.copy(f, root / split / str(c) / f.name)
    return root


def checkpoint(run_dir: Path, step: int, *, model: str = "kat_tiny", ema: bool = True) -> Path:
    weights = {"w": torch.zeros(2)}
    return save_checkpoint(
        run_dir,
        step,
        model_state=weights,
        ema_state=weights if ema else None,
        training_state={"step": step},
        meta={"model": model, "model_kwargs": {"depth": 1}, "num_classes": 10, "step": step},
        keep=5,
        is_best=False,
    )


def with_env(variables: dict, call):
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        return call()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def truncate(path: Path, keep: float = 0.6) -> Path:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])
    return path


def x8():
    return torch.randn(2, 8), torch.zeros(1, 6), torch.zeros(8, 4)


# ------------------------------------------------------------------------------------------------------
# id -> (make the bad input and call the code, expected exception, words the message must contain)


def config_cases(tmp: Path) -> dict:
    return {
        "config-unknown-key": (
            lambda: parse_config(["--config", write(tmp / "c.yaml", "epoch: 3\n")]),
            ConfigError,
            ["unknown config key 'epoch'", "c.yaml", "did you mean 'epochs'"],
        ),
        "config-unknown-flag": (
            lambda: parse_config(["--batch_sise", "3"]),
            ConfigError,
            ["unknown flag '--batch_sise'", "did you mean 'batch_size'"],
        ),
        "config-wrong-type": (
            lambda: parse_config(["--lr", "fast"]),
            ConfigError,
            ["config key 'lr' expects float, got 'fast'"],
        ),
        "config-bad-choice": (
            lambda: parse_config(["--mixed_precision", "fp8"]),
            ConfigError,
            ["'mixed_precision'", "'fp8' is not one of 'no', 'bf16', 'fp16'"],
        ),
        "config-out-of-range": (
            lambda: parse_config(["--lr", "nan"]),
            ConfigError,
            ["config key 'lr' must be a finite number > 0, got nan"],
        ),
        "config-not-positive": (
            lambda: parse_config(["--batch_size", "0"]),
            ConfigError,
            ["config key 'batch_size' must be >= 1, got 0"],
        ),
        "config-odd-batch-with-mixup": (
            lambda: parse_config(["--batch_size", "7"]),
            ConfigError,
            ["'batch_size' must be even, got 7"],
        ),
        "config-unsafe-yaml": (
            lambda: parse_config(["--config", write(tmp / "u.yaml", "model: !!python/name:os.system\n")]),
            ConfigError,
            ["u.yaml is not valid YAML", "python/name:os.system"],
        ),
        "config-missing-file": (
            lambda: parse_config(["--config", "nope.yaml"]),
            ConfigError,
            ["config file 'nope.yaml' not found", "available: "],
        ),
        "config-nonfinite-policy": (
            lambda: parse_config(["--nonfinite", "ignore"]),
            ConfigError,
            ["config key 'nonfinite': 'ignore' is not one of 'skip', 'stop'"],
        ),
        "config-kwargs-shadow-keys": (
            lambda: parse_config(["--model_kwargs.drop_path_rate", "0.2"]),
            ConfigError,
            ["set 'drop_path' and 'num_classes' as config keys"],
        ),
        "config-fsdp-with-compile": (
            lambda: parse_config(["--fsdp", "--compile"]),
            ConfigError,
            ["fsdp: true with compile: true is not supported"],
        ),
        "config-fsdp-fp16": (
            lambda: parse_config(["--fsdp", "--mixed_precision", "fp16"]),
            ConfigError,
            ["fsdp: true trains in bf16 or fp32", "mixed_precision: bf16"],
        ),
        "config-fsdp-without-gpu": (
            lambda: Trainer(parse_config(["--fsdp", "--cpu", "true", *QUIET])),
            ConfigError,
            ["fsdp: true shards the model over GPUs", "(cpu: true); set fsdp: false"],
        ),
        "config-accelerate-fsdp-launch": (
            lambda: with_env(
                {"ACCELERATE_USE_FSDP": "true"}, lambda: Trainer(parse_config(["--cpu", "true", *QUIET]))
            ),
            ConfigError,
            ["accelerate was launched with FSDP", "set fsdp: true"],
        ),
    }


def data_cases(tmp: Path) -> dict:
    def no_val():
        (tmp / "a" / "train" / "0").mkdir(parents=True)
        return check_layout(tmp / "a")

    def class_mismatch():
        for split, name in (("train", "cat"), ("train", "dog"), ("val", "cat"), ("val", "emu")):
            (tmp / "b" / split / name).mkdir(parents=True)
        return check_layout(tmp / "b")

    def empty_class():
        root = digits(tmp / "c", 1, 1)
        (root / "train" / "10").mkdir()
        (root / "val" / "10").mkdir()
        return ImageFolderDataset(root / "train")

    def too_many_bad_images():
        root = digits(tmp / "d", 1, 1)
        (root / "train" / "0" / "broken.png").write_bytes(b"not a png")
        dataset = ImageFolderDataset(root / "train", max_bad_images=0)
        broken = [path.endswith("broken.png") for path, _ in dataset.samples].index(True)
        dataset[broken]  # logged, counted, replaced by the next image
        dataset.check_bad_images()

    def fewer_images_than_a_step():
        root = digits(tmp / "e", 1, 1)
        argv = ["--config", "demo", "--data_dir", str(root), "--output_dir", str(tmp), *TINY, *QUIET]
        Trainer(parse_config(argv))  # 10 images, batch_size 64

    return {
        "data-missing-dir": (
            lambda: check_layout(tmp / "nowhere"),
            DataError,
            [f"data_dir '{tmp / 'nowhere'}' does not exist", "data/README.md"],
        ),
        "data-missing-split": (no_val, DataError, [f"'{tmp / 'a' / 'val'}' is missing", "expected data_dir"]),
        "data-class-mismatch": (
            class_mismatch,
            DataError,
            ["different class folders", "only in train/: dog", "only in val/: emu"],
        ),
        "data-empty-class": (empty_class, DataError, ["class folder(s) without images", "10"]),
        "data-unreadable-images": (
            too_many_bad_images,
            DataError,
            ["1 images under", "could not be read (limit max_bad_images=0)", "re-extract"],
        ),
        "data-too-few-images": (
            fewer_images_than_a_step,
            ConfigError,
            ["train/ has 10 images, fewer than one optimizer step (64", "lower batch_size"],
        ),
    }


def checkpoint_cases(tmp: Path) -> dict:
    def resume_missing():
        cfg = parse_config(["--resume", str(tmp / "gone")])
        return choose_resume(cfg, tmp / "run")

    def resume_none_on_existing_run():
        checkpoint(tmp / "run2", 4)
        return choose_resume(parse_config(["--resume", "none"]), tmp / "run2")

    def truncated_step_dir():
        step = checkpoint(tmp / "run3", 4)
        truncate(step / "model.safetensors")
        return resolve_checkpoint(step)

    def pickled_code():
        torch.save({"model": {"w": torch.zeros(1)}, "loss": torch.nn.CrossEntropyLoss()}, tmp / "code.pth")
        return load_checkpoint_file(tmp / "code.pth")

    def resume_other_architecture():
        root = digits(tmp / "data", 7, 1)
        checkpoint(tmp / "runs" / "demo", 2, model="vit_tiny_patch16_224")
        argv = ["--config", "demo", "--data_dir", str(root), "--output_dir", str(tmp / "runs"), *TINY, *QUIET]
        Trainer(parse_config([*argv, "--batch_size", "8"]))

    def resume_fsdp_with_ddp():
        root = digits(tmp / "data-fsdp", 7, 1)
        argv = ["--config", "demo", "--data_dir", str(root), "--output_dir", str(tmp / "runs-fsdp"), *TINY, *QUIET]
        cfg = parse_config([*argv, "--batch_size", "8"])
        tmp_dir = begin_checkpoint(tmp / "runs-fsdp" / "demo", 2)
        (tmp_dir / "optimizer").mkdir()
        (tmp_dir / "optimizer" / ".metadata").write_bytes(b"DCP index")  # as an FSDP run leaves it
        save_checkpoint(
            tmp / "runs-fsdp" / "demo",
            2,
            model_state={"w": torch.zeros(2)},
            ema_state=None,
            training_state={"step": 2},
            meta={"model": cfg.model, "model_kwargs": cfg.model_kwargs, "num_classes": 10},
            keep=2,
            is_best=False,
            tmp=tmp_dir,
        )
        Trainer(cfg)

    def no_ema():
        return read_checkpoint(checkpoint(tmp / "run4", 3, ema=False), ema=True)

    def init_from_missing():
        cfg = parse_config(["--init_from", str(tmp / "vit.safetensors"), *TINY])
        init_weights_from(create_model(cfg, 10), cfg)

    import json  # imported here, not at the top: this section is the checkpoint helper's

    from kat.training.checkpoint import read_training_state

    def bit_rot():
        step = checkpoint(tmp / "run5", 2)
        raw = bytearray((step / "model.safetensors").read_bytes())
        raw[-1] ^= 0x40  # the last byte of the last tensor: the size and the header stay right
        (step / "model.safetensors").write_bytes(bytes(raw))
        return read_checkpoint(step)

    def edited_meta(change):
        step = checkpoint(tmp / "run6", 2)
        meta = json.loads((step / "meta.json").read_text())
        change(meta)
        (step / "meta.json").write_text(json.dumps(meta))
        return read_checkpoint(step)

    def state_holding_code():
        step = checkpoint(tmp / "run7", 2)
        torch.save({"step": 2, "loss_fn": torch.nn.CrossEntropyLoss()}, step / "training_state.pt")
        return read_training_state(step)

    def output_dir_is_a_file():
        write(tmp / "runs-file", "a file where the output directory should be")
        return checkpoint(tmp / "runs-file" / "demo", 2)

    return {
        "ckpt-resume-missing": (
            resume_missing,
            ConfigError,
            ["config key 'resume'", "gone", "does not exist"],
        ),
        "ckpt-resume-none-existing-run": (
            resume_none_on_existing_run,
            ConfigError,
            ["--resume none", "already holds checkpoints (newest: step-00000004)", "another --run_name"],
        ),
        "ckpt-truncated-explicit": (
            truncated_step_dir,
            ValueError,
            ["model.safetensors is missing, truncated or corrupt", "use another checkpoint"],
        ),
        "ckpt-pickled-code": (
            pickled_code,
            ValueError,
            ["code.pth holds Python objects", "weights_only=True", "re-save just its weights"],
        ),
        "ckpt-resume-other-architecture": (
            resume_other_architecture,
            ConfigError,
            ["cannot resume from", "vit_tiny_patch16_224", "use a new --run_name"],
        ),
        "ckpt-resume-fsdp-mismatch": (
            resume_fsdp_with_ddp,
            ConfigError,
            ["with fsdp: false: it was written by an FSDP run", "resume it with fsdp: true", "init_from:"],
        ),
        "ckpt-no-ema": (no_ema, ValueError, ["has no EMA weights", "model_ema: false"]),
        "ckpt-init-from-missing": (
            init_from_missing,
            ConfigError,
            ["config key 'init_from'", "vit.safetensors", "does not exist"],
        ),
        "ckpt-bit-rot": (
            bit_rot,
            ValueError,
            ["model.safetensors is damaged: its checksum (xxh3-64) is", "meta.json recorded", "use another checkpoint"],
        ),
        "ckpt-meta-wrong-type": (
            lambda: edited_meta(lambda meta: meta.update(num_classes="10")),
            ValueError,
            ["meta.json: 'num_classes' is '10' (str), not an integer", "restore the file"],
        ),
        "ckpt-meta-missing-key": (
            lambda: edited_meta(lambda meta: meta.pop("model_kwargs")),
            ValueError,
            ["meta.json lacks the key(s) model_kwargs", "use another checkpoint"],
        ),
        "ckpt-state-wrong-content": (
            lambda: read_training_state(checkpoint(tmp / "run8", 2)),  # training_state={'step': 2} only
            ValueError,
            ["training_state.pt lacks the entries epoch, samples_in_epoch", "--resume <step dir>"],
        ),
        "ckpt-state-holds-code": (
            state_holding_code,
            ValueError,
            ["training_state.pt holds Python objects (torch.nn.modules.loss.CrossEntropyLoss)", "never code"],
        ),
        "ckpt-write-output-is-a-file": (
            output_dir_is_a_file,
            OSError,  # kat.training.checkpoint.CheckpointWriteError
            ["cannot write checkpoint", "runs-file is a file, not a directory", "already there are intact"],
        ),
    }


def model_cases(tmp: Path) -> dict:
    def build(*flags):
        return create_model(parse_config(list(flags)), 10)

    small = "depth: 1, embed_dim: 32, num_heads: 2"
    return {
        "model-unknown-name": (
            lambda: build("--model", "kat_tinny"),
            ConfigError,
            ["unknown timm model 'kat_tinny'", "closest: kat_tiny"],
        ),
        "model-unknown-kwarg": (
            lambda: build("--model_kwargs", f"{{{small}, embed_dims: 32}}"),
            ConfigError,
            ["config key 'model_kwargs'", "is not accepted by kat_tiny", "embed_dims"],
        ),
        "model-heads-do-not-divide-width": (
            lambda: build("--model_kwargs", "{depth: 1, embed_dim: 30, num_heads: 4}"),
            ConfigError,
            ["config key 'model_kwargs'", "dim should be divisible by num_heads"],
        ),
        "model-groups-do-not-divide-width": (
            lambda: build("--model_kwargs", f"{{{small}, kan_groups: 7}}"),
            ConfigError,
            ["config key 'model_kwargs'", "channels=32 is not divisible by groups=7"],
        ),
        "model-unknown-act-init": (
            lambda: build("--model_kwargs", f"{{{small}, act_init: mish}}"),
            ConfigError,
            ["unknown rational init 'mish'", "choose one of"],
        ),
        "model-fused-unfusable": (
            lambda: build("--model_kwargs", f"{{{small}, proj_drop_rate: 0.1}}"),
            ConfigError,
            ["config key 'model_kwargs'", "dropout p=0.1 in the mixer", "fused=False"],
        ),
        "model-checkpoint-does-not-fit": (
            lambda: check_state_dict_fits({"cls_token": torch.zeros(1, 1, 64)}, build(*TINY)),
            CheckpointMismatchError,
            ["checkpoint does not fit", "cls_token (1, 1, 64) vs (1, 1, 32)", "keys missing", "meta.json"],
        ),
    }


def op_cases(tmp: Path) -> dict:
    x, num, den = x8()
    return {
        "op-integer-input": (
            lambda: group_rational(x.long(), num, den),
            TypeError,
            ["group_rational: x has dtype torch.int64", "x.float()"],
        ),
        "op-coefficient-shape": (
            lambda: group_rational(x, torch.zeros(1, 5), den),
            ValueError,
            ["numerator must have shape (Gn, 6), got (1, 5)"],
        ),
        "op-channels-not-divisible": (
            lambda: group_rational(torch.randn(2, 12), num, den),
            ValueError,
            ["C divisible by the 8 groups", "(2, 12)"],
        ),
        "op-devices-differ": (
            lambda: group_rational(x, num.to("meta"), den),
            ValueError,
            ["tensors on different devices", "numerator: meta", "move them to one device"],
        ),
        "op-bias-shape": (
            lambda: group_rational(x, num, den, bias=torch.zeros(4)),
            ValueError,
            ["bias must have shape (C,) = (8,)", "got (4,)"],
        ),
        "op-unknown-backend": (
            lambda: group_rational(x, num, den, backend="cuda"),
            ValueError,
            ["backend='cuda' is not one of None, 'auto', 'triton', 'torch'"],
        ),
        "op-module-channels": (
            lambda: GroupRational(10, groups=8),
            ValueError,
            ["channels=10 is not divisible by groups=8"],
        ),
    }


def all_cases(tmp: Path) -> dict:
    return config_cases(tmp) | data_cases(tmp) | checkpoint_cases(tmp) | model_cases(tmp) | op_cases(tmp)


CASE_IDS = list(all_cases(Path("/nonexistent")))


@pytest.mark.parametrize("case", CASE_IDS)
def test_bad_input_gets_the_documented_error(case, tmp_path):
    make, error_type, words = all_cases(tmp_path)[case]
    with pytest.raises(error_type) as error:
        make()
    message = str(error.value)
    for text in words:
        assert text in message, (text, message)
    doc = ERRORS_MD.read_text()
    assert f"`{case}`" in doc


def test_op_backend_environment_variable(monkeypatch):
    monkeypatch.setenv("KAT_RATIONAL_BACKEND", "fast")
    with pytest.raises(
        ValueError, match="KAT_RATIONAL_BACKEND='fast' is not one of 'triton', 'torch', 'auto'"
    ):
        group_rational(*x8())


def test_recovery_damaged_checkpoints_are_skipped_on_resume(tmp_path, caplog):
    """A truncated file, a missing file, an interrupted write: resume uses the newest whole checkpoint."""
    run = tmp_path / "run"
    for step in (2, 4, 6, 8):
        checkpoint(run, step)
    truncate(run / "step-00000008" / "ema.safetensors")
    (run / "step-00000006" / "training_state.pt").write_bytes(b"PK\x03\x04 truncated zip")
    (run / "step-00000004" / "meta.json").write_text('{"format": "kat-checkpoint/1", "has_ema": tr')
    (run / ".tmp-step-00000010-99").mkdir()
    with caplog.at_level(logging.WARNING):
        assert choose_resume(parse_config([]), run) == run / "step-00000002"
    for text in (
        "step-00000008: ema.safetensors is missing, truncated",
        "step-00000006: training_state.pt",
        "step-00000004: meta.json",
        ".tmp-step-00000010-99: an interrupted checkpoint write",
    ):
        assert text in caplog.text
    assert [p.name for p in list_checkpoints(run, warn=False)] == ["step-00000002"]


def test_catalogue_and_tests_agree():
    """Every `id` in docs/ERRORS.md is a CASES entry or names the test that covers it, and vice versa."""
    doc = ERRORS_MD.read_text()
    rows = [line for line in doc.splitlines() if re.match(r"^\| `[a-z0-9-]+` \|", line)]
    ids = [re.match(r"^\| `([a-z0-9-]+)`", line).group(1) for line in rows]
    assert len(ids) == len(set(ids)) >= 20
    tested_here = set(CASE_IDS)
    assert tested_here <= set(ids)
    for case, line in zip(ids, rows):
        if case in tested_here:
            continue
        tests = re.findall(r"(tests/test_\w+\.py)::(\w+)", line)
        assert tests, f"{case}: no test named in its row"
        for file, name in tests:
            assert re.search(rf"^def {name}\(", (REPO / file).read_text(), re.M), (case, file, name)
