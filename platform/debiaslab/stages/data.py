"""The data stage: build (or reuse) the configured dataset, refusing a folder built from another
recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from debiaslab.config import ExperimentConfig
from debiaslab.data.locate import train_data_path
from debiaslab.errors import DataError
from debiaslab.progress import log
from debiaslab.stages.common import StageResult


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
               "bias_ratio", "reference_fraction", "reference_count", "seed")
LONG_TAILS = ("long_tail", "long_tail_reference")  # imbalances that read imb_factor


def data_recipe(d: Any) -> dict[str, Any]:
    """Everything that defines a built dataset (as its manifest records it under build)."""
    from debiaslab.data.sources import bind_source_path

    options = dict(d.source_options)
    if d.path:
        options = bind_source_path(d.source, options, d.path)
    return {"source": d.source, "source_options": options, "imbalance": d.imbalance,
            "imb_factor": d.imb_factor, "bias_attribute": d.bias_attribute or None,
            "bias_ratio": d.bias_ratio, "reference_fraction": d.reference_fraction,
            "reference_count": d.reference_count, "seed": d.seed}


def recipe_kwargs(recipe: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in recipe.items() if k != "source"}


def check_recipe(folder: Path, built: dict[str, Any], wanted: dict[str, Any]) -> None:
    """A dataset folder is reused only for the recipe it was built from."""
    import json

    from debiaslab.data.sources import SPLIT_IMBALANCES

    def norm(recipe: dict[str, Any]) -> dict[str, Any]:
        out = {k: recipe.get(k) for k in RECIPE_KEYS}
        out["reference_count"] = out["reference_count"] or 0  # absent in earlier manifests
        if out["imbalance"] not in LONG_TAILS:
            out["imb_factor"] = None
        if out["imbalance"] != "attribute_bias":
            out["bias_attribute"] = out["bias_ratio"] = None
        if out["imbalance"] not in SPLIT_IMBALANCES:
            out["reference_fraction"] = out["reference_count"] = None
        elif out["reference_count"]:
            out["reference_fraction"] = None  # the count decides the size
        return json.loads(json.dumps(out, default=str))

    have, want = norm(built), norm(wanted)
    diffs = [k for k in RECIPE_KEYS if have[k] != want[k]]
    if diffs:
        shown = "; ".join(f"{k}: {have[k]!r} (built) vs {want[k]!r} (config)" for k in diffs)
        raise DataError(f"{folder}: holds a dataset built from another recipe ({shown}); pass "
                        f"--force to rebuild it, or set another data.dataset_dir")


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
