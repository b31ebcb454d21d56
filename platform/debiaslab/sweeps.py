"""Sweep definitions (configs/sweeps/*.yaml): a base experiment, a search space over config
paths, objectives and trial resources; validated before any trial starts. Ray-free: the Tune
side is in distributed/sweep.py."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from debiaslab.config import (
    ExperimentConfig,
    check_name,
    from_dict,
    load_config,
    validate,
)
from debiaslab.errors import ConfigError
from debiaslab.strict import apply_overrides, from_mapping, load_yaml, set_path

SWEEP_KINDS = ("sampling", "training")
# config sections a sampling trial may change (the checkpoint is fixed)
SAMPLING_SECTIONS = ("sample.", "metrics.")
TRAIN_METRICS = ("train/loss", "train/grad_norm")


@dataclass
class ParamSpec:
    """One search dimension: float (uniform), log (log-uniform), int, or categorical."""

    type: Literal["float", "log", "int", "categorical"] = "float"
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] = ()


@dataclass
class Objective:
    metric: str = ""
    mode: Literal["min", "max"] = "min"

    def key(self, metrics: dict[str, Any]) -> float:
        """Smaller is better: the metric (min) or its negation (max); +inf when missing."""
        value = metrics.get(self.metric)
        if value is None or not isinstance(value, (int, float)) or value != value:
            return float("inf")
        return float(value) if self.mode == "min" else -float(value)


def ranking_key(metrics: dict[str, Any], objectives: list[Objective]) -> tuple[float, ...]:
    """Lexicographic rank of a trial: the first objective, ties broken by the second."""
    return tuple(o.key(metrics) for o in objectives)


def pareto_front(all_metrics: list[dict[str, Any]], objectives: list[Objective]) -> list[bool]:
    """Per trial: no other trial is at least as good on every objective and better on one."""
    keys = [ranking_key(m, objectives) for m in all_metrics]

    def dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
        return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))

    return [not any(dominates(other, k) for other in keys) and all(v != float("inf") for v in k)
            for k in keys]


@dataclass
class SchedulerSpec:
    """ASHA (Li et al. 2020) on the trial's intermediate reports (``rungs`` of them)."""

    type: Literal["none", "asha"] = "none"
    grace_period: int = 1
    reduction_factor: float = 2.0


@dataclass
class SweepConfig:
    """A sweep over a base experiment; ``params`` maps config paths to ParamSpecs."""

    name: str = "sweep"
    experiment: str = ""  # base experiment YAML (relative paths: from the sweep file's repo)
    overrides: tuple[str, ...] = ()
    kind: Literal["sampling", "training"] = "sampling"
    checkpoint: str = ""  # sampling: checkpoint file or run folder (default: the base run)
    params: dict[str, Any] = field(default_factory=dict)
    # tpe: Optuna's TPE (random for the first startup_trials); grid: every combination of the
    # categorical choices once (Optuna's GridSampler), e.g. to trace a trade-off curve
    search: Literal["tpe", "grid"] = "tpe"
    objective: Objective = field(default_factory=lambda: Objective("eval/fid", "min"))
    second_objective: Objective = field(default_factory=Objective)  # metric "" = single
    num_trials: int = 6
    rungs: int = 1  # intermediate evaluations per trial (ASHA decides on them)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent_trials: int = 0  # 0: from the cluster's resources
    seed: int = 0  # Optuna TPE seed
    startup_trials: int = 10  # TPE's random trials before it models the objective (Optuna: 10)
    storage_path: str = ""  # default <base output_dir>/ray_results

    # filled by load_sweep
    specs: dict[str, ParamSpec] = field(default_factory=dict, repr=False)
    base: ExperimentConfig | None = field(default=None, repr=False)
    base_raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def objectives(self) -> list[Objective]:
        return [self.objective] + ([self.second_objective] if self.second_objective.metric else [])

    @property
    def storage(self) -> Path:
        assert self.base is not None
        raw = self.storage_path or str(Path(self.base.output_dir) / "ray_results")
        return Path(raw).resolve()

    @property
    def sweep_dir(self) -> Path:
        return self.storage / self.name


def _resolve(path: str, sweep_file: Path | None) -> Path:
    p = Path(path)
    if p.is_absolute() or p.exists() or sweep_file is None:
        return p
    # configs/sweeps/x.yaml -> repo root is two levels up
    candidate = sweep_file.resolve().parents[2] / p
    return candidate if candidate.exists() else p


SPEC_KEYS = {"type", "low", "high", "choices"}


def flatten_params(params: dict[str, Any]) -> dict[str, Any]:
    """``{"cbdm": {"tau": {...spec}}}`` and ``{"cbdm.tau": {...spec}}`` alike -> dotted paths;
    entries for the same path are merged (``--set params.cbdm.tau.low=0.5`` nests that way)."""
    flat: dict[str, Any] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, dict) and value and not SPEC_KEYS & set(value):
                walk(value, path)
            elif isinstance(value, dict) and isinstance(flat.get(path), dict):
                flat[path].update(value)
            else:
                flat[path] = dict(value) if isinstance(value, dict) else value

    walk(params, "")
    return flat


def check_spec(path: str, spec: ParamSpec) -> None:
    """Ranges must be non-empty and ordered; log ranges positive; choices non-empty."""
    where = f"params.{path}"
    if spec.type == "categorical":
        if not spec.choices:
            raise ConfigError(f"{where}: categorical needs a non-empty choices list")
        return
    if spec.low is None or spec.high is None:
        raise ConfigError(f"{where}: {spec.type} needs low and high")
    if not (math.isfinite(spec.low) and math.isfinite(spec.high)):
        raise ConfigError(f"{where}: low and high must be finite")
    if spec.low >= spec.high:
        raise ConfigError(f"{where}: empty or inverted range [{spec.low}, {spec.high}]")
    if spec.type == "log" and spec.low <= 0:
        raise ConfigError(f"{where}: log range needs low > 0, got {spec.low}")
    if spec.type == "int" and not (float(spec.low).is_integer() and float(spec.high).is_integer()):
        raise ConfigError(f"{where}: int range needs integer bounds")


def trial_config(sweep: SweepConfig, values: dict[str, Any], name: str) -> ExperimentConfig:
    """The base experiment with one trial's values (``{config path: value}``) applied."""
    overrides = [*sweep.overrides, f"name={name}"]
    raw = apply_overrides(dict(sweep.base_raw), overrides)
    for path, value in values.items():
        set_path(raw, path, value, f"params.{path}")
    cfg = from_dict(raw)
    validate(cfg)
    return cfg


def probe_values(sweep: SweepConfig) -> list[dict[str, Any]]:
    """Both ends of every range (and every choice), to validate the space before any trial."""
    corners = []
    for path, spec in sweep.specs.items():
        values = list(spec.choices) if spec.type == "categorical" else [spec.low, spec.high]
        if spec.type == "int":
            values = [int(v) for v in values]
        corners.extend({path: v} for v in values)
    return corners


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    """Load and fully validate a sweep YAML: unknown keys, ranges, parameter paths (each range
    end applied to the base experiment and validated), kind-specific rules. Objective metrics
    are checked against what trials report in distributed.sweep (needs the extractor)."""
    sweep_file = Path(path)
    raw = apply_overrides(load_yaml(sweep_file), overrides or [])
    sweep = from_mapping(SweepConfig, {k: v for k, v in raw.items()
                                     if k not in ("specs", "base", "base_raw")})
    check_name("name", sweep.name)  # the sweep's folder and its trials' run names
    if not sweep.experiment:
        raise ConfigError(f"{sweep_file}: experiment: name the base experiment YAML")
    base_path = _resolve(sweep.experiment, sweep_file)
    sweep.experiment = str(base_path)
    sweep.base_raw = load_yaml(base_path)
    sweep.base = load_config(base_path, list(sweep.overrides))
    sweep.params = flatten_params(sweep.params)
    if not sweep.params:
        raise ConfigError(f"{sweep_file}: params: the search space is empty")
    for key, value in sweep.params.items():
        if not isinstance(value, dict):
            raise ConfigError(f"params.{key}: expected a mapping with type/low/high or choices")
        spec = from_mapping(ParamSpec, value, f"params.{key}")
        check_spec(key, spec)
        if sweep.kind == "sampling" and not key.startswith(SAMPLING_SECTIONS):
            raise ConfigError(f"params.{key}: a sampling sweep reuses one checkpoint and can only "
                              f"vary {', '.join(s + '*' for s in SAMPLING_SECTIONS)}")
        sweep.specs[key] = spec
    if sweep.search == "grid":
        sweep.num_trials = _grid_size(sweep, "num_trials" in raw)
    for values in probe_values(sweep):  # unknown paths / bad values fail here, one line each
        try:
            trial_config(sweep, values, f"{sweep.name}-probe")
        except ConfigError as exc:
            key = next(iter(values))
            raise ConfigError(f"params.{key}: {exc}") from None
    positive = {"num_trials": sweep.num_trials, "rungs": sweep.rungs,
                "startup_trials": sweep.startup_trials,
                "cpus_per_trial": sweep.cpus_per_trial,
                "scheduler.grace_period": sweep.scheduler.grace_period}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be > 0, got {value}")
    if sweep.max_concurrent_trials < 0 or sweep.gpus_per_trial < 0:
        raise ConfigError("max_concurrent_trials and gpus_per_trial must be >= 0")
    if sweep.scheduler.type == "asha" and sweep.rungs < 2:
        raise ConfigError("scheduler.type=asha: needs rungs >= 2 (intermediate evaluations)")
    if not sweep.objective.metric:
        raise ConfigError("objective.metric: name the metric to optimise, e.g. eval/fid")
    return sweep


def _grid_size(sweep: SweepConfig, num_trials_given: bool) -> int:
    """``search: grid`` runs each combination of categorical choices once: their count."""
    size = 1
    for key, spec in sweep.specs.items():
        if spec.type != "categorical":
            raise ConfigError(f"params.{key}: search: grid needs a categorical choices list, "
                              f"got type {spec.type}")
        if len({repr(c) for c in spec.choices}) < len(spec.choices):
            raise ConfigError(f"params.{key}: choices repeat a value; list each once")
        size *= len(spec.choices)
    if num_trials_given and sweep.num_trials != size:
        raise ConfigError(f"num_trials: search: grid runs each of its {size} combinations once; "
                          f"drop num_trials or set it to {size}")
    return size


def check_objectives(sweep: SweepConfig, reported: set[str]) -> None:
    """Every objective must be a metric trials report (one line listing what they do)."""
    for obj in sweep.objectives:
        if obj.metric not in reported:
            raise ConfigError(f"objective metric {obj.metric!r} is not reported by any trial; "
                              f"trials report: {', '.join(sorted(reported))}")


# ------------------------------------------------------------------------------ results plots


def importance_and_scatter_figures(sweep: SweepConfig, trials: list[dict[str, Any]]
                                   ) -> dict[str, Any]:
    """Parameter importance (Optuna's fANOVA on the finished trials), every objective against
    every parameter (with the mean per choice of a categorical one, where trials repeat it),
    and with two objectives their front. ``trials``: [{"params": {...}, "metrics": {...}}]."""
    import optuna

    from debiaslab.report import _new_figure

    metric = sweep.objective.metric
    done = [t for t in trials if _finite(t["metrics"].get(metric))]
    figures: dict[str, Any] = {}
    if not done:
        return figures
    paths = list(sweep.specs)
    objectives = sweep.objectives
    fig = _new_figure((max(5.0, 3.4 * len(paths)), 2.9 * len(objectives) + 0.4))
    for row, objective in enumerate(objectives):
        for col, p in enumerate(paths):
            ax = fig.add_subplot(len(objectives), len(paths), row * len(paths) + col + 1)
            _objective_vs_param(ax, sweep.specs[p], p, objective.metric, done)
    fig.suptitle(f"{sweep.name}: objectives vs parameters ({len(done)} trials)", fontsize=10)
    fig.tight_layout()
    figures["objective_vs_params"] = fig
    if len(objectives) == 2:
        figures["front"] = front_figure(sweep, done)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = {p: _distribution(s) for p, s in sweep.specs.items()}
    study = optuna.create_study(direction="minimize" if sweep.objective.mode == "min"
                                else "maximize")
    for t in done:
        study.add_trial(optuna.trial.create_trial(
            params={p: t["params"][p] for p in paths}, distributions=dists,
            value=float(t["metrics"][metric])))
    fig = _new_figure((5.0, 0.8 + 0.45 * len(paths)))
    ax = fig.add_subplot(1, 1, 1)
    values = {float(t["metrics"][metric]) for t in done}
    try:  # fANOVA needs at least two trials with different objective values
        if len(values) < 2:
            raise RuntimeError("all finished trials have the same objective value")
        importances = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names])
        ax.set_xlabel(f"importance for {metric} (fANOVA, {len(done)} trials)")
    except RuntimeError as exc:  # e.g. optuna's "zero total variance in all trees"
        ax.text(0.5, 0.5, f"importance undefined:\n{exc}", ha="center", va="center",
                fontsize=8, transform=ax.transAxes)
        ax.set_axis_off()
    fig.tight_layout()
    figures["param_importance"] = fig
    return figures


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(float(value))


def _objective_vs_param(ax: Any, spec: ParamSpec, path: str, metric: str,
                        trials: list[dict[str, Any]]) -> None:
    """One scatter panel; a categorical parameter's choices in their listed order, joined by
    the mean of the trials at each (where a grid repeats them, e.g. over seeds)."""
    done = [t for t in trials if _finite(t["metrics"].get(metric))]
    xs = [t["params"][path] for t in done]
    ys = [float(t["metrics"][metric]) for t in done]
    if spec.type == "categorical":
        labels = [str(c) for c in spec.choices]
        xs = [labels.index(str(x)) for x in xs]
        ax.set_xticks(range(len(labels)), labels)
        means = [(i, sum(y for x, y in zip(xs, ys) if x == i) / xs.count(i))
                 for i in range(len(labels)) if i in xs]
        if len(means) < len(xs):
            ax.plot(*zip(*means), color="0.4", lw=1, label="mean")
            ax.legend(fontsize=7)
    ax.scatter(xs, ys, s=18)
    if spec.type == "log":
        ax.set_xscale("log")
    ax.set_xlabel(path)
    ax.set_ylabel(metric)


def front_figure(sweep: SweepConfig, trials: list[dict[str, Any]]) -> Any:
    """The two objectives against each other, each trial labelled with its parameters, the
    Pareto front (``pareto_front``) joined by a line."""
    from debiaslab.report import _new_figure

    first, second = sweep.objectives
    done = [t for t in trials
            if _finite(t["metrics"].get(first.metric)) and _finite(t["metrics"].get(second.metric))]
    fig = _new_figure((6.0, 4.6))
    ax = fig.add_subplot(1, 1, 1)
    xs = [float(t["metrics"][second.metric]) for t in done]
    ys = [float(t["metrics"][first.metric]) for t in done]
    on = pareto_front([t["metrics"] for t in done], sweep.objectives)
    ax.scatter(xs, ys, s=22, c=["C3" if o else "C0" for o in on])
    front = sorted((x, y) for x, y, o in zip(xs, ys, on) if o)
    if front:
        ax.plot(*zip(*front), color="C3", lw=1, label="Pareto front")
        ax.legend(fontsize=8)
    for t, x, y in zip(done, xs, ys):
        label = ", ".join(f"{p.rsplit('.', 1)[-1]}={_short(v)}" for p, v in t["params"].items()
                          if p in sweep.specs)
        ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"{second.metric} ({second.mode})")
    ax.set_ylabel(f"{first.metric} ({first.mode})")
    ax.set_title(f"{sweep.name}: {len(done)} trials", fontsize=10)
    fig.tight_layout()
    return fig


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _distribution(spec: ParamSpec) -> Any:
    import optuna

    if spec.type == "categorical":
        return optuna.distributions.CategoricalDistribution(list(spec.choices))
    if spec.type == "int":
        return optuna.distributions.IntDistribution(int(spec.low), int(spec.high))
    return optuna.distributions.FloatDistribution(spec.low, spec.high, log=spec.type == "log")
