"""Where an experiment's datasets live and how its training set is loaded (no orchestration, so
every layer, Ray workers included, can find the data without importing the stages)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from debiaslab.errors import DataError


def train_data_path(cfg: Any, root: Path | None = None) -> Path:
    """The folder the score model trains on: for builds with a reference set, the part
    ``data.train_on`` names (biased, reference or observed = both)."""
    from debiaslab.data.sources import SPLIT_IMBALANCES

    root = root or cfg.dataset_path
    return root / cfg.data.train_on if cfg.data.imbalance in SPLIT_IMBALANCES else root


def load_training_data(cfg: Any) -> Any:
    """The experiment's training set as an in-memory ImageDataset (one-line error if not built)."""
    from debiaslab.data.dataset import ImageDataset

    path = train_data_path(cfg)
    if not (path / "dataset.json").is_file():
        raise DataError(f"{path}: no dataset here; run `debiaslab data build` first")
    return ImageDataset.load(path)
