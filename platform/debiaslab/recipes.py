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
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

from debiaslab.config import ExperimentConfig, to_dict
from debiaslab.errors import ConfigError
from debiaslab.registry import Registry

ArtifactKind = Literal["dataset", "side_table", "checkpoint", "samples", "evaluation"]
ARTIFACT_KINDS = ("dataset", "side_table", "checkpoint", "samples", "evaluation")
Backend = Literal["local", "ray"]
STAGE_TAG = "debiaslab.stage"

RECORD_DIR = "stages"
RECORD_VERSION = 1

RECIPES: Registry = Registry("recipe")


def log(msg: str) -> None:
    print(f"[debiaslab] {msg}", flush=True)


@dataclass(frozen=True)
class Artifact:
    """A stage output: its kind, where it is, and a content hash of what is there."""

    kind: str
    path: str
    hash: str

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "path": self.path, "hash": self.hash}


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


StageFn = Callable[[ExperimentConfig, StageContext], StageOutput]


@dataclass(frozen=True)
class Stage:
    """One step of a recipe.

    ``inputs`` / ``outputs`` map artifact names to kinds; ``keys`` are the dotted config keys
    (or sections, ending in ".") whose values define the output; ``run_suffix`` names the stage's
    own run (``<name>.<suffix>``; "" shares the experiment's run folder, like the score model).
    """

    name: str
    fn: StageFn
    inputs: Mapping[str, str] = field(default_factory=dict)
    outputs: Mapping[str, str] = field(default_factory=dict)
    keys: tuple[str, ...] = ()
    backend: Backend = "local"
    run_suffix: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        for name, kind in {**self.inputs, **self.outputs}.items():
            if kind not in ARTIFACT_KINDS:
                raise ValueError(f"stage {self.name}: artifact {name} has unknown kind {kind!r}")

    def run_name(self, cfg: ExperimentConfig) -> str:
        return f"{cfg.name}.{self.run_suffix}" if self.run_suffix else cfg.name


@dataclass(frozen=True)
class Recipe:
    """An ordered list of stages whose inputs are produced by earlier stages (checked)."""

    name: str
    stages: tuple[Stage, ...]
    description: str = ""
    check: Callable[[ExperimentConfig], None] | None = None  # extra config rules of the method
    # extra metrics of the method, computed wherever samples are evaluated (evaluate stage,
    # `debiaslab evaluate`, sweep trials): (cfg, SampleSet, extractor, {artifact: path} of the
    # run's recorded stage outputs) -> (metrics, provenance for the evaluation's meta)
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
    import debiaslab.methods  # noqa: F401  (method modules register their recipes)

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


def stage_config(cfg: ExperimentConfig, stage: Stage) -> ExperimentConfig:
    """The config a stage runs with: its backend resolved (distributed.backend local or ray)."""
    backend = resolve_backend(cfg, stage)
    if cfg.distributed.backend == backend:
        return cfg
    return dataclasses.replace(cfg, distributed=dataclasses.replace(cfg.distributed,
                                                                    backend=backend))


# ----------------------------------------------------------------------------- hashing / records


def config_values(cfg: ExperimentConfig, keys: Sequence[str]) -> dict[str, Any]:
    """{key: value} for dotted keys; a key ending in "." selects a whole section."""
    flat = _flatten(to_dict(cfg))
    out: dict[str, Any] = {}
    for key in keys:
        if key.endswith("."):
            out.update({k: v for k, v in flat.items() if k.startswith(key)})
        elif key in flat:
            out[key] = flat[key]
        else:
            raise ValueError(f"stage key {key!r} is not a config key")
    return out


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and all(isinstance(x, str) for x in v):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def stage_key(stage: Stage, cfg: ExperimentConfig, inputs: Mapping[str, Artifact]) -> str:
    blob = json.dumps({"stage": stage.name, "config": config_values(cfg, stage.keys),
                       "inputs": {k: inputs[k].hash for k in sorted(stage.inputs)}},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def record_path(cfg: ExperimentConfig, stage: Stage) -> Path:
    return cfg.run_dir / RECORD_DIR / f"{stage.name}.json"


def read_record(cfg: ExperimentConfig, stage: Stage) -> dict[str, Any] | None:
    path = record_path(cfg, stage)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("version") == RECORD_VERSION else None


def recorded_outputs(cfg: ExperimentConfig) -> dict[str, str]:
    """{artifact name: path} of every stage output recorded in the run folder (what a method's
    evaluation or a sweep trial reads of the run that produced its checkpoint)."""
    out: dict[str, str] = {}
    folder = cfg.run_dir / RECORD_DIR
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("version") == RECORD_VERSION:
            out.update({k: str(v.get("path", "")) for k, v in record.get("outputs", {}).items()
                        if isinstance(v, dict)})
    return out


def write_record(cfg: ExperimentConfig, stage: Stage, key: str, output: StageOutput) -> Path:
    from debiaslab.fileio import write_text_atomic

    path = record_path(cfg, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"version": RECORD_VERSION, "stage": stage.name, "key": key,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "outputs": {k: a.to_json() for k, a in output.artifacts.items()},
              "metrics": output.metrics}
    return write_text_atomic(path, json.dumps(record, indent=2, sort_keys=True))


def up_to_date(cfg: ExperimentConfig, stage: Stage, key: str) -> dict[str, Artifact] | None:
    """The recorded outputs when the stage already ran with this key and they are intact."""
    record = read_record(cfg, stage)
    if record is None or record.get("key") != key:
        return None
    outputs = {k: Artifact(**v) for k, v in record.get("outputs", {}).items()}
    if set(outputs) != set(stage.outputs):
        return None
    for artifact in outputs.values():
        if artifact_hash(artifact.kind, Path(artifact.path)) != artifact.hash:
            return None
    return outputs


def artifact_hash(kind: str, path: Path) -> str | None:
    """Content hash of an artifact on disk (None when it is missing or unreadable)."""
    try:
        if kind in ("dataset", "side_table"):
            return _manifest_hash(path)
        if kind == "samples":  # a folder of per-sampler datasets
            parts = sorted(p for p in path.iterdir() if (p / "dataset.json").is_file())
            if not parts:
                return None
            joined = "".join(f"{p.name}:{_manifest_hash(p)};" for p in parts)
            return hashlib.sha256(joined.encode()).hexdigest()
        return file_hash(path)
    except (OSError, ValueError, KeyError):
        return None


def _manifest_hash(path: Path) -> str:
    """The content hash a dataset's (or side table's) manifest records, provided every data
    file it lists is still there with its recorded size (a cheap check; readers verify the
    bytes against the hash when they load)."""
    for name in ("dataset.json", "side_table.json"):
        if (path / name).is_file():
            manifest = json.loads((path / name).read_text())
            files = manifest.get("shards") or manifest.get("files") or []
            for entry in files:
                file = entry["file"] if isinstance(entry, dict) else entry
                size = entry.get("bytes") if isinstance(entry, dict) else None
                stat = (path / file).stat()  # FileNotFoundError: the artifact is incomplete
                if size is not None and stat.st_size != int(size):
                    raise ValueError(f"{path / file}: size changed")
            return str(manifest["content_hash"])
    raise FileNotFoundError(path)


def file_hash(path: Path) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative names and bytes)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    if not files:
        raise FileNotFoundError(path)
    for f in files:
        if f != path:
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def make_artifact(kind: str, path: Path | str) -> Artifact:
    path = Path(path)
    digest = artifact_hash(kind, path)
    if digest is None:
        raise ConfigError(f"stage output {path} ({kind}) is missing or unreadable")
    return Artifact(kind, str(path), digest)


# ----------------------------------------------------------------------------- walking


@dataclass
class RecipeResult:
    """Per stage: its outputs and whether it ran or was skipped; the parent MLflow run id."""

    outputs: dict[str, Artifact] = field(default_factory=dict)
    stages: dict[str, StageOutput] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
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
        scfg = stage_config(cfg, stage)
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
        output = run_stage(scfg, stage, inputs, parent=parent, force=force, progress=progress)
        write_record(scfg, stage, key, output)
        result.outputs.update(output.artifacts)
        result.stages[stage.name] = output
        result.metrics.update(output.metrics)


def run_stage(cfg: ExperimentConfig, stage: Stage, inputs: dict[str, Artifact], *,
              parent: Any = None, force: bool = False, progress: bool = True) -> StageOutput:
    """Run one stage (in an MLflow child run of ``parent`` when given)."""
    if parent is None:
        return _checked(stage, stage.fn(cfg, StageContext(inputs, None, progress, force)))
    from debiaslab.compare import KIND_STAGE, KIND_TAG
    from debiaslab.tracking import Tracker

    tags = {"mlflow.parentRunId": parent.run_id, KIND_TAG: KIND_STAGE, STAGE_TAG: stage.name}
    with Tracker(cfg.output_dir, cfg.tracking.experiment, f"{cfg.name}/{stage.name}",
                 tags=tags, tracking_uri=parent.tracking_uri) as child:
        child.log_params({f"stage.{k}": v for k, v in config_values(cfg, stage.keys).items()})
        for name, artifact in inputs.items():
            child.set_tag(f"input.{name}", f"{artifact.path}@{artifact.hash[:12]}")
        output = _checked(stage, stage.fn(cfg, StageContext(inputs, child, progress, force)))
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
    """Where stage ``stage_name`` of the config's recipe runs (the same rule as run_recipe)."""
    if cfg.distributed.backend != "auto":
        return cfg.distributed.backend  # type: ignore[return-value]
    import debiaslab.methods  # noqa: F401

    recipe = RECIPES.get(cfg.recipe)
    for stage in recipe.stages:
        if stage.name == stage_name:
            return stage.backend
    return "local"
