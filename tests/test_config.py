"""Config resolution: defaults < YAML < flags, the shipped configs, and errors that name the key and the fix."""

from pathlib import Path

import pytest

from kat.training.config import (
    CONFIGS_DIR,
    ConfigError,
    TrainConfig,
    find_config_file,
    load_yaml,
    parse_config,
    save_config,
)


def write(path, text):
    path.write_text(text)
    return str(path)


def test_precedence_defaults_yaml_flags(tmp_path):
    config = write(
        tmp_path / "mine.yaml", "batch_size: 32\nlr: 5e-4\nmodel_kwargs: {depth: 2, embed_dim: 32}\n"
    )
    cfg = parse_config(["--config", config, "--batch-size", "16", "--model_kwargs.depth", "1"])
    assert cfg.batch_size == 16  # flag beats YAML
    assert cfg.lr == 5e-4 and isinstance(cfg.lr, float)  # YAML's `5e-4` is a string to PyYAML; we accept it
    assert cfg.epochs == TrainConfig().epochs  # default where neither says anything
    assert cfg.model_kwargs == {"depth": 1, "embed_dim": 32}  # dict keys merge
    assert cfg.run_name == "mine"  # from the config file name


def test_flag_spellings_and_values():
    cfg = parse_config(
        [
            "--batch_size=8",
            "--compile",
            "--wandb-entity",
            "null",
            "--opt_betas",
            "[0.9, 0.95]",
            "--run_name",
            "2024",
            "--model_kwargs",
            "{depth: 3}",
        ]
    )
    assert (cfg.batch_size, cfg.compile, cfg.wandb_entity, cfg.opt_betas) == (8, True, None, [0.9, 0.95])
    assert cfg.run_name == "2024" and cfg.model_kwargs == {"depth": 3}
    assert parse_config(["--compile", "false"]).compile is False
    assert parse_config([]).run_name == TrainConfig().model


@pytest.mark.parametrize("name", ["demo", "demo.yaml", "configs/demo.yaml"])
def test_bare_config_name_finds_configs_dir(name):
    assert parse_config(["--config", name]).data_dir == "data/demo"


def test_shipped_recipe_configs():
    for name in ("kat_t", "kat_s", "kat_b", "vit_s", "demo"):
        assert set(load_yaml(CONFIGS_DIR / f"{name}.yaml")) <= set(TrainConfig().to_dict()), name
    expected = {
        "kat_t": ("kat_tiny", 0.1),
        "kat_s": ("kat_small", 0.1),
        "kat_b": ("kat_base", 0.4),
        "vit_s": ("vit_small_patch16_224", 0.1),
    }
    for name, (model, drop_path) in expected.items():
        cfg = parse_config(["--config", name])
        assert (cfg.model, cfg.drop_path) == (model, drop_path)
        # the published recipe (arXiv 2409.10594): lr 1e-3 at global batch 1024 = 8 processes x 128
        assert cfg.global_batch_size(8) == 1024 and cfg.scaled_lr(8) == pytest.approx(1e-3)
        assert cfg.scaled_lr(2) == pytest.approx(2.5e-4)  # linear rule for other batch sizes
        assert (cfg.weight_decay, cfg.warmup_epochs, cfg.epochs, cfg.clip_grad) == (0.05, 5, 300, None)
        assert (cfg.mixup, cfg.cutmix, cfg.mixup_switch_prob, cfg.smoothing, cfg.reprob) == (
            0.8,
            1.0,
            0.5,
            0.1,
            0.25,
        )
        assert cfg.aa.startswith("rand-m9-mstd0.5") and cfg.model_ema_decay == 0.9999
        assert (cfg.crop_pct, cfg.interpolation, cfg.opt, cfg.opt_betas) == (
            0.875,
            "bicubic",
            "adamw",
            [0.9, 0.999],
        )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch_sise", "3"], "unknown flag '--batch_sise'; did you mean 'batch_size'"),
        (["--lr", "fast"], "config key 'lr' expects float, got 'fast'"),
        (["--epochs", "2.5"], "config key 'epochs' expects int"),
        (["--mixed_precision", "fp8"], "'fp8' is not one of 'no', 'bf16', 'fp16'"),
        (["--model_kwargs", "3"], "config key 'model_kwargs' expects a mapping"),
        (["--config", "nope.yaml"], "config file 'nope.yaml' not found"),
        (["--batch_size", "0"], "'batch_size' must be >= 1"),
        (["--batch_size", "7"], "'batch_size' must be even"),  # mixup is on by default
        (["--model_kwargs.drop_path_rate", "0.2"], "set 'drop_path'"),
    ],
)
def test_bad_flags(argv, message):
    with pytest.raises(ConfigError) as error:
        parse_config(argv)
    assert message in str(error.value)


def test_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'epoch' in .*bad.yaml; did you mean 'epochs'"):
        parse_config(["--config", write(tmp_path / "bad.yaml", "epoch: 3\n")])
    with pytest.raises(ConfigError, match="config key 'workers' expects int, got 'many'"):
        parse_config(["--config", write(tmp_path / "bad2.yaml", "workers: many\n")])
    with pytest.raises(ConfigError, match="must be a mapping"):
        parse_config(["--config", write(tmp_path / "bad3.yaml", "- a\n- b\n")])
    # Loaded with yaml.safe_load: no Python objects from config files.
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_config(["--config", write(tmp_path / "bad4.yaml", "model: !!python/name:os.system\n")])


def test_saved_config_reproduces_the_run(tmp_path):
    cfg = parse_config(["--config", "demo", "--lr", "3e-3", "--model_kwargs.depth", "1"])
    save_config(cfg, tmp_path / "config.yaml")
    assert parse_config(["--config", str(tmp_path / "config.yaml")]) == cfg


def test_train_entry_point_reports_config_errors(capsys):
    import train

    assert train.main(["--config", "demo", "--wandb_mod", "offline"]) == 2
    assert "did you mean 'wandb_mode'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--run_name", ".."],
            "'run_name' must be a plain directory name (no '/', not '.' or '..'), got '..'",
        ),
        (["--run_name", "a/b"], "'run_name' must be a plain directory name"),
        (["--std", "[0, 0, 0]"], "config key 'std' must hold finite numbers > 0"),
        (
            ["--mean", "[0.5, 0.5]"],
            "config key 'mean' needs one number per input channel (3), got [0.5, 0.5]",
        ),
        (["--std", "[0.5]", "--model_kwargs.in_chans", "1"], None),
        (["--crop_pct", "0"], "config key 'crop_pct' must be in (0, 1]"),
        (["--crop_pct", "null"], None),
        (["--interpolation", "bicubik"], "config key 'interpolation': 'bicubik' is not one of nearest"),
        (["--interpolation", "random"], "config key 'interpolation': 'random' is not one of"),
        (["--train_interpolation", "random"], None),
        (["--opt", "adamww"], "config key 'opt': 'adamww' is not a timm optimizer; closest: adamw"),
        (["--opt", "lookahead_sgd"], None),
        (["--opt", "fancy_adamw"], "'fancy_adamw' is not a timm optimizer"),
        (["--scale", "[0.5, 0.1]"], "config key 'scale' must be [low, high] with 0 < low <= high <= 1"),
        (["--scale", "[0.5, 2]"], "config key 'scale' must be"),
        (["--ratio", "[0, 1]"], "config key 'ratio' must be [low, high] with 0 < low <= high"),
        (["--aa", "rand-x9"], "config key 'aa': 'rand-x9' is not a timm auto-augment policy"),
        (["--aa", "augmix-m5"], None),
        (["--remode", "zeros"], "config key 'remode': 'zeros' is not a random erasing fill mode"),
        (["--opt_betas", "[0.9, 1.5]"], "config key 'opt_betas' must be two numbers in [0, 1)"),
    ],
)
def test_impossible_values_are_refused(argv, message):
    if message is None:
        parse_config(argv)  # the nearby valid value passes
        return
    with pytest.raises(ConfigError) as error:
        parse_config(argv)
    assert message in str(error.value)


def test_yaml_duplicate_keys_and_syntax_errors_name_file_and_line(tmp_path):
    twice = write(tmp_path / "twice.yaml", "lr: 1e-3\nepochs: 3\nlr: 5e-4\n")
    with pytest.raises(ConfigError) as error:
        parse_config(["--config", twice])
    assert f"{twice} is not valid YAML (line 3, column 1): key 'lr' is given twice" in str(error.value)
    nested = write(tmp_path / "nested.yaml", "model_kwargs:\n  depth: 2\n  depth: 4\n")
    with pytest.raises(ConfigError, match=r"nested.yaml is not valid YAML \(line 3, column 3\): key 'depth'"):
        parse_config(["--config", nested])
    broken = write(tmp_path / "broken.yaml", "lr: 1e-3\nmodel_kwargs: {depth: 2\n")
    with pytest.raises(ConfigError) as error:
        parse_config(["--config", broken])
    assert str(error.value).startswith(f"{broken} is not valid YAML (line 3")
    assert "\n" not in str(error.value) and "<unicode string>" not in str(error.value)


def test_bad_values_fail_before_the_run_directory_exists(tmp_path, capsys):
    import train

    for flags in (
        ["--opt", "adamww"],
        ["--interpolation", "bicubik"],
        ["--mean", "[0.5]"],
        ["--run_name", ".."],
    ):
        argv = [
            "--config",
            "demo",
            "--output_dir",
            str(tmp_path / "runs"),
            "--wandb_mode",
            "disabled",
            *flags,
        ]
        assert train.main(argv) == 2
        assert "error: config key" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither output_dir/demo nor, for run_name .., output_dir/..


def test_configs_are_found_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("kat_s", "kat_s.yaml", "configs/kat_s.yaml"):
        assert find_config_file(name) == CONFIGS_DIR / "kat_s.yaml"
    (tmp_path / "kat_s.yaml").write_text("epochs: 3\n")
    assert find_config_file("kat_s.yaml") == Path("kat_s.yaml")  # a file here wins over the shipped one
