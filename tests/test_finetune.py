"""Fine-tuning (kat/configs/finetune.yaml): init_from one of our runs onto a dataset with another class count.

A 2-step demo run of a 1-block KAT is the source; the fine-tune run starts from it on 3 of the digit classes, the
way the README tutorial does with the full demo. About 10 s on 2 cores.
"""

import math
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from kat.training.checkpoint import read_checkpoint
from kat.training.config import ConfigError, parse_config
from kat.training.engine import Trainer, train

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"
ARCH = "{img_size: 28, patch_size: 7, depth: 2, embed_dim: 32, num_heads: 2}"
QUIET = ["--wandb_mode", "disabled", "--plot_rationals", "false", "--workers", "0"]


def digits(root: Path, classes: list[str], per_class: int) -> Path:
    if root.exists():
        return root
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for f in sorted((DEMO / split / c).glob("*.png"))[:per_class]:
                shutil.copy(f, root / split / c / f.name)
    return root


@pytest.fixture(scope="module")
def source_run(tmp_path_factory) -> Path:
    """A 2-step demo run (10 classes): the checkpoint a tutorial reader fine-tunes from."""
    tmp = tmp_path_factory.mktemp("source")
    data = digits(tmp / "digits10", [str(c) for c in range(10)], 8)
    argv = ["--config", "demo", "--data_dir", str(data), "--output_dir", str(tmp), "--run_name", "demo_short"]
    train(parse_config(argv + ["--model_kwargs", ARCH, "--batch_size", "40", "--max_steps", "2", *QUIET]))
    return tmp / "demo_short"


def finetune_config(tmp_path: Path, init_from: Path, *extra: str):
    data = digits(tmp_path / "digits3", ["0", "1", "2"], 16)
    argv = ["--config", "finetune", "--data_dir", str(data), "--init_from", str(init_from)]
    argv += [
        "--model",
        "kat_tiny",
        "--model_kwargs",
        ARCH,
        "--output_dir",
        str(tmp_path),
        "--batch_size",
        "16",
    ]
    return parse_config(argv + ["--mixed_precision", "no", "--max_steps", "2", *QUIET, *extra])


def test_finetune_starts_from_demo_checkpoint_with_new_head_and_layer_decay(tmp_path, source_run):
    source, meta = read_checkpoint(source_run)
    assert meta["num_classes"] == 10
    cfg = finetune_config(tmp_path, source_run, "--layer_decay", "0.5")
    trainer = Trainer(cfg)
    model = trainer.parts.raw_model

    # Everything but the head comes from the demo checkpoint; the head is new, for 3 classes.
    state = model.state_dict()
    assert model.head.weight.shape == (3, 32)
    for key in (
        "pos_embed",
        "blocks.1.attn.qkv.weight",
        "blocks.0.mlp.act2.weight_denominator",
        "norm.weight",
    ):
        assert torch.equal(state[key], source[key]), key

    # Layer decay: one lr scale per group_matcher layer, 0.5 per layer down from the head (2 blocks: the
    # embeddings are 3 layers below the head), applied by the scheduler to every group's lr.
    names = {id(p): n for n, p in model.named_parameters()}
    scale_of = {names[id(p)]: g["lr_scale"] for g in trainer.parts.optimizer.param_groups for p in g["params"]}
    assert scale_of["head.weight"] == 1.0
    assert scale_of["blocks.1.mlp.fc1.weight"] == 0.5
    assert scale_of["blocks.0.mlp.act1.weight_numerator"] == 0.25
    assert scale_of["patch_embed.proj.weight"] == scale_of["pos_embed"] == 0.125
    for group in trainer.parts.optimizer.param_groups:
        assert math.isclose(group["lr"], cfg.warmup_lr * group["lr_scale"], rel_tol=1e-6)

    result = trainer.fit()
    assert trainer.step == 2 and math.isfinite(result["val"]["loss"])
    _, finetuned_meta = read_checkpoint(tmp_path / "finetune")
    assert finetuned_meta["num_classes"] == 3 and finetuned_meta["class_names"] == ["0", "1", "2"]


def test_init_from_errors_name_the_key(tmp_path, source_run):
    wider = ARCH.replace("embed_dim: 32", "embed_dim: 64")
    with pytest.raises(ConfigError, match=r"(?s)init_from.*shape mismatches.*blocks\.0"):
        Trainer(finetune_config(tmp_path, source_run, "--model_kwargs", wider))

    vit = timm.create_model(
        "vit_tiny_patch16_224", img_size=28, patch_size=7, depth=2, embed_dim=32, num_heads=2
    )
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, path)
    with pytest.raises(ConfigError, match="act_init: gelu"):
        Trainer(finetune_config(tmp_path, path))
    # With act_init gelu, a ViT file makes a KAT*: act2 holds the GELU fit, the attention is the ViT's.
    trainer = Trainer(
        finetune_config(tmp_path, path, "--model_kwargs.act_init", "gelu", "--run_name", "kat_star")
    )
    assert torch.equal(trainer.parts.raw_model.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
    assert trainer.parts.raw_model.blocks[0].mlp.act2.init == "gelu"

    with pytest.raises(ConfigError, match=r"init_from.*vit\.npz does not exist"):
        Trainer(finetune_config(tmp_path, tmp_path / "vit.npz", "--run_name", "npz"))
