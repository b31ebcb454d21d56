"""What a classifier trains on: noisy images of a dataset with labels from any column (class,
attribute, side table), or feature-table rows; the stratified split and the timestep range."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from debiaslab.config import ExperimentConfig
from debiaslab.data.pixels import from_uint8
from debiaslab.errors import ConfigError, DataError

INPUT_IMAGES, INPUT_FEATURES = "noisy_images", "features"
LABEL_CLASS, ATTR_PREFIX, SIDE_PREFIX = "class", "attr:", "side:"


@dataclass
class ClassifierData:
    """Rows a classifier trains on, aligned: inputs, integer labels 0..K-1 and the K names.

    ``inputs``: uint8 images [N, C, H, W] (kind noisy_images; noised at training time) or float
    features [N, ...] (kind features). ``timesteps``: per-row timesteps of the features (None: a
    time-free head). ``cond``: class labels to condition on (model.class_conditional).
    ``source_hash``: content hash of the dataset the rows come from; ``rows``: their indices in
    it (default 0..N-1).
    """

    kind: str
    inputs: Tensor
    labels: Tensor
    class_names: list[str]
    timesteps: Tensor | None = None
    cond: Tensor | None = None
    num_cond_classes: int = 0
    source_hash: str = ""
    rows: Tensor | None = None

    def __post_init__(self) -> None:
        if self.kind not in (INPUT_IMAGES, INPUT_FEATURES):
            raise ConfigError(f"classifier.input: unknown input {self.kind!r}; allowed: "
                              f"{INPUT_IMAGES}, {INPUT_FEATURES}")
        self.inputs = torch.as_tensor(self.inputs)
        if self.kind == INPUT_IMAGES and (self.inputs.dtype != torch.uint8
                                          or self.inputs.ndim != 4):
            raise DataError(f"noisy_images inputs must be uint8 [N, C, H, W], got "
                            f"{self.inputs.dtype} {tuple(self.inputs.shape)}")
        if self.kind == INPUT_FEATURES:
            self.inputs = self.inputs.float()
            if self.inputs.ndim < 2 or not torch.isfinite(self.inputs).all():
                raise DataError(f"features must be finite numbers [N, ...], got shape "
                                f"{tuple(self.inputs.shape)}")
        n = self.inputs.shape[0]
        self.labels = torch.as_tensor(np.asarray(self.labels), dtype=torch.long)
        if self.labels.shape != (n,):
            raise DataError(f"labels must be [N={n}] aligned to the rows, got "
                            f"{tuple(self.labels.shape)}")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise DataError(f"labels must lie in 0..{len(self.class_names) - 1} (one per class "
                            f"name), got {int(self.labels.min())}..{int(self.labels.max())}")
        for key in ("timesteps", "cond"):
            value = getattr(self, key)
            if value is not None:
                value = torch.as_tensor(np.asarray(value))
                if value.shape != (n,):
                    raise DataError(f"{key} must be [N={n}], got {tuple(value.shape)}")
                setattr(self, key, value.long() if key == "cond" else value.float())
        self.rows = torch.arange(n) if self.rows is None else torch.as_tensor(self.rows).long()
        self.class_names = [str(c) for c in self.class_names]

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.inputs.shape[1:])

    @property
    def num_outputs(self) -> int:
        return len(self.class_names)

    def subset(self, idx: Tensor | np.ndarray | Sequence[int]) -> "ClassifierData":
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)

        def pick(values: Tensor | None) -> Tensor | None:
            return None if values is None else values[idx]

        return dataclasses.replace(self, inputs=self.inputs[idx], labels=self.labels[idx],
                                   timesteps=pick(self.timesteps), cond=pick(self.cond),
                                   rows=self.rows[idx])

    def float_inputs(self, idx: Tensor) -> Tensor:
        """Rows ``idx`` as float: images in [-1, 1], features as stored."""
        x = self.inputs[idx]
        return from_uint8(x) if self.kind == INPUT_IMAGES else x

    def rows_hash(self) -> str:
        """sha256 of what the rows mean: their indices, labels, class names, timesteps,
        conditioning labels and (features) values; the image content is ``source_hash``."""
        h = hashlib.sha256(f"{self.kind}|{self.source_hash}|{self.class_names}".encode())
        parts = [self.rows, self.labels, self.timesteps, self.cond]
        if self.kind == INPUT_FEATURES:
            parts.append(self.inputs)
        for part in parts:
            h.update(b"-" if part is None else part.contiguous().numpy().tobytes())
        return h.hexdigest()


def dataset_labels(dataset: Any, label: str) -> tuple[np.ndarray, list[str]]:
    """(labels int64 [N] aligned to the dataset's rows, -1 for none; class names) of ``label``:
    "class" (the dataset's classes), "attr:<name>" (a 0/1 attribute: ["not <name>", "<name>"])
    or "side:<table>.<column>" (an integer side-table column joined by id; classes 0..max)."""
    if label == LABEL_CLASS:
        return dataset.labels.numpy().astype(np.int64), list(dataset.class_names)
    if label.startswith(ATTR_PREFIX):
        name = label[len(ATTR_PREFIX):]
        if name not in dataset.attr_names:
            raise ConfigError(f"classifier.label: {label!r}: the dataset has no attribute "
                              f"{name!r}; attributes: {', '.join(dataset.attr_names) or '(none)'}")
        column = dataset.attributes[:, dataset.attr_names.index(name)].numpy().astype(np.int64)
        return column, [f"not {name}", name]
    if label.startswith(SIDE_PREFIX):
        values = side_column(dataset, label[len(SIDE_PREFIX):], "classifier.label")
        if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
            raise ConfigError(f"classifier.label: {label!r} must be an integer column [N], got "
                              f"{values.dtype} {values.shape[1:]}")
        labels = values.astype(np.int64)
        count = int(labels.max()) + 1 if (labels >= 0).any() else 0
        return labels, [str(k) for k in range(count)]
    raise ConfigError(f"classifier.label: unknown label {label!r}; allowed: {LABEL_CLASS}, "
                      f"{ATTR_PREFIX}<name>, {SIDE_PREFIX}<table>.<column>")


def side_column(dataset: Any, spec: str, key: str) -> np.ndarray:
    """Side-table column ``<table>.<column>`` of ``dataset``'s folder aligned to its rows (the
    column is after the last dot: table names may hold dots, e.g. ``<run>.mscore``)."""
    from debiaslab.data.side_tables import join, read_side_table

    table, dot, column = spec.rpartition(".")
    if not (table and dot and column):
        raise ConfigError(f"{key}: {spec!r} must name a side table column as <table>.<column>")
    side = read_side_table(dataset.manifest.path, table, [column])
    return join(dataset.ids, side, column)


def image_data(dataset: Any, label: str = LABEL_CLASS, *,
               class_conditional: bool = False) -> ClassifierData:
    """A noisy-image classifier's rows of an ImageDataset: the rows that have a ``label``
    (see `dataset_labels`), conditioned on the dataset's class when ``class_conditional``."""
    labels, names = dataset_labels(dataset, label)
    keep = labels >= 0
    cond = None
    if class_conditional:
        cond = dataset.labels.numpy()
        keep &= cond >= 0
        cond = cond[keep]
    rows = np.flatnonzero(keep)
    if not len(rows):
        raise DataError(f"{dataset.manifest.path}: no row has a {label!r} label")
    return ClassifierData(INPUT_IMAGES, dataset.images[torch.from_numpy(rows)], labels[keep],
                          names, cond=cond,
                          num_cond_classes=int(dataset.num_classes) if class_conditional else 0,
                          source_hash=str(dataset.content_hash), rows=torch.from_numpy(rows))


def feature_data(features: np.ndarray | Tensor, labels: np.ndarray | Tensor,
                 class_names: Sequence[str], *, timesteps: np.ndarray | Tensor | None = None,
                 source_hash: str = "") -> ClassifierData:
    """A head's rows: float features [N, ...] (vectors or N-D tensors), int labels [N] in
    0..K-1 and K class names, optionally the timestep [N] each row was computed at."""
    return ClassifierData(INPUT_FEATURES, torch.as_tensor(np.asarray(features)), labels,
                          list(class_names), timesteps=timesteps, source_hash=source_hash)


def load_classifier_data(cfg: ExperimentConfig) -> ClassifierData:
    """``cfg.classifier``'s rows from the experiment's built training set (what Ray workers
    call): labels from ``classifier.label``; for input=features, the float side-table column
    ``classifier.features`` as inputs."""
    from debiaslab.data.locate import load_training_data

    c = cfg.classifier
    dataset = load_training_data(cfg)
    if c.input == INPUT_IMAGES:
        return image_data(dataset, c.label, class_conditional=cfg.model.class_conditional)
    if not c.features:
        raise ConfigError("classifier.features: input=features needs the side table column "
                          "<table>.<column> that holds the features")
    features = side_column(dataset, c.features, "classifier.features")
    labels, names = dataset_labels(dataset, c.label)
    keep = np.flatnonzero(labels >= 0)
    return ClassifierData(INPUT_FEATURES, torch.as_tensor(features[keep]), labels[keep], names,
                          source_hash=str(dataset.content_hash), rows=torch.from_numpy(keep))


def stratified_split(labels: Tensor | np.ndarray, val_fraction: float, seed: int
                     ) -> tuple[Tensor, Tensor]:
    """(train, validation) row indices, sorted: round(val_fraction * n_c) random rows of each
    label c go to validation (at least one row of each label stays in training)."""
    labels = np.asarray(labels)
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"classifier.val_fraction: must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    val: list[np.ndarray] = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        val.append(members[:min(round(val_fraction * len(members)), len(members) - 1)])
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return torch.from_numpy(train_idx).long(), torch.from_numpy(val_idx).long()


def split_data(cfg: ExperimentConfig, data: ClassifierData
               ) -> tuple[ClassifierData, ClassifierData]:
    """(training rows, validation rows) of ``data``: stratified by label,
    ``classifier.val_fraction`` held out, seeded by ``train.seed``."""
    train_idx, val_idx = stratified_split(data.labels, cfg.classifier.val_fraction,
                                          cfg.train.seed)
    return data.subset(train_idx), data.subset(val_idx)


def timestep_bounds(cfg: ExperimentConfig) -> tuple[int, int]:
    """Inclusive [lo, hi] of the training timesteps: ``classifier.timestep_range`` or 0..T-1."""
    T = cfg.diffusion.num_timesteps
    rng = cfg.classifier.timestep_range
    if not rng:
        return 0, T - 1
    if len(rng) != 2 or not 0 <= rng[0] <= rng[1] <= T - 1:
        raise ConfigError(f"classifier.timestep_range: must be [lo, hi] with 0 <= lo <= hi <= "
                          f"{T - 1} (diffusion.num_timesteps - 1), got {list(rng)}")
    return int(rng[0]), int(rng[1])


