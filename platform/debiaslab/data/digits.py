"""Embedded real data: scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes),
upsampled bilinearly to 16x16 uint8 grayscale, with derived binary attributes `bold` and `even`."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from debiaslab.data.schema import ImageArrays
from debiaslab.errors import DataError

DIGITS_SIZE = 16  # output side length in pixels
DIGITS_SOURCE_SIZE = 8  # side length of the bundled images
DIGITS_MAX_VALUE = 16.0  # bundled pixel values lie in 0..16
PIXEL_MAX = 255
DIGITS_CLASS_NAMES = [str(d) for d in range(10)]
DIGITS_ATTR_NAMES = ["bold", "even"]


def load_digits_arrays(size: int = DIGITS_SIZE) -> ImageArrays:
    """All 1,797 digits as (N, 1, size, size) uint8 with labels 0..9 and attributes
    `bold` (ink mass strictly above the median over the whole set) and `even` (label is even)."""
    if size < 1:
        raise DataError(f"digits: size must be >= 1, got {size}")
    bunch = load_digits()
    raw = bunch.images.astype(np.float64)  # (N, 8, 8), values 0..16
    labels = bunch.target.astype(np.int64)
    x = torch.from_numpy(raw / DIGITS_MAX_VALUE).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    if size != DIGITS_SOURCE_SIZE:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    images = (x * PIXEL_MAX).round().clamp(0, PIXEL_MAX).to(torch.uint8).numpy()
    ink_mass = raw.reshape(len(raw), -1).sum(axis=1)
    bold = ink_mass > np.median(ink_mass)
    even = labels % 2 == 0
    attributes = np.stack([bold, even], axis=1).astype(np.int8)
    return ImageArrays(
        images=np.ascontiguousarray(images),
        labels=labels,
        attributes=attributes,
        class_names=list(DIGITS_CLASS_NAMES),
        attr_names=list(DIGITS_ATTR_NAMES),
        ids=[f"digits-{i:04d}" for i in range(len(labels))],
    )
