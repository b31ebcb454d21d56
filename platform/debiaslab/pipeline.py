"""Stage functions (data build, train, sample, whole experiment) called by the CLI and jobs/."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from debiaslab.config import ExperimentConfig, dump_yaml, training_keys
from debiaslab.data.locate import load_training_data, train_data_path
from debiaslab.errors import DataError
from debiaslab.fileio import write_text_atomic
from debiaslab.progress import log  # noqa: F401  (methods import log from here)

REPO_ROOT = Path(__file__).resolve().parents[2]
GRID_COLUMNS = 10
GRID_SCALE = 2  # 16x16 digits are easier to read enlarged


def on_ray(cfg: ExperimentConfig, stage: str, backend: str | None = None) -> bool:
    """Whether ``stage`` runs on Ray: ``backend`` when the caller knows it (a running stage's
    StageContext.backend), else the recipe's rule (recipes.backend_of)."""
    if backend is not None:
        return backend == "ray"
    from debiaslab.recipes import backend_of

    return backend_of(cfg, stage) == "ray"


# ------------------------------------------------------------------------------------ data


def build_data(cfg: ExperimentConfig, *, force: bool = False) -> Path:
    """Build the configured dataset as Parquet shards (reused when it already exists and was
    built from the same recipe; a folder built from another recipe is refused, not reused)."""
    from debiaslab.data.schema import read_manifest
    from debiaslab.data.sources import build_dataset

    out = cfg.dataset_path
    recipe = data_recipe(cfg.data)
    if not force and train_data_path(cfg, out).joinpath("dataset.json").is_file():
        manifest = read_manifest(train_data_path(cfg, out))
        check_recipe(out, manifest.extra.get("build", {}), recipe)
        log(f"dataset {out} exists ({manifest.num_rows} images, hash "
            f"{manifest.content_hash[:12]}); pass --force to rebuild")
        return out
    build_dataset(cfg.data.source, out, **recipe_kwargs(recipe))
    manifest = read_manifest(train_data_path(cfg, out))
    log(f"built {out}: {manifest.num_rows} images, class counts {manifest.class_counts}")
    return out


RECIPE_KEYS = ("source", "source_options", "imbalance", "imb_factor", "bias_attribute",
               "bias_ratio", "reference_fraction", "seed")


def data_recipe(d: Any) -> dict[str, Any]:
    """Everything that defines a built dataset (as its manifest records it under build)."""
    from debiaslab.data.sources import bind_source_path

    options = dict(d.source_options)
    if d.path:
        options = bind_source_path(d.source, options, d.path)
    return {"source": d.source, "source_options": options, "imbalance": d.imbalance,
            "imb_factor": d.imb_factor, "bias_attribute": d.bias_attribute or None,
            "bias_ratio": d.bias_ratio, "reference_fraction": d.reference_fraction,
            "seed": d.seed}


def recipe_kwargs(recipe: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in recipe.items() if k != "source"}


def check_recipe(folder: Path, built: dict[str, Any], wanted: dict[str, Any]) -> None:
    """A dataset folder is reused only for the recipe it was built from."""
    import json

    def norm(recipe: dict[str, Any]) -> dict[str, Any]:
        out = {k: recipe.get(k) for k in RECIPE_KEYS}
        if out["imbalance"] != "long_tail":
            out["imb_factor"] = None
        if out["imbalance"] != "attribute_bias":
            out["bias_attribute"] = out["bias_ratio"] = out["reference_fraction"] = None
        return json.loads(json.dumps(out, default=str))

    have, want = norm(built), norm(wanted)
    diffs = [k for k in RECIPE_KEYS if have[k] != want[k]]
    if diffs:
        shown = "; ".join(f"{k}: {have[k]!r} (built) vs {want[k]!r} (config)" for k in diffs)
        raise DataError(f"{folder}: holds a dataset built from another recipe ({shown}); pass "
                        f"--force to rebuild it, or set another data.dataset_dir")


# ------------------------------------------------------------------------------------ train


@dataclass
class StageResult:
    """Paths and numbers a stage produced (printed by the CLI, asserted by tests)."""

    run_dir: Path
    checkpoint: Path | None = None
    mlflow_run_id: str | None = None
    artifacts: dict[str, Path] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    evaluations: dict[str, Any] = field(default_factory=dict)  # sampler -> Evaluation


def resume_point(cfg: ExperimentConfig, backend: str | None = None) -> Path | None:
    """The checkpoint a training run of ``cfg`` would resume from (local or Ray storage)."""
    from debiaslab.checkpoints import latest_intact_checkpoint, list_checkpoints

    if not on_ray(cfg, "train", backend):
        return latest_intact_checkpoint(cfg.run_dir / "checkpoints")
    from debiaslab.distributed.train import storage_path

    storage = storage_path(cfg)
    if "://" in storage:
        return None  # remote storage: the workers check when they restore
    found = [c for folder in sorted((Path(storage) / cfg.name).glob("checkpoint_*"))
             for c in list_checkpoints(folder)]
    return max(found)[1] if found else None


def check_resumable(cfg: ExperimentConfig, backend: str | None = None) -> dict[str, tuple]:
    """Before any MLflow run is opened: refuse a resume that would change what the run means
    (training.resume); returns the changes train.resume_allow accepted."""
    from debiaslab.checkpoints import TRAINER_KEYS, load_checkpoint
    from debiaslab.training.resume import check_resume

    latest = resume_point(cfg, backend)
    if latest is None:
        return {}
    from debiaslab.data.schema import read_manifest

    state = load_checkpoint(latest, required=TRAINER_KEYS)
    return check_resume(cfg, state, latest, read_manifest(train_data_path(cfg)).content_hash)


def train(cfg: ExperimentConfig, *, tracker: Any = None, progress: bool = True,
          backend: str | None = None) -> StageResult:
    """Train ``cfg`` on its built dataset in this process (Ray Train reuses the same Trainer),
    holding the run folder's lock; orphaned temp files of killed writers are removed first."""
    from debiaslab.runlock import run_lock

    with run_lock(cfg.run_dir):
        return _train(cfg, tracker=tracker, progress=progress, backend=backend)


def _train(cfg: ExperimentConfig, *, tracker: Any = None, progress: bool = True,
           backend: str | None = None) -> StageResult:
    from debiaslab.checkpoints import remove_orphan_temps
    from debiaslab.training.loop import Trainer
    from debiaslab.training.resume import describe_changes

    dataset = load_training_data(cfg)
    changes = check_resumable(cfg, backend)
    for path in remove_orphan_temps(cfg.run_dir / "checkpoints"):
        log(f"removed {path.name}, left by a writer that was killed")
    on_metrics: Callable[[int, dict[str, float]], None] | None = None
    if tracker is not None:
        tracker.log_dataset(dataset.content_hash, "train", str(train_data_path(cfg)))
        on_metrics = lambda step, metrics: tracker.log_metrics(metrics, step)
        if changes:
            tracker.set_tag("debiaslab.resume_changes", describe_changes(changes))
    if changes:
        log(f"resuming with changed {', '.join(changes)} (train.resume_allow)")
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", dump_yaml(cfg))
    if on_ray(cfg, "train", backend):
        from debiaslab.distributed.train import train_distributed

        log(f"training on Ray Train: {cfg.distributed.num_workers} worker(s)")
        dist = train_distributed(
            cfg, tracking_uri=tracker.tracking_uri if tracker is not None else None,
            mlflow_run_id=tracker.run_id if tracker is not None else None)
        if tracker is not None:
            tracker.set_tag("checkpoint", str(dist.checkpoint_uri))
        final = dist.metrics.get("train/loss")  # rank 0 already logged the per-step metrics
        return StageResult(run_dir=run_dir, checkpoint=dist.checkpoint,
                           metrics={} if final is None else {"train/final_loss": float(final)})
    trainer = Trainer(cfg, dataset, run_dir, on_metrics=on_metrics, progress=progress)
    result = trainer.fit()
    losses = list(result.losses.values())
    metrics = {"train/final_loss": sum(losses[-50:]) / max(len(losses[-50:]), 1)} if losses else {}
    if tracker is not None:
        tracker.set_tag("checkpoint", str(result.checkpoint))
    return StageResult(run_dir=run_dir, checkpoint=result.checkpoint, metrics=metrics)


# ------------------------------------------------------------------------------------ sample


def sample(cfg: ExperimentConfig, checkpoint: str | Path | None = None, *, tracker: Any = None,
           out_dir: str | Path | None = None, progress: bool = True,
           classifier: str | Path | None = None,
           artifacts: dict[str, str | Path] | None = None,
           backend: str | None = None) -> StageResult:
    """Sample with every configured sampler and ``sample.guidance``; write images (Parquet)
    and grids. ``artifacts``: the recipe's auxiliary models by artifact name, which guidance
    entries with checkpoint "" use (``classifier``: shorthand for the "classifier" one)."""
    import numpy as np
    import torch

    from debiaslab.data.pixels import to_uint8
    from debiaslab.data.schema import NO_LABEL, DatasetMeta, write_dataset
    from debiaslab.report import save_image_grid
    from debiaslab.sampling import (
        generate,
        guided_denoiser,
        load_trained,
        resolve_guidance,
        seed_labels,
    )

    trained = load_trained(checkpoint or cfg.run_dir, use_ema=cfg.sample.use_ema,
                           device=cfg.train.device)
    s = cfg.sample
    ray = on_ray(cfg, "sample", backend)
    out = Path(out_dir) if out_dir else cfg.run_dir / "samples"
    seeds = list(range(s.seed_start, s.seed_start + s.num_samples))
    guidance = resolve_guidance(cfg, classifier=classifier, artifacts=artifacts)
    if guidance and tracker is not None:
        import json

        tracker.set_tag("sample.guidance", json.dumps(guidance))
    result = StageResult(run_dir=cfg.run_dir, checkpoint=trained.checkpoint)
    for name in s.samplers:
        t0 = time.perf_counter()
        denoiser = guided_denoiser(trained, name, guidance)
        # labels: the network's; targets: what each image was steered toward (recorded)
        labels, targets = seed_labels(trained, s.labels, seeds, denoiser)
        if ray:
            images = sample_on_ray(cfg, trained.checkpoint, name, out / name, guidance)
        else:
            images = generate(trained, name, seeds, steps=s.steps, labels=labels,
                              denoiser=denoiser, batch_size=s.batch_size,
                              progress=progress, options=s.options.get(name, {}),
                              clip_x0=s.clip_x0)
        seconds = time.perf_counter() - t0
        order = (torch.argsort(targets, stable=True) if targets is not None
                 else torch.arange(len(seeds)))
        grid = save_image_grid(images[order], out / f"grid_{name}.png", GRID_COLUMNS,
                               scale=GRID_SCALE)
        uint8 = to_uint8(images).numpy()
        lab = targets.numpy() if targets is not None else np.full(len(seeds), NO_LABEL)
        meta = DatasetMeta(name=f"{cfg.name}-{name}", source=f"samples:{trained.checkpoint}",
                           class_names=trained.class_names, attr_names=[])
        if not ray:  # the Ray job wrote the same dataset itself
            write_dataset(out / name, uint8, lab, None, meta,
                          ids=[f"seed{sd:08d}" for sd in seeds])
        result.artifacts[f"grid_{name}"] = Path(grid)
        result.artifacts[f"samples_{name}"] = out / name
        result.metrics[f"sample/{name}/images_per_sec"] = len(seeds) / seconds
        log(f"{name}: {len(seeds)} images in {seconds:.1f}s -> {grid}")
        if tracker is not None:
            tracker.log_artifact(grid, "samples")
            tracker.log_metrics({f"sample/{name}/images_per_sec": len(seeds) / seconds},
                                step=trained.step)
    return result


def sample_on_ray(cfg: ExperimentConfig, checkpoint: Path, sampler: str, out: Path,
                  guidance: list[dict[str, Any]]) -> Any:
    """Sample with a Ray Data actor pool over seed ranges; returns the images in [-1, 1]."""
    from debiaslab.data.dataset import ImageDataset
    from debiaslab.distributed.data import sample_job
    from debiaslab.distributed.runtime import ray_session

    s, d = cfg.sample, cfg.distributed
    with ray_session(d.address, object_store_memory_gb=d.object_store_memory_gb):
        sample_job(checkpoint, sampler, range(s.seed_start, s.seed_start + s.num_samples), out,
                   steps=s.steps, labels_mode=s.labels, guidance=guidance,
                   options=s.options.get(sampler, {}), clip_x0=s.clip_x0, use_ema=s.use_ema,
                   seeds_per_task=s.batch_size,  # the local path's batches: batch guidance agrees
                   device=cfg.train.device, concurrency=d.map_concurrency,
                   num_cpus=d.map_num_cpus, num_gpus=d.map_num_gpus)
    ds = ImageDataset.load(out)
    order = sorted(range(len(ds.ids)), key=lambda i: ds.ids[i])  # seed order
    return ds.to_float(ds.images[order])


# ------------------------------------------------------------------------------------ evaluate

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
    recipe_evaluation(cfg, samples, extractor, ev, inputs)
    out = Path(out_dir) if out_dir else cfg.run_dir / "eval"
    json_path = save_evaluation(ev, out / f"eval_{name}.json")
    figures = {}
    for fig_name, fig in evaluation_figures(ev, title=f"{cfg.name} / {name}").items():
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
                      inputs: Any = None) -> None:
    """Add the recipe's own metrics and their provenance to ``ev`` (no-op for recipes without)."""
    from debiaslab.recipes import RECIPES, recorded_outputs

    recipe = RECIPES.get(cfg.recipe)
    if recipe.evaluation is None:
        return
    if inputs is None:
        inputs = recorded_outputs(cfg)
    paths = {k: str(getattr(v, "path", v)) for k, v in dict(inputs).items()}
    metrics, meta = recipe.evaluation(cfg, samples, extractor, paths)
    ev.metrics.update(metrics)
    ev.meta.update(meta)


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


# ------------------------------------------------------------------------------------ stages
# The stages every diffusion recipe shares (recipes.Stage): data -> train -> sample -> evaluate.
# Methods compose them with their own stages (methods/*.py).


def data_stage(cfg: ExperimentConfig, ctx: Any) -> Any:
    """Build (or reuse) the configured dataset; logs the class-count plot."""
    from debiaslab.data.schema import read_manifest
    from debiaslab.recipes import StageOutput, make_artifact
    from debiaslab.report import class_count_figure, save_figure

    build_data(cfg, force=ctx.force)
    path = train_data_path(cfg)
    manifest = read_manifest(path)
    plot = cfg.run_dir / "class_counts.png"
    plot.parent.mkdir(parents=True, exist_ok=True)
    save_figure(class_count_figure(dict(zip(manifest.class_names, manifest.class_counts)),
                                   title=f"{cfg.name}: training images per class"), plot)
    if ctx.tracker is not None:
        ctx.tracker.log_dataset(manifest.content_hash, "train", str(path))
        ctx.tracker.log_artifact(plot, "plots")
    return StageOutput(artifacts={"dataset": make_artifact("dataset", path)},
                       result=StageResult(run_dir=cfg.run_dir, artifacts={"class_counts": plot}))


def train_stage(cfg: ExperimentConfig, ctx: Any) -> Any:
    """Train the score model (local Trainer or Ray Train, see recipes.backend_of)."""
    from debiaslab.recipes import StageOutput, make_artifact

    result = train(cfg, tracker=ctx.tracker, progress=ctx.progress, backend=ctx.backend)
    if result.checkpoint is None:
        raise DataError(f"{cfg.run_dir}: training wrote no checkpoint")
    return StageOutput(artifacts={"score_model": make_artifact("checkpoint", result.checkpoint)},
                       metrics=dict(result.metrics), result=result)


def sample_stage(cfg: ExperimentConfig, ctx: Any) -> Any:
    """Sample every configured sampler with the configured guidance."""
    from debiaslab.recipes import StageOutput, make_artifact

    out = cfg.run_dir / "samples"
    models = {k: a.path for k, a in ctx.inputs.items()  # the recipe's auxiliary models
              if a.kind == "checkpoint" and k != "score_model"}
    result = sample(cfg, ctx.inputs["score_model"].path, tracker=ctx.tracker,
                    progress=ctx.progress, out_dir=out, artifacts=models, backend=ctx.backend)
    return StageOutput(artifacts={"samples": make_artifact("samples", out)},
                       metrics=dict(result.metrics), result=result)


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


def train_aux_model(cfg: ExperimentConfig, ctx: Any, *, section: str = "classifier",
                    name: str = "classifier", artifact: str = "classifier") -> Any:
    """Train the auxiliary model of config section ``section`` (a classifier section) in its
    own run ``<name>.<stage name>`` (Ray Train or this process, as ``ctx.backend`` says), then
    validate it per timestep bucket on the held-out rows (plot). Output: checkpoint
    ``artifact``."""
    from debiaslab.checkpoints import remove_orphan_temps
    from debiaslab.recipes import StageOutput, make_artifact
    from debiaslab.report import save_figure
    from debiaslab.runlock import run_lock
    from debiaslab.training.classifier import (
        classifier_experiment,
        evaluation_metrics,
        load_classifier_data,
        plot_classifier_evaluation,
        train_classifier,
        validate_checkpoint,
    )

    ccfg = classifier_experiment(cfg, section, run_suffix=name)
    tracker = ctx.tracker
    with run_lock(ccfg.run_dir):
        ccfg.run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(ccfg.run_dir / "config.yaml", dump_yaml(ccfg))
        for path in remove_orphan_temps(ccfg.run_dir / "checkpoints"):
            log(f"removed {path.name}, left by a writer that was killed")
        if ctx.backend == "ray":
            from debiaslab.distributed.train import train_distributed
            from debiaslab.training.factories import classifier_trainer

            log(f"{name} on Ray Train: {cfg.distributed.num_workers} worker(s)")
            dist = train_distributed(
                ccfg, tracking_uri=tracker.tracking_uri if tracker is not None else None,
                mlflow_run_id=tracker.run_id if tracker is not None else None,
                trainer_factory=classifier_trainer)
            checkpoint = dist.checkpoint
            if checkpoint is None:
                raise DataError(f"{dist.storage_dir}: the {name} run left no local "
                                f"checkpoint (remote storage is not supported for guidance)")
            evaluation = validate_checkpoint(ccfg, checkpoint, ccfg.train.device)
        else:
            on_metrics = ((lambda step, m: tracker.log_metrics(m, step))
                          if tracker is not None else None)
            result = train_classifier(ccfg, load_classifier_data(ccfg), ccfg.run_dir,
                                      on_metrics=on_metrics, progress=ctx.progress)
            checkpoint, evaluation = result.train.checkpoint, result.evaluation
    metrics = {f"{name}/{k}": v for k, v in evaluation_metrics(evaluation).items()}
    plot = save_figure(plot_classifier_evaluation(
        evaluation, title=f"{ccfg.name}: validation per timestep"),
        ccfg.run_dir / "validation_per_timestep.png")
    log(f"{name} validation accuracy {evaluation['accuracy_mean']:.3f} "
        f"(per bucket: {', '.join(f'{a:.2f}' for a in evaluation['accuracy'])})")
    if tracker is not None:
        tracker.log_metrics(metrics, step=ccfg.train.steps)
        tracker.log_artifact(plot, "plots")
        tracker.set_tag("checkpoint", str(checkpoint))
    summary = {f"{name}/val/accuracy": metrics[f"{name}/val/accuracy"]}
    return StageOutput(artifacts={artifact: make_artifact("checkpoint", checkpoint)},
                       metrics=summary, result=StageResult(
                           run_dir=ccfg.run_dir,
                           artifacts={f"{name}_validation": Path(plot)}))




def diffusion_stages(sample_inputs: dict[str, str] | None = None,
                     extra: tuple[Any, ...] = (), evaluate_inputs: dict[str, str] | None = None,
                     evaluate_keys: tuple[str, ...] = (), *, before_train: tuple[Any, ...] = (),
                     train_inputs: dict[str, str] | None = None,
                     train_keys: tuple[str, ...] = ()) -> tuple[Any, ...]:
    """data -> [before_train] -> train -> [extra] -> sample -> evaluate.

    ``before_train``: stages the score model's training reads (e.g. a discriminator its loss
    uses), with ``train_inputs`` the artifacts the train stage takes from them (bound into its
    config, ``cfg.inputs``, so Ray Train workers get them) and ``train_keys`` config keys that
    define the model besides the training sections; ``extra``: stages between train and
    sample; ``sample_inputs`` adds inputs of the sample stage (e.g. a guidance classifier's
    checkpoint), ``evaluate_inputs`` and ``evaluate_keys`` what the recipe's own evaluation
    (Recipe.evaluation) reads. The recipe checks that every input is produced earlier."""
    from debiaslab.recipes import Stage

    extra_train_keys = tuple(train_keys)
    return (
        Stage("data", data_stage, outputs={"dataset": "dataset"}, keys=("data.",),
              description="build the (imbalanced) dataset"),
        *before_train,
        Stage("train", train_stage, inputs={"dataset": "dataset", **(train_inputs or {})},
              outputs={"score_model": "checkpoint"},
              keys=(lambda: training_keys() + extra_train_keys) if extra_train_keys
              else training_keys,
              description="train the score model"),
        *extra,
        Stage("sample", sample_stage,
              inputs={"score_model": "checkpoint", **(sample_inputs or {})},
              outputs={"samples": "samples"}, keys=("sample.",),
              description="sample with every configured sampler and guidance"),
        Stage("evaluate", evaluate_stage,
              inputs={"samples": "samples", **(evaluate_inputs or {})},
              outputs={"evaluation": "evaluation"}, keys=("metrics.", *evaluate_keys),
              description="quality, fairness and minority metrics against the reference"),
    )


def aux_model_keys(section: str) -> tuple[str, ...]:
    """What defines an auxiliary model trained on noisy images: its section, the forward process
    it is noised with and the global batch split."""
    return (f"{section}.", "diffusion.schedule", "diffusion.num_timesteps",
            "distributed.num_workers")


def aux_model_stage(name: str = "classifier", *, section: str | None = None,
                    artifact: str | None = None, inputs: dict[str, str] | None = None,
                    keys: tuple[str, ...] = (),
                    configure: Callable[[ExperimentConfig], ExperimentConfig] | None = None,
                    backend: str = "ray", description: str = "") -> Any:
    """A stage that trains one auxiliary model (a classifier on noisy images or on a feature
    table; Ray Train by default): config section ``section`` (default: the stage name), run
    ``<name>.<stage name>``, output checkpoint ``artifact`` (default: the stage name), which
    guidance entries name with ``artifact:``. A recipe may hold any number of them, anywhere
    the data flow allows. ``configure``: adjusts the config first (e.g. binds the label column
    of a side table an earlier stage wrote); ``keys``: config keys beyond the section's."""
    from debiaslab.recipes import Stage

    section = section or name
    artifact = artifact or name

    def run(cfg: ExperimentConfig, ctx: Any) -> Any:
        return train_aux_model(configure(cfg) if configure is not None else cfg, ctx,
                               section=section, name=name, artifact=artifact)

    return Stage(name, run, inputs={"dataset": "dataset", **(inputs or {})},
                 outputs={artifact: "checkpoint"}, keys=aux_model_keys(section) + tuple(keys),
                 backend=backend, run_suffix=name,  # type: ignore[arg-type]
                 description=description or f"train the auxiliary model of cfg.{section}")


def side_table_stage(name: str, *, output: str, table: Callable[[ExperimentConfig], str],
                     mapper: type, mapper_kwargs: Callable[[ExperimentConfig, Any], dict],
                     schema: Callable[[], Any], inputs: dict[str, str] | None = None,
                     keys: tuple[str, ...] = (),
                     producer: Callable[[ExperimentConfig, Any], dict] | None = None,
                     prepare: Callable[[ExperimentConfig, Any], None] | None = None,
                     summary: Callable[[ExperimentConfig, Path], dict[str, float]] | None = None,
                     backend: str = "ray", description: str = "") -> Any:
    """A stage that maps every image of the dataset to side-table columns: a Ray Data map job
    (backend ray: ``mapper(**mapper_kwargs)`` built once per actor) or the same mapper on the
    same batches in this process (local). Writes side table ``table(cfg)`` of the dataset as
    artifact ``output``.

    ``schema()``: the pyarrow schema of the mapper's output (``id`` plus its columns);
    ``producer``: what computed the table (recorded in it); ``prepare``: runs first in this
    process (checks options, fills caches the actors read); ``summary``: metrics of the written
    table (logged to the stage's run and copied to the parent)."""
    from debiaslab.recipes import Stage

    def run(cfg: ExperimentConfig, ctx: Any) -> Any:
        from debiaslab.recipes import StageOutput, make_artifact

        dataset = Path(ctx.inputs["dataset"].path)
        kwargs = mapper_kwargs(cfg, ctx)
        info = producer(cfg, ctx) if producer is not None else {}
        name_ = table(cfg)
        if prepare is not None:
            prepare(cfg, ctx)
        d = cfg.distributed
        if ctx.backend == "ray":
            from debiaslab.distributed.data import map_to_side_table
            from debiaslab.distributed.runtime import ray_session

            with ray_session(d.address, object_store_memory_gb=d.object_store_memory_gb):
                folder = map_to_side_table(
                    dataset, name_, mapper, kwargs, schema(), producer=info,
                    read_columns=["id", "image", "label"], decode=True,
                    concurrency=d.map_concurrency, batch_size=d.map_batch_size,
                    num_cpus=d.map_num_cpus, num_gpus=d.map_num_gpus, progress=ctx.progress)
        else:
            from debiaslab.data.side_tables import map_dataset, write_side_table

            columns = [f.name for f in schema() if f.name != "id"]
            ids, values = map_dataset(dataset, mapper(**kwargs), columns,
                                      batch_size=d.map_batch_size, progress=ctx.progress,
                                      desc=name)
            folder = write_side_table(dataset, name_, ids, values, producer=info)
        metrics = summary(cfg, folder) if summary is not None else {}
        if ctx.tracker is not None and metrics:
            ctx.tracker.log_metrics(metrics)
        return StageOutput(artifacts={output: make_artifact("side_table", folder)},
                           metrics=metrics)

    return Stage(name, run, inputs={"dataset": "dataset", **(inputs or {})},
                 outputs={output: "side_table"}, keys=keys, backend=backend,  # type: ignore
                 description=description)


# ------------------------------------------------------------------------------------ whole run


def run_tags(cfg: ExperimentConfig) -> dict[str, str]:
    """Tags that let `debiaslab compare` group seeds of one setting and name the method."""
    from debiaslab.compare import GROUP_TAG, METHOD_TAG, SEED_TAG

    return {GROUP_TAG: cfg.tracking.group or cfg.name, SEED_TAG: str(cfg.train.seed),
            METHOD_TAG: cfg.recipe}


def seed_configs(cfg_path: str | None, overrides: list[str], seeds: list[int]
                 ) -> list[ExperimentConfig]:
    """One config per training seed: ``train.seed=s``, name ``<name>-s<s>``, one group."""
    from debiaslab.config import load_config

    base = load_config(cfg_path, overrides)
    group = base.tracking.group or base.name
    return [load_config(cfg_path, [*overrides, f"train.seed={s}", f"name={base.name}-s{s}",
                                   f"tracking.group={group}"]) for s in seeds]


def run_experiment(cfg: ExperimentConfig, *, progress: bool = True, stages: Any = (),
                   force: bool = False) -> StageResult:
    """Run the config's recipe (or only ``stages``): one MLflow parent run, a child per stage,
    stages whose inputs are unchanged skipped. Holds the run folder's lock throughout."""
    from debiaslab.recipes import run_recipe
    from debiaslab.runlock import run_lock

    def preflight(c: ExperimentConfig) -> None:
        if not stages or "train" in stages:
            if (train_data_path(c) / "dataset.json").is_file():
                check_resumable(c)  # before an MLflow run records a config that won't apply

    with run_lock(cfg.run_dir):
        done = run_recipe(cfg, only=stages, force=force, progress=progress,
                          parent_tags=run_tags(cfg), before=preflight)
    result = StageResult(run_dir=cfg.run_dir, mlflow_run_id=done.mlflow_run_id,
                         metrics=dict(done.metrics))
    for output in done.stages.values():
        part = output.result
        if isinstance(part, StageResult):
            result.checkpoint = part.checkpoint or result.checkpoint
            result.artifacts.update(part.artifacts)
            result.evaluations.update(part.evaluations)
    if "score_model" in done.outputs and result.checkpoint is None:
        result.checkpoint = Path(done.outputs["score_model"].path)
    return result


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


# ------------------------------------------------------------------------------------ sweeps


def trial_ops() -> Any:
    """The stage functions Tune trials run (handed to distributed.sweep, which never imports
    this module)."""
    from debiaslab.distributed.sweep import TrialOps
    from debiaslab.recipes import recorded_outputs

    return TrialOps(train=train, sample=sample, evaluate_samples=evaluate_samples,
                    build_metric_extractor=build_metric_extractor, reference_path=reference_path,
                    recorded_outputs=recorded_outputs)


def run_sweep(sweep_file: str | Path, overrides: list[str] | None = None, *,
              progress: bool = True) -> Any:
    """Run (or resume) a Ray Tune + Optuna sweep (distributed.sweep.run_sweep)."""
    from debiaslab.distributed.sweep import run_sweep as tune_sweep

    return tune_sweep(sweep_file, overrides, ops=trial_ops(), progress=progress)
