"""Improved precision/recall (Kynkaanniemi et al. 2019) and density/coverage (Naeem et al. 2020).

Also the chunked float64 distance and k-nearest-neighbour helpers shared by the minority metrics.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from debiaslab.errors import DataError
from debiaslab.metrics.fid import check_features, check_same_dim

DEFAULT_K = 5
DIST_CHUNK_BYTES = 256 * 2**20  # float64 distance block kept in memory at a time


# ----------------------------------------------------------------------- distances and kNN
def _chunk_rows(n_cols: int) -> int:
    return max(1, DIST_CHUNK_BYTES // (8 * max(n_cols, 1)))


def distance_chunks(a: np.ndarray, b: np.ndarray,
                    chunk_rows: int | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield (start, stop, D) with D[i, j] = ||a[start + i] - b[j]||_2 in float64, a block of
    rows at a time, via ||a||^2 + ||b||^2 - 2 a.b (clamped at 0) on data centred at the mean
    of both sets (which keeps the cancellation error small)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    center = (a.sum(axis=0) + b.sum(axis=0)) / (len(a) + len(b))
    ac = a - center
    bc = ac if b is a else b - center
    b_sq = np.einsum("ij,ij->i", bc, bc)
    step = chunk_rows or _chunk_rows(len(b))
    for start in range(0, len(a), step):
        blk = ac[start:start + step]
        d2 = blk @ bc.T
        d2 *= -2.0
        d2 += np.einsum("ij,ij->i", blk, blk)[:, None]
        d2 += b_sq[None, :]
        np.maximum(d2, 0.0, out=d2)
        yield start, start + len(blk), np.sqrt(d2, out=d2)


def pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """All Euclidean distances [N_a, N_b] in float64 (one block; for small sets)."""
    out = np.empty((len(a), len(b)))
    for start, stop, d in distance_chunks(a, b):
        out[start:stop] = d
    return out


def smallest_k(d: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k smallest entries sorted ascending and their column indices."""
    if k < d.shape[1]:
        idx = np.argpartition(d, k - 1, axis=1)[:, :k]
    else:
        idx = np.broadcast_to(np.arange(d.shape[1]), d.shape).copy()
    vals = np.take_along_axis(d, idx, axis=1)
    order = np.argsort(vals, axis=1, kind="stable")
    return np.take_along_axis(vals, order, axis=1), np.take_along_axis(idx, order, axis=1)


def knn(query: np.ndarray, ref: np.ndarray, k: int,
        exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Distances [N_q, k] (ascending) and indices of the k nearest `ref` points of each query.
    With exclude_self, `query` is `ref` and each point's own index is skipped."""
    dists = np.empty((len(query), k))
    idx = np.empty((len(query), k), dtype=np.int64)
    for start, stop, d in distance_chunks(query, ref):
        if exclude_self:
            rows = np.arange(stop - start)
            d[rows, rows + start] = np.inf
        dists[start:stop], idx[start:stop] = smallest_k(d, k)
    return dists, idx


def check_k(k: int, counts: dict[str, int]) -> None:
    """One-line DataError unless every named set has at least k + 1 points (k-NN radii exclude
    the point itself)."""
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise DataError(f"k must be a positive integer, got {k!r}")
    short = {name: n for name, n in counts.items() if n < k + 1}
    if short:
        listing = ", ".join(f"{name}: {n}" for name, n in counts.items())
        raise DataError(f"k-NN with k={k} needs at least {k + 1} points per set, got {listing}")


def k_nearest_radii(x: Any, k: int = DEFAULT_K) -> np.ndarray:
    """Kynkaanniemi et al. 2019, Sec. 3: r_k(a) = ||a - NN_k(a)||, the distance from each point
    to its k-th nearest neighbour in its own set, excluding itself. Returns [N] float64."""
    x = check_features(x, "features")
    check_k(k, {"features": len(x)})
    return knn(x, x, k, exclude_self=True)[0][:, -1]


# --------------------------------------------------------------------------------- metrics
def prdc(real: Any, fake: Any, k: int = DEFAULT_K) -> dict[str, float]:
    """Precision, recall (Kynkaanniemi et al. 2019, Eq. 1-2), density and coverage (Naeem et al.
    2020, Eq. 4-5), with r_k the k-NN radius within a point's own set (docs/algorithms.md §6):

    precision = (1/M) sum_j 1[exists i: ||Y_j - X_i|| <= r_k(X_i)]
    recall    = (1/N) sum_i 1[exists j: ||X_i - Y_j|| <= r_k(Y_j)]
    density   = (1/(kM)) sum_j sum_i 1[||Y_j - X_i|| <= r_k(X_i)]
    coverage  = (1/N) sum_i 1[min_j ||X_i - Y_j|| <= r_k(X_i)]

    X = real [N, D], Y = fake [M, D]. Balls are closed (<=, as in Kynkaanniemi et al.); the prdc
    package uses < , which differs only on exact ties. One chunked pass over real-fake distances.
    """
    real = check_features(real, "real features")
    fake = check_features(fake, "fake features")
    check_same_dim(real, fake, "real features", "fake features")
    check_k(k, {"real": len(real), "fake": len(fake)})
    r_real = knn(real, real, k, exclude_self=True)[0][:, -1]
    r_fake = knn(fake, fake, k, exclude_self=True)[0][:, -1]
    balls_per_fake = np.zeros(len(fake), dtype=np.int64)  # real balls containing each fake
    recalled = np.zeros(len(real), dtype=bool)
    covered = np.zeros(len(real), dtype=bool)
    for start, stop, d in distance_chunks(real, fake):  # rows: real, columns: fake
        balls_per_fake += (d <= r_real[start:stop, None]).sum(axis=0)
        recalled[start:stop] = (d <= r_fake[None, :]).any(axis=1)
        covered[start:stop] = d.min(axis=1) <= r_real[start:stop]
    return {
        "precision": float((balls_per_fake > 0).mean()),
        "recall": float(recalled.mean()),
        "density": float(balls_per_fake.sum() / (k * len(fake))),
        "coverage": float(covered.mean()),
    }


def improved_recall(real: np.ndarray, fake: np.ndarray, k: int = DEFAULT_K) -> float:
    """Kynkaanniemi et al. 2019, Eq. 2: the fraction of real points inside some fake k-NN ball
    (needs only the fake radii; used per class)."""
    real = check_features(real, "real features")
    fake = check_features(fake, "fake features")
    check_same_dim(real, fake, "real features", "fake features")
    check_k(k, {"fake": len(fake)})
    r_fake = knn(fake, fake, k, exclude_self=True)[0][:, -1]
    recalled = np.zeros(len(real), dtype=bool)
    for start, stop, d in distance_chunks(real, fake):
        recalled[start:stop] = (d <= r_fake[None, :]).any(axis=1)
    return float(recalled.mean())
