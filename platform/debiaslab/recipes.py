"""Methods as recipes of stages.

A :class:`Recipe` is an ordered list of :class:`Stage` s. Each stage declares typed inputs and
outputs (artifacts: a dataset, a side table, a checkpoint, samples, an evaluation), the config
keys that define its output, a default backend (local or Ray) and its own run name. `debiaslab run`
walks the recipe the config names (:func:`run_recipe`); every stage also runs alone.

Skipping: a stage's key is a hash of its config keys and the hashes of its inputs. After a stage
succeeds its record (key, outputs with their hashes) is written to ``<run_dir>/stages/<stage>.json``
(atomically); the next run skips the stage when the key matches and every output still exists with
the recorded hash, and says so.

MLflow: one parent run per experiment (``cfg.name``), one child run per executed stage
(``<name>/<stage>``, tag ``debiaslab.kind=stage``) holding that stage's params, metrics and
artifacts. The stage's summary metrics are also copied to the parent, so comparisons and sweeps
read one run per experiment.

Backends are chosen in one place, :func:`stage_config`: ``distributed.backend: auto`` takes the
stage's default, ``local`` or ``ray`` forces every stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence

from debiaslab.config import ExperimentConfig, register_validator, to_dict
from debiaslab.errors import ConfigError
from debiaslab.progress import log
from debiaslab.records import (  # noqa: F401  (the record API, re-exported for stage authors)
    RECORD_DIR,
    RECORD_VERSION,
    Artifact,
    artifact_hash,
    config_values,
    file_hash,
    make_artifact,
    read_record,
    record_path,
    recorded_outputs,
    up_to_date,
    write_record,
)
from debiaslab.registry import Registry
from debiaslab.strict import check_registered

ArtifactKind = Literal["dataset", "side_table", "checkpoint", "samples", "evaluation"]
ARTIFACT_KINDS = ("dataset", "side_table", "checkpoint", "samples", "evaluation")
Backend = Literal["local", "ray"]
STAGE_TAG = "debiaslab.stage"

RECIPES: Registry = Registry("recipe")


@register_validator
def check_recipe_name(cfg: ExperimentConfig) -> None:
    """config.validate's hook: ``recipe`` names a registered recipe."""
    check_registered("recipe", cfg.recipe, RECIPES)


@dataclass
class StageOutput:
    """What a stage function returns."""

    artifacts: dict[str, Artifact] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # copied to the parent run
    result: Any = None  # anything the caller of the stage may want (e.g. StageResult)


@dataclass
class StageContext:
    """What a running stage gets besides its config."""

    inputs: dict[str, Artifact]
    tracker: Any = None  # the stage's MLflow child run (None when tracking is off)
    progress: bool = True
    force: bool = False
    backend: Backend = "local"  # where this stage runs (resolve_backend), decided once


StageFn = Callable[[ExperimentConfig, StageContext], StageOutput]


@dataclass(frozen=True)
class Stage:
    """One step of a recipe.

    ``inputs`` / ``outputs`` map artifact names to kinds; ``keys`` are the dotted config keys
    (or sections, ending in ".") whose values define the output, or a function returning them
    when they depend on what is registered (the train stage reads every section that affects
    training); ``run_suffix`` names the stage's own run (``<name>.<suffix>``; "" shares the
    experiment's run folder, like the score model).
    """

    name: str
    fn: StageFn
    inputs: Mapping[str, str] = field(default_factory=dict)
    outputs: Mapping[str, str] = field(default_factory=dict)
    keys: tuple[str, ...] | Callable[[], tuple[str, ...]] = ()
    backend: Backend = "local"
    run_suffix: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        for name, kind in {**self.inputs, **self.outputs}.items():
            if kind not in ARTIFACT_KINDS:
                raise ValueError(f"stage {self.name}: artifact {name} has unknown kind {kind!r}")

    def run_name(self, cfg: ExperimentConfig) -> str:
        return f"{cfg.name}.{self.run_suffix}" if self.run_suffix else cfg.name

    def key_names(self) -> tuple[str, ...]:
        """The config keys that define this stage's output."""
        return tuple(self.keys() if callable(self.keys) else self.keys)


@dataclass(frozen=True)
class Recipe:
    """An ordered list of stages whose inputs are produced by earlier stages (checked)."""

    name: str
    stages: tuple[Stage, ...]
    description: str = ""
    check: Callable[[ExperimentConfig], None] | None = None  # extra config rules of the method
    # extra metrics of the method, computed wherever samples are evaluated (evaluate stage,
    # `debiaslab evaluate`, sweep trials): (cfg, SampleSet, extractor, {artifact: path} of the
    # run's recorded stage outputs) -> (metrics, provenance for the evaluation's meta, whose
    # optional "figures": {name: Figure} are saved as <name>_<samples>.png beside the
    # evaluation and logged with it)
    evaluation: Callable[..., tuple[dict[str, float], dict[str, Any]]] | None = None

    def __post_init__(self) -> None:
        produced: dict[str, str] = {}
        for stage in self.stages:
            for name, kind in stage.inputs.items():
                if name not in produced:
                    raise ValueError(f"recipe {self.name}: stage {stage.name} reads {name!r}, "
                                     f"which no earlier stage produces")
                if produced[name] != kind:
                    raise ValueError(f"recipe {self.name}: stage {stage.name} reads {name!r} as "
                                     f"{kind}, but it is a {produced[name]}")
            produced.update(stage.outputs)

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise ConfigError(f"recipe {self.name} has no stage {name!r}; stages: "
                          f"{', '.join(s.name for s in self.stages)}")


def requires(recipe: str, key: str, value: str) -> Callable[[ExperimentConfig], None]:
    """A Recipe.check: config key ``key`` (dotted) must equal ``value``."""
    def check(cfg: ExperimentConfig) -> None:
        have = config_values(cfg, [key])[key]
        if have != value:
            raise ConfigError(f"recipe {recipe}: needs {key}: {value}, got {have!r}")
    return check


def register_recipe(recipe: Recipe) -> Recipe:
    RECIPES.register(recipe.name)(recipe)
    return recipe


def get_recipe(cfg: ExperimentConfig) -> Recipe:
    """The config's recipe (registered by the method plugins), its own config rules checked."""
    recipe = RECIPES.get(cfg.recipe)
    if recipe.check is not None:
        recipe.check(cfg)
    return recipe


# ----------------------------------------------------------------------------- backend choice


def resolve_backend(cfg: ExperimentConfig, stage: Stage) -> Backend:
    """The one place that chooses where a stage runs: distributed.backend auto -> the stage's
    default; local or ray -> that, for every stage."""
    setting = cfg.distributed.backend
    return stage.backend if setting == "auto" else setting  # type: ignore[return-value]


def bind_inputs(cfg: ExperimentConfig, inputs: Mapping[str, Artifact]) -> ExperimentConfig:
    """The config a stage runs with, holding its input artifacts (``cfg.inputs``): what Ray
    workers receive and what a training stage's checkpoint records. The stage key already holds
    the inputs' content hashes, so a new input re-runs the stage."""
    bound = {k: {"path": a.path, "hash": a.hash} for k, a in sorted(inputs.items())}
    return dataclasses.replace(cfg, inputs=bound)


def stage_config(cfg: ExperimentConfig, stage: Stage) -> ExperimentConfig:
    """The config a stage runs with: its backend resolved (distributed.backend local or ray)."""
    backend = resolve_backend(cfg, stage)
    if cfg.distributed.backend == backend:
        return cfg
    return dataclasses.replace(cfg, distributed=dataclasses.replace(cfg.distributed,
                                                                    backend=backend))


# ----------------------------------------------------------------------------- stage keys


def stage_key(stage: Stage, cfg: ExperimentConfig, inputs: Mapping[str, Artifact]) -> str:
    """sha256 of the stage's name, its config keys' values and its inputs' content hashes."""
    blob = json.dumps({"stage": stage.name, "config": config_values(cfg, stage.key_names()),
                       "inputs": {k: inputs[k].hash for k in sorted(stage.inputs)}},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


# ----------------------------------------------------------------------------- walking


@dataclass
class RecipeResult:
    """Per stage: its outputs and whether it ran or was skipped; the parent MLflow run id."""

    outputs: dict[str, Artifact] = field(default_factory=dict)
    stages: dict[str, StageOutput] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each stage that ran
    mlflow_run_id: str | None = None


def run_recipe(cfg: ExperimentConfig, *, only: Sequence[str] = (), force: bool = False,
               progress: bool = True, parent_tags: Mapping[str, str] | None = None,
               before: Callable[[ExperimentConfig], None] | None = None) -> RecipeResult:
    """Run the config's recipe (or only the named stages, whose inputs must already exist).

    ``before(cfg)`` runs after the stage records are read but before any MLflow run opens
    (preflight checks such as resume compatibility)."""
    recipe = get_recipe(cfg)
    wanted = list(only) or [s.name for s in recipe.stages]
    for name in wanted:
        recipe.stage(name)
    result = RecipeResult()
    if before is not None:
        before(cfg)
    tracker_cm = None
    if cfg.tracking.enabled:
        from debiaslab.tracking import Tracker

        tracker_cm = Tracker(cfg.output_dir, cfg.tracking.experiment,
                             cfg.tracking.run_name or cfg.name, tags=dict(parent_tags or {}))
    if tracker_cm is None:
        _walk(cfg, recipe, wanted, result, None, force, progress)
        return result
    with tracker_cm as parent:
        parent.log_config(to_dict(cfg))
        _walk(cfg, recipe, wanted, result, parent, force, progress)
        if result.metrics:
            parent.log_metrics(result.metrics, step=cfg.train.steps)
        if result.skipped:
            parent.set_tag("debiaslab.skipped_stages", ",".join(result.skipped))
        result.mlflow_run_id = parent.run_id
    return result


def _walk(cfg: ExperimentConfig, recipe: Recipe, wanted: list[str], result: RecipeResult,
          parent: Any, force: bool, progress: bool) -> None:
    for stage in recipe.stages:
        if stage.name not in wanted:
            record = read_record(cfg, stage)  # an earlier run's outputs feed later stages
            if record is not None:
                result.outputs.update({k: Artifact(**v) for k, v in record["outputs"].items()})
            continue
        missing = [k for k in stage.inputs if k not in result.outputs]
        if missing:
            raise ConfigError(f"stage {stage.name} needs {', '.join(missing)}; run the earlier "
                              f"stages of recipe {recipe.name} first")
        inputs = {k: result.outputs[k] for k in stage.inputs}
        scfg = bind_inputs(stage_config(cfg, stage), inputs)
        key = stage_key(stage, scfg, inputs)
        done = None if force else up_to_date(scfg, stage, key)
        if done is not None:
            log(f"stage {stage.name}: up to date (inputs {key[:12]}), skipped")
            result.outputs.update(done)
            result.skipped.append(stage.name)
            record = read_record(scfg, stage) or {}
            result.metrics.update(record.get("metrics", {}))
            continue
        log(f"stage {stage.name}: running ({resolve_backend(cfg, stage)})")
        start = time.monotonic()
        output = run_stage(scfg, stage, inputs, parent=parent, force=force, progress=progress)
        result.seconds[stage.name] = time.monotonic() - start
        log(f"stage {stage.name}: done in {result.seconds[stage.name]:.0f} s")
        write_record(scfg, stage, key, output.artifacts, output.metrics)
        result.outputs.update(output.artifacts)
        result.stages[stage.name] = output
        result.metrics.update(output.metrics)


def run_stage(cfg: ExperimentConfig, stage: Stage, inputs: dict[str, Artifact], *,
              parent: Any = None, force: bool = False, progress: bool = True) -> StageOutput:
    """Run one stage (in an MLflow child run of ``parent`` when given) on its resolved backend."""
    backend = resolve_backend(cfg, stage)
    if parent is None:
        return _checked(stage, stage.fn(cfg, StageContext(inputs, None, progress, force,
                                                          backend)))
    from debiaslab.compare import KIND_STAGE, KIND_TAG
    from debiaslab.tracking import Tracker

    tags = {"mlflow.parentRunId": parent.run_id, KIND_TAG: KIND_STAGE, STAGE_TAG: stage.name}
    with Tracker(cfg.output_dir, cfg.tracking.experiment, f"{cfg.name}/{stage.name}",
                 tags=tags, tracking_uri=parent.tracking_uri) as child:
        child.log_params({f"stage.{k}": v
                          for k, v in config_values(cfg, stage.key_names()).items()})
        for name, artifact in inputs.items():
            child.set_tag(f"input.{name}", f"{artifact.path}@{artifact.hash[:12]}")
        output = _checked(stage, stage.fn(cfg, StageContext(inputs, child, progress, force,
                                                            backend)))
        for name, artifact in output.artifacts.items():
            child.set_tag(f"output.{name}", f"{artifact.path}@{artifact.hash[:12]}")
    return output


def _checked(stage: Stage, output: StageOutput) -> StageOutput:
    missing = set(stage.outputs) - set(output.artifacts)
    if missing:
        raise RuntimeError(f"stage {stage.name} did not produce {', '.join(sorted(missing))}")
    for name, artifact in output.artifacts.items():
        if stage.outputs.get(name) not in (None, artifact.kind):
            raise RuntimeError(f"stage {stage.name}: output {name} is a {artifact.kind}, "
                               f"declared {stage.outputs[name]}")
    return output


def backend_of(cfg: ExperimentConfig, stage_name: str) -> Backend:
    """Where stage ``stage_name`` of the config's recipe runs (the same rule as run_recipe), for
    callers outside a recipe walk (``debiaslab train``, sweep trials); a stage the recipe does not
    have is a ConfigError, never a silent "local"."""
    return resolve_backend(cfg, RECIPES.get(cfg.recipe).stage(stage_name))
