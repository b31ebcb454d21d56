"""Low-density ("minority") metrics of generated samples against real features
(docs/algorithms.md §6, §1.6): AvgkNN, Local Outlier Factor and Rarity Score; higher = rarer
for the first two."""

from __future__ import annotations

from typing import Any

import numpy as np

from debiaslab.errors import DataError
from debiaslab.metrics.fid import check_features, check_same_dim
from debiaslab.metrics.prdc import check_k, distance_chunks, knn, smallest_k

DEFAULT_K = 5
DEFAULT_LOF_K = 20
LRD_EPS = 1e-10  # guards lrd = 1/0 for duplicated points (the same guard as scikit-learn)


def _inputs(real: Any, fake: Any, ks: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    real = check_features(real, "real features")
    fake = check_features(fake, "fake features")
    check_same_dim(real, fake, "real features", "fake features")
    for name, k in ks.items():
        check_k(k, {f"real ({name})": len(real)})
    return real, fake


def _fake_to_real(real: np.ndarray, fake: np.ndarray, k: int, radii: np.ndarray | None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One chunked pass over fake-real distances: the k nearest real points of each fake point
    and, given real radii, its rarity score (see :func:`rarity_score`)."""
    dists = np.empty((len(fake), k))
    idx = np.empty((len(fake), k), dtype=np.int64)
    rarity = None if radii is None else np.empty(len(fake))
    for start, stop, d in distance_chunks(fake, real):
        if radii is not None:
            inside = d <= radii[None, :]
            best = np.where(inside, radii[None, :], np.inf).min(axis=1)
            rarity[start:stop] = np.where(np.isfinite(best), best, np.nan)
        dists[start:stop], idx[start:stop] = smallest_k(d, k)
    return dists, idx, rarity


def _lof_from_knn(real_d: np.ndarray, real_idx: np.ndarray, fake_d: np.ndarray,
                  fake_idx: np.ndarray, k: int) -> np.ndarray:
    """Breunig et al. 2000, Def. 5-7 from the k nearest real neighbours (sorted, first k used)."""
    k_dist = real_d[:, k - 1]  # k-distance of each real point (itself excluded)
    # Def. 6: lrd(a) = 1 / mean_{b in N_k(a)} reach-dist_k(a, b), reach-dist_k(a, b) =
    # max(k-dist(b), d(a, b)) (Def. 5)
    lrd_real = 1.0 / (np.maximum(k_dist[real_idx[:, :k]], real_d[:, :k]).mean(axis=1) + LRD_EPS)
    lrd_fake = 1.0 / (np.maximum(k_dist[fake_idx[:, :k]], fake_d[:, :k]).mean(axis=1) + LRD_EPS)
    # Def. 7: LOF(a) = mean_{b in N_k(a)} lrd(b) / lrd(a)
    return lrd_real[fake_idx[:, :k]].mean(axis=1) / lrd_fake


def avg_knn(real: Any, fake: Any, k: int = DEFAULT_K) -> np.ndarray:
    """AvgkNN (MG, docs/algorithms.md §6): (1/k) sum_{j<=k} ||phi(x) - phi(n_j(x))||, n_j the j-th
    nearest real neighbour of the fake point x. Returns [N_fake]."""
    real = check_features(real, "real features")
    fake = check_features(fake, "fake features")
    check_same_dim(real, fake, "real features", "fake features")
    if not isinstance(k, (int, np.integer)) or k < 1 or len(real) < k:
        raise DataError(f"AvgkNN with k={k} needs a positive k and at least k real points, "
                        f"got {len(real)} real")
    return knn(fake, real, k)[0].mean(axis=1)


def local_outlier_factor(real: Any, fake: Any, k: int = DEFAULT_LOF_K) -> np.ndarray:
    """Breunig et al. 2000, LOF (Def. 5-7) of each fake point as a query against the real set
    (docs/algorithms.md §6): reach-dist_k(a, b) = max(k-dist(b), d(a, b)); lrd(a) = 1 / mean_{b in
    N_k(a)} reach-dist_k(a, b); LOF(a) = mean_{b in N_k(a)} lrd(b) / lrd(a); N_k over real
    points only, real k-distances and lrds computed within the real set excluding the point
    itself. > 1 = outlier. Returns [N_fake]."""
    real, fake = _inputs(real, fake, {"LOF": k})
    real_d, real_idx = knn(real, real, k, exclude_self=True)
    fake_d, fake_idx, _ = _fake_to_real(real, fake, k, None)
    return _lof_from_knn(real_d, real_idx, fake_d, fake_idx, k)


def rarity_score(real: Any, fake: Any, k: int = DEFAULT_K) -> np.ndarray:
    """Han et al. 2022, Rarity Score (docs/algorithms.md §6): RS(x) = min{ NN_k(r) : r in R,
    ||phi(x) - phi(r)|| <= NN_k(r) }, NN_k(r) the k-NN radius of real r (itself excluded).
    NaN where no real ball contains x (undefined, discarded in summaries). Returns [N_fake]."""
    real, fake = _inputs(real, fake, {"rarity": k})
    radii = knn(real, real, k, exclude_self=True)[0][:, -1]
    return _fake_to_real(real, fake, 1, radii)[2]


def minority_summary(real: Any, fake: Any, k: int = DEFAULT_K,
                     lof_k: int = DEFAULT_LOF_K) -> dict[str, float | None]:
    """Means over the fake set of AvgkNN (k), LOF (lof_k) and Rarity Score (k; over the points
    where it is defined) plus the fraction of points with a defined rarity. The real kNN and the
    fake-real distances are computed once for all three. Rarity is None if nowhere defined."""
    real, fake = _inputs(real, fake, {"AvgkNN/rarity": k, "LOF": lof_k})
    k_max = max(k, lof_k)
    real_d, real_idx = knn(real, real, k_max, exclude_self=True)
    fake_d, fake_idx, rarity = _fake_to_real(real, fake, k_max, real_d[:, k - 1])
    lof = _lof_from_knn(real_d, real_idx, fake_d, fake_idx, lof_k)
    defined = ~np.isnan(rarity)
    return {
        "avg_knn": float(fake_d[:, :k].mean()),
        "lof": float(lof.mean()),
        "rarity": float(rarity[defined].mean()) if defined.any() else None,
        "rarity_defined_fraction": float(defined.mean()),
    }
