"""Recipes of stages (debiaslab.recipes): typed I/O checked at registration, skipping by content
hash, single stages, backend choice, and CBDM / Debias as recipes producing exactly what the
primitives (Trainer + sampler + CFG wrapper) produce for the same seeds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY as TINY_CORE

from debiaslab.checkpoints import load_checkpoint
from debiaslab.config import load_config
from debiaslab.data.dataset import ImageDataset
from debiaslab.diffusion.guidance import ClassifierFreeGuidance
from debiaslab.diffusion.samplers import sample as run_sampler
from debiaslab.errors import ConfigError
from debiaslab.experiment import run_experiment
from debiaslab.recipes import (
    RECIPES,
    Recipe,
    Stage,
    StageOutput,
    backend_of,
    get_recipe,
    make_artifact,
    resolve_backend,
)
from debiaslab.sampling import load_trained, sample_labels
from debiaslab.training.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_CORE + ["train.steps=6", "train.warmup_steps=2", "train.log_every=3",
                    "train.checkpoint_every=3", "sample.samplers=[ddim]", "sample.num_samples=12",
                    "sample.steps=4", "sample.batch_size=12", "metrics.bootstrap=0",
                    "tracking.enabled=false"]


def tiny(tmp_path: Path, config: str, *extra: str):
    return load_config(ROOT / "configs/experiments" / config,
                       TINY + [f"output_dir={tmp_path}", *extra])


def _noop(cfg, ctx):
    return StageOutput()


def test_recipe_io_is_checked_when_declared():
    with pytest.raises(ValueError, match="reads 'samples', which no earlier stage produces"):
        Recipe("broken", (Stage("evaluate", _noop, inputs={"samples": "samples"}),))
    with pytest.raises(ValueError, match="reads 'model' as checkpoint, but it is a dataset"):
        Recipe("kinds", (Stage("a", _noop, outputs={"model": "dataset"}),
                         Stage("b", _noop, inputs={"model": "checkpoint"})))
    with pytest.raises(ValueError, match="unknown kind"):
        Stage("c", _noop, outputs={"x": "tensor"})
    import debiaslab.methods  # noqa: F401  (registers the recipes)

    assert {"diffusion", "cbdm", "debias", "classifier_guidance"} <= set(RECIPES.names())


def test_methods_check_their_recipe_config(tmp_path):
    with pytest.raises(ConfigError, match="recipe cbdm: needs diffusion.loss: cbdm"):
        get_recipe(tiny(tmp_path, "digits_lt_cbdm.yaml", "diffusion.loss=denoising"))
    with pytest.raises(ConfigError, match="needs a classifier entry"):
        get_recipe(tiny(tmp_path, "digits_classifier_guidance.yaml", "sample.guidance=[]"))
    with pytest.raises(ConfigError, match="unknown recipe 'nope'"):
        load_config(None, ["recipe=nope"])


def test_backend_is_chosen_in_one_place(tmp_path):
    cfg = tiny(tmp_path, "digits_classifier_guidance.yaml")
    recipe = get_recipe(cfg)
    assert {s.name: resolve_backend(cfg, s) for s in recipe.stages} == {
        "data": "local", "train": "local", "classifier": "ray", "sample": "local",
        "evaluate": "local"}
    forced = tiny(tmp_path, "digits_classifier_guidance.yaml", "distributed.backend=local")
    assert backend_of(forced, "classifier") == "local"
    assert backend_of(tiny(tmp_path, "digits_lt_cbdm.yaml", "distributed.backend=ray"),
                      "train") == "ray"


def test_unchanged_stages_are_skipped_and_changed_ones_rerun(tmp_path, capsys):
    cfg = tiny(tmp_path, "digits_lt_debias.yaml")
    first = run_experiment(cfg, progress=False)
    assert first.checkpoint is not None and "eval/fid" in first.metrics
    capsys.readouterr()
    run_experiment(cfg, progress=False)
    out = capsys.readouterr().out
    assert all(f"stage {s}: up to date" in out for s in ("data", "train", "sample", "evaluate"))
    # a sampling knob changes the sample stage's key, and so the evaluation's input
    more = tiny(tmp_path, "digits_lt_debias.yaml", "sample.num_samples=14")
    run_experiment(more, progress=False)
    out = capsys.readouterr().out
    assert "stage train: up to date" in out
    assert "stage sample: running" in out and "stage evaluate: running" in out
    assert len(ImageDataset.load(cfg.run_dir / "samples" / "ddim").ids) == 14
    # tampering with an output invalidates its record: the stage runs again
    grid_parts = sorted((cfg.run_dir / "samples" / "ddim").glob("*.parquet"))
    grid_parts[0].unlink()
    run_experiment(more, stages=("sample",), progress=False)
    assert "stage sample: running" in capsys.readouterr().out
    # --force re-runs an up-to-date stage
    run_experiment(more, stages=("evaluate",), force=True, progress=False)
    assert "stage evaluate: running" in capsys.readouterr().out


def test_a_stage_alone_needs_its_inputs(tmp_path):
    cfg = tiny(tmp_path, "digits_lt_debias.yaml")
    with pytest.raises(ConfigError, match="stage sample needs score_model; run the earlier"):
        run_experiment(cfg, stages=("sample",), progress=False)
    with pytest.raises(ConfigError, match="has no stage 'classifier'"):
        run_experiment(cfg, stages=("classifier",), progress=False)


def test_cbdm_recipe_equals_the_primitives_bit_for_bit(tmp_path):
    """The recipe adds bookkeeping only: the same Trainer losses and weights, and the same
    CFG samples as composing Trainer, ClassifierFreeGuidance and the sampler by hand."""
    cfg = tiny(tmp_path / "recipe", "digits_lt_cbdm.yaml")
    result = run_experiment(cfg, progress=False)
    by_hand = tiny(tmp_path / "hand", "digits_lt_cbdm.yaml")
    from debiaslab.stages import build_data

    build_data(by_hand)
    dataset = ImageDataset.load(by_hand.dataset_path)
    manual = Trainer(by_hand, dataset, by_hand.run_dir, progress=False).fit()
    ours, theirs = load_checkpoint(result.checkpoint), load_checkpoint(manual.checkpoint)
    assert ours["step"] == theirs["step"] == 6
    for key, value in theirs["ema"]["shadow"].items():
        assert torch.equal(ours["ema"]["shadow"][key], value), key
    trained = load_trained(manual.checkpoint, device="cpu")
    omega = cfg.sample.guidance[0]["omega"]
    guided = ClassifierFreeGuidance(trained.denoiser, omega, trained.null_label)
    seeds = list(range(cfg.sample.num_samples))
    labels = sample_labels(cfg.sample.labels, trained.num_classes, seeds)
    images = run_sampler("ddim", guided, seeds, trained.shape, steps=cfg.sample.steps,
                         cond={"y": labels}, clip_x0=cfg.sample.clip_x0).float().clamp(-1, 1)
    uint8 = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    saved = ImageDataset.load(cfg.run_dir / "samples" / "ddim")
    order = sorted(range(len(saved.ids)), key=lambda i: saved.ids[i])
    assert torch.equal(saved.images[order], uint8)
    assert saved.labels[order].tolist() == labels.tolist()


def test_make_artifact_refuses_a_missing_output(tmp_path):
    with pytest.raises(ConfigError, match="missing or unreadable"):
        make_artifact("checkpoint", tmp_path / "nope.pt")
    path = tmp_path / "x.bin"
    path.write_bytes(b"abc")
    a, b = make_artifact("checkpoint", path), make_artifact("checkpoint", path)
    assert a == b
    path.write_bytes(b"abd")
    assert make_artifact("checkpoint", path).hash != a.hash
