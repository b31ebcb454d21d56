"""Minority Guidance: Um, Lee & Ye, "Don't Play Favorites: Minority Guidance for Diffusion
Models", ICLR 2024 (docs/algorithms.md §1).

Stages (recipe ``minority_guidance``): data -> train (the frozen backbone) -> score (minority
score of every training image, a Ray Data map job writing a side table) -> classes (L
equal-frequency classes from score quantiles, stratified validation rows, histogram) ->
classifier (p(l | x_t, t) on Ray Train, label = the class column) -> sample (the registered
``classifier`` guidance toward a target class, usually L-1) -> evaluate (the usual metrics plus
cFID against the minority reference: the real images in the top ``reference_top`` of scores,
added by Recipe.evaluation wherever samples are evaluated, sweep trials included).

Where the official code and the paper disagree, this module follows docs/algorithms.md §1:
``perturb_t`` indexes a respaced chain of ``respacing`` steps (60 of 100 -> t = 605), x0_hat is
clipped to [-1, 1], the class of a score is the smallest j with s <= quantile(s, (j+1)/L).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from debiaslab.data.pixels import map_batch
from debiaslab.diffusion.noise import image_noise, image_seed  # noqa: F401  (the MG API)
from debiaslab.diffusion.schedules import respaced_timestep
from debiaslab.errors import ConfigError, DataError
from debiaslab.methods.api import ExperimentConfig, register_section
from debiaslab.metrics.distances import (  # noqa: F401  (the MG API)
    DISTANCES,
    Distance,
    FeatureDistance,
    L2Distance,
    LPIPSDistance,
    build_distance,
    load_lpips_vgg,
)
from debiaslab.nets.cascaded import CascadedClassifier  # noqa: F401  (the MG API)
from debiaslab.strict import check_registered

SCORE_TABLE = "mscore"  # side tables <name>.mscore (column score) and <name>.mclass
CLASS_TABLE = "mclass"  # (columns class, val)


DISTANCE_OPTIONS = "minority.distance_options"  # the config key error messages name

# ----------------------------------------------------------------------------------- config


@dataclass
class MinorityConfig:
    """``minority:`` settings (docs/algorithms.md §1.2, §1.3, §1.6); defaults of the official
    LSUN scripts, except ``distance`` (lpips needs local VGG16 weights)."""

    distance: str = "lpips"  # DISTANCES: lpips | l2 | feature
    # lpips: {vgg_weights: <torchvision vgg16 state_dict file>}; feature: {extractor: digits}
    distance_options: dict[str, Any] = field(default_factory=dict)
    n_iter: int = 5  # noise draws per image
    perturb_t: int = 60  # an index into the respaced chain of `respacing` steps
    respacing: int = 100
    clip_x0: bool = True  # clip the Tweedie estimate to [-1, 1] (guided-diffusion clip_denoised)
    seed: int = 0  # noise of image `id`, draw i: a generator seeded from (seed, id)
    # images per model forward (each contributes its n_iter draws); 1 makes every score
    # independent of how Ray batches images (byte-identical at any concurrency)
    images_per_forward: int = 1
    num_classes: int = 100  # L
    val_ratio: float = 0.05  # stratified validation rows of the classes (classifier stage)
    class_conditional: bool = False  # quantiles within each dataset class
    reference_top: float = 0.1  # minority reference: the real images in this top fraction

    def check(self, cfg: ExperimentConfig) -> None:
        check_registered("minority.distance", self.distance, DISTANCES)
        for key in ("n_iter", "respacing", "images_per_forward"):
            if getattr(self, key) < 1:
                raise ConfigError(f"minority.{key}: must be >= 1, got {getattr(self, key)}")
        if self.respacing > cfg.diffusion.num_timesteps:
            raise ConfigError(f"minority.respacing: must be <= diffusion.num_timesteps "
                              f"({cfg.diffusion.num_timesteps}), got {self.respacing}")
        if not 0 <= self.perturb_t < self.respacing:
            raise ConfigError(f"minority.perturb_t: must be in [0, {self.respacing - 1}] (an "
                              f"index of the {self.respacing}-step chain), got {self.perturb_t}")
        if self.num_classes < 2:
            raise ConfigError(f"minority.num_classes: L must be >= 2, got {self.num_classes}")
        if not 0.0 <= self.val_ratio < 1.0:
            raise ConfigError(f"minority.val_ratio: must be in [0, 1), got {self.val_ratio}")
        if not 0.0 < self.reference_top <= 1.0:
            raise ConfigError(f"minority.reference_top: must be in (0, 1], got "
                              f"{self.reference_top}")
        if not 0 <= self.seed <= 2**31 - 1:
            raise ConfigError(f"minority.seed: must be in [0, {2**31 - 1}], got {self.seed}")
        DISTANCES.get(self.distance).check_options(self.distance_options, DISTANCE_OPTIONS)


register_section("minority", MinorityConfig)


def score_table(cfg: ExperimentConfig) -> str:
    """The run's score side table (named after the experiment: runs never share one)."""
    return f"{cfg.name}.{SCORE_TABLE}"


def class_table(cfg: ExperimentConfig) -> str:
    return f"{cfg.name}.{CLASS_TABLE}"


# ----------------------------------------------------------------------------- the score


def minority_score(denoiser: Any, x0: Tensor, noise: Tensor, t: int,
                   distance: Callable[[Tensor, Tensor], Tensor], *, clip_x0: bool = True,
                   cond: dict[str, Tensor] | None = None) -> Tensor:
    """Um et al. 2024, Eq. 6 as implemented (§1.2): l(x0) = (1/n) sum_i d(x0, x0_hat^(i)) with
    x_t^(i) = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps^(i) and x0_hat the Tweedie estimate of the
    frozen model (clipped to [-1, 1] when ``clip_x0``).

    x0 [B, C, H, W] in [-1, 1]; noise [B, n, C, H, W]; ``cond`` per image ([B] each, e.g. the
    class y of a conditional backbone). Returns float32 scores [B]."""
    b, n = noise.shape[:2]
    x = x0.unsqueeze(1).expand_as(noise).reshape(b * n, *x0.shape[1:])
    tt = torch.full((b * n,), int(t), dtype=torch.long, device=x.device)
    a, s = denoiser.schedule.alpha_sigma(tt, x)
    x_t = a * x + s * noise.reshape(b * n, *x0.shape[1:]).to(x.device, x.dtype)
    rep = {k: v.repeat_interleave(n, 0) for k, v in (cond or {}).items()}
    with torch.no_grad():
        x0_hat = denoiser.x0(x_t, tt, **rep)
        if clip_x0:
            x0_hat = x0_hat.clamp(-1.0, 1.0)
        d = distance(x, x0_hat)
    return d.float().view(b, n).mean(1)


class MinorityScoreMapper:
    """Minority scores of decoded dataset rows (``id``, ``pixels`` uint8 [N, C, H, W],
    ``label``): the frozen backbone and the distance are built once per actor."""

    def __init__(self, checkpoint: str, settings: dict[str, Any], device: str = "auto",
                 cache_dir: str = "") -> None:
        import os

        from debiaslab.sampling import load_trained

        if cache_dir:  # the driver's extractor cache (the feature distance's weights)
            os.environ.setdefault("DEBIASLAB_CACHE", cache_dir)
        self.trained = load_trained(checkpoint, use_ema=True, device=device)
        self.settings = settings
        self.device = next(self.trained.model.parameters()).device
        self.distance = build_distance(settings["distance"], settings["distance_options"],
                                       self.device, where=DISTANCE_OPTIONS)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        s = self.settings
        ids, x0, labels = map_batch(batch)
        conditional = self.trained.num_classes > 0 and self.trained.cfg.model.class_conditional
        scores = np.empty(len(ids), np.float32)
        step = int(s["images_per_forward"])
        for start in range(0, len(ids), step):
            part = slice(start, start + step)
            noise = torch.stack([image_noise(s["seed"], i, s["n_iter"], tuple(x0.shape[1:]))
                                 for i in ids[part]])
            cond = {"y": labels[part].clamp(min=0).to(self.device)} if conditional else None
            scores[part] = minority_score(
                self.trained.denoiser, x0[part].to(self.device), noise.to(self.device),
                s["t"], self.distance, clip_x0=s["clip_x0"], cond=cond).cpu().numpy()
        return {"id": np.asarray(ids, dtype=object), "score": scores}


def score_settings(cfg: ExperimentConfig) -> dict[str, Any]:
    """What the mapper needs (plain values: shipped to Ray actors and written to the table)."""
    m = cfg.minority
    t = respaced_timestep(m.perturb_t, m.respacing, cfg.diffusion.num_timesteps)
    return {"distance": m.distance, "distance_options": dict(m.distance_options),
            "n_iter": m.n_iter, "t": t, "perturb_t": m.perturb_t, "respacing": m.respacing,
            "clip_x0": m.clip_x0, "seed": m.seed, "images_per_forward": m.images_per_forward}


def score_dataset_local(dataset_path: Path, checkpoint: Path, settings: dict[str, Any], *,
                        batch_size: int = 64, device: str = "auto", progress: bool = False
                        ) -> tuple[list[str], np.ndarray]:
    """The scores of every image in this process (ids in dataset order, float32 [N])."""
    from debiaslab.data.side_tables import map_dataset

    mapper = MinorityScoreMapper(str(checkpoint), settings, device)
    ids, columns = map_dataset(dataset_path, mapper, ["score"], batch_size=batch_size,
                               progress=progress, desc="minority scores")
    return ids, columns["score"].astype(np.float32, copy=False)


# --------------------------------------------------------------------------- the classes


def quantile_classes(scores: np.ndarray, num_classes: int) -> np.ndarray:
    """§1.3: thresholds q_j = quantile(s, (j + 1) / L) (linear interpolation, numpy's default
    and torch.quantile's), and the class of s is the smallest j with s <= q_j: equal-frequency
    bins in ascending score order, class L-1 the rarest. int64 [N]."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or not len(s):
        raise DataError(f"minority classes: need a non-empty score vector, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise DataError(f"minority classes: {int((~np.isfinite(s)).sum())} scores are not "
                        f"finite; recompute the score table")
    if num_classes < 2:
        raise ConfigError(f"minority.num_classes: L must be >= 2, got {num_classes}")
    q = np.quantile(s, np.arange(1, num_classes + 1) / num_classes)
    return np.minimum(np.searchsorted(q, s, side="left"), num_classes - 1).astype(np.int64)


def minority_classes(scores: np.ndarray, num_classes: int, groups: np.ndarray | None = None
                     ) -> np.ndarray:
    """quantile_classes over all scores, or within each group (the class-conditional variant:
    scores are quantized inside each dataset class)."""
    if groups is None:
        return quantile_classes(scores, num_classes)
    out = np.empty(len(scores), np.int64)
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        out[rows] = quantile_classes(np.asarray(scores)[rows], num_classes)
    return out


def plot_scores(scores: np.ndarray, num_classes: int, path: Path, title: str) -> Path:
    """Histogram of the minority scores with the L-1 inner bin edges (quantile thresholds)."""
    from matplotlib.figure import Figure

    from debiaslab.report import save_figure

    s = np.asarray(scores, dtype=np.float64)
    edges = np.quantile(s, np.arange(1, num_classes) / num_classes)
    fig = Figure(figsize=(7.0, 3.5), layout="constrained")
    ax = fig.add_subplot()
    ax.hist(s, bins=min(100, max(10, len(s) // 20)), color="#4c72b0")
    for i, e in enumerate(edges):
        ax.axvline(e, color="#c44e52", lw=0.6, alpha=0.6, label="class edges" if i == 0 else None)
    ax.set_xlabel("minority score (class L-1 = highest = rarest)")
    ax.set_ylabel("images")
    if len(edges):
        ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"{title}: {len(s)} images, L = {num_classes}", fontsize=10)
    return save_figure(fig, path)


# ------------------------------------------------------------------------------- the stages

# what defines the scores (not distributed.map_*: the scores do not depend on the job layout)
SCORE_KEYS = ("minority.distance", "minority.distance_options.", "minority.n_iter",
              "minority.perturb_t", "minority.respacing", "minority.clip_x0", "minority.seed",
              "minority.images_per_forward")
CLASS_KEYS = ("minority.num_classes", "minority.val_ratio", "minority.class_conditional",
              "classifier.train.seed")


def _score_kwargs(cfg: ExperimentConfig, ctx: Any) -> dict[str, Any]:
    import os

    return {"checkpoint": ctx.inputs["score_model"].path, "settings": score_settings(cfg),
            "device": cfg.train.device, "cache_dir": os.environ.get("DEBIASLAB_CACHE", "")}


def _score_producer(cfg: ExperimentConfig, ctx: Any) -> dict[str, Any]:
    return {"method": "minority_guidance", "checkpoint": ctx.inputs["score_model"].path,
            "checkpoint_hash": ctx.inputs["score_model"].hash, **score_settings(cfg)}


def _score_prepare(cfg: ExperimentConfig, ctx: Any) -> None:
    """Checks the distance's options and fills the weights cache the actors read."""
    from debiaslab.methods.api import log

    settings = score_settings(cfg)
    log(f"minority scores: {settings['distance']} distance, n_iter {settings['n_iter']}, "
        f"t = {settings['t']} (step {settings['perturb_t']} of {settings['respacing']})")
    build_distance(settings["distance"], settings["distance_options"], where=DISTANCE_OPTIONS)


def _score_schema(cfg: ExperimentConfig, ctx: Any) -> Any:
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("score", pa.float32())])


def _score_summary(cfg: ExperimentConfig, folder: Path) -> dict[str, float]:
    from debiaslab.data.side_tables import read_side_table

    scores = read_side_table(folder.parents[1], score_table(cfg), ["score"]).column("score")
    return {"minority/score_mean": float(np.mean(scores)),
            "minority/score_std": float(np.std(scores))}


def classes_stage(cfg: ExperimentConfig, ctx: Any) -> Any:
    """§1.3: L equal-frequency classes from the score quantiles (within each dataset class for
    the class-conditional variant), the stratified validation rows the classifier holds out,
    and a histogram of the scores with the bin edges; side table <name>.mclass."""
    from debiaslab.data.dataset import ImageDataset
    from debiaslab.data.side_tables import write_side_table
    from debiaslab.methods.api import StageOutput, make_artifact
    from debiaslab.training.classifier_data import stratified_split

    m = cfg.minority
    dataset_path = Path(ctx.inputs["dataset"].path)
    ds = ImageDataset.load(dataset_path)
    scores = read_scores(ctx.inputs["scores"].path, ds)
    groups = ds.labels.numpy() if m.class_conditional else None
    labels = minority_classes(scores, m.num_classes, groups)
    _, val_rows = stratified_split(labels, m.val_ratio, cfg.classifier.train.seed)
    val = np.zeros(len(labels), np.int8)
    val[val_rows.numpy()] = 1
    folder = write_side_table(dataset_path, class_table(cfg), ds.ids,
                              {"class": labels, "val": val},
                              producer={"method": "minority_guidance",
                                        "num_classes": m.num_classes,
                                        "class_conditional": m.class_conditional,
                                        "scores": ctx.inputs["scores"].hash})
    plot = plot_scores(scores, m.num_classes, cfg.run_dir / "minority" / "scores.png",
                       cfg.name)
    counts = np.bincount(labels, minlength=m.num_classes)
    metrics = {"minority/class_size_min": float(counts.min()),
               "minority/class_size_max": float(counts.max()),
               "minority/val_rows": float(val.sum())}
    if ctx.tracker is not None:
        ctx.tracker.log_metrics(metrics)
        ctx.tracker.log_artifact(plot, "plots")
    return StageOutput(artifacts={"classes": make_artifact("side_table", folder)},
                       metrics=metrics)


def classifier_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The classifier section of the minority classifier: the class column of <name>.mclass
    as its label, minority.val_ratio held out (the rows the classes stage marked)."""
    c = dataclasses.replace(cfg.classifier, label=f"side:{class_table(cfg)}.class",
                            val_fraction=cfg.minority.val_ratio)
    return dataclasses.replace(cfg, classifier=c)


def minority_reference_rows(scores: np.ndarray, top: float) -> np.ndarray:
    """Row indices of the minority reference: the ceil(top * N) highest scores (ties broken
    by row order), sorted."""
    n = max(1, int(np.ceil(top * len(scores))))
    order = np.lexsort((np.arange(len(scores)), -np.asarray(scores, dtype=np.float64)))
    return np.sort(order[:n])


def read_scores(table_path: str | Path, dataset: Any) -> np.ndarray:
    """The score column of side table folder ``table_path`` (``<dataset>/side/<name>``)
    aligned to ``dataset``'s rows (a table that misses images is a one-line DataError)."""
    from debiaslab.data.side_tables import join, read_side_table

    folder = Path(table_path)
    return join(dataset.ids, read_side_table(folder.parent.parent, folder.name, ["score"]),
                "score")


def minority_evaluation(cfg: ExperimentConfig, samples: Any, extractor: Any,
                        inputs: dict[str, str]) -> tuple[dict[str, float], dict[str, Any]]:
    """Recipe.evaluation (§1.6): cFID of the samples against the minority reference, the real
    training images in the top ``minority.reference_top`` of minority scores, in the
    evaluation's feature space (the usual metrics, against all real data, come with every
    evaluation). Provenance: the reference's image count, id-list hash and score table."""
    from debiaslab.data.dataset import ImageDataset
    from debiaslab.metrics.fid import fid_from_features

    if "scores" not in inputs:
        raise DataError(f"{cfg.run_dir}: no minority score table is recorded; run the score "
                        f"stage first (debiaslab run --stage score)")
    table = Path(inputs["scores"])
    ds = ImageDataset.load(table.parent.parent)
    rows = minority_reference_rows(read_scores(table, ds), cfg.minority.reference_top)
    ref = extractor.extract(ds.images[torch.from_numpy(rows)].numpy(),
                            batch_size=cfg.metrics.batch_size).features
    fake = extractor.extract(samples.images, batch_size=cfg.metrics.batch_size).features
    ids_hash = hashlib.sha256("\n".join(ds.ids[i] for i in rows).encode()).hexdigest()
    meta = {"minority_reference": {"dataset": str(table.parent.parent),
                                   "dataset_hash": ds.content_hash, "score_table": str(table),
                                   "top": cfg.minority.reference_top,
                                   "num_images": int(len(rows)), "ids_sha256": ids_hash}}
    return {"cfid_minority": fid_from_features(fake, ref)}, meta


def check_config(cfg: ExperimentConfig) -> None:
    """Rules of the recipe: the sample stage is guided by the minority classifier, toward a
    class 0..L-1 (or -1: balanced over the classes), on noisy images."""
    L = cfg.minority.num_classes
    entries = [(i, e) for i, e in enumerate(cfg.sample.guidance) if e.get("type") == "classifier"]
    if not entries:
        raise ConfigError(f"recipe minority_guidance: sample.guidance needs a classifier entry, "
                          f"e.g. [{{type: classifier, scale: 3.5, target: {L - 1}}}]")
    for i, entry in entries:
        target = entry.get("target", -1)
        if not isinstance(target, int) or not -1 <= target < L:
            raise ConfigError(f"sample.guidance[{i}].target: {target!r} is not a minority class; "
                              f"use 0..{L - 1} (minority.num_classes = {L}; {L - 1} is the "
                              f"rarest) or -1")
    if cfg.classifier.input != "noisy_images":
        raise ConfigError("recipe minority_guidance: classifier.input must be noisy_images")
    DISTANCES.get(cfg.minority.distance).check_ready(cfg.minority.distance_options,
                                                     DISTANCE_OPTIONS)
    if cfg.minority.class_conditional and not cfg.model.class_conditional:
        raise ConfigError("minority.class_conditional: needs a class-conditional backbone "
                          "(model.class_conditional: true)")
    if cfg.minority.class_conditional and not cfg.classifier.model.class_conditional:
        raise ConfigError("minority.class_conditional: the minority classifier is p(l | x_t, c); "
                          "set classifier.model.class_conditional: true")


def _stages() -> tuple[Any, ...]:
    from debiaslab.methods.api import Stage, aux_model_stage, diffusion_stages, side_table_stage

    score = side_table_stage(
        "score", output="scores", table=score_table, mapper=MinorityScoreMapper,
        mapper_kwargs=_score_kwargs, schema=_score_schema, inputs={"score_model": "checkpoint"},
        keys=SCORE_KEYS, producer=_score_producer, prepare=_score_prepare,
        summary=_score_summary, description="minority score of every training image (Ray Data)")
    classes = Stage("classes", classes_stage, inputs={"dataset": "dataset",
                                                      "scores": "side_table"},
                    outputs={"classes": "side_table"}, keys=CLASS_KEYS,
                    description="L equal-frequency classes from the score quantiles")
    # §1.4: p(l | x_t, t) trained with cross-entropy, t uniform over 0..T-1, on Ray Train
    classifier = aux_model_stage("classifier", inputs={"classes": "side_table"},
                                 keys=("minority.val_ratio",), configure=classifier_config,
                                 description="noise-conditional minority classifier (Ray Train)")
    return diffusion_stages(sample_inputs={"classifier": "checkpoint"},
                            extra=(score, classes, classifier),
                            evaluate_inputs={"scores": "side_table"},
                            evaluate_keys=("minority.reference_top",))


def _register() -> None:
    from debiaslab.methods.api import Recipe, register_recipe

    register_recipe(Recipe("minority_guidance", _stages(), check=check_config,
                           evaluation=minority_evaluation,
                           description="Um et al. 2024: minority scores, a minority classifier, "
                                       "and classifier guidance toward the rarest class"))


_register()
