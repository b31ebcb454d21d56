"""One evaluation protocol for quality and fairness (docs/algorithms.md §6), on any sample set.

Every number is tagged with the extractor and the reference set that produced it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from debiaslab.errors import DataError
from debiaslab.fileio import write_atomic, write_text_atomic

FEATURE_CACHE_VERSION = 1
EVAL_PREFIX = "eval"


IS_SPLITS = 10  # Inception / classifier score splits (pytorch-fid, CBDM)


@dataclass
class SampleSet:
    """Images to evaluate: uint8 [N, C, H, W] and, for class-conditional samples, their labels.
    With `class_names`, label i means class `class_names[i]` and is matched to the reference's
    classes by name; without, labels are taken as reference class indices."""

    images: np.ndarray
    labels: np.ndarray | None
    source: str
    class_names: list[str] | None = None

    def __post_init__(self) -> None:
        if len(self.images) == 0:
            raise DataError(f"{self.source}: the sample set is empty")
        if self.images.ndim != 4:
            raise DataError(f"{self.source}: images must be [N, C, H, W], got {self.images.shape}")


@dataclass
class Evaluation:
    """Scalar metrics, per-class rows and distributions, with their provenance."""

    metrics: dict[str, float]
    per_class: list[dict[str, Any]] = field(default_factory=list)
    distributions: dict[str, dict[str, float]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def prefixed(self, prefix: str = EVAL_PREFIX) -> dict[str, float]:
        return {f"{prefix}/{k}": v for k, v in self.metrics.items()}


# ------------------------------------------------------------------------------ inputs


def load_samples(path: str | Path, shape: tuple[int, int, int] | None = None) -> SampleSet:
    """Samples from a debiaslab dataset folder (dataset.json), an image folder with one
    subfolder per class, or a Parquet file of encoded images."""
    from debiaslab.data.dataset import ImageDataset
    from debiaslab.data.sources import load_source

    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: samples not found")
    if (p / "dataset.json").is_file():
        ds = ImageDataset.load(p)
        labels = ds.labels.numpy()
        if not (labels >= 0).all():
            return SampleSet(ds.images.numpy(), None, str(p))
        return SampleSet(ds.images.numpy(), labels, str(p), list(ds.class_names) or None)
    if p.is_file() and p.suffix == ".parquet":
        arrays = load_source("parquet", {"path": str(p)})
    elif p.is_dir():
        options: dict[str, Any] = {"root": str(p)}
        if shape is not None:
            options.update(channels=shape[0], size=shape[1])
        arrays = load_source("folder", options)
    else:
        raise DataError(f"{p}: not a dataset folder, image folder or .parquet file")
    labels = np.asarray(arrays.labels)
    if not (labels >= 0).all():
        return SampleSet(np.asarray(arrays.images), None, str(p))
    return SampleSet(np.asarray(arrays.images), labels, str(p), list(arrays.class_names) or None)


def labels_in_reference(samples: SampleSet, reference_names: list[str],
                        reference: str | Path) -> np.ndarray | None:
    """The sample labels as indices into the reference's classes: matched by name when the
    sample set names its classes (an image folder's sorted subfolders need not follow the
    reference's order), else taken as they are. An unknown name is a one-line DataError."""
    from debiaslab.data.schema import one_line

    if samples.labels is None or not samples.class_names or not reference_names:
        return samples.labels
    names = [str(n) for n in samples.class_names]
    labels = np.asarray(samples.labels)
    if names == list(reference_names):
        return labels
    unknown = [n for n in names if n not in reference_names]
    if unknown:
        raise DataError(one_line(
            f"{samples.source}: class name(s) {', '.join(map(repr, unknown))} are not classes of "
            f"the reference {reference} ({', '.join(map(repr, reference_names))}); name the "
            f"sample classes (e.g. image subfolders) after the reference's"))
    if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
        raise DataError(f"{samples.source}: labels must lie in [0, {len(names)}) for its "
                        f"{len(names)} class names")
    index = {name: i for i, name in enumerate(reference_names)}
    return np.asarray([index[n] for n in names], dtype=np.int64)[labels]


@dataclass
class ReferenceFeatures:
    features: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    mu: np.ndarray
    sigma: np.ndarray
    name: str
    content_hash: str


def reference_features(reference_dir: str | Path, extractor: Any, *, batch_size: int = 256,
                       progress: bool = False) -> ReferenceFeatures:
    """Features and FID statistics of a reference dataset, cached beside it (.npz) per
    extractor and content hash."""
    from debiaslab.data.dataset import ImageDataset
    from debiaslab.metrics.fid import gaussian_stats, load_stats, save_stats

    ref = ImageDataset.load(reference_dir)
    tag = f"{extractor.name}-{ref.content_hash[:16]}-v{FEATURE_CACHE_VERSION}"
    feat_path = Path(reference_dir) / f"features_{tag}.npy"
    stats_path = Path(reference_dir) / f"fid_stats_{tag}.npz"
    if feat_path.is_file() and stats_path.is_file():
        try:
            features = np.load(feat_path)
            mu, sigma, _ = load_stats(stats_path)
        except (OSError, ValueError, DataError):
            features = None
    else:
        features = None
    if features is None or len(features) != len(ref):
        features = extractor.extract(ref.images.numpy(), batch_size=batch_size,
                                     progress=progress).features
        mu, sigma = gaussian_stats(features)
        _atomic_npy(feat_path, features)
        save_stats(stats_path, mu, sigma, {"extractor": extractor.name, "reference": str(
            reference_dir), "content_hash": ref.content_hash, "n": len(features)})
    return ReferenceFeatures(features=features, labels=ref.labels.numpy(),
                             class_names=list(ref.class_names), mu=mu, sigma=sigma,
                             name=ref.name, content_hash=ref.content_hash)


def _atomic_npy(path: Path, array: np.ndarray) -> None:
    write_atomic(path, lambda fh: np.save(fh, array))


# ------------------------------------------------------------------------------ the protocol


def evaluate(samples: SampleSet, reference_dir: str | Path, extractor: Any, *, k: int = 5,
             lof_k: int = 20, head_fraction: float = 0.5, class_counts: list[int] | None = None,
             bootstrap: int = 200, kid_subset_size: int = 1000, batch_size: int = 256,
             seed: int = 0, progress: bool = False) -> Evaluation:
    """Every applicable metric of ``samples`` against the reference set.

    ``class_counts`` (training images per class) defines head and tail classes for long-tailed
    data; without it the reference counts are used.
    """
    from debiaslab.metrics.fairness import (
        attribute_distribution,
        fairness_discrepancy,
        joint_fairness_discrepancy,
    )
    from debiaslab.metrics.fid import frechet_distance, gaussian_stats, inception_score, kid
    from debiaslab.metrics.minority import minority_summary
    from debiaslab.metrics.per_class import head_tail_split, per_class_metrics
    from debiaslab.metrics.prdc import prdc

    ref = reference_features(reference_dir, extractor, batch_size=batch_size, progress=progress)
    if len(ref.features) < k + 1:
        raise DataError(f"{reference_dir}: reference set has {len(ref.features)} images; "
                        f"k={k} needs at least {k + 1}")
    ext = extractor.extract(samples.images, batch_size=batch_size, progress=progress)
    fake = ext.features
    mu, sigma = gaussian_stats(fake)
    m: dict[str, float] = {"fid": frechet_distance(mu, sigma, ref.mu, ref.sigma)}
    kid_mean, kid_std = kid(fake, ref.features, subset_size=kid_subset_size, seed=seed)
    m.update(kid=kid_mean, kid_std=kid_std)
    m.update(prdc(ref.features, fake, k=k))
    if ext.logits is not None and len(fake) >= IS_SPLITS:
        is_mean, is_std = inception_score(ext.logits, splits=IS_SPLITS)
        if getattr(extractor, "supports_inception_score", False):
            m.update(inception_score=is_mean, inception_score_std=is_std)
        else:  # the same exp E KL(p(y|x) || p(y)) with the domain classifier (e.g. digits)
            m.update(classifier_score=is_mean, classifier_score_std=is_std)
    m.update(minority_summary(ref.features, fake, k=k, lof_k=lof_k))

    result = Evaluation(metrics=m)
    sample_labels = labels_in_reference(samples, ref.class_names, reference_dir)
    labels = sample_labels if sample_labels is not None else ext.classes
    label_source = "conditioning labels" if samples.labels is not None else "extractor predictions"
    num_classes = len(ref.class_names)
    if labels is not None and num_classes > 1:
        counts = class_counts or np.bincount(ref.labels, minlength=num_classes).tolist()
        head, tail = head_tail_split(counts, head_fraction)
        pc = per_class_metrics(ref.features, ref.labels, fake, labels, ref.class_names, k=k,
                               head_classes=head, bootstrap=bootstrap, seed=seed)
        result.per_class = pc.as_rows()
        m.update(pc.summary())
    if ext.classes is not None and extractor.class_names:
        nc = len(extractor.class_names)
        m["fd_class"] = fairness_discrepancy(ext.classes, nc)
        dist = attribute_distribution(ext.classes, nc)
        result.distributions["class"] = dict(zip(extractor.class_names, map(float, dist)))
        if sample_labels is not None:
            m["label_accuracy"] = float((ext.classes == sample_labels).mean())
    if ext.attributes is not None and extractor.attr_names:
        for j, name in enumerate(extractor.attr_names):
            m[f"fd_{name}"] = fairness_discrepancy(ext.attributes[:, j].astype(np.int64), 2)
            result.distributions[name] = {"0": float(1 - ext.attributes[:, j].mean()),
                                          "1": float(ext.attributes[:, j].mean())}
        if len(extractor.attr_names) > 1:
            m["fd_joint"] = joint_fairness_discrepancy(ext.attributes)
    undefined = sorted(key for key, v in m.items() if v is None)  # e.g. no class in a group
    bad = [key for key, v in m.items() if v is not None and not math.isfinite(float(v))]
    if bad:
        raise DataError(f"{samples.source}: metric(s) {', '.join(bad)} are not finite; "
                        f"check the sample set ({len(fake)} images)")
    result.metrics = {key: float(v) for key, v in m.items() if v is not None}
    result.meta = {
        "extractor": extractor.name, "reference": str(reference_dir),
        "reference_name": ref.name, "reference_hash": ref.content_hash,
        "reference_images": int(len(ref.features)), "samples": samples.source,
        "num_samples": int(len(fake)), "feature_dim": int(fake.shape[1]), "k": k,
        "lof_k": lof_k, "bootstrap": bootstrap,
        "per_class_labels": label_source if labels is not None else None,
        "undefined_metrics": undefined,
    }
    return result


def save_evaluation(ev: Evaluation, path: str | Path) -> Path:
    """Write the evaluation as JSON (temp name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, json.dumps(ev.to_json(), indent=2, default=float))
