"""The one conversion between model space [-1, 1] and stored uint8 pixels, and its one rounding
rule: u = round_half_even((x + 1) * 127.5) in float32, clamped to 0..255 (NaN -> 0). The stored
samples, the grids, the extractor inputs and the minority-score distances all use it, so a saved
image and the grid that shows it hold the same bytes."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

PIXEL_MAX = 255
PIXEL_HALF_RANGE = 127.5


def to_uint8(x: Tensor) -> Tensor:
    """float images in [-1, 1] -> uint8 0..255 (same device)."""
    u = ((x.float() + 1.0) * PIXEL_HALF_RANGE).round()
    return torch.nan_to_num(u, nan=0.0).clamp(0, PIXEL_MAX).to(torch.uint8)


def to_uint8_numpy(x: Any) -> np.ndarray:
    """The numpy twin of :func:`to_uint8`, bit for bit (float32 arithmetic, half to even)."""
    u = np.rint((np.asarray(x, dtype=np.float32) + np.float32(1.0)) * np.float32(PIXEL_HALF_RANGE))
    return np.nan_to_num(u, nan=0.0).clip(0, PIXEL_MAX).astype(np.uint8)


def from_uint8(u: Tensor) -> Tensor:
    """uint8 0..255 -> float32 in [-1, 1]."""
    return u.float() / PIXEL_HALF_RANGE - 1.0


def map_batch(batch: dict[str, Any]) -> tuple[list[str], Tensor, Tensor]:
    """A decoded map-job batch (``id``, ``pixels`` uint8 [N, C, H, W], ``label``) as (ids, images
    in [-1, 1], int64 labels). Ray hands the batch's arrays over read-only (zero copy): they are
    copied only then, so torch never wraps a non-writable array (a UserWarning per batch)."""
    ids = [str(i) for i in batch["id"]]
    pixels = torch.from_numpy(np.require(batch["pixels"], requirements=["C", "W"]))
    labels = torch.from_numpy(np.require(np.asarray(batch["label"], dtype=np.int64),
                                         requirements=["C", "W"]))
    return ids, from_uint8(pixels), labels
