"""Recipes hold any number of auxiliary models and put stages anywhere the data flow allows
(issue 18 §3): two auxiliary classifiers with their own sections, runs and artifacts, named by
guidance entries; a stage before the score model's training whose artifact the train stage reads,
bound into its config; the backend travels with the stage."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import pytest
from conftest import TINY as TINY_CORE
from conftest import recipe_runs

from debiaslab.checkpoints import load_checkpoint
from debiaslab.config import SECTIONS, ClassifierConfig, load_config
from debiaslab.errors import CheckpointError, ConfigError
from debiaslab.experiment import run_experiment
from debiaslab.methods.api import Recipe, aux_model_stage, diffusion_stages
from debiaslab.recipes import RECIPES, backend_of, read_record
from debiaslab.sampling import resolve_guidance

TINY = TINY_CORE + ["train.steps=4", "train.warmup_steps=1", "train.log_every=2",
                    "train.checkpoint_every=2", "sample.samplers=[ddim]", "sample.num_samples=4",
                    "sample.steps=3", "sample.batch_size=4", "metrics.bootstrap=0",
                    "distributed.backend=local", "data.imb_factor=0.5"]
AUX = ["model.model_channels=8", "model.channel_mult=[1]", "model.head_channels=8", "train.steps=3",
       "train.batch_size=16", "train.checkpoint_every=3", "train.log_every=3", "train.device=cpu"]


@contextlib.contextmanager
def registered(recipe: Recipe, *sections: str) -> Iterator[None]:
    """A test recipe and classifier-typed sections, registered for the block only (other
    tests' configs must not grow these sections)."""
    for name in sections:
        SECTIONS[name] = ClassifierConfig
    RECIPES.register(recipe.name)(recipe)
    try:
        yield
    finally:
        RECIPES._items.pop(recipe.name, None)
        for name in sections:
            SECTIONS.pop(name, None)


def aux_overrides(section: str, steps: int) -> list[str]:
    return [f"{section}.{k}" for k in AUX] + [f"{section}.train.steps={steps}",
                                               f"{section}.train.checkpoint_every={steps}"]


def test_two_auxiliary_models_each_with_its_section_run_and_artifact(tmp_path):
    recipe = Recipe("two_aux", diffusion_stages(
        sample_inputs={"classifier": "checkpoint", "critic": "checkpoint"},
        extra=(aux_model_stage("classifier"), aux_model_stage("critic"))))
    with registered(recipe, "critic"):
        cfg = load_config(None, TINY + aux_overrides("classifier", 3) + aux_overrides("critic", 2)
                          + ["recipe=two_aux", "name=two", f"output_dir={tmp_path}",
                             "model.class_conditional=false", "sample.labels=none",
                             "sample.guidance=[{type: classifier, artifact: critic, scale: 2.0,"
                             " target: 1}]"])
        assert backend_of(cfg, "critic") == "local"
        run_experiment(cfg, stages=("data", "train", "classifier", "critic", "sample"),
                       progress=False)
        records = {s: read_record(cfg, s)["outputs"] for s in ("classifier", "critic")}
        paths = {s: Path(records[s][s]["path"]) for s in records}
        # each model trained in its own run from its own section (3 and 2 steps)
        assert paths["classifier"].is_relative_to(tmp_path / "runs" / "two.classifier")
        assert paths["critic"].is_relative_to(tmp_path / "runs" / "two.critic")
        assert load_checkpoint(paths["classifier"])["step"] == 3
        assert load_checkpoint(paths["critic"])["step"] == 2
        # the sample stage's guidance entry got the artifact it names, not the classifier
        _, children = recipe_runs(_client(tmp_path), cfg.tracking.experiment)
        (entry,) = json.loads(children["sample"].data.tags["sample.guidance"])
        assert (Path(entry["checkpoint"]), entry["artifact"]) == (paths["critic"], "critic")
        # an entry that names no artifact means the recipe's "classifier"
        plain = [{"type": "classifier", "scale": 1.0}, {"type": "classifier",
                                                        "artifact": "critic"}]
        resolved = resolve_guidance(cfg, plain, artifacts={k: str(v) for k, v in paths.items()})
        assert [Path(e["checkpoint"]) for e in resolved] == [paths["classifier"],
                                                             paths["critic"]]


def test_a_stage_before_training_feeds_the_score_model_through_its_config(tmp_path, capsys):
    recipe = Recipe("prior_first", diffusion_stages(
        before_train=(aux_model_stage("prior"),), train_inputs={"prior": "checkpoint"}))
    with registered(recipe, "prior"):
        base = TINY + ["recipe=prior_first", "name=pf", f"output_dir={tmp_path}",
                       "tracking.enabled=false"]
        cfg = load_config(None, base + aux_overrides("prior", 2))
        assert [s.name for s in RECIPES.get("prior_first").stages][:3] == ["data", "prior",
                                                                           "train"]
        done = run_experiment(cfg, stages=("data", "prior", "train"), progress=False)
        prior = read_record(cfg, "prior")["outputs"]["prior"]
        # the train stage ran with the prior bound into its config: what Ray workers get and
        # what the checkpoint records
        bound = load_checkpoint(done.checkpoint)["config"]["inputs"]
        assert bound["prior"] == {"path": prior["path"], "hash": prior["hash"]}
        # unchanged, every stage is up to date (the preflight resume check knows no inputs yet)
        capsys.readouterr()
        run_experiment(cfg, stages=("data", "prior", "train"), progress=False)
        assert "stage train: up to date" in capsys.readouterr().out
        # a new prior changes the train stage's key: it is not skipped, and adopting the
        # checkpoint trained with the old prior is refused, naming the input
        other = load_config(None, base + aux_overrides("prior", 3))
        with pytest.raises(CheckpointError, match=r"inputs\.prior\.hash"):
            run_experiment(other, stages=("prior", "train"), progress=False)
        out = capsys.readouterr().out
        assert "stage prior: running" in out and "stage train: running" in out


def test_inputs_are_bound_by_the_engine_never_taken_from_a_config_file(tmp_path):
    stale = tmp_path / "config.yaml"
    stale.write_text("name: x\ninputs: {prior: {path: /gone, hash: abc}}\n")
    assert load_config(stale).inputs == {}


def test_a_stage_the_recipe_lacks_has_no_silent_backend():
    cfg = load_config(None, ["recipe=diffusion"])
    with pytest.raises(ConfigError, match="recipe diffusion has no stage 'classifier'"):
        backend_of(cfg, "classifier")


def _client(output_dir: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{output_dir}/mlflow.db")
