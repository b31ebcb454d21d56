"""Compare finished runs across methods and settings: mean and 95% confidence interval over seeds
per metric, as a printed table, Markdown and PNG plots (``debiaslab compare``)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from debiaslab.errors import ConfigError
from debiaslab.fileio import write_text_atomic

GROUP_TAG, SEED_TAG, METHOD_TAG = "debiaslab.group", "debiaslab.seed", "debiaslab.method"
KIND_TAG, KIND_COMPARISON, KIND_STAGE = "debiaslab.kind", "comparison", "stage"
DEFAULT_METRICS = ("eval/fid", "eval/precision", "eval/recall", "eval/head_fid", "eval/tail_fid",
                   "eval/head_recall", "eval/tail_recall", "eval/fd_class")
LOWER_IS_BETTER = ("fid", "kid", "fd")  # a metric name containing one of these: lower is better
CONFIDENCE = 0.95
# params that differ between seeds of one setting, or only say where things were written
NOT_A_SETTING = ("name", "train.seed", "output_dir", "tracking.", "data.dataset_dir",
                 "distributed.storage_path", "debiaslab.")
MAX_SETTING_PARAMS = 4


@dataclass
class Summary:
    """Mean of a metric over a group's runs with a two-sided t confidence interval."""

    mean: float
    half_width: float  # nan with one run
    n: int
    values: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, values: Sequence[float], confidence: float = CONFIDENCE) -> "Summary":
        from scipy import stats

        v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
        if len(v) == 0:
            return cls(math.nan, math.nan, 0, [])
        if len(v) == 1:
            return cls(float(v[0]), math.nan, 1, v.tolist())
        sem = v.std(ddof=1) / math.sqrt(len(v))
        half = float(stats.t.ppf(0.5 + confidence / 2, len(v) - 1) * sem)
        return cls(float(v.mean()), half, len(v), v.tolist())

    def format(self, digits: int = 3) -> str:
        if self.n == 0:
            return "-"
        if self.n == 1 or not math.isfinite(self.half_width):
            return f"{self.mean:.{digits}g}"
        return f"{self.mean:.{digits}g} ± {self.half_width:.2g}"


@dataclass
class Group:
    """Runs of one setting (differing only by seed)."""

    name: str
    method: str
    setting: dict[str, str]
    runs: list[Any]
    metrics: dict[str, Summary]

    @property
    def seeds(self) -> list[str]:
        return sorted({r.tags.get(SEED_TAG, r.params.get("train.seed", "?")) for r in self.runs})


def lower_is_better(metric: str) -> bool:
    """FID, KID and fairness discrepancy (any ``_``-separated part of the name, e.g.
    ``eval/tail_fid``, ``eval/fd_class``) are distances: lower is better."""
    return any(part in LOWER_IS_BETTER for part in metric.rsplit("/", 1)[-1].split("_"))


def _is_setting(key: str) -> bool:
    return not any(key == p or (p.endswith(".") and key.startswith(p)) for p in NOT_A_SETTING)


def group_runs(runs: Sequence[Any], metrics: Sequence[str], by: Sequence[str] = ()
               ) -> list[Group]:
    """Group runs by the params ``by`` (default: the ``debiaslab.group`` tag, else run name),
    summarise each metric, and list the params that distinguish the groups."""
    if not runs:
        raise ConfigError("compare: no finished runs matched")
    buckets: dict[str, list[Any]] = {}
    for run in runs:
        if by:
            key = ", ".join(f"{k}={run.params.get(k, '?')}" for k in by)
        else:
            key = run.tags.get(GROUP_TAG) or run.name or run.run_id
        buckets.setdefault(key, []).append(run)
    # params constant within each group but different across groups = the "setting"
    keys = sorted({k for run in runs for k in run.params if _is_setting(k)})
    varying = [k for k in keys
               if len({tuple(sorted({r.params.get(k) for r in rs})) for rs in buckets.values()}) > 1
               and all(len({r.params.get(k) for r in rs}) == 1 for rs in buckets.values())]
    groups = []
    for key, rs in buckets.items():
        method = rs[0].tags.get(METHOD_TAG) or rs[0].params.get("diffusion.loss", "")
        setting = {k: rs[0].params.get(k, "") for k in (list(by) or varying)[:MAX_SETTING_PARAMS]}
        summaries = {m: Summary.of([r.metrics.get(m) for r in rs]) for m in metrics}
        groups.append(Group(key, method, setting, rs, summaries))
    return groups


def check_metrics(runs: Sequence[Any], metrics: Sequence[str]) -> None:
    """Every requested metric must be reported by at least one run (one-line error otherwise)."""
    reported = {m for r in runs for m in r.metrics}
    missing = [m for m in metrics if m not in reported]
    if missing:
        eval_like = sorted(m for m in reported if m.startswith("eval/") and m.count("/") == 1)
        raise ConfigError(f"compare: no run reports {', '.join(missing)}; reported: "
                          f"{', '.join(eval_like or sorted(reported)[:20])}")


def table_rows(groups: Sequence[Group], metrics: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for g in groups:
        row: dict[str, Any] = {"group": g.name, "method": g.method, "seeds": len(g.runs)}
        row.update({k: v for k, v in g.setting.items()})
        row.update({m: g.metrics[m].format() for m in metrics})
        rows.append(row)
    return rows


def best_groups(groups: Sequence[Group], metric: str) -> set[str]:
    means = [(g.metrics[metric].mean, g.name) for g in groups if g.metrics[metric].n]
    if not means:
        return set()
    best = (min if lower_is_better(metric) else max)(m for m, _ in means)
    return {name for m, name in means if m == best}


def to_markdown(groups: Sequence[Group], metrics: Sequence[str], title: str = "") -> str:
    """A Markdown table; the best mean per metric in bold; arrows give the better direction."""
    rows = table_rows(groups, metrics)
    columns = list(rows[0].keys())
    header = [c if c not in metrics else f"{c} {'↓' if lower_is_better(c) else '↑'}"
              for c in columns]
    best = {m: best_groups(groups, m) for m in metrics}
    lines = [f"### {title}", ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"**{row[c]}**" if c in metrics and row["group"] in best[c] else str(row[c])
                 for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Mean ± half-width of the {CONFIDENCE:.0%} t-interval over seeds "
                 f"(n = seeds per row).")
    return "\n".join(lines) + "\n"


def comparison_figure(groups: Sequence[Group], metrics: Sequence[str], title: str = "") -> Any:
    """One panel per metric: a bar per group at the mean, CI error bar, one dot per seed."""
    from debiaslab.report import _new_figure

    cols = min(4, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig = _new_figure((3.2 * cols, 2.8 * rows + 0.4))
    colors = [f"C{i % 10}" for i in range(len(groups))]
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, i + 1)
        for j, g in enumerate(groups):
            s = g.metrics[metric]
            if not s.n:
                continue
            err = s.half_width if math.isfinite(s.half_width) else 0.0
            ax.bar(j, s.mean, color=colors[j], alpha=0.6, yerr=err, capsize=4)
            ax.scatter([j] * s.n, s.values, color="black", s=8, zorder=3)
        ax.set_xticks(range(len(groups)), [g.name for g in groups], rotation=30, ha="right",
                      fontsize=7)
        ax.set_title(f"{metric} {'↓' if lower_is_better(metric) else '↑'}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


@dataclass
class Comparison:
    groups: list[Group]
    metrics: list[str]
    markdown: str
    files: dict[str, Path]
    mlflow_run_id: str | None = None


def compare(
    tracking_uri: str,
    *,
    experiments: Sequence[str] = (),
    tags: Mapping[str, str] | None = None,
    run_ids: Sequence[str] = (),
    metrics: Sequence[str] = DEFAULT_METRICS,
    by: Sequence[str] = (),
    out_dir: str | os.PathLike[str] = "outputs/compare",
    log_to: str | None = None,
) -> Comparison:
    """Read finished runs from MLflow (by experiment + tags, or run ids), group seeds, and write
    compare.md / compare.png to ``out_dir``; with ``log_to`` (an experiment name) also log them
    to a new MLflow run tagged ``debiaslab.kind=comparison`` (comparison runs are never read)."""
    from debiaslab.report import save_figure
    from debiaslab.tracking import Tracker, find_runs

    if not experiments and not run_ids:
        raise ConfigError("compare: name an --experiment or --run-ids")
    runs = [r for r in find_runs(tracking_uri, experiments=experiments, tags=tags,
                                 run_ids=run_ids)
            if r.tags.get(KIND_TAG) not in (KIND_COMPARISON, KIND_STAGE)]
    if not runs:
        raise ConfigError(f"compare: no finished runs in {', '.join(experiments or run_ids)}"
                          + (f" with tags {dict(tags)}" if tags else ""))
    metrics = list(metrics)
    check_metrics(runs, metrics)
    groups = sorted(group_runs(runs, metrics, by), key=lambda g: g.name)
    title = f"{', '.join(experiments) or 'selected runs'}: {len(runs)} runs, {len(groups)} groups"
    markdown = to_markdown(groups, metrics, title)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md_path = out / "compare.md"
    write_text_atomic(md_path, markdown)
    files = {"markdown": md_path,
             "plot": save_figure(comparison_figure(groups, metrics, title), out / "compare.png")}
    result = Comparison(groups, metrics, markdown, files)
    if log_to:
        with Tracker(out, log_to, "compare", tags={KIND_TAG: KIND_COMPARISON},
                     tracking_uri=tracking_uri) as tracker:
            for path in files.values():
                tracker.log_artifact(path, "compare")
            tracker.log_params({"runs": len(runs), "groups": len(groups),
                                "metrics": ",".join(metrics)})
            result.mlflow_run_id = tracker.run_id
    return result
