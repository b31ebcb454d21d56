"""Per-class FID and improved recall with bootstrap confidence intervals, and head/tail means
(class-imbalanced evaluation, CBDM/TIW setting; docs/algorithms.md §6)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from debiaslab.errors import ConfigError, DataError
from debiaslab.metrics.fid import (
    MIN_STATS_SAMPLES,
    check_features,
    check_same_dim,
    frechet_distance,
    frechet_distance_batch,
    gaussian_stats,
)
from debiaslab.metrics.prdc import DEFAULT_K, pairwise_distances

DEFAULT_BOOTSTRAP = 200
DEFAULT_CI = 0.95
DEFAULT_HEAD_FRACTION = 0.5
MIN_RECALL_FAKE = 2  # a k-NN radius needs one other fake point
BOOTSTRAP_BLOCK_BYTES = 64 * 2**20  # memory for a block of bootstrap distance matrices
METRICS = ("fid", "recall")
METRIC_BOUNDS = {"fid": (0.0, np.inf), "recall": (0.0, 1.0)}
CI_METHODS = ("centered", "percentile")


@dataclass
class ClassRow:
    """One class: sample counts, point estimates, percentile CIs; None with a reason when the
    class has too few samples for a metric."""

    index: int
    name: str
    group: str | None
    n_real: int
    n_fake: int
    fid: float | None = None
    fid_ci: tuple[float, float] | None = None
    recall: float | None = None
    recall_ci: tuple[float, float] | None = None
    k_used: int | None = None
    boot_bias: dict[str, float] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The row as report.per_class_figure reads it (class, group, <metric>, <metric>_ci)."""
        return {
            "class": self.name, "index": self.index, "group": self.group,
            "n_real": self.n_real, "n_fake": self.n_fake,
            "fid": self.fid, "fid_ci": None if self.fid_ci is None else list(self.fid_ci),
            "recall": self.recall,
            "recall_ci": None if self.recall_ci is None else list(self.recall_ci),
            "k_used": self.k_used,
            **{f"{m}_boot_bias": self.boot_bias.get(m) for m in METRICS},
            "reason": "; ".join(f"{m}: {r}" for m, r in self.reasons.items()) or None,
        }


@dataclass
class GroupMean:
    """Mean of one metric over the classes of a group where it is defined, with its CI."""

    value: float | None
    ci: tuple[float, float] | None
    classes: list[int]
    excluded: list[int]


@dataclass
class PerClassResult:
    """Rows per class and, per group ('all', and 'head'/'tail' when given), metric means."""

    rows: list[ClassRow]
    groups: dict[str, dict[str, GroupMean]]
    k: int
    bootstrap: int
    ci: float
    ci_method: str
    seed: int

    def as_rows(self) -> list[dict[str, Any]]:
        return [row.as_dict() for row in self.rows]

    def summary(self) -> dict[str, float | None]:
        """Flat group means: head_fid, tail_fid, head_recall, tail_recall, all_fid, ... (+ _ci_lo,
        _ci_hi); None where no class of the group has the metric."""
        out: dict[str, float | None] = {}
        for group, metrics in self.groups.items():
            for metric, agg in metrics.items():
                out[f"{group}_{metric}"] = agg.value
                out[f"{group}_{metric}_ci_lo"] = None if agg.ci is None else agg.ci[0]
                out[f"{group}_{metric}_ci_hi"] = None if agg.ci is None else agg.ci[1]
        return out


# ------------------------------------------------------------------------------- helpers
def head_tail_split(class_counts: Sequence[int],
                    head_fraction: float = DEFAULT_HEAD_FRACTION) -> tuple[list[int], list[int]]:
    """Head = the round(head_fraction * C) classes with the most training samples (ties broken
    by the lower class index), tail = the rest; each non-empty when C >= 2. Sorted by index."""
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise DataError(f"head/tail split: expected class counts [C], got shape {counts.shape}")
    if not 0.0 < head_fraction < 1.0:
        raise ConfigError(f"head_fraction: must lie in (0, 1), got {head_fraction}")
    num = counts.size
    order = sorted(range(num), key=lambda c: (-counts[c], c))
    n_head = int(math.floor(head_fraction * num + 0.5))
    n_head = min(max(n_head, 1), max(num - 1, 1))
    return sorted(order[:n_head]), sorted(order[n_head:])


def _labels(labels: Any, n: int, num_classes: int, name: str) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.shape != (n,):
        raise DataError(f"{name}: expected {n} labels (one per feature row), got shape "
                        f"{arr.shape}")
    if n and not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{name}: labels must be integers, got dtype {arr.dtype}")
    if n and (arr.min() < 0 or arr.max() >= num_classes):
        raise DataError(f"{name}: labels must lie in [0, {num_classes}), got range "
                        f"[{arr.min()}, {arr.max()}]")
    return arr.astype(np.int64)


def bootstrap_ci(point: float, replicates: np.ndarray, ci: float, method: str,
                 bounds: tuple[float, float] = (-np.inf, np.inf)) -> tuple[float, float]:
    """Efron & Tibshirani 1993, Sec. 13.3: percentile interval [q_{(1-ci)/2}, q_{(1+ci)/2}] of
    the replicates ('percentile'), or of the replicates shifted by the bootstrap bias estimate
    mean(theta*) - theta_hat (Sec. 10.2) so they centre on the point estimate ('centered').
    Clipped to the metric's range `bounds`.

    Why 'centered' is the default: resampling with replacement leaves ~63% distinct points, so
    FID replicates are biased up and k-NN recall replicates down, at ~100 samples per class by
    more than their spread: the plain percentile interval then excludes the point estimate.
    """
    if method not in CI_METHODS:
        raise ConfigError(f"ci_method: unknown {method!r}; valid: {', '.join(CI_METHODS)}")
    if method == "centered":
        replicates = replicates - (replicates.mean() - point)
    lo, hi = np.quantile(replicates, [(1.0 - ci) / 2.0, (1.0 + ci) / 2.0])
    return float(np.clip(lo, *bounds)), float(np.clip(hi, *bounds))


def _recall_resampled(d_ff: np.ndarray, d_rf: np.ndarray, idx: np.ndarray,
                      k: int) -> np.ndarray:
    """Kynkaanniemi et al. 2019, Eq. 2 for each fake resample idx[b] (rows of [B, n]): the
    fraction of real points within r_k of some resampled fake point, r_k over the resample
    excluding the point itself (a duplicate counts as a neighbour at distance 0)."""
    n = idx.shape[1]
    out = np.empty(len(idx))
    block = max(1, BOOTSTRAP_BLOCK_BYTES // (8 * n * max(n, d_rf.shape[0], 1)))
    diag = np.arange(n)
    for start in range(0, len(idx), block):
        ib = idx[start:start + block]
        sub = d_ff[ib[:, :, None], ib[:, None, :]]  # [b, n, n]
        sub[:, diag, diag] = np.inf
        radii = np.partition(sub, k - 1, axis=2)[:, :, k - 1]  # [b, n]
        inside = d_rf[:, ib] <= radii[None, :, :]  # [n_real, b, n]
        out[start:start + block] = inside.any(axis=2).mean(axis=0)
    return out


def _fid_resampled(mu_r: np.ndarray, sigma_r: np.ndarray, fake_c: np.ndarray,
                   idx: np.ndarray) -> np.ndarray:
    """FID (Heusel et al. 2017) of each fake resample idx[b] against the class's real statistics:
    batched unbiased covariances and one batched eigenproblem per block of resamples."""
    n, d = idx.shape[1], fake_c.shape[1]
    out = np.empty(len(idx))
    block = max(1, BOOTSTRAP_BLOCK_BYTES // (8 * (n * d + d * d)))
    for start in range(0, len(idx), block):
        x = fake_c[idx[start:start + block]]  # [b, n, D]
        mus = x.mean(axis=1)
        xc = x - mus[:, None, :]
        sigmas = np.matmul(np.swapaxes(xc, 1, 2), xc) / (n - 1)
        out[start:start + block] = frechet_distance_batch(mu_r, sigma_r, mus, sigmas)
    return out


def _class_metrics(row: ClassRow, real_c: np.ndarray, fake_c: np.ndarray, k: int,
                   bootstrap: int, rng: np.random.Generator, ci: float, ci_method: str
                   ) -> dict[str, np.ndarray]:
    """Fill the point estimates and CIs of `row`; return the bootstrap replicates per metric."""
    boots: dict[str, np.ndarray] = {}
    idx = rng.integers(0, len(fake_c), size=(bootstrap, len(fake_c))) if bootstrap else None
    if row.n_real < MIN_STATS_SAMPLES or row.n_fake < MIN_STATS_SAMPLES:
        row.reasons["fid"] = (f"needs >= {MIN_STATS_SAMPLES} real and fake samples, got "
                              f"{row.n_real} real, {row.n_fake} fake")
    else:
        mu_r, sigma_r = gaussian_stats(real_c)
        row.fid = frechet_distance(mu_r, sigma_r, *gaussian_stats(fake_c))
        if idx is not None:
            boots["fid"] = _fid_resampled(mu_r, sigma_r, fake_c, idx)
            row.fid_ci = bootstrap_ci(row.fid, boots["fid"], ci, ci_method, METRIC_BOUNDS["fid"])
            row.boot_bias["fid"] = float(boots["fid"].mean() - row.fid)
    if row.n_real < 1 or row.n_fake < MIN_RECALL_FAKE:
        row.reasons["recall"] = (f"needs >= 1 real and >= {MIN_RECALL_FAKE} fake samples, got "
                                 f"{row.n_real} real, {row.n_fake} fake")
    else:
        row.k_used = min(k, row.n_fake - 1)
        if row.k_used < k:
            row.reasons["recall"] = f"k reduced from {k} to {row.k_used} ({row.n_fake} fake)"
        d_ff = pairwise_distances(fake_c, fake_c)
        d_rf = pairwise_distances(real_c, fake_c)
        identity = np.arange(row.n_fake)[None, :]
        row.recall = float(_recall_resampled(d_ff, d_rf, identity, row.k_used)[0])
        if idx is not None:
            boots["recall"] = _recall_resampled(d_ff, d_rf, idx, row.k_used)
            row.recall_ci = bootstrap_ci(row.recall, boots["recall"], ci, ci_method,
                                         METRIC_BOUNDS["recall"])
            row.boot_bias["recall"] = float(boots["recall"].mean() - row.recall)
    return boots


def _group_mean(rows: list[ClassRow], members: list[int], metric: str,
                boots: list[dict[str, np.ndarray]], ci: float, ci_method: str) -> GroupMean:
    """Mean of a metric over the member classes where it is defined; its bootstrap replicate b
    is the mean of the classes' replicates b (classes resampled independently)."""
    used = [c for c in members if getattr(rows[c], metric) is not None]
    excluded = [c for c in members if c not in used]
    if not used:
        return GroupMean(None, None, used, excluded)
    value = float(np.mean([getattr(rows[c], metric) for c in used]))
    interval = None
    if all(metric in boots[c] for c in used):
        replicates = np.mean([boots[c][metric] for c in used], axis=0)
        interval = bootstrap_ci(value, replicates, ci, ci_method, METRIC_BOUNDS[metric])
    return GroupMean(value, interval, used, excluded)


# ---------------------------------------------------------------------------------- public
def per_class_metrics(real: Any, real_labels: Any, fake: Any, fake_labels: Any,
                      class_names: Sequence[str], *, k: int = DEFAULT_K,
                      head_classes: Sequence[int] | None = None,
                      bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0,
                      ci: float = DEFAULT_CI, ci_method: str = "centered") -> PerClassResult:
    """Per class c: FID (Heusel et al. 2017) between real features labelled c and fake features
    labelled c, improved recall (Kynkaanniemi et al. 2019, Eq. 2, k capped at n_fake - 1 and
    recorded), and bootstrap CIs (:func:`bootstrap_ci`, `ci_method`) from `bootstrap` resamples
    (with replacement) of the class's fake samples; plus means over all / head / tail classes
    with bootstrap CIs (replicate b of a mean = mean of the classes' replicates b). Metrics
    a class cannot support are None with the reason in the row. Deterministic under `seed`
    (class c draws from numpy default_rng([seed, c]))."""
    real = check_features(real, "real features", 0)
    fake = check_features(fake, "fake features", 0)
    check_same_dim(real, fake, "real features", "fake features")
    num = len(class_names)
    if num == 0:
        raise DataError("per-class metrics: class_names is empty")
    real_labels = _labels(real_labels, len(real), num, "real labels")
    fake_labels = _labels(fake_labels, len(fake), num, "fake labels")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise DataError(f"per-class metrics: k must be a positive integer, got {k!r}")
    if ci_method not in CI_METHODS:
        raise ConfigError(f"ci_method: unknown {ci_method!r}; valid: {', '.join(CI_METHODS)}")
    if bootstrap < 0 or not 0.0 < ci < 1.0:
        raise DataError(f"per-class metrics: need bootstrap >= 0 and 0 < ci < 1, got "
                        f"{bootstrap} and {ci}")
    head = None if head_classes is None else sorted({int(c) for c in head_classes})
    if head is not None and any(not 0 <= c < num for c in head):
        raise DataError(f"per-class metrics: head classes {head} outside [0, {num})")
    rows: list[ClassRow] = []
    boots: list[dict[str, np.ndarray]] = []
    for c, name in enumerate(class_names):
        real_c, fake_c = real[real_labels == c], fake[fake_labels == c]
        group = None if head is None else ("head" if c in head else "tail")
        row = ClassRow(c, str(name), group, len(real_c), len(fake_c))
        boots.append(_class_metrics(row, real_c, fake_c, k, bootstrap,
                                    np.random.default_rng([seed, c]), ci, ci_method))
        rows.append(row)
    members = {"all": list(range(num))}
    if head is not None:
        members["head"] = head
        members["tail"] = [c for c in range(num) if c not in head]
    groups = {g: {m: _group_mean(rows, cs, m, boots, ci, ci_method) for m in METRICS}
              for g, cs in members.items()}
    return PerClassResult(rows, groups, k, bootstrap, ci, ci_method, seed)
