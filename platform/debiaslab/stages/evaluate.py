"""The evaluate stage: metric features, the reference set, the metrics of every sampler's samples
(plus the recipe's own), and the evaluation table with its reliability marks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from debiaslab.config import ExperimentConfig
from debiaslab.data.locate import train_data_path
from debiaslab.errors import DataError
from debiaslab.progress import log
from debiaslab.stages.common import StageResult
from debiaslab.stages.data import check_recipe, data_recipe, recipe_kwargs


def extract_features(cfg: ExperimentConfig, dataset: Path | None = None,
                     out: Path | None = None) -> Path:
    """Metric features (cfg.metrics.extractor) of a dataset folder as Parquet, by a Ray Data
    actor pool with the distributed.map_* settings."""
    from debiaslab.distributed.data import extract_features_job
    from debiaslab.distributed.runtime import ray_session

    dataset = dataset or train_data_path(cfg)
    out = out or (Path(cfg.output_dir).resolve() / "features"
                  / f"{Path(str(dataset)).name}-{cfg.metrics.extractor}")
    d = cfg.distributed
    options = extractor_options(cfg)
    with ray_session(d.address, object_store_memory_gb=d.object_store_memory_gb):
        return extract_features_job(dataset, cfg.metrics.extractor, out,
                                    extractor_options=options,
                                    concurrency=d.map_concurrency, batch_size=d.map_batch_size,
                                    num_cpus=d.map_num_cpus, num_gpus=d.map_num_gpus)


EVAL_TABLE_COLUMNS = ["samples", "fid", "kid", "precision", "recall", "density", "coverage",
                      "head_fid", "tail_fid", "head_recall", "tail_recall", "fd_class",
                      "avg_knn", "lof", "rarity"]


def reference_path(cfg: ExperimentConfig) -> Path:
    """The evaluation reference: ``metrics.reference`` or the source's full, balanced set
    (built on first use, e.g. all 1,797 digits)."""
    from debiaslab.config import DataConfig, dataset_key
    from debiaslab.data.sources import build_dataset

    if cfg.metrics.reference:
        path = Path(cfg.metrics.reference).resolve()
        if not (path / "dataset.json").is_file():
            raise DataError(f"{path}: metrics.reference is not a dataset folder (no dataset.json)")
        return path
    full = DataConfig(source=cfg.data.source, path=cfg.data.path,
                      source_options=dict(cfg.data.source_options), imbalance="none",
                      seed=cfg.data.seed)
    path = Path(cfg.output_dir).resolve() / "data" / f"{dataset_key(full)}-reference"
    recipe = data_recipe(full)
    if (path / "dataset.json").is_file():
        from debiaslab.data.schema import read_manifest

        check_recipe(path, read_manifest(path).extra.get("build", {}), recipe)
    else:
        build_dataset(full.source, path, **recipe_kwargs(recipe))
        log(f"built reference set {path}")
    return path


def extractor_options(cfg: ExperimentConfig) -> dict[str, Any]:
    """Keyword options of cfg.metrics.extractor (the Inception weights file, if given)."""
    if cfg.metrics.extractor == "inception" and cfg.metrics.inception_weights:
        return {"weights_path": cfg.metrics.inception_weights}
    return {}


def build_metric_extractor(cfg: ExperimentConfig) -> Any:
    from debiaslab.metrics.features import build_extractor

    return build_extractor(cfg.metrics.extractor, **extractor_options(cfg))


def evaluate_samples(cfg: ExperimentConfig, samples: Any, *, extractor: Any = None,
                     tracker: Any = None, name: str = "samples", progress: bool = False,
                     out_dir: Path | None = None, inputs: Any = None) -> Any:
    """Evaluate a SampleSet (or a path to one) with cfg.metrics, plus the recipe's own
    metrics (Recipe.evaluation, given ``inputs``: {artifact: path}, by default the run's recorded
    stage outputs); write eval JSON and plots."""
    from debiaslab.metrics.evaluate import SampleSet, evaluate, load_samples, save_evaluation
    from debiaslab.report import evaluation_figures, save_figure

    extractor = extractor or build_metric_extractor(cfg)
    if not isinstance(samples, SampleSet):
        samples = load_samples(samples, getattr(extractor, "input_shape", None))
    class_counts = None
    train_manifest = train_data_path(cfg) / "dataset.json"
    if train_manifest.is_file():
        from debiaslab.data.schema import read_manifest

        class_counts = list(read_manifest(train_data_path(cfg)).class_counts)
    m = cfg.metrics
    ev = evaluate(samples, reference_path(cfg), extractor, k=m.k, lof_k=m.lof_k,
                  head_fraction=m.head_fraction, class_counts=class_counts,
                  bootstrap=m.bootstrap, kid_subset_size=m.kid_subset_size,
                  batch_size=m.batch_size, seed=m.seed, progress=progress)
    own_figures = recipe_evaluation(cfg, samples, extractor, ev, inputs)
    out = Path(out_dir) if out_dir else cfg.run_dir / "eval"
    json_path = save_evaluation(ev, out / f"eval_{name}.json")
    figures = {}
    for fig_name, fig in {**evaluation_figures(ev, title=f"{cfg.name} / {name}"),
                          **own_figures}.items():
        figures[fig_name] = save_figure(fig, out / f"{fig_name}_{name}.png")
    if tracker is not None:
        tracker.log_artifact(json_path, "eval")
        for path in figures.values():
            tracker.log_artifact(path, "eval")
        tracker.log_metrics({f"eval/{name}/{k}": v for k, v in ev.metrics.items()},
                            step=cfg.train.steps)
        tracker.set_tag("eval.extractor", ev.meta["extractor"])
        tracker.set_tag("eval.reference", f"{ev.meta['reference_name']}@"
                                          f"{ev.meta['reference_hash'][:12]}")
    return ev


def recipe_evaluation(cfg: ExperimentConfig, samples: Any, extractor: Any, ev: Any,
                      inputs: Any = None) -> dict[str, Any]:
    """Add the recipe's own metrics and their provenance to ``ev`` (no-op for recipes without);
    returns the figures it made ({name: Figure}, the meta's ``figures``), which the caller saves
    beside the evaluation and logs with it."""
    from debiaslab.recipes import RECIPES, recorded_outputs

    recipe = RECIPES.get(cfg.recipe)
    if recipe.evaluation is None:
        return {}
    if inputs is None:
        inputs = recorded_outputs(cfg)
    paths = {k: str(getattr(v, "path", v)) for k, v in dict(inputs).items()}
    metrics, meta = recipe.evaluation(cfg, samples, extractor, paths)
    meta = dict(meta)
    figures = dict(meta.pop("figures", {}))
    ev.metrics.update(metrics)
    ev.meta.update(meta)
    return figures


KID_MIN_SAMPLES = 50  # below it the table shows no KID: its estimate is mostly variance


PER_CLASS_FID = ("head_fid", "tail_fid")


def eval_row(label: str, ev: Any) -> dict[str, Any]:
    """One row of the evaluation table. Estimators that are unreliable at the sample count are
    flagged, not printed bare (eval_notes explains the marks): KID as mean ± std (its unbiased
    estimate goes below 0 when no difference is detectable), hidden below KID_MIN_SAMPLES;
    per-class FID marked ``*`` when a class has fewer samples than feature dimensions."""
    row: dict[str, Any] = {"samples": label,
                           **{k: ev.metrics.get(k) for k in EVAL_TABLE_COLUMNS[1:]}}
    n = ev.meta.get("num_samples")
    if row.get("kid") is not None:
        std = ev.metrics.get("kid_std")
        if n is not None and n < KID_MIN_SAMPLES:
            row["kid"] = f"n/a (n<{KID_MIN_SAMPLES})"
        elif std is not None:
            row["kid"] = f"{row['kid']:.3g} ± {std:.2g}"
    if _few_per_class(ev):
        for key in PER_CLASS_FID:
            if row.get(key) is not None:
                row[key] = f"{row[key]:.4g}*"
    return row


def _few_per_class(ev: Any) -> tuple[int, int] | None:
    """(fewest samples of a class, feature dimensions) when the first is below the second."""
    dim = ev.meta.get("feature_dim")
    counts = [int(r["n_fake"]) for r in getattr(ev, "per_class", []) or [] if r.get("n_fake")]
    if dim and counts and min(counts) < dim:
        return min(counts), int(dim)
    return None


def eval_notes(evaluations: Any) -> list[str]:
    """The footnotes of the table's marks, for the evaluations that have them."""
    notes = ["kid: unbiased MMD^2 estimate, mean ± std over subsets; values at or below 0 mean "
             "no difference is detectable at this sample count"]
    few = [f for f in (_few_per_class(ev) for ev in evaluations) if f]
    if few:
        n, dim = min(few)
        notes.append(f"*: per-class FID from as few as {n} samples per class, fewer than the "
                     f"{dim} feature dimensions (singular covariance): biased high; compare "
                     f"only at equal sample counts")
    return notes


def evaluate_run(cfg: ExperimentConfig, result: StageResult, *, tracker: Any = None,
                 progress: bool = False, inputs: Any = None) -> None:
    """Evaluate every sampler's samples of a run; the first sampler's metrics are also logged
    without the sampler in the name (``eval/fid``), the namespace sweeps and comparisons use."""
    from debiaslab.report import format_table

    extractor = build_metric_extractor(cfg)
    for i, name in enumerate(cfg.sample.samplers):
        ev = evaluate_samples(cfg, result.artifacts[f"samples_{name}"], extractor=extractor,
                              tracker=tracker, name=name, progress=progress, inputs=inputs)
        result.evaluations[name] = ev
        if i == 0:
            result.metrics.update(ev.prefixed("eval"))
    rows = [eval_row(f"{cfg.name}/{n}", ev) for n, ev in result.evaluations.items()]
    log(f"evaluation ({extractor.name} features vs "
        f"{next(iter(result.evaluations.values())).meta['reference_name']}):\n"
        + format_table(rows, EVAL_TABLE_COLUMNS) + "\n"
        + "\n".join(f"  {note}" for note in eval_notes(result.evaluations.values())))


def evaluate_stage(cfg: ExperimentConfig, ctx: Any) -> Any:
    """Metrics of every sampler's samples against the reference set."""
    from debiaslab.recipes import StageOutput, make_artifact

    folder = Path(ctx.inputs["samples"].path)
    result = StageResult(run_dir=cfg.run_dir)
    for name in cfg.sample.samplers:
        result.artifacts[f"samples_{name}"] = folder / name
    evaluate_run(cfg, result, tracker=ctx.tracker, progress=False, inputs=ctx.inputs)
    metrics = dict(result.metrics)  # eval/<metric> of the first sampler, eval/<sampler>/...
    for name, ev in result.evaluations.items():
        metrics.update({f"eval/{name}/{k}": v for k, v in ev.metrics.items()})
    return StageOutput(artifacts={"evaluation": make_artifact("evaluation",
                                                              cfg.run_dir / "eval")},
                       metrics=metrics, result=result)
