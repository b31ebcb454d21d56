"""Imbalance builders: pure numpy on label / attribute arrays, returning selected row indices.
Long tail follows CBDM's canonical recipe (docs/algorithms.md 4.6); attribute bias and the
long tail with a balanced reference follow TIW-DSM (§2.1)."""

from __future__ import annotations

import math

import numpy as np

from debiaslab.errors import DataError

_FLOOR_EPS = 1e-9  # guards floor(P / ratio) against 999.9999999 for exact quotients
_MAX_CLASSES_SHOWN = 10  # empty classes named in the long-tail error


def _check_imb_factor(imb_factor: float) -> None:
    if not 0.0 < imb_factor <= 1.0:
        raise DataError(f"imb_factor (rho) must be in (0, 1], got {imb_factor}")


def long_tail_counts(n_max: int, num_classes: int, imb_factor: float) -> list[int]:
    """Exponential profile n_c = floor(n_max * rho^(c / (C - 1))), c = 0..C-1 (class 0 = head)."""
    _check_imb_factor(imb_factor)
    if n_max < 1 or num_classes < 1:
        raise DataError(f"n_max and num_classes must be >= 1, got {n_max} and {num_classes}")
    if num_classes == 1:
        return [int(n_max)]
    return [int(n_max * imb_factor ** (c / (num_classes - 1))) for c in range(num_classes)]


def min_imb_factor(n_max: int, num_classes: int) -> float:
    """Smallest rho (at most 1) whose long-tail profile gives every class >= 1 image. The tail
    class gets floor(n_max * rho), so it is 1 / n_max, nudged up past floating-point error."""
    rho = 1.0 / n_max
    while min(long_tail_counts(n_max, num_classes, rho)) < 1:
        rho = float(np.nextafter(rho, 2.0))
    return rho


def _readable_factor(n_max: int, num_classes: int, rho: float) -> str:
    """`rho` rounded up to 3 (or more, until every class is kept) significant digits."""
    for digits in range(3, 18):
        scale = 10.0 ** (digits - 1 - math.floor(math.log10(rho)))
        candidate = min(math.ceil(rho * scale) / scale, 1.0)
        if min(long_tail_counts(n_max, num_classes, candidate)) >= 1:
            return f"{candidate:g}"
    return repr(rho)


def _check_no_empty_class(
    counts: list[int], n_max: int, imb_factor: float, class_names: list[str] | None
) -> None:
    empty = [c for c, n_c in enumerate(counts) if n_c < 1]
    if not empty:
        return
    names = [class_names[c] if class_names and c < len(class_names) else str(c) for c in empty]
    shown = ", ".join(names[:_MAX_CLASSES_SHOWN])
    if len(names) > _MAX_CLASSES_SHOWN:
        shown += f", ... ({len(names)} in all)"
    smallest = _readable_factor(n_max, len(counts), min_imb_factor(n_max, len(counts)))
    raise DataError(
        f"data.imb_factor: {imb_factor} leaves class(es) {shown} with zero images "
        f"(n_max {n_max}, {len(counts)} classes); the smallest factor that keeps every class "
        f"(>= 1 image) is 1/n_max = 1/{n_max}: set data.imb_factor >= {smallest}"
    )


def long_tail_indices(
    labels: np.ndarray,
    imb_factor: float,
    seed: int = 0,
    n_max: int | None = None,
    num_classes: int | None = None,
    class_names: list[str] | None = None,
) -> np.ndarray:
    """Indices of a long-tailed subset: one RandomState(seed); for c = 0..C-1 shuffle class c's
    sorted indices and keep the first n_c. Returned class-major in that order (as in CBDM).

    `n_max` defaults to the smallest class count, so every class can supply its n_c. A factor
    that leaves a class with no image is a DataError (naming `class_names` when given).
    """
    _check_imb_factor(imb_factor)
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"long_tail needs a 1-D integer label array, got {labels.dtype}")
    if len(labels) == 0 or labels.min() < 0:
        raise DataError("long_tail needs every image to have a class label (found label < 0)")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    if labels.max() >= num_classes:
        raise DataError(f"label {int(labels.max())} out of range [0, {num_classes})")
    available = np.bincount(labels, minlength=num_classes)
    if n_max is None:
        n_max = int(available.min())
    counts = long_tail_counts(n_max, num_classes, imb_factor)
    _check_no_empty_class(counts, n_max, imb_factor, class_names)
    rng = np.random.RandomState(seed)
    selected = []
    for c, n_c in enumerate(counts):
        idx = np.flatnonzero(labels == c)
        if len(idx) < n_c:
            raise DataError(f"long_tail: class {c} has {len(idx)} images, needs {n_c}")
        rng.shuffle(idx)
        selected.append(idx[:n_c])
    return np.concatenate(selected).astype(np.int64)


def attribute_bias_indices(
    attribute: np.ndarray,
    ratio: float,
    reference_fraction: float,
    seed: int = 0,
    reference_count: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """TIW-DSM split of a binary attribute: (biased_idx, reference_idx), disjoint and sorted.

    The reference set is balanced 50/50 over the attribute with ``reference_count`` images, or
    round(reference_fraction * N) when the count is 0; from the rest, the largest biased set in
    which a fraction `ratio` has attribute = 1.
    """
    attribute = np.asarray(attribute)
    if attribute.ndim != 1 or len(attribute) == 0:
        raise DataError("attribute_bias needs a non-empty 1-D attribute array")
    if not np.isin(attribute, (0, 1)).all():
        raise DataError("attribute_bias needs a binary (0/1) attribute")
    if not 0.0 <= ratio <= 1.0:
        raise DataError(f"bias_ratio must be in [0, 1], got {ratio}")
    n_ref = reference_size(len(attribute), reference_fraction, reference_count)
    rng = np.random.RandomState(seed)
    pos = np.flatnonzero(attribute == 1)
    neg = np.flatnonzero(attribute == 0)
    rng.shuffle(pos)
    rng.shuffle(neg)
    n_ref_pos = n_ref // 2
    n_ref_neg = n_ref - n_ref_pos
    if n_ref < 2:
        raise DataError(f"reference_fraction {reference_fraction} gives fewer than 2 images")
    if n_ref_pos > len(pos) or n_ref_neg > len(neg):
        raise DataError(
            f"attribute_bias: a balanced reference of {n_ref} needs {n_ref_pos} + {n_ref_neg} "
            f"images, available {len(pos)} with attribute=1 and {len(neg)} with attribute=0"
        )
    reference = np.concatenate([pos[:n_ref_pos], neg[:n_ref_neg]])
    rest_pos, rest_neg = pos[n_ref_pos:], neg[n_ref_neg:]
    limits = []
    if ratio > 0.0:
        limits.append(len(rest_pos) / ratio)
    if ratio < 1.0:
        limits.append(len(rest_neg) / (1.0 - ratio))
    total = int(math.floor(min(limits) + _FLOOR_EPS))
    n_pos = min(int(round(ratio * total)), len(rest_pos))
    n_neg = min(total - n_pos, len(rest_neg))
    if n_pos + n_neg == 0:
        raise DataError(f"attribute_bias: no images left for a biased set with ratio {ratio}")
    biased = np.concatenate([rest_pos[:n_pos], rest_neg[:n_neg]])
    return np.sort(biased).astype(np.int64), np.sort(reference).astype(np.int64)


def reference_size(n_images: int, reference_fraction: float, reference_count: int = 0) -> int:
    """How many reference images: ``reference_count`` when > 0, else round(fraction * N)."""
    if reference_count < 0:
        raise DataError(f"reference_count must be >= 0, got {reference_count}")
    if reference_count > 0:
        return int(reference_count)
    if not 0.0 < reference_fraction < 1.0:
        raise DataError(f"reference_fraction must be in (0, 1), got {reference_fraction}")
    return int(round(reference_fraction * n_images))


def balanced_counts(total: int, num_groups: int) -> list[int]:
    """``total`` split as evenly as possible over groups, the first ones taking the remainder."""
    base, extra = divmod(total, num_groups)
    return [base + (1 if g < extra else 0) for g in range(num_groups)]


def long_tail_reference_indices(
    labels: np.ndarray,
    imb_factor: float,
    n_reference: int,
    seed: int = 0,
    n_max: int | None = None,
    num_classes: int | None = None,
    class_names: list[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """TIW-DSM's long-tail setting: (biased_idx, reference_idx), disjoint.

    The reference is drawn first, class-balanced: ``n_reference`` images split evenly over the
    classes (RandomState(seed), each class's indices shuffled). The biased set is then the long
    tail (:func:`long_tail_indices`, same seed) of the images left, so its ``n_max`` defaults to
    the smallest class count left. The reference comes back sorted, the biased set class-major.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0 or labels.min() < 0:
        raise DataError("long_tail_reference needs every image to have a class label")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    if n_reference < num_classes:
        raise DataError(f"a class-balanced reference needs at least one image per class: "
                        f"{n_reference} reference images for {num_classes} classes; raise "
                        f"data.reference_count or data.reference_fraction")
    rng = np.random.RandomState(seed)
    chosen = []
    for c, n_c in enumerate(balanced_counts(n_reference, num_classes)):
        idx = np.flatnonzero(labels == c)
        if len(idx) <= n_c:
            raise DataError(f"long_tail_reference: class {c} has {len(idx)} images; a reference "
                            f"of {n_c} per class leaves none for the biased set")
        rng.shuffle(idx)
        chosen.append(idx[:n_c])
    reference = np.sort(np.concatenate(chosen)).astype(np.int64)
    rest = np.setdiff1d(np.arange(len(labels)), reference)
    biased = rest[long_tail_indices(labels[rest], imb_factor, seed, n_max,
                                    num_classes=num_classes, class_names=class_names)]
    return biased.astype(np.int64), reference
