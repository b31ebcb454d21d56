"""Frechet Inception Distance, Kernel Inception Distance and Inception Score on feature arrays.

docs/algorithms.md §6; inputs are float arrays [N, D] (or [N, C] class scores for the Inception
Score).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import scipy.special
import torch
from scipy.linalg.blas import dtrmm
from threadpoolctl import ThreadpoolController

from debiaslab.errors import DataError
from debiaslab.fileio import write_atomic

MIN_STATS_SAMPLES = 2  # an unbiased covariance needs two points
STATS_CHUNK_ROWS = 8192  # rows converted to float64 at a time in gaussian_stats
SQRTM_EPS = 1e-6  # pytorch-fid's diagonal offset when sqrtm of the product is not finite
SQRTM_IMAG_ATOL = 1e-3  # pytorch-fid's tolerance on the imaginary part of the diagonal
KID_DEGREE = 3
KID_COEF0 = 1.0
PROB_SUM_ATOL = 1e-3  # rows of a probability matrix must sum to 1 within this
LAPACK_THREADS = 1  # Cholesky/eigen solvers: threaded LAPACK stalls (10x) on a busy machine

_THREADPOOLS: ThreadpoolController | None = None


@contextlib.contextmanager
def _serial_lapack() -> Iterator[None]:
    """Run the enclosed factorizations single-threaded (numpy/scipy BLAS and torch). Their
    level-2 steps sync the threads per column; with other processes on the cores that costs ~10x
    (3-15 s instead of 0.7 s for a 2048 eigvalsh on 2 busy cores); matmuls keep all threads."""
    global _THREADPOOLS
    if _THREADPOOLS is None:
        _THREADPOOLS = ThreadpoolController()
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(LAPACK_THREADS)
    try:
        with _THREADPOOLS.limit(limits=LAPACK_THREADS, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(torch_threads)


# ------------------------------------------------------------------------------ validation
def check_features(x: Any, name: str, min_rows: int = 1) -> np.ndarray:
    """`x` as a finite float64 array [N, D] with N >= `min_rows`, or a one-line DataError."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{name}: not a numeric array ({exc})") from None
    if arr.ndim != 2:
        raise DataError(f"{name}: expected a 2-D array [N, D], got shape {arr.shape}")
    if arr.shape[1] == 0:
        raise DataError(f"{name}: features have dimension 0 (shape {arr.shape})")
    if arr.shape[0] < min_rows:
        raise DataError(f"{name}: {arr.shape[0]} samples, at least {min_rows} needed")
    if not np.isfinite(arr).all():
        raise DataError(f"{name}: contains NaN or infinite values")
    return arr


def check_same_dim(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    """One-line DataError unless the two feature arrays share their dimension D."""
    if a.shape[-1] != b.shape[-1]:
        raise DataError(f"{name_a} have dimension {a.shape[-1]} but {name_b} have "
                        f"{b.shape[-1]}; both must come from the same extractor")


def _check_stats(mu: Any, sigma: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise DataError(f"{name}: expected mu [D] and sigma [D, D], got {mu.shape} and "
                        f"{sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise DataError(f"{name}: statistics contain NaN or infinite values")
    return mu, sigma


# ------------------------------------------------------------------------------------- FID
def gaussian_stats(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of features [N, D] (Heusel et al. 2017, FID's Gaussian fit).

    mu = (1/N) sum_i x_i;  Sigma = (1/(N-1)) sum_i (x_i - mu)(x_i - mu)^T, both float64.
    The covariance is one BLAS matmul X_c^T X_c per chunk of centred rows (all BLAS threads).
    """
    x = np.asarray(features)
    if x.ndim != 2 or x.shape[0] < MIN_STATS_SAMPLES or x.shape[1] == 0:
        check_features(x, "features", MIN_STATS_SAMPLES)  # raises the precise message
    n, d = x.shape
    mu = np.zeros(d, dtype=np.float64)
    for start in range(0, n, STATS_CHUNK_ROWS):
        mu += x[start:start + STATS_CHUNK_ROWS].sum(axis=0, dtype=np.float64)
    mu /= n
    if not np.isfinite(mu).all():
        raise DataError("features: contains NaN or infinite values")
    sigma = np.zeros((d, d), dtype=np.float64)
    for start in range(0, n, STATS_CHUNK_ROWS):
        xc = x[start:start + STATS_CHUNK_ROWS].astype(np.float64)  # always a copy
        xc -= mu
        sigma += xc.T @ xc
    sigma /= n - 1
    sigma = 0.5 * (sigma + sigma.T)  # exact symmetry for the Cholesky / eigh below
    return mu, sigma


def _cholesky_factor(s: np.ndarray) -> np.ndarray | None:
    """F with F F^T = s: Cholesky when s is numerically positive definite, else None."""
    try:
        with _serial_lapack():
            return scipy.linalg.cholesky(s, lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        return None


def _eigh_factor(s: np.ndarray) -> np.ndarray:
    """F = V diag(sqrt(max(w, 0))) with s = V diag(w) V^T: F F^T = s for any symmetric PSD s."""
    with _serial_lapack():  # torch's MKL syevd: ~2x OpenBLAS's on one thread
        w, v = (t.numpy() for t in torch.linalg.eigh(torch.from_numpy(np.ascontiguousarray(s))))
    return v * np.sqrt(np.clip(w, 0.0, None))


def psd_factor(s: np.ndarray) -> np.ndarray:
    """A factor F with F F^T = s of a covariance: Cholesky, or the eigh square root when s is
    singular (N < D)."""
    f = _cholesky_factor(s)
    return _eigh_factor(s) if f is None else f


def _sum_sqrt_eigvals(m: np.ndarray) -> np.ndarray:
    """sum_i sqrt(max(lambda_i, 0)) of symmetric matrices [..., D, D] (symmetrized first)."""
    m = 0.5 * (m + np.swapaxes(m, -1, -2))
    with _serial_lapack():
        lam = torch.linalg.eigvalsh(torch.from_numpy(m)).numpy()
    return np.sqrt(np.clip(lam, 0.0, None)).sum(axis=-1)


def _congruence(f: np.ndarray, b: np.ndarray, lower: bool) -> np.ndarray:
    """F^T B F; two triangular products (half the flops of gemm) when F is lower-triangular."""
    if not lower:
        return f.T @ (b @ f)
    bf = dtrmm(1.0, f, b, side=1, lower=1)  # B F
    return dtrmm(1.0, f, bf, side=0, lower=1, trans_a=1, overwrite_b=1)  # F^T (B F)


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((Sigma1 Sigma2)^{1/2}) = sum_i sqrt(lambda_i(F^T Sigma2 F)) for any F F^T = Sigma1.

    Sigma1 Sigma2 = F (F^T Sigma2 F) F^{-1} is similar to the symmetric PSD F^T Sigma2 F, so the
    eigenvalues are real and >= 0 (tiny negative round-off is clamped to 0, which is also what
    the real part of scipy's sqrtm does). F is a Cholesky factor of Sigma1 (or of Sigma2, the
    trace being symmetric) and, when both are singular (N < D), the eigh square root of Sigma1.
    """
    for a, b in ((sigma1, sigma2), (sigma2, sigma1)):
        f = _cholesky_factor(a)
        if f is not None:
            return float(_sum_sqrt_eigvals(_congruence(f, b, lower=True)))
    f = _eigh_factor(sigma1)
    return float(_sum_sqrt_eigvals(_congruence(f, sigma2, lower=False)))


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Heusel et al. 2017 (FID), docs/algorithms.md §6:
    d^2 = ||mu1 - mu2||^2 + Tr(Sigma1) + Tr(Sigma2) - 2 Tr((Sigma1 Sigma2)^{1/2}).

    Fast path without sqrtm (see :func:`trace_sqrt_product`); no jitter for singular (N < D)
    covariances.
    """
    mu1, sigma1 = _check_stats(mu1, sigma1, "first statistics")
    mu2, sigma2 = _check_stats(mu2, sigma2, "second statistics")
    check_same_dim(mu1, mu2, "first statistics", "second statistics")
    diff = mu1 - mu2
    tr_covmean = trace_sqrt_product(sigma1, sigma2)
    d2 = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
    return max(d2, 0.0)  # identical statistics give 0 up to round-off


def frechet_distance_batch(mu_ref: np.ndarray, sigma_ref: np.ndarray, mus: np.ndarray,
                           sigmas: np.ndarray) -> np.ndarray:
    """:func:`frechet_distance` of B statistics (mus [B, D], sigmas [B, D, D]) against one
    reference, factoring Sigma_ref once and solving the B eigenproblems in one batched call
    (bootstrap replicates). Returns [B] float64."""
    f = psd_factor(sigma_ref)
    tr_covmean = _sum_sqrt_eigvals(f.T @ sigmas @ f)
    diff = mus - mu_ref
    d2 = (np.einsum("bi,bi->b", diff, diff) + np.trace(sigma_ref)
          + np.trace(sigmas, axis1=-2, axis2=-1) - 2.0 * tr_covmean)
    return np.maximum(d2, 0.0)


def frechet_distance_sqrtm(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any,
                           eps: float = SQRTM_EPS) -> float:
    """Reference FID (pytorch-fid's calculate_frechet_distance): scipy sqrtm of Sigma1 Sigma2,
    real part; if not finite, retry with eps added to both diagonals. Slow; for cross-checks."""
    mu1, sigma1 = _check_stats(mu1, sigma1, "first statistics")
    mu2, sigma2 = _check_stats(mu2, sigma2, "second statistics")
    check_same_dim(mu1, mu2, "first statistics", "second statistics")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=SQRTM_IMAG_ATOL):
            raise DataError(f"FID: sqrtm has an imaginary component "
                            f"{np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_features(a: Any, b: Any) -> float:
    """FID between two feature sets [N_a, D] and [N_b, D] (Heusel et al. 2017)."""
    a = np.asarray(a)
    b = np.asarray(b)
    if a.ndim == 2 and b.ndim == 2:
        check_same_dim(a, b, "first features", "second features")
    mu1, sigma1 = gaussian_stats(a)
    mu2, sigma2 = gaussian_stats(b)
    return frechet_distance(mu1, sigma1, mu2, sigma2)


def _json_scalar(value: Any) -> Any:
    """numpy scalars and arrays in `meta` (e.g. N = len(features)) as plain JSON values."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"meta value {value!r} is not JSON serializable")


def save_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray,
               meta: dict[str, Any]) -> Path:
    """Write mu, sigma and a JSON `meta` (extractor, reference name/hash, N, ...) to an .npz,
    atomically (temporary name in the same folder, then rename). Returns the path."""
    path = Path(path)
    mu, sigma = _check_stats(mu, sigma, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(meta, sort_keys=True, default=_json_scalar)
    # a file object: np.savez appends no suffix
    write_atomic(path, lambda fh: np.savez(fh, mu=mu, sigma=sigma, meta=np.array(text)))
    return path


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read statistics written by :func:`save_stats` (or a pytorch-fid npz with mu/sigma, meta
    then {}). A missing or malformed file is a one-line DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: FID statistics file not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            mu, sigma = data["mu"], data["sigma"]
            meta = json.loads(str(data["meta"])) if "meta" in data.files else {}
    except Exception as exc:  # zip, key, JSON and pickle errors all mean "not our file"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: not a valid FID statistics file ({reason})") from None
    mu, sigma = _check_stats(mu, sigma, str(path))
    if not isinstance(meta, dict):
        raise DataError(f"{path}: FID statistics meta is not a JSON object")
    return mu, sigma, meta


# ------------------------------------------------------------------------------------- KID
def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = KID_DEGREE,
                      gamma: float | None = None, coef0: float = KID_COEF0) -> np.ndarray:
    """Binkowski et al. 2018, KID kernel: k(x, y) = (gamma x.y + coef0)^degree, gamma = 1/D."""
    if gamma is None:
        gamma = 1.0 / x.shape[1]
    return (gamma * (x @ y.T) + coef0) ** degree


def mmd2_unbiased(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
    """Binkowski et al. 2018, Eq. 2 (unbiased MMD^2 for m = n, torch-fidelity's 'unbiased'):
    sum_{i!=j} k(x_i,x_j)/(m(m-1)) + sum_{i!=j} k(y_i,y_j)/(m(m-1)) - 2 sum_{i,j} k(x_i,y_j)/m^2.
    """
    m = k_xx.shape[0]
    kt_xx = k_xx.sum() - np.trace(k_xx)
    kt_yy = k_yy.sum() - np.trace(k_yy)
    return float((kt_xx + kt_yy) / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m))


def kid(a: Any, b: Any, num_subsets: int = 100, subset_size: int = 1000,
        degree: int = KID_DEGREE, gamma: float | None = None, coef0: float = KID_COEF0,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018; torch-fidelity's definition): mean and
    std (ddof 0) over `num_subsets` random subsets (without replacement, numpy RandomState(seed))
    of the unbiased MMD^2 with the polynomial kernel. subset_size is capped at min(N_a, N_b)."""
    a = check_features(a, "first features", MIN_STATS_SAMPLES)
    b = check_features(b, "second features", MIN_STATS_SAMPLES)
    check_same_dim(a, b, "first features", "second features")
    if num_subsets < 1 or subset_size < MIN_STATS_SAMPLES:
        raise DataError(f"KID: need num_subsets >= 1 and subset_size >= 2, got {num_subsets} "
                        f"and {subset_size}")
    m = min(subset_size, len(a), len(b))
    rng = np.random.RandomState(seed)
    mmds = np.empty(num_subsets)
    for i in range(num_subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        mmds[i] = mmd2_unbiased(polynomial_kernel(x, x, degree, gamma, coef0),
                                polynomial_kernel(x, y, degree, gamma, coef0),
                                polynomial_kernel(y, y, degree, gamma, coef0))
    return float(mmds.mean()), float(mmds.std())


# -------------------------------------------------------------------------------------- IS
def _log_probs(scores: np.ndarray, from_logits: bool) -> np.ndarray:
    if from_logits:
        return scipy.special.log_softmax(scores, axis=1)
    if (scores < 0).any() or not np.allclose(scores.sum(axis=1), 1.0, atol=PROB_SUM_ATOL):
        raise DataError("inception score: probabilities must be >= 0 and sum to 1 per row "
                        "(pass from_logits=True for logits)")
    with np.errstate(divide="ignore"):
        return np.log(scores)


def inception_score(logits_or_probs: Any, splits: int = 10,
                    from_logits: bool = True) -> tuple[float, float]:
    """Salimans et al. 2016: IS = exp(E_x KL(p(y|x) || p(y))), p(y) = mean of p(y|x) over the
    split (docs/algorithms.md §6). `splits` equal consecutive splits of N // splits rows (the
    remainder is dropped, as in pytorch-fid/CBDM); returns the mean and std (ddof 0) over splits."""
    scores = check_features(logits_or_probs, "inception scores", 1)
    n = scores.shape[0]
    if splits < 1 or n < splits:
        raise DataError(f"inception score: {n} samples cannot fill {splits} splits")
    log_p = _log_probs(scores, from_logits)
    p = np.exp(log_p)
    size = n // splits
    values = np.empty(splits)
    for i in range(splits):
        lp, pp = log_p[i * size:(i + 1) * size], p[i * size:(i + 1) * size]
        with np.errstate(divide="ignore", invalid="ignore"):
            log_py = np.log(pp.mean(axis=0))
            # KL(p(y|x) || p(y)) = sum_y p (log p - log p(y)), with 0 log 0 = 0
            kl = np.where(pp > 0, pp * (lp - log_py), 0.0).sum(axis=1)
        values[i] = np.exp(kl.mean())
    return float(values.mean()), float(values.std())
