"""Fairness Discrepancy (Choi et al. 2020) of attribute predictions on generated samples
(docs/algorithms.md §6, §3.8): the L2 distance between the predicted class proportions and
uniform."""

from __future__ import annotations

from typing import Any

import numpy as np

from debiaslab.errors import DataError

MAX_JOINT_ATTRIBUTES = 20  # 2^20 joint classes; beyond that the histogram is meaningless


def _labels(pred: Any, num_classes: int) -> np.ndarray:
    """Integer labels [N] in [0, num_classes) from labels [N] or class scores [N, C] (argmax)."""
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise DataError(f"fairness: num_classes must be a positive integer, got {num_classes!r}")
    arr = np.asarray(pred)
    if arr.size == 0:
        raise DataError("fairness: no predictions (empty input)")
    if arr.ndim == 2:
        if arr.shape[1] != num_classes:
            raise DataError(f"fairness: scores have {arr.shape[1]} columns, expected "
                            f"num_classes={num_classes}")
        return arr.argmax(axis=1)
    if arr.ndim != 1:
        raise DataError(f"fairness: expected labels [N] or scores [N, C], got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.number) or not np.all(np.mod(arr, 1) == 0):
            raise DataError("fairness: labels must be integers")
        arr = arr.astype(np.int64)
    if arr.min() < 0 or arr.max() >= num_classes:
        raise DataError(f"fairness: labels must lie in [0, {num_classes}), got range "
                        f"[{arr.min()}, {arr.max()}]")
    return arr


def attribute_distribution(pred: Any, num_classes: int) -> np.ndarray:
    """p_gen[c] = (1/N) sum_x 1[pred(x) = c] (Choi et al. 2020): proportions [C] summing to 1."""
    labels = _labels(pred, num_classes)
    return np.bincount(labels, minlength=num_classes) / len(labels)


def fairness_discrepancy(pred: Any, num_classes: int) -> float:
    """Choi et al. 2020, Fairness Discrepancy (docs/algorithms.md §6):
    FD = || u - p_gen ||_2, u = 1/C.
    0 = perfectly balanced; the maximum, sqrt(1 - 1/C), is all samples in one class."""
    p_gen = attribute_distribution(pred, num_classes)
    return float(np.linalg.norm(np.full(num_classes, 1.0 / num_classes) - p_gen))


def joint_labels(attr_matrix: Any) -> np.ndarray:
    """Joint class of A binary attributes: sum_j a_j 2^(A-1-j) (first attribute = highest bit)."""
    attrs = np.asarray(attr_matrix)
    if attrs.size == 0:
        raise DataError("fairness: no predictions (empty attribute matrix)")
    if attrs.ndim != 2:
        raise DataError(f"fairness: expected a 0/1 attribute matrix [N, A], got shape "
                        f"{attrs.shape}")
    if attrs.shape[1] > MAX_JOINT_ATTRIBUTES:
        raise DataError(f"fairness: {attrs.shape[1]} attributes exceed the limit of "
                        f"{MAX_JOINT_ATTRIBUTES} for joint classes")
    if not np.isin(attrs, (0, 1)).all():
        raise DataError("fairness: attribute matrix entries must be 0 or 1")
    weights = 2 ** np.arange(attrs.shape[1] - 1, -1, -1, dtype=np.int64)
    return attrs.astype(np.int64) @ weights


def joint_fairness_discrepancy(attr_matrix: Any) -> float:
    """Choi et al. 2020, FD over the 2^A joint classes of A binary attributes [N, A] of 0/1."""
    labels = joint_labels(attr_matrix)
    return fairness_discrepancy(labels, 2 ** np.asarray(attr_matrix).shape[1])
