"""Strict config: YAML + --set overrides, one-line errors naming the key and allowed values."""

from pathlib import Path

import pytest
from conftest import one_line

from debiaslab.config import ExperimentConfig, apply_overrides, from_dict, load_config
from debiaslab.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_validate():
    cfg = load_config(None)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.train.batch_size == 64 and cfg.model.channel_mult == (1, 2, 2)


def test_overrides_parse_types():
    cfg = load_config(None, ["train.lr=3e-4", "model.channel_mult=[1,2]", "train.steps=10",
                             "diffusion.weighting=min_snr", "diffusion.weighting_params={gamma: 3}",
                             "sample.samplers=ddim", "name=abc"])
    assert cfg.train.lr == 3e-4 and cfg.model.channel_mult == (1, 2)
    assert cfg.train.steps == 10 and cfg.diffusion.weighting_params == {"gamma": 3}
    assert cfg.sample.samplers == ("ddim",) and cfg.name == "abc"


def test_unknown_key_lists_allowed():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["train.lrr=1"])
    msg = one_line(exc)
    assert "'train.lrr'" in msg and "lr" in msg and "batch_size" in msg


def test_unknown_section():
    with pytest.raises(ConfigError) as exc:
        from_dict({"trian": {}})
    assert "'trian'" in one_line(exc)


def test_literal_lists_allowed_values():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["train.precision=fp8"])
    msg = one_line(exc)
    assert "train.precision" in msg and "bf16" in msg and "fp32" in msg


@pytest.mark.parametrize("override,fragment", [
    ("train.steps=abc", "train.steps: expected an integer"),
    ("train.steps=0", "train.steps: must be > 0"),
    ("train.lr=true", "train.lr: expected a number"),
    ("train.ema_decay=1.5", "train.ema_decay: must be in [0, 1]"),
    ("diffusion.weighting=nope", "diffusion.weighting: unknown loss weighting 'nope'"),
    ("diffusion.target=noise", "allowed: eps, v, x0"),
    ("sample.samplers=[ddim,euler9]", "sample.samplers[1]"),
    ("model.net=resnet", "model.net"),
    ("diffusion.weighting_params={foo: 1}", "diffusion.weighting_params"),
    ("data.source=imagenet", "data.source"),
    ("sample.steps=5000", "sample.steps: must be <="),
    ("metrics.extractor=clip", "metrics.extractor: unknown feature extractor"),
    ("metrics.k=0", "metrics.k: must be > 0"),
    ("train", "must look like key.path=value"),
])
def test_bad_values_are_one_line_errors(override, fragment):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert fragment in one_line(exc)


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "missing.yaml")
    assert "missing.yaml" in one_line(exc)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: [1,\n")
    with pytest.raises(ConfigError) as exc:
        load_config(bad)
    assert "bad.yaml" in one_line(exc)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError):
        load_config(listy)


def test_override_does_not_mutate_input():
    raw = {"train": {"steps": 5}}
    out = apply_overrides(raw, ["train.steps=7"])
    assert raw["train"]["steps"] == 5 and out["train"]["steps"] == 7


def test_every_shipped_config_validates():
    files = sorted((ROOT / "configs").rglob("*.yaml"))
    experiments = [f for f in files if "experiments" in f.parts]
    assert experiments, "configs/experiments/ holds at least one experiment"
    for f in experiments:
        load_config(f)


@pytest.mark.parametrize("path", sorted(str(p) for p in (ROOT / "configs").rglob("*.yaml")),
                         ids=lambda p: Path(p).name)
def test_every_shipped_config_passes_dry_run(path):
    """Experiments through `debiaslab run --dry-run`, sweeps through `debiaslab sweep --dry-run`
    (the sweep also resolves and validates its base experiment and every range end)."""
    from debiaslab.cli import main

    command = "sweep" if "sweeps" in Path(path).parts else "run"
    assert main([command, "-c", path, "--dry-run"]) == 0
