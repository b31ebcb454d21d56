"""Feature extractors for the metrics (docs/algorithms.md §6): one interface, batched uint8 images
in, features, logits and domain predictions out; built by name from the `EXTRACTORS` registry."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from debiaslab.data.pixels import to_uint8
from debiaslab.data.schema import one_line
from debiaslab.errors import ConfigError, DataError
from debiaslab.progress import progress as progress_bar
from debiaslab.registry import Registry

FLOAT_RANGE_TOLERANCE = 1e-3  # float inputs may overshoot [-1, 1] by this much (rounding noise)
DEFAULT_BATCH_SIZE = 256
IMAGE_NDIM = 4  # [N, C, H, W]
# Modules that register the built-in extractors; imported lazily by build_extractor so that
# importing this module stays cheap (torch-fidelity is only imported when Inception is built).
BUILTIN_EXTRACTOR_MODULES = ("debiaslab.metrics.inception", "debiaslab.metrics.digits_classifier")

EXTRACTORS: Registry[Any] = Registry("feature extractor")
# What each registered extractor's extract() predicts besides features, known without building
# it (config checks): "class" and "attr:<name>" (the digits extractor registers its own).
PREDICTIONS: dict[str, tuple[str, ...]] = {}


@dataclass
class Extracted:
    """Per-image outputs of an extractor; optional fields are None when it does not produce them."""

    features: np.ndarray  # [N, D] float32
    logits: np.ndarray | None = None  # [N, K] float32 class logits (Inception: 1008-way, for IS)
    classes: np.ndarray | None = None  # [N] int64 argmax domain-class predictions
    attributes: np.ndarray | None = None  # [N, A] int8 0/1 attribute predictions

    def __len__(self) -> int:
        return len(self.features)


def default_device() -> torch.device:
    """The first CUDA device when one is available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _shape_text(shape: tuple[int, ...] | None) -> str:
    return "any" if shape is None else "x".join(str(s) for s in shape)


class FeatureExtractor:
    """Base class: validates and batches images, runs `_forward` under no_grad on `device`.

    Subclasses set `name`, `feature_dim`, `class_names`, `attr_names`, `input_shape` (required
    (C, H, W), or None for any size) and `input_channels` (accepted channel counts when
    `input_shape` is None), and implement `_forward(uint8 [B, C, H, W] on device) -> dict` with
    "features" and optionally "logits", "classes", "attributes" tensors.
    """

    name: str = "feature-extractor"
    feature_dim: int = 0
    class_names: list[str] = []
    attr_names: list[str] = []
    input_shape: tuple[int, int, int] | None = None
    input_channels: tuple[int, ...] | None = None
    supports_inception_score: bool = False  # logits are ImageNet-style (Inception Score applies)
    device: torch.device = torch.device("cpu")

    def metadata(self) -> dict[str, Any]:
        """What an evaluation records about the extractor (name, dims, input contract)."""
        return {
            "extractor": self.name,
            "feature_dim": self.feature_dim,
            "class_names": list(self.class_names),
            "attr_names": list(self.attr_names),
            "input_shape": list(self.input_shape) if self.input_shape is not None else None,
        }

    def _forward(self, batch: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    # ------------------------------------------------------------------ input validation
    def _expected_text(self) -> str:
        if self.input_shape is not None:
            return _shape_text(self.input_shape)
        channels = "/".join(str(c) for c in self.input_channels or ())
        return f"{channels or 'any'} channels, any size"

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        expected = self._expected_text()
        if len(shape) != IMAGE_NDIM:
            raise DataError(one_line(
                f"{self.name}: expected images [N, C, H, W] ({expected}), got shape {list(shape)}"
            ))
        n, chw = shape[0], tuple(shape[1:])
        if n == 0:
            raise DataError(f"{self.name}: no images to extract features from (got N = 0)")
        wrong_shape = self.input_shape is not None and chw != tuple(self.input_shape)
        wrong_channels = self.input_channels is not None and chw[0] not in self.input_channels
        if wrong_shape or wrong_channels or min(chw) < 1:
            raise DataError(one_line(
                f"{self.name}: got images of shape {_shape_text(chw)} (C x H x W), "
                f"expected {expected}"
            ))

    def _check_values(self, images: np.ndarray | Tensor) -> None:
        dtype = images.dtype
        if isinstance(dtype, torch.dtype):
            is_uint8, is_float = dtype == torch.uint8, dtype.is_floating_point
        else:
            is_uint8, is_float = dtype == np.uint8, bool(np.issubdtype(dtype, np.floating))
        if is_uint8:
            return
        if not is_float:
            raise DataError(f"{self.name}: expected uint8 images or floats in [-1, 1], got {dtype}")
        lo, hi = float(images.min()), float(images.max())
        bound = 1.0 + FLOAT_RANGE_TOLERANCE
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -bound or hi > bound:
            raise DataError(one_line(
                f"{self.name}: float images must lie in [-1, 1], got values in [{lo:.4g}, {hi:.4g}]"
            ))

    @staticmethod
    def _to_uint8(batch: Tensor) -> Tensor:
        if batch.dtype == torch.uint8:
            return batch
        return to_uint8(batch)

    # ------------------------------------------------------------------------ extraction
    def extract(
        self,
        images: np.ndarray | Tensor,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        progress: bool = False,
    ) -> Extracted:
        """Features (and logits / predictions) of uint8 [N, C, H, W] images (floats in [-1, 1]
        are quantised to uint8 first), in batches of `batch_size` under torch.no_grad."""
        if batch_size < 1:
            raise ConfigError(f"{self.name}: batch_size must be >= 1, got {batch_size}")
        if not isinstance(images, (np.ndarray, Tensor)):
            images = np.asarray(images)
        self._check_shape(tuple(images.shape))
        self._check_values(images)
        n = images.shape[0]
        outputs: dict[str, list[np.ndarray]] = {}
        with torch.no_grad(), progress_bar(total=n, desc=self.name, unit="img",
                                           disable=not progress, leave=False) as bar:
            for start in range(0, n, batch_size):
                chunk = images[start:start + batch_size]
                if isinstance(chunk, np.ndarray):  # read-only arrays (Ray batches) are copied
                    chunk = torch.from_numpy(np.require(chunk, requirements=["C", "W"]))
                batch = self._to_uint8(chunk.to(self.device))
                for key, value in self._forward(batch).items():
                    outputs.setdefault(key, []).append(value.detach().cpu().numpy())
                bar.update(len(batch))

        def joined(key: str, dtype: type) -> np.ndarray | None:
            parts = outputs.get(key)
            return np.concatenate(parts).astype(dtype, copy=False) if parts else None

        features = joined("features", np.float32)
        assert features is not None, f"{type(self).__name__}._forward returned no 'features'"
        return Extracted(
            features=features,
            logits=joined("logits", np.float32),
            classes=joined("classes", np.int64),
            attributes=joined("attributes", np.int8),
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, feature_dim={self.feature_dim})"


def register_builtin_extractors() -> Registry[Any]:
    """Import the built-in extractor modules (cheap: no weights load) and return the registry."""
    for module in BUILTIN_EXTRACTOR_MODULES:
        importlib.import_module(module)
    return EXTRACTORS


def build_extractor(name: str, **options: Any) -> FeatureExtractor:
    """The extractor registered as `name` ("inception", "digits"), built with `options`."""
    return register_builtin_extractors().build(name, **options)
