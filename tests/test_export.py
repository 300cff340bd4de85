"""python -m kat.export: hf folders timm loads with the run's logits, ONNX files onnxruntime runs, errors."""

import json

import pytest
import timm
import torch
from safetensors.torch import save_file

from kat.export import main
from kat.training.checkpoint import checkpoint_name, save_checkpoint

ARCH = dict(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2)
CLASSES = ["cat", "dog", "emu"]
DATA_CONFIG = {
    "input_size": [3, 32, 32],
    "interpolation": "bilinear",
    "mean": [0.5, 0.4, 0.3],
    "std": [0.2, 0.25, 0.3],
    "crop_pct": 0.9,
}
METRICS = {
    "val": {"top1": 61.25, "top5": 97.5, "loss": 0.8125, "num_images": 80, "images_per_sec": 100.0},
    "val_ema": {"top1": 63.75, "top5": 98.75, "loss": 0.7812, "num_images": 80, "images_per_sec": 100.0},
}


def tiny_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("kat_tiny", num_classes=len(CLASSES), **ARCH).eval()


def save_run(run_dir, step: int = 7, ema: bool = True) -> tuple[dict, dict | None]:
    """A checkpoint as train.py writes it (see Trainer.save), with different model and EMA weights."""
    model_state = tiny_model(0).state_dict()
    ema_state = tiny_model(1).state_dict() if ema else None
    meta = {
        "model": "kat_tiny",
        "model_kwargs": {**ARCH, "drop_path_rate": 0.1},
        "num_classes": len(CLASSES),
        "class_names": CLASSES,
        "step": step,
        "epoch": 2,
        "data_config": DATA_CONFIG,
        "config": {"run_name": "tiny-run", "model": "kat_tiny", "lr": 0.001, "epochs": 2},
        "metrics": METRICS,
    }
    save_checkpoint(
        run_dir,
        step,
        model_state=model_state,
        ema_state=ema_state,
        training_state={"step": step},
        meta=meta,
        keep=3,
        is_best=False,
    )
    return model_state, ema_state


def logits(state: dict, x: torch.Tensor) -> torch.Tensor:
    model = tiny_model(2)
    model.load_state_dict(state)
    with torch.no_grad():
        return model(x)


@pytest.mark.skipif(
    not hasattr(timm.models._hub, "load_model_config_from_path"), reason="timm reads local-dir: from 1.0.16"
)
@pytest.mark.parametrize("ema", [False, True])
def test_hf_folder_loads_through_timm_local_dir(tmp_path, ema):
    run_dir = tmp_path / "run"
    model_state, ema_state = save_run(run_dir)
    out = tmp_path / "hub"
    assert main(["--checkpoint", str(run_dir), "--format", "hf", "--out", str(out)] + ["--ema"] * ema) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]

    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, logits(ema_state if ema else model_state, x), rtol=0, atol=0)
    assert not torch.equal(logits(model_state, x), logits(ema_state, x))  # so the choice above is visible

    data_config = timm.data.resolve_model_data_config(model)
    assert list(data_config["input_size"]) == DATA_CONFIG["input_size"]
    for key in ("interpolation", "crop_pct"):
        assert data_config[key] == DATA_CONFIG[key]
    for key in ("mean", "std"):
        assert list(data_config[key]) == DATA_CONFIG[key]


def test_hf_config_and_model_card(tmp_path):
    run_dir = tmp_path / "run"
    save_run(run_dir)
    out = tmp_path / "hub"
    assert main(["--checkpoint", str(run_dir / checkpoint_name(7)), "--format", "hf", "--out", str(out)]) == 0

    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "kat_tiny_patch16_224"
    assert config["num_classes"] == len(CLASSES)
    assert config["label_names"] == CLASSES
    args = config["model_args"]
    assert {k: args[k] for k in ("patch_size", "depth", "embed_dim", "num_heads", "num_classes")} == {
        **{k: ARCH[k] for k in ("patch_size", "depth", "embed_dim", "num_heads")},
        "num_classes": len(CLASSES),
    }
    assert "drop_path_rate" not in args  # a training regulariser, not the architecture
    cfg = config["pretrained_cfg"]
    assert cfg["num_classes"] == len(CLASSES) and cfg["input_size"] == DATA_CONFIG["input_size"]
    assert not {"url", "hf_hub_id", "tag", "file"} & set(cfg)  # nothing of the published weights' source

    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: timm" in card
    assert "| model (exported) | 61.25 | 97.50 | 0.8125 | 80 |" in card
    assert "| EMA | 63.75 | 98.75 | 0.7812 | 80 |" in card
    assert "lr: 0.001" in card and "tiny-run" in card


def test_refuses_to_overwrite_without_force(tmp_path, capsys):
    run_dir = tmp_path / "run"
    save_run(run_dir)
    out = tmp_path / "hub"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "README.md").write_text("my card")
    args = ["--checkpoint", str(run_dir), "--format", "hf", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "exists" in err and "--force" in err and "Traceback" not in err
    assert (out / "README.md").read_text() == "my card"

    assert main(args + ["--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine"  # only the export's own files are replaced
    assert "kat_tiny" in (out / "README.md").read_text()
    assert (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dir left


def _fail(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("kat.export: error: ") and len(err.strip().splitlines()) == 1
    return err


def test_bad_input_one_line_errors(tmp_path, capsys):
    out = str(tmp_path / "out")
    err = _fail(["--checkpoint", str(tmp_path / "nope"), "--format", "hf", "--out", out], capsys)
    assert "does not exist" in err

    run_dir = tmp_path / "run"
    save_run(run_dir, ema=False)
    err = _fail(["--checkpoint", str(run_dir), "--ema", "--format", "hf", "--out", out], capsys)
    assert "no EMA weights" in err and "drop --ema" in err

    step_dir = run_dir / checkpoint_name(7)
    weights = step_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    err = _fail(["--checkpoint", str(step_dir), "--format", "hf", "--out", out], capsys)
    assert "incomplete" in err and "model.safetensors" in err
    err = _fail(["--checkpoint", str(run_dir), "--format", "hf", "--out", out], capsys)
    assert "complete" in err

    bare = tmp_path / "weights.safetensors"
    save_file(tiny_model(0).state_dict(), bare)
    err = _fail(["--checkpoint", str(bare), "--format", "hf", "--out", out], capsys)
    assert "no meta.json" in err

    file_out = tmp_path / "file"
    file_out.write_text("keep")
    err = _fail(["--checkpoint", str(run_dir), "--format", "hf", "--out", str(file_out), "--force"], capsys)
    assert "is a file" in err and file_out.read_text() == "keep"
    err = _fail(["--checkpoint", str(run_dir), "--format", "onnx", "--out", str(tmp_path), "--force"], capsys)
    assert "is a folder" in err
    assert not (tmp_path / "out").exists()


def test_onnx_runs_in_onnxruntime_with_any_batch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    run_dir = tmp_path / "run"
    model_state, _ = save_run(run_dir)
    out = tmp_path / "kat.onnx"
    assert main(["--checkpoint", str(run_dir), "--format", "onnx", "--out", str(out)]) == 0

    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["class_names"]) == CLASSES and json.loads(props["mean"]) == DATA_CONFIG["mean"]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = torch.randn(batch, 3, 32, 32)
        (got,) = session.run(["logits"], {"images": x.numpy()})
        torch.testing.assert_close(torch.from_numpy(got), logits(model_state, x), rtol=1e-4, atol=1e-4)
