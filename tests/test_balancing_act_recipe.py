"""Balancing Act's recipe end to end: h-vectors by inversion (local and Ray Data, byte-identical),
per-timestep heads (local and Ray Train), guided sampling (the Ray path uses the local path's
guidance batches), the attribute evaluation, and one-line errors for bad settings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY

from debiaslab.config import load_config, validate
from debiaslab.data.dataset import ImageDataset
from debiaslab.data.side_tables import read_side_manifest, read_side_table
from debiaslab.errors import ConfigError, DataError
from debiaslab.experiment import run_experiment
from debiaslab.methods.balancing_act import (
    ba_grid,
    h_rows,
    h_storage_bytes,
    h_table,
)
from debiaslab.recipes import get_recipe, read_record
from debiaslab.training.classifier import classifier_experiment, load_classifier

GUIDE = "sample.guidance=[{type: balancing_act, scale: 2.0, p_ref: [[0.5, 0.5], [0.3, 0.7]]}]"
SMALL = TINY + [
    "recipe=balancing_act", "model.class_conditional=false", "data.imbalance=attribute_bias",
    "data.bias_attribute=bold", "train.steps=6", "train.warmup_steps=1",
    "train.checkpoint_every=6", "ba.n_steps=6", "h_classifier.label=attr:bold+attr:even",
    "h_classifier.train.steps=10", "h_classifier.train.batch_size=32",
    "h_classifier.train.checkpoint_every=10", "sample.samplers=[ddim]", "sample.steps=6",
    "sample.options={ddim: {eta: 1.0, spacing: floor}}", "sample.num_samples=8",
    "sample.batch_size=4", "sample.labels=none", GUIDE, "metrics.bootstrap=0",
    "tracking.enabled=false", "name=ba"]
RECORDED = ba_grid(6)[:-1]  # 0, 199, 399, 599, 799
H_SHAPE = (len(RECORDED), 32, 8, 8)  # the tiny UNet's bottleneck: 32 channels at 8 x 8


def _cfg(tmp_path, *extra):
    return load_config(None, SMALL + [f"output_dir={tmp_path}", *extra])


def _table(cfg):
    path = cfg.dataset_path / "biased"
    return read_side_table(path, h_table(cfg), ["h"]), read_side_manifest(
        path / "side" / h_table(cfg))


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ba")
    cfg = _cfg(out, "distributed.backend=local")
    return cfg, run_experiment(cfg, progress=False)


def test_the_recipe_runs_and_records_what_it_computed(local_run):
    cfg, result = local_run
    assert [s.name for s in get_recipe(cfg).stages] == \
        ["data", "train", "hvectors", "h_classifier", "sample", "evaluate"]
    table, manifest = _table(cfg)
    dataset = ImageDataset.load(cfg.dataset_path / "biased")
    assert table.column("h").shape == (len(dataset.ids),) + H_SHAPE
    assert table.column("h").dtype == np.float16 and np.isfinite(table.column("h")).all()
    assert manifest["producer"]["timesteps"] == RECORDED
    assert result.metrics["ba/h_bytes_per_image"] == h_storage_bytes(H_SHAPE, "float16") == 20480
    # the heads: one per recorded timestep and attribute, rebuilt from the checkpoint alone
    heads, info = load_classifier(read_record(cfg, get_recipe(cfg).stage("h_classifier"))
                                  ["outputs"]["h_classifier"]["path"])
    assert info["h_heads"]["grid"] == RECORDED and info["h_heads"]["groups"] == [2, 2]
    assert heads.weights[0].shape == (len(RECORDED), 32 * 8 * 8, 4)
    assert 0.0 <= result.metrics["h_classifier/val/accuracy"] <= 1.0
    assert (cfg.run_dir.with_name("ba.h_classifier") / "validation_per_timestep.png").is_file()
    # the evaluation: shares against p_ref per attribute and jointly, and the plot
    m = result.metrics
    assert {"eval/ba/fd_target_bold", "eval/ba/fd_target_even", "eval/ba/fd_target_joint",
            "eval/ba/share_bold_0", "eval/ba/share_even_1"} <= set(m)
    shares = np.array([m["eval/ba/share_even_0"], m["eval/ba/share_even_1"]])
    assert m["eval/ba/fd_target_even"] == pytest.approx(np.linalg.norm(shares - [0.3, 0.7]))
    assert (cfg.run_dir / "eval" / "attributes_ddim.png").is_file()
    # the samples record the guidance with every field and the batch it sees at once
    record = json.loads((cfg.run_dir / "samples" / "sampling.json").read_text())
    entry = record["guidance"][0]
    assert record["guidance_batch_size"] == 4 and entry["type"] == "balancing_act"
    assert entry["scale_mode"] == "batch" and entry["window"] == [] and entry["temperature"] == 8
    assert entry["checkpoint"].endswith(".pt")


def test_h_vectors_are_byte_identical_on_rerun(local_run):
    cfg, _ = local_run
    before = _table(cfg)[1]["content_hash"]
    run_experiment(cfg, stages=["hvectors"], force=True, progress=False)
    assert _table(cfg)[1]["content_hash"] == before


def test_a_table_that_does_not_fit_the_heads_is_one_line(local_run):
    """The table holds h at 5 timesteps; ba keeping 2 of them means 2 heads: refused."""
    cfg, _ = local_run
    other = load_config(None, SMALL + [f"output_dir={cfg.output_dir}",
                                       "ba.keep_steps=[199, 399]"])
    from debiaslab.methods.balancing_act import heads_config

    ccfg = classifier_experiment(heads_config(other), "h_classifier", run_suffix="h_classifier")
    with pytest.raises(DataError, match=r"holds h at 5 timesteps \(5 per image\) but ba keeps "
                                        r"2; .*rerun the hvectors stage") as info:
        h_rows(ccfg)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("extra, message", [
    (["ba.keep_steps=[5]"], r"ba.keep_steps: 5 is not a recorded timestep;.*\(0, 199, ..., 799\)"),
    (["ba.n_steps=1"], r"ba.n_steps: must be in \[2, 1000\]"),
    (["h_classifier.label=attr:nope"], r"does not predict attr:nope \(h_classifier.label\)"),
    (["h_classifier.model.options={grid: [0]}"], r"h_classifier.model.options.grid: set from"),
    (["model.net=mlp_head"], r"recipe balancing_act: model.net must be unet"),
    (["sample.guidance=[{type: balancing_act, mode: both}]"], r"mode"),
])
def test_bad_settings_are_one_line_before_anything_runs(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message) as info:
        cfg = _cfg(tmp_path, *extra)
        validate(cfg)
        get_recipe(cfg).check(cfg)
    assert "\n" not in str(info.value)


def test_ray_paths_equal_the_local_ones(shared_ray, local_run, tmp_path):
    """hvectors on Ray Data (2 actors, batches of 100) writes the table the local path wrote,
    byte for byte (one image per inversion forward); the heads train on Ray Train; sampling on
    Ray Data with distribution guidance gives the images of the local path with the same heads,
    because both guide the same batches (sample.batch_size)."""
    from debiaslab.stages import sample

    cfg, _ = local_run
    local_hash = _table(cfg)[1]["content_hash"]
    ray_cfg = load_config(None, SMALL + [f"output_dir={cfg.output_dir}",
                                         "distributed.backend=ray", "distributed.num_workers=1",
                                         "distributed.map_concurrency=2",
                                         "distributed.map_batch_size=100"])
    run_experiment(ray_cfg, stages=["hvectors", "h_classifier", "sample"], force=True,
                   progress=False)
    assert _table(ray_cfg)[1]["content_hash"] == local_hash
    record = read_record(ray_cfg, get_recipe(ray_cfg).stage("h_classifier"))
    heads = record["outputs"]["h_classifier"]["path"]
    assert "ray_results" in heads  # trained by a Ray Train worker
    here = sample(_cfg(tmp_path, "distributed.backend=local"),
                  read_record(ray_cfg, get_recipe(ray_cfg).stage("train"))
                  ["outputs"]["score_model"]["path"], out_dir=tmp_path / "local",
                  progress=False, artifacts={"h_classifier": heads}, backend="local")
    on_ray = ImageDataset.load(ray_cfg.run_dir / "samples" / "ddim")
    local = ImageDataset.load(here.artifacts["samples_ddim"])
    assert on_ray.ids == local.ids
    assert torch.equal(on_ray.images, local.images)


def test_the_image_space_baselines_classifier_trains_on_the_built_data(local_run):
    """recipe subgroup_classifier on a dataset that already exists (the baseline's classifier
    of clean images, trained beside a Balancing Act run): it has no train stage, so no score
    model checkpoint is looked for."""
    cfg, _ = local_run
    clf = load_config(None, SMALL + [
        f"output_dir={cfg.output_dir}", "recipe=subgroup_classifier", "name=ba_clf",
        "classifier.label=attr:bold", "classifier.timestep_range=[0, 0]",
        "classifier.val_buckets=1", "classifier.model.model_channels=8",
        "classifier.model.channel_mult=[1]", "classifier.model.attention_resolutions=[]",
        "classifier.model.head_channels=8",
        "classifier.train.steps=2", "classifier.train.batch_size=16",
        "classifier.train.checkpoint_every=2", "distributed.backend=local"])
    result = run_experiment(clf, progress=False)
    assert "classifier/val/accuracy" in result.metrics
