"""eval.py end to end on CPU: real timm models, real weight files, real image files.

Every run's metrics are checked against a forward pass written out here (same weights, same images), so a
head that timm silently re-initialised, EMA weights picked by mistake, or a dropped/duplicated image all fail.
"""

import argparse
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from timm.data import create_transform
from torchvision.datasets import ImageFolder

import eval as eval_cli
from kat.training.checkpoint import resolve_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "emu"]
IMAGES_PER_CLASS = (3, 2, 2)  # 7 images: batch size 4 does not divide it


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A 3-class ImageFolder of small random PNG/JPEG files of different sizes (resized by the transform)."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for name, count in zip(CLASSES, IMAGES_PER_CLASS):
        (root / "val" / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, size=(36 + 4 * i, 44, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "val" / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def run_eval(*argv):
    """eval.py's main() in this process (fast: no interpreter start); returns its exit code."""
    return eval_cli.main([str(a) for a in argv] + ["--workers", "0", "--no_progress"])


def reference_metrics(model, data_dir: Path, data_config: dict) -> dict:
    """Top-1 and mean loss from one plain forward pass over every image."""
    dataset = ImageFolder(str(data_dir / "val"), transform=create_transform(**data_config, is_training=False))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    targets = torch.tensor(dataset.targets)
    with torch.no_grad():
        logits = model.eval()(images)
    return {
        "top1": 100.0 * (logits.argmax(-1) == targets).float().mean().item(),
        "loss": F.cross_entropy(logits, targets).item(),
        "num_images": len(dataset),
    }


def assert_matches_reference(results: dict, model, data_dir: Path) -> None:
    expected = reference_metrics(model, data_dir, results["data_config"])
    assert results["num_images"] == expected["num_images"] == sum(IMAGES_PER_CLASS)
    assert results["top1"] == pytest.approx(expected["top1"])
    assert results["loss"] == pytest.approx(expected["loss"], rel=1e-4)


def tiny_vit(**kwargs):
    """timm's 0.4M-parameter test ViT (160 px, fixed-size input): fast on CPU."""
    torch.manual_seed(kwargs.pop("seed", 0))
    return timm.create_model("test_vit", num_classes=len(CLASSES), **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Weight files from elsewhere: --model NAME


def test_published_kat_pth_with_wrappers(tmp_path, data_dir):
    """A published-style KAT checkpoint: weights under 'model' with DDP 'module.' prefixes, next to the training
    script's argparse.Namespace (allowed under weights_only) and optimizer state. A small kat_tiny (--model_kwargs)
    keeps it fast; the loading path is the one kat_small_patch16_224 takes."""
    kwargs = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}
    torch.manual_seed(0)
    model = timm.create_model("kat_tiny", num_classes=len(CLASSES), **kwargs)
    path = tmp_path / "kat_tiny.pth"
    torch.save(
        {
            "model": {f"module.{k}": v for k, v in model.state_dict().items()},
            "epoch": 299,
            "args": argparse.Namespace(model="kat_tiny", lr=1e-3),
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.0}]},
        },
        path,
    )
    out = tmp_path / "out" / "results.json"
    argv = [
        "--checkpoint",
        path,
        "--model",
        "kat_tiny",
        "--model_kwargs",
        json.dumps(kwargs),
        "--data_dir",
        data_dir,
    ]
    assert run_eval(*argv, "--batch_size", 4, "--json", out) == 0
    results = json.loads(out.read_text())
    expected_keys = (
        "top1 top5 loss images_per_sec num_images model checkpoint step epoch ema split data_config"
    )
    for key in expected_keys.split() + ["device", "num_processes", "rational_backend"]:
        assert key in results, key
    identity = (results["model"], results["epoch"], results["step"], results["ema"])
    assert identity == ("kat_tiny", 299, None, False)
    assert results["top5"] == 100.0  # 3 classes
    assert results["images_per_sec"] > 0
    assert results["rational_backend"] in ("torch", "triton")
    # The model's data config: its own 32 px (not the pretrained_cfg's 224), crop 0.875, bicubic, ImageNet mean.
    assert results["data_config"] == {
        "input_size": [3, 32, 32],
        "interpolation": "bicubic",
        "mean": list(timm.data.IMAGENET_DEFAULT_MEAN),
        "std": list(timm.data.IMAGENET_DEFAULT_STD),
        "crop_pct": 0.875,
    }
    assert_matches_reference(results, model, data_dir)


def test_safetensors_timm_model_and_overrides(tmp_path, data_dir, capsys):
    """Any timm model with a local .safetensors file; data-config flags override the pretrained_cfg."""
    model = tiny_vit()
    path = tmp_path / "w.safetensors"
    save_file(model.state_dict(), path)
    out = tmp_path / "r.json"
    overrides = ["--crop_pct", 0.8, "--interpolation", "bilinear", "--mean", 0.4, 0.4, 0.4]
    argv = ["--checkpoint", path, "--model", "test_vit", "--data_dir", data_dir, "--batch-size", 4, *overrides]
    assert run_eval(*argv, "--json", out) == 0
    results = json.loads(out.read_text())
    assert results["data_config"]["crop_pct"] == 0.8
    assert results["data_config"]["interpolation"] == "bilinear"
    assert results["data_config"]["mean"] == [0.4, 0.4, 0.4]
    assert results["data_config"]["std"] == [0.5, 0.5, 0.5]  # test_vit's own
    assert_matches_reference(results, model, data_dir)
    table = capsys.readouterr().out
    assert "top-1" in table and f"{results['top1']:.3f} %" in table and "7 images" in table


def test_ema_flag_picks_the_ema_weights(tmp_path, data_dir):
    model, ema = tiny_vit(seed=1), tiny_vit(seed=2)
    path = tmp_path / "train_ckpt.pth"
    torch.save({"state_dict": model.state_dict(), "state_dict_ema": ema.state_dict(), "epoch": 4}, path)
    for flags, expected in (([], model), (["--ema"], ema)):
        out = tmp_path / f"r{len(flags)}.json"
        argv = ["--checkpoint", path, "--model", "test_vit", "--data_dir", data_dir, "--json", out]
        assert run_eval(*argv, *flags) == 0
        results = json.loads(out.read_text())
        assert results["ema"] == bool(flags)
        assert_matches_reference(results, expected, data_dir)


# ---------------------------------------------------------------------------------------------------------
# Our training checkpoints: everything comes from meta.json


def save_run_checkpoint(run_dir: Path, step: int, model, ema=None, data_dir=None, **meta_overrides) -> Path:
    """One checkpoint written by the training code's own save_checkpoint (the real on-disk format)."""
    meta = {
        "model": "test_vit",
        "model_kwargs": {},
        "num_classes": len(CLASSES),
        "class_names": CLASSES,
        "step": step,
        "epoch": step // 2,
        # Not test_vit's defaults (bicubic, crop 0.95): the checkpoint's data config must win.
        "data_config": {
            "input_size": [3, 160, 160],
            "interpolation": "bilinear",
            "mean": [0.5] * 3,
            "std": [0.25] * 3,
            "crop_pct": 0.9,
        },
        "config": {"data_dir": str(data_dir)},
        "metrics": {},
        **meta_overrides,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(
        run_dir,
        step,
        model_state=model.state_dict(),
        ema_state=None if ema is None else ema.state_dict(),
        training_state={"step": step},
        meta=meta,
        keep=5,
        is_best=False,
    )


def test_run_dir_step_dir_and_ema(tmp_path, data_dir):
    """A run dir means its latest checkpoint; model, data dir and data config are read from meta.json."""
    old, new, new_ema = tiny_vit(seed=1), tiny_vit(seed=2), tiny_vit(seed=3)
    run_dir = tmp_path / "run"
    step3 = save_run_checkpoint(run_dir, 3, old, data_dir=data_dir)
    step5 = save_run_checkpoint(run_dir, 5, new, ema=new_ema, data_dir=data_dir)
    cases = [
        ([run_dir], new, step5, False),
        ([run_dir, "--ema"], new_ema, step5, True),
        ([step3], old, step3, False),
        ([step5 / "ema.safetensors"], new_ema, step5, True),
    ]
    for i, (argv, expected_model, expected_dir, ema) in enumerate(cases):
        out = tmp_path / f"r{i}.json"
        assert run_eval("--checkpoint", argv[0], *argv[1:], "--batch_size", 4, "--json", out) == 0, argv
        results = json.loads(out.read_text())
        identity = (results["checkpoint"], results["step"], results["ema"])
        assert identity == (str(expected_dir), int(expected_dir.name[5:]), ema)
        assert results["data_dir"] == str(data_dir)
        assert results["data_config"]["interpolation"] == "bilinear"
        assert results["data_config"]["std"] == [0.25] * 3
        assert_matches_reference(results, expected_model, data_dir)


def test_checkpoint_shared_without_training_state(tmp_path, data_dir):
    """A step dir passed on without training_state.pt (weights + meta.json only) still evaluates, EMA too;
    resuming from it is what needs the training state, and says so."""
    model, ema = tiny_vit(seed=4), tiny_vit(seed=5)
    step = save_run_checkpoint(tmp_path / "run", 7, model, ema=ema, data_dir=data_dir)
    shared = tmp_path / "shared" / step.name
    shared.mkdir(parents=True)
    for name in ("meta.json", "model.safetensors", "ema.safetensors"):
        shutil.copy(step / name, shared / name)
    for flags, expected in (([], model), (["--ema"], ema)):
        out = tmp_path / f"shared{len(flags)}.json"
        assert run_eval("--checkpoint", shared, *flags, "--batch_size", 4, "--json", out) == 0
        assert_matches_reference(json.loads(out.read_text()), expected, data_dir)
    with pytest.raises(ValueError, match="training_state.pt is missing"):
        resolve_checkpoint(shared)


def test_flags_share_train_py_names_and_keep_the_old_ones():
    new = eval_cli.parse_args(["--checkpoint", "c", "--data_dir", "d", "--mixed_precision", "bf16"])
    old = eval_cli.parse_args(["--checkpoint", "c", "--data", "d", "--amp", "bf16"])
    assert (new.data_dir, new.mixed_precision) == (old.data_dir, old.mixed_precision) == ("d", "bf16")
    assert eval_cli.parse_args(["--checkpoint", "c", "--amp", "none"]).mixed_precision == "no"
    assert eval_cli.parse_args(["--checkpoint", "c"]).mixed_precision == "no"  # fp32 unless asked


# ---------------------------------------------------------------------------------------------------------
# Errors: one line on stderr, exit code 2, no traceback


def _truncate(path: Path, keep: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _error_case(case: str, tmp: Path, data_dir: Path) -> tuple[list, list[str]]:
    """(eval.py arguments, substrings the error line must contain) for one kind of bad input."""
    good = tmp / "good.safetensors"
    save_file(tiny_vit().state_dict(), good)
    base = ["--model", "test_vit", "--data_dir", data_dir]
    if case == "missing":
        return ["--checkpoint", tmp / "nope.pth", *base], ["nope.pth", "does not exist"]
    if case == "truncated_safetensors":
        return ["--checkpoint", _truncate(good, 0.9), *base], ["good.safetensors", "truncated or corrupt"]
    if case == "truncated_pth":
        path = tmp / "t.pth"
        torch.save(tiny_vit().state_dict(), path)
        return ["--checkpoint", _truncate(path, 0.5), *base], ["t.pth", "truncated or corrupt"]
    if case == "pickled_code":
        path = tmp / "code.pth"
        torch.save({"model": tiny_vit().state_dict(), "loss_fn": torch.nn.CrossEntropyLoss()}, path)
        return ["--checkpoint", path, *base], [
            "code.pth",
            "torch.nn.modules.loss.CrossEntropyLoss",
            "never code",
        ]
    if case == "other_architecture":
        path = tmp / "vit2.safetensors"  # test_vit2 has a register token, LayerScale and no cls token
        save_file(timm.create_model("test_vit2", num_classes=3).state_dict(), path)
        return ["--checkpoint", path, *base], [
            "does not fit model test_vit",
            "keys missing from the checkpoint: cls_token",
            "unexpected",
            "ls1.gamma",
            "more)",
        ]
    if case == "shape_mismatch":
        path = tmp / "wide.safetensors"
        save_file(tiny_vit(embed_dim=96).state_dict(), path)
        return ["--checkpoint", path, *base], [
            "shape mismatches",
            "pos_embed (1, 101, 96) vs (1, 101, 64)",
        ]
    if case == "class_count":
        path = tmp / "five.safetensors"
        save_file(timm.create_model("test_vit", num_classes=5).state_dict(), path)
        return ["--checkpoint", path, *base], ["has 3 class folders", "head has 5 outputs"]
    if case == "missing_split":
        return ["--checkpoint", good, *base, "--split", "test"], [f"{data_dir / 'test'}", "does not exist"]
    if case == "no_ema":
        return ["--checkpoint", good, *base, "--ema"], ["no EMA weights", "drop --ema"]
    if case == "only_ema":
        path = tmp / "ema_only.pth"
        torch.save({"state_dict_ema": tiny_vit().state_dict()}, path)
        return ["--checkpoint", path, *base], ["ema_only.pth holds only EMA weights; pass --ema"]
    if case == "input_size":  # kat_tiny, unlike test_vit, is a fixed-size ViT
        kwargs = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}
        path = tmp / "kat.safetensors"
        save_file(timm.create_model("kat_tiny", num_classes=3, **kwargs).state_dict(), path)
        argv = ["--checkpoint", path, "--model", "kat_tiny", "--model_kwargs", json.dumps(kwargs)]
        return [*argv, "--data_dir", data_dir, "--img_size", 48], ["takes 32x32 inputs, not 48x48", "img_size"]
    if case == "unknown_model":
        return ["--checkpoint", good, "--model", "kat_gigantic", "--data_dir", data_dir], ["kat_gigantic"]
    if case == "run_without_ema":
        step = save_run_checkpoint(tmp / "run", 2, tiny_vit(), data_dir=data_dir)
        return ["--checkpoint", tmp / "run", "--ema"], [str(step), "no EMA weights"]
    if case == "run_truncated":
        step = save_run_checkpoint(tmp / "run", 2, tiny_vit(), data_dir=data_dir)
        _truncate(step / "model.safetensors", 0.7)
        return ["--checkpoint", step], [str(step / "model.safetensors"), "truncated or corrupt"]
    if case == "run_other_architecture":  # meta.json describes a wider model than the weights hold
        step = save_run_checkpoint(
            tmp / "run", 2, tiny_vit(), data_dir=data_dir, model_kwargs={"embed_dim": 96}
        )
        return ["--checkpoint", step], [
            "does not fit model test_vit",
            "cls_token (1, 1, 64) vs (1, 1, 96)",
        ]
    if case == "run_class_names":
        swapped = ["dog", "cat", "emu"]
        save_run_checkpoint(tmp / "run", 2, tiny_vit(), data_dir=data_dir, class_names=swapped)
        return ["--checkpoint", tmp / "run"], [
            "differ from the checkpoint's class_names",
            "0: 'cat' vs 'dog'",
        ]
    if case == "not_a_run":
        (tmp / "empty_run").mkdir()
        return ["--checkpoint", tmp / "empty_run"], ["empty_run", "neither a checkpoint directory"]
    if case == "no_model":
        return ["--checkpoint", good, "--data_dir", data_dir], ["--model"]
    raise AssertionError(case)


ERROR_CASES = [
    "missing",
    "truncated_safetensors",
    "truncated_pth",
    "pickled_code",
    "other_architecture",
    "shape_mismatch",
    "class_count",
    "missing_split",
    "no_ema",
    "only_ema",
    "input_size",
    "unknown_model",
    "no_model",
    "run_without_ema",
    "run_truncated",
    "run_other_architecture",
    "run_class_names",
    "not_a_run",
]


@pytest.mark.parametrize("case", ERROR_CASES)
def test_bad_input_is_one_clear_line(case, tmp_path, data_dir, capsys):
    argv, expected = _error_case(case, tmp_path, data_dir)
    assert run_eval(*argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eval.py: error: "), captured.err
    for text in expected:
        assert text in lines[0], (text, lines[0])


def test_command_line_error_has_no_traceback(tmp_path):
    """The real entry point: exit code 2 and no traceback, also when the error surfaces deep inside."""
    path = tmp_path / "w.pth"
    path.write_bytes(b"not a checkpoint")
    argv = ["--checkpoint", str(path), "--model", "test_vit", "--data_dir", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, "eval.py", *argv], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"eval.py: error: cannot read {path}: it is truncated or corrupt")
    assert len(proc.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------------------
# Several processes, and agreement with what training logged


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_count_every_image_once(tmp_path, data_dir):
    """accelerate launch, 2 CPU processes, 7 images in batches of 2: the prepared loader pads rank 1 with a
    duplicate image, which must not be counted (~20 s: two interpreters start)."""
    model = tiny_vit()
    path = tmp_path / "w.safetensors"
    save_file(model.state_dict(), path)
    out = tmp_path / "r.json"
    launch = (
        "-m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no"
    )
    launch += f" --dynamo_backend no --main_process_port {_free_port()}"
    evaluate = (
        f"eval.py --cpu --checkpoint {path} --model test_vit --data_dir {data_dir} --batch_size 2 --workers 0"
    )
    cmd = [sys.executable, *launch.split(), *evaluate.split(), "--no_progress", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["num_processes"] == 2
    assert_matches_reference(results, model, data_dir)


def _small_demo_copy(root: Path) -> Path:
    """A slice of the embedded MNIST demo set: 8 train images per class, 47 val images (not a multiple of any
    batch size used here)."""
    demo = REPO / "data" / "demo"
    for split, per_class in (("train", [8] * 10), ("val", [5] * 7 + [4] * 3)):
        for class_dir, count in zip(sorted((demo / split).iterdir()), per_class):
            (root / split / class_dir.name).mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:count]:
                shutil.copy(image, root / split / class_dir.name / image.name)
    return root


@pytest.mark.slow
def test_reproduces_the_top1_training_logged(tmp_path):
    """A short demo training run evaluates its model and EMA at the end and logs the results in metrics.jsonl;
    eval.py on the checkpoint it wrote (other batch size, its own loader) must report the same numbers."""
    import train

    data = _small_demo_copy(tmp_path / "data")
    argv = ["--config", "demo.yaml", "--data_dir", str(data), "--output_dir", str(tmp_path / "runs")]
    argv += ["--run_name", "demo", "--batch_size", "16", "--max_steps", "3", "--wandb_mode", "disabled"]
    argv += ["--plot_rationals", "false"]
    assert train.main(argv) == 0
    run_dir = tmp_path / "runs" / "demo"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if r.get("type") == "eval"][-1]
    assert logged["step"] == 3

    for flags, key in (([], "val"), (["--ema"], "val_ema")):
        out = tmp_path / f"{key}.json"
        assert run_eval("--checkpoint", run_dir, "--batch_size", 10, "--json", out, *flags) == 0
        results = json.loads(out.read_text())
        assert (results["step"], results["ema"], results["num_images"]) == (3, bool(flags), 47)
        assert results["data_dir"] == str(data)  # read from the checkpoint
        assert results["top1"] == pytest.approx(logged[key]["top1"], abs=1e-9)
        assert results["top5"] == pytest.approx(logged[key]["top5"], abs=1e-9)
        assert results["loss"] == pytest.approx(logged[key]["loss"], rel=1e-5)
