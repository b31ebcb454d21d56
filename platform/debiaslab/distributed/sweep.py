"""Ray Tune + Optuna sweeps (configs/sweeps/*.yaml) against metrics logged in MLflow: one parent
run per sweep, one child run per trial, resumable with ``Tuner.restore``."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from debiaslab.compare import KIND_TAG
from debiaslab.config import ExperimentConfig, absolute_paths, to_dict
from debiaslab.errors import ConfigError, DebiaslabError
from debiaslab.fileio import write_text_atomic
from debiaslab.sweeps import (
    TRAIN_METRICS,
    SweepConfig,
    check_objectives,
    importance_and_scatter_figures,
    pareto_front,
    ranking_key,
    trial_config,
)

from .runtime import init_ray, limit_threads, ray_env, shutdown_ray

STATE_FILE = "debiaslab_sweep.json"  # parent MLflow run id, beside Tune's experiment state
SWEEP_TAG, TRIAL_TAG, PARENT_TAG = "debiaslab.sweep", "debiaslab.trial_id", "mlflow.parentRunId"
PROBE_IMAGES = 64  # reference images evaluated once to learn which metrics trials report
RUNG_KEY = "rung"
STATE_SAVE_PERIOD_S = 1.0  # Tune experiment-state save period (TUNE_GLOBAL_CHECKPOINT_S)
ATTEMPTS_FILE = "attempts.txt"  # in the trial's run folder: one line per execution


@dataclass
class SweepResult:
    best_config: dict[str, Any]
    best_metrics: dict[str, float]
    best_trial_id: str
    trials: list[dict[str, Any]] = field(default_factory=list)
    parent_run_id: str = ""
    sweep_dir: Path = Path()
    restored: bool = False


# ------------------------------------------------------------------------------- search space


@dataclass(frozen=True)
class TrialOps:
    """The stage functions a trial runs, handed in by the caller (experiment.trial_ops), so this
    module never imports the orchestration layer above it."""

    train: Any  # (cfg, tracker=, progress=) -> result with .checkpoint and .metrics
    sample: Any  # (cfg, checkpoint, out_dir=, progress=, artifacts=) -> result with .artifacts
    evaluate_samples: Any  # (cfg, samples, extractor=, name=, out_dir=) -> Evaluation
    build_metric_extractor: Any  # (cfg) -> extractor
    reference_path: Any  # (cfg) -> Path
    recorded_outputs: Any = None  # (cfg) -> {artifact: path} the run's recipe recorded
    # the base run's recorded artifacts, which every trial's evaluation reads (run_sweep)
    inputs: dict[str, str] = field(default_factory=dict)
    # (base cfg, swept paths) -> {name: {path, hash}}: what a training trial's train stage reads
    # from the base run's earlier stages (e.g. TIW-DSM's discriminator), bound into its config
    train_inputs: Any = None


def param_space(sweep: SweepConfig) -> dict[str, Any]:
    """Tune's param_space dict (OptunaSearch converts it to Optuna distributions)."""
    from ray import tune

    builders = {
        "float": lambda s: tune.uniform(s.low, s.high),
        "log": lambda s: tune.loguniform(s.low, s.high),
        "int": lambda s: tune.randint(int(s.low), int(s.high) + 1),  # upper bound exclusive
        "categorical": lambda s: tune.choice(list(s.choices)),
    }
    return {path: builders[spec.type](spec) for path, spec in sweep.specs.items()}


def reported_metrics(sweep: SweepConfig, ops: TrialOps) -> set[str]:
    """Metric names a trial reports: one real evaluation of a few reference images (so the
    extractor, reference set and metric settings are the trials' own), plus training metrics."""
    from debiaslab.data.dataset import ImageDataset
    from debiaslab.metrics.evaluate import SampleSet
    cfg = sweep.base
    assert cfg is not None
    ref = ImageDataset.load(ops.reference_path(cfg))
    idx = np.linspace(0, len(ref.ids) - 1, min(PROBE_IMAGES, len(ref.ids))).astype(int)
    probe = SampleSet(ref.images.numpy()[idx], ref.labels.numpy()[idx], "probe")
    probe_cfg = dataclasses.replace(cfg, metrics=dataclasses.replace(cfg.metrics, bootstrap=0))
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        ev = ops.evaluate_samples(probe_cfg, probe, extractor=ops.build_metric_extractor(cfg),
                                  out_dir=Path(tmp), inputs=ops.inputs)
    names = {f"eval/{k}" for k in ev.metrics}
    if sweep.kind == "training":
        names |= set(TRAIN_METRICS)
    return names


def concurrent_trials(sweep: SweepConfig) -> int:
    """``max_concurrent_trials``, or as many trials as the cluster's CPUs (and GPUs) hold."""
    import ray

    if sweep.max_concurrent_trials:
        return sweep.max_concurrent_trials
    cfg = sweep.base
    assert cfg is not None
    cpus = sweep.cpus_per_trial
    gpus = sweep.gpus_per_trial
    if sweep.kind == "training":
        cpus += cfg.distributed.num_workers * cfg.distributed.cpus_per_worker
    resources = ray.cluster_resources()
    fits = [math.floor(resources.get("CPU", 1) / cpus)]
    if gpus > 0:
        fits.append(math.floor(resources.get("GPU", 0) / gpus))
    return max(1, min(fits))


# ------------------------------------------------------------------------------------- trials


def _trial_name(sweep_name: str, trial_id: str) -> str:
    return f"{sweep_name}-{trial_id}"


def _child_tracker(ctx: dict[str, Any], trial_id: str, name: str) -> Any:
    """The trial's MLflow child run: reused if a previous attempt of this trial created it."""
    from debiaslab.tracking import Tracker, find_runs

    tags = {SWEEP_TAG: ctx["sweep_name"], TRIAL_TAG: trial_id}
    existing = find_runs(ctx["tracking_uri"], experiments=[ctx["experiment"]], tags=tags,
                         statuses=())
    return Tracker(ctx["output_dir"], ctx["experiment"], name,
                   tags={**tags, PARENT_TAG: ctx["parent_run_id"], KIND_TAG: "trial"},
                   tracking_uri=ctx["tracking_uri"],
                   run_id=existing[0].run_id if existing else None, end_run=True)


def _rung_sizes(total: int, rungs: int) -> list[int]:
    return [math.ceil(total * r / rungs) for r in range(1, rungs + 1)]


def guidance_models(base: ExperimentConfig) -> dict[str, str]:
    """{artifact: checkpoint} of the BASE experiment's auxiliary models that its guidance
    entries with checkpoint "" use (each entry names its artifact): trials run under other
    names, so they must get these from the base run."""
    from debiaslab.diffusion.guidance import spec_fields
    from debiaslab.sampling import guidance_checkpoint

    out = {}
    for entry in base.sample.guidance:
        full = spec_fields(entry)
        if "checkpoint" in full and not full["checkpoint"]:
            artifact = str(full.get("artifact", "classifier"))
            out[artifact] = str(guidance_checkpoint(base, "", artifact))
    return out


def _sample_and_evaluate(cfg: ExperimentConfig, checkpoint: Path, trial_dir: Path,
                         done: list[Any], upto: int, extractor: Any, ops: TrialOps,
                         models: dict[str, str] | None = None) -> tuple[Any, Path]:
    """Sample seeds [seed_start + len(done), seed_start + upto) with the first sampler, add them
    to ``done`` and evaluate all of them (the same seed range in every trial)."""
    from debiaslab.data.dataset import ImageDataset
    from debiaslab.metrics.evaluate import SampleSet
    s = cfg.sample
    have = sum(len(d.ids) for d in done)
    sampler = s.samplers[0]
    if upto > have:
        part = dataclasses.replace(cfg, sample=dataclasses.replace(
            s, seed_start=s.seed_start + have, num_samples=upto - have, samplers=(sampler,)),
            distributed=dataclasses.replace(cfg.distributed, backend="local"))
        res = ops.sample(part, checkpoint, out_dir=trial_dir / f"samples-{have:06d}",
                         progress=False, artifacts=models or None)
        done.append(ImageDataset.load(res.artifacts[f"samples_{sampler}"]))
    images = np.concatenate([d.images.numpy() for d in done])
    labels = np.concatenate([d.labels.numpy() for d in done])
    has_labels = bool((labels >= 0).all())
    samples = SampleSet(images, labels if has_labels else None, f"{cfg.name}/{sampler}")
    ev = ops.evaluate_samples(cfg, samples, extractor=extractor, name=sampler,
                              out_dir=trial_dir / "eval", inputs=ops.inputs)
    grid = trial_dir / f"samples-{0:06d}" / f"grid_{sampler}.png"
    return ev, grid


def run_trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """One Tune trial: the base experiment with this trial's values; sampling trials reuse the
    fixed checkpoint, training trials train it with Ray Train first. Reports after each rung."""
    from ray import tune

    from debiaslab.sweeps import load_sweep

    ray_env()
    ops: TrialOps = ctx["ops"]
    sweep = load_sweep(ctx["sweep_file"], ctx["sweep_overrides"])
    limit_threads(sweep.cpus_per_trial)  # the trial samples and evaluates in this process
    trial_id = tune.get_context().get_trial_id()
    name = _trial_name(sweep.name, trial_id)
    cfg = absolute_paths(trial_config(sweep, dict(config), name))
    cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(
        cfg.tracking, run_name=name, group=name))
    if sweep.kind == "training" and ctx.get("train_inputs"):  # the base run's, as it bound them
        cfg = dataclasses.replace(cfg, inputs=dict(ctx["train_inputs"]))
    trial_dir = cfg.run_dir
    trial_dir.mkdir(parents=True, exist_ok=True)
    with open(trial_dir / ATTEMPTS_FILE, "a", encoding="utf-8") as fh:  # one line per attempt
        fh.write(f"{os.getpid()}\n")
    extractor = ops.build_metric_extractor(cfg)
    done: list[Any] = []
    stopped: SystemExit | None = None
    with _child_tracker(ctx, trial_id, name) as tracker:
        tracker.log_config(to_dict(cfg))
        tracker.log_params({f"sweep.{k}": v for k, v in config.items()})
        steps = _rung_sizes(cfg.train.steps, sweep.rungs)
        sizes = _rung_sizes(cfg.sample.num_samples, sweep.rungs)
        checkpoint = Path(ctx["checkpoint"]) if ctx["checkpoint"] else None
        for rung in range(1, sweep.rungs + 1):
            metrics: dict[str, float] = {}
            if sweep.kind == "training":  # each rung trains further (Ray Train resumes the run)
                rung_cfg = dataclasses.replace(cfg, train=dataclasses.replace(
                    cfg.train, steps=steps[rung - 1]), distributed=dataclasses.replace(
                    cfg.distributed, backend="ray"))
                trained = ops.train(rung_cfg, tracker=tracker, progress=False)
                checkpoint = trained.checkpoint
                done = []  # a new checkpoint: the samples are new too
                metrics.update({k: v for k, v in trained.metrics.items()})
                sample_upto = cfg.sample.num_samples
            else:
                sample_upto = sizes[rung - 1]
            assert checkpoint is not None
            ev, grid = _sample_and_evaluate(cfg, checkpoint, trial_dir, done, sample_upto,
                                            extractor, ops, ctx.get("models"))
            metrics.update({f"eval/{k}": float(v) for k, v in ev.metrics.items()
                            if v is not None})
            tracker.log_metrics(metrics, step=rung)
            if grid.is_file():
                tracker.log_artifact(grid, "samples")
            try:
                tune.report({**metrics, RUNG_KEY: rung, "samples": sample_upto})
            except SystemExit as exc:  # Tune stops a trial (ASHA, last rung) with sys.exit(0)
                if exc.code not in (0, None):
                    raise
                tracker.set_tag("debiaslab.stopped_early", str(rung < sweep.rungs).lower())
                stopped = exc
                break
        else:
            tracker.set_tag("debiaslab.stopped_early", "false")
    if stopped is not None:  # the child run is closed (FINISHED): now let Tune end the thread
        raise stopped


# ------------------------------------------------------------------------------------ driver


def _read_state(sweep_dir: Path) -> dict[str, Any]:
    path = sweep_dir / STATE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _write_state(sweep_dir: Path, state: dict[str, Any]) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(sweep_dir / STATE_FILE, json.dumps(state, indent=2) + "\n")


def _sampling_checkpoint(sweep: SweepConfig, recorded: dict[str, str]) -> str:
    """The score model every sampling trial loads: ``checkpoint`` if the sweep names one, else
    the base run's train-stage record (``recorded``: its recorded outputs; a stage found up to
    date may point into another run's folder), else the base run folder's latest checkpoint."""
    from debiaslab.checkpoints import resolve_checkpoint

    assert sweep.base is not None
    target = sweep.checkpoint or recorded.get("score_model") or str(sweep.base.run_dir)
    try:
        return str(resolve_checkpoint(target))
    except DebiaslabError:
        raise ConfigError(f"checkpoint: no trained checkpoint at {target}; train the base "
                          f"experiment first (debiaslab train --config {sweep.experiment})"
                          ) from None


def run_sweep(sweep_file: str | os.PathLike[str], overrides: list[str] | None = None, *,
              ops: TrialOps, progress: bool = True) -> SweepResult:
    """Run (or resume) the sweep of ``sweep_file``: validate everything first, then Tune with
    OptunaSearch (TPE, multi-objective with a second objective, or a grid) and optional ASHA,
    each trial logging to an MLflow child run of the sweep's parent run."""
    from debiaslab.sweeps import load_sweep

    sweep = load_sweep(sweep_file, overrides)
    if ops.recorded_outputs is not None and sweep.base is not None:
        ops = dataclasses.replace(ops, inputs=dict(ops.recorded_outputs(sweep.base)))
    reported = reported_metrics(sweep, ops)
    check_objectives(sweep, reported)
    checkpoint = _sampling_checkpoint(sweep, ops.inputs) if sweep.kind == "sampling" else ""
    base = sweep.base
    assert base is not None
    bound: dict[str, Any] = {}
    if sweep.kind == "training" and ops.train_inputs is not None:
        bound = ops.train_inputs(base, list(sweep.specs))
    models = guidance_models(base)
    import ray

    started = False
    if not ray.is_initialized():
        init_ray(base.distributed.address,
                 object_store_memory_gb=base.distributed.object_store_memory_gb)
        started = True
    try:
        return _tune(sweep, str(Path(sweep_file).resolve()), list(overrides or []), checkpoint,
                     progress, ops, models, bound)
    finally:
        if started:
            shutdown_ray()


def _tune(sweep: SweepConfig, sweep_file: str, overrides: list[str], checkpoint: str,
          progress: bool, ops: TrialOps, models: dict[str, str] | None = None,
          train_inputs: dict[str, Any] | None = None) -> SweepResult:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from debiaslab.tracking import Tracker, resolve_tracking_uri

    base = sweep.base
    assert base is not None
    # Tune saves its experiment state every few seconds (adaptive); a trial created after the
    # last save is unknown on restore and would be run again under a new id. Save often.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", str(STATE_SAVE_PERIOD_S))
    sweep_dir = sweep.sweep_dir
    state = _read_state(sweep_dir)
    restorable = tune.Tuner.can_restore(str(sweep_dir))
    tracking_uri = resolve_tracking_uri(base.output_dir)
    experiment = base.tracking.experiment
    parent_id = state.get("parent_run_id") if restorable else None
    parent = Tracker(base.output_dir, experiment, sweep.name,
                     tags={SWEEP_TAG: sweep.name, KIND_TAG: "sweep"}, tracking_uri=tracking_uri,
                     run_id=parent_id, end_run=True)
    with parent:
        if parent_id is None:
            parent.log_params({"sweep.kind": sweep.kind, "sweep.search": sweep.search,
                               "sweep.num_trials": sweep.num_trials,
                               "sweep.objective": sweep.objective.metric,
                               "sweep.experiment": sweep.experiment,
                               **{f"space.{k}": json.dumps(dataclasses.asdict(v))
                                  for k, v in sweep.specs.items()}})
            _write_state(sweep_dir, {"parent_run_id": parent.run_id, "sweep_file": sweep_file})
        ctx = {"sweep_file": sweep_file, "sweep_overrides": overrides,
               "sweep_name": sweep.name, "tracking_uri": tracking_uri,
               "experiment": experiment, "output_dir": str(Path(base.output_dir).resolve()),
               "parent_run_id": parent.run_id, "checkpoint": checkpoint, "ops": ops,
               "models": dict(models or {}), "train_inputs": dict(train_inputs or {})}
        trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx),
                                        {"cpu": sweep.cpus_per_trial,
                                         "gpu": sweep.gpus_per_trial})
        objectives = sweep.objectives
        metric, mode = objectives[0].metric, objectives[0].mode
        if restorable:
            tuner = tune.Tuner.restore(str(sweep_dir), trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            multi = len(objectives) > 1
            import optuna

            sampler = (optuna.samplers.GridSampler(
                {path: list(spec.choices) for path, spec in sweep.specs.items()}, seed=sweep.seed)
                if sweep.search == "grid" else
                optuna.samplers.TPESampler(seed=sweep.seed, n_startup_trials=sweep.startup_trials))
            searcher = OptunaSearch(
                metric=[o.metric for o in objectives] if multi else metric,
                mode=[o.mode for o in objectives] if multi else mode, sampler=sampler)
            scheduler = None
            if sweep.scheduler.type == "asha":
                scheduler = ASHAScheduler(time_attr="training_iteration", metric=metric,
                                          mode=mode, max_t=sweep.rungs,
                                          grace_period=sweep.scheduler.grace_period,
                                          reduction_factor=sweep.scheduler.reduction_factor)
            tuner = tune.Tuner(
                trainable,
                param_space=param_space(sweep),
                tune_config=tune.TuneConfig(
                    search_alg=searcher, scheduler=scheduler, num_samples=sweep.num_trials,
                    max_concurrent_trials=concurrent_trials(sweep),
                    reuse_actors=True,  # one process runs trial after trial: no re-imports
                    trial_name_creator=lambda t: _trial_name(sweep.name, t.trial_id),
                    trial_dirname_creator=lambda t: _trial_name(sweep.name, t.trial_id)),
                run_config=tune.RunConfig(name=sweep.name, storage_path=str(sweep.storage),
                                          verbose=1 if progress else 0),
            )
        grid = tuner.fit()
        errors = [r.error for r in grid if r.error is not None]
        trials = [{"trial_id": r.metrics.get("trial_id", ""), "params": dict(r.config),
                   "rung": int(r.metrics.get(RUNG_KEY, 0)),
                   "metrics": {k: v for k, v in r.metrics.items()
                               if isinstance(v, (int, float)) and "/" in k}}
                  for r in grid if r.metrics]
        if not trials:
            raise DebiaslabError(f"sweep {sweep.name}: no trial reported a result "
                                 f"(first error: {errors[0] if errors else 'none'})")
        _end_open_children(tracking_uri, experiment, sweep.name,
                           {t["trial_id"]: t["rung"] for t in trials}, sweep.rungs)
        best = _best_result(grid, sweep.objectives, sweep.rungs)
        result = SweepResult(best_config=dict(best.config),
                             best_metrics={k: v for k, v in best.metrics.items()
                                           if isinstance(v, (int, float)) and "/" in k},
                             best_trial_id=str(best.metrics.get("trial_id", "")),
                             trials=trials, parent_run_id=parent.run_id, sweep_dir=sweep_dir,
                             restored=restorable)
        _log_summary(parent, sweep, result)
    return result


def _best_result(grid: Any, objectives: list[Any], rungs: int) -> Any:
    """The best trial among those that reached the last rung (an early-stopped trial's FID is
    on fewer samples or training steps, so not comparable; all trials if none did): the first
    objective decides, ties are broken by the second (sweeps.ranking_key)."""
    metric = objectives[0].metric
    results = [r for r in grid if r.metrics and r.metrics.get(metric) is not None]
    complete = [r for r in results if int(r.metrics.get(RUNG_KEY, 0)) == rungs] or results
    return min(complete, key=lambda r: ranking_key(r.metrics, objectives))


def _end_open_children(tracking_uri: str, experiment: str, sweep_name: str,
                       last_rung: dict[str, int], rungs: int) -> None:
    """No child run is left RUNNING. Tune stops a trial's actor at its final report (or
    earlier, by ASHA) before the trial closes its run: those end FINISHED, tagged
    ``debiaslab.stopped_early`` when stopped before the last rung; a trial Tune never recorded
    (driver killed before its state was saved) ends KILLED, tagged ``debiaslab.lost_trial``,
    and is soft-deleted (MLflow's deleted view keeps it)."""
    from debiaslab.tracking import end_run, find_runs

    for run in find_runs(tracking_uri, experiments=[experiment],
                         tags={SWEEP_TAG: sweep_name, KIND_TAG: "trial"},
                         statuses=("RUNNING",)):
        trial_id = run.tags.get(TRIAL_TAG, "")
        if trial_id in last_rung:
            early = last_rung[trial_id] < rungs
            end_run(tracking_uri, run.run_id, "FINISHED",
                    tags={"debiaslab.stopped_early": str(early).lower()})
        else:  # its work is redone by another trial: keep no duplicate child in the view
            end_run(tracking_uri, run.run_id, "KILLED", tags={"debiaslab.lost_trial": "true"},
                    delete=True)


def _log_summary(parent: Any, sweep: SweepConfig, result: SweepResult) -> None:
    """Best config and metrics, a trials table, importance and objective-vs-parameter plots."""
    from debiaslab.report import markdown_table, save_figure

    parent.log_params({f"best.{k}": v for k, v in result.best_config.items()})
    parent.set_tag("best_trial_id", result.best_trial_id)
    parent.log_metrics({f"best/{k}": v for k, v in result.best_metrics.items()})
    out = result.sweep_dir / "summary"
    out.mkdir(parents=True, exist_ok=True)
    metric_cols = [o.metric for o in sweep.objectives]
    trials = sorted(result.trials, key=lambda t: ranking_key(t["metrics"], sweep.objectives))
    front = pareto_front([t["metrics"] for t in trials], sweep.objectives)
    rows = [{"trial": t["trial_id"], **t["params"], "rung": t["rung"],
             **{m: t["metrics"].get(m) for m in metric_cols},
             **({"pareto": "yes" if on else ""} if len(metric_cols) > 1 else {})}
            for t, on in zip(trials, front)]
    table = write_text_atomic(out / "trials.md", markdown_table(rows))
    parent.log_artifact(table, "sweep")
    for name, fig in importance_and_scatter_figures(sweep, result.trials).items():
        parent.log_artifact(save_figure(fig, out / f"{name}.png"), "sweep")
