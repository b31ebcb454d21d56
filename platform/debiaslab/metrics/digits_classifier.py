"""Domain features for the embedded digits: a small CNN with a class head and a binary head per
attribute, trained deterministically on the balanced 16x16 digits set and cached by content hash."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from debiaslab.checkpoints import save_checkpoint
from debiaslab.data.digits import DIGITS_ATTR_NAMES, DIGITS_SIZE, load_digits_arrays
from debiaslab.data.pixels import from_uint8
from debiaslab.data.schema import ImageArrays, one_line
from debiaslab.metrics.features import (
    EXTRACTORS,
    PREDICTIONS,
    FeatureExtractor,
    default_device,
)
from debiaslab.progress import progress as progress_bar

RECIPE_VERSION = "digits-cnn-v1"  # bump whenever the architecture or training changes
DIGITS_SEED = 0
HOLDOUT_FRACTION = 0.2  # stratified, per class
EPOCHS = 20
BATCH_SIZE = 64
MAX_LEARNING_RATE = 2e-3  # one-cycle schedule peak (Adam)
CONV_WIDTH = 16  # channels of the first conv stage; the second has twice as many
FEATURE_DIM = 128  # penultimate layer = the features used for FID / PR / DC
ATTR_LOGIT_THRESHOLD = 0.0  # attribute predicted 1 when its logit is > 0 (p > 0.5)
POOLED_SIZE = 4  # 16 -> 8 -> 4 after the two max-pools
# One intra-op thread: results do not depend on the machine's core count (bitwise), and no
# OpenMP oversubscription when other processes share the cores.
TRAIN_THREADS = 1
CACHE_ENV = "DEBIASLAB_CACHE"  # debiaslab cache root; extractors live in <root>/extractors
DEFAULT_CACHE_ROOT = Path("~/.cache/debiaslab")
EXTRACTORS_SUBDIR = "extractors"
CACHE_FORMAT = 1
KEY_CHARS = 12
HASH_DOMAIN = b"debiaslab-digits-classifier"
NAME_PREFIX = "digits-classifier"

RECIPE: dict[str, Any] = {
    "version": RECIPE_VERSION,
    "image_size": DIGITS_SIZE,
    "seed": DIGITS_SEED,
    "holdout_fraction": HOLDOUT_FRACTION,
    "epochs": EPOCHS,
    "batch_size": BATCH_SIZE,
    "optimizer": "adam+onecycle",
    "max_lr": MAX_LEARNING_RATE,
    "conv_width": CONV_WIDTH,
    "threads": TRAIN_THREADS,
    "feature_dim": FEATURE_DIM,
    "loss": "ce(class)+bce(attributes)",
}


class DigitsNet(nn.Module):
    """Two conv stages (3x3 conv-ReLU x2, max-pool) -> linear -> ReLU features -> heads.

    Input is 1x16x16 in [-1, 1]; forward returns (features [B, D], class logits [B, C],
    attribute logits [B, A]).
    """

    def __init__(self, num_classes: int, num_attributes: int, width: int = CONV_WIDTH,
                 feature_dim: int = FEATURE_DIM) -> None:
        super().__init__()
        wide = 2 * width
        self.trunk = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, wide, 3, padding=1), nn.ReLU(),
            nn.Conv2d(wide, wide, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(wide * POOLED_SIZE * POOLED_SIZE, feature_dim), nn.ReLU(),
        )
        self.class_head = nn.Linear(feature_dim, num_classes)
        self.attr_head = nn.Linear(feature_dim, num_attributes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        features = self.trunk(x)
        return features, self.class_head(features), self.attr_head(features)


def _to_input(images_uint8: Tensor) -> Tensor:
    return from_uint8(images_uint8)


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-class split: (train indices, held-out indices), both sorted; each class
    contributes round(fraction * count) held-out images."""
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        held.append(members[: int(np.floor(fraction * len(members) + 0.5))])
    heldout = np.sort(np.concatenate(held))
    train = np.setdiff1d(np.arange(len(labels)), heldout)
    return train, heldout


def cache_key(arrays: ImageArrays, recipe: dict[str, Any] = RECIPE) -> str:
    """sha256 of the recipe, the images (shape + bytes), labels and attributes."""
    digest = hashlib.sha256(HASH_DOMAIN)
    digest.update(json.dumps(recipe, sort_keys=True).encode())
    for array in (arrays.images, np.asarray(arrays.labels, dtype="<i8"),
                  np.asarray(arrays.attributes, dtype=np.int8)):
        array = np.ascontiguousarray(array)
        digest.update(json.dumps([str(array.dtype), list(array.shape)]).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def resolve_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir` itself when given, else <$DEBIASLAB_CACHE or ~/.cache/debiaslab>/extractors."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    root = os.environ.get(CACHE_ENV) or DEFAULT_CACHE_ROOT
    return Path(root).expanduser() / EXTRACTORS_SUBDIR


@contextlib.contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    """Seeded, single-threaded, deterministic-algorithms-only region; restores the caller's RNG
    state, thread count and determinism flags on exit."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(TRAIN_THREADS)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _accuracies(net: DigitsNet, images: Tensor, labels: Tensor, attributes: Tensor
                ) -> tuple[float, list[float]]:
    net.eval()
    with torch.no_grad():
        _, class_logits, attr_logits = net(_to_input(images))
    class_acc = (class_logits.argmax(1) == labels).double().mean().item()
    attr_pred = (attr_logits > ATTR_LOGIT_THRESHOLD).to(attributes.dtype)
    attr_acc = (attr_pred == attributes).double().mean(0).tolist()
    return class_acc, attr_acc


def train_digits_classifier(arrays: ImageArrays, *, progress: bool = False
                            ) -> tuple[DigitsNet, dict[str, Any]]:
    """Train `DigitsNet` on the non-held-out 80% (CPU, bit-deterministic) and measure held-out
    accuracy. Returns the net (eval mode, CPU) and its metrics."""
    start = time.perf_counter()
    train_idx, held_idx = stratified_holdout(arrays.labels, HOLDOUT_FRACTION, DIGITS_SEED)
    images = torch.from_numpy(np.ascontiguousarray(arrays.images))
    labels = torch.from_numpy(np.asarray(arrays.labels, dtype=np.int64))
    attributes = torch.from_numpy(np.asarray(arrays.attributes, dtype=np.int8))
    x_train = _to_input(images[train_idx])
    y_train, a_train = labels[train_idx], attributes[train_idx].to(torch.float32)
    steps_per_epoch = -(-len(train_idx) // BATCH_SIZE)
    with _deterministic(DIGITS_SEED):
        net = DigitsNet(len(arrays.class_names), len(arrays.attr_names))
        optimizer = torch.optim.Adam(net.parameters(), lr=MAX_LEARNING_RATE)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=MAX_LEARNING_RATE, total_steps=EPOCHS * steps_per_epoch)
        generator = torch.Generator().manual_seed(DIGITS_SEED)
        bar = progress_bar(range(EPOCHS), desc=f"train {NAME_PREFIX}", unit="epoch",
                           disable=not progress, leave=False)
        for _ in bar:
            net.train()
            order = torch.randperm(len(train_idx), generator=generator)
            for batch in order.split(BATCH_SIZE):
                _, class_logits, attr_logits = net(x_train[batch])
                loss = (F.cross_entropy(class_logits, y_train[batch])
                        + F.binary_cross_entropy_with_logits(attr_logits, a_train[batch]))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
        class_acc, attr_acc = _accuracies(net, images[held_idx], labels[held_idx],
                                          attributes[held_idx])
    metrics = {
        "heldout_accuracy": class_acc,
        "heldout_attr_accuracy": dict(zip(arrays.attr_names, attr_acc)),
        "num_train": len(train_idx),
        "num_heldout": len(held_idx),
        "train_seconds": time.perf_counter() - start,
    }
    return net.eval(), metrics


def _load_cached(path: Path, key: str, net: DigitsNet) -> dict[str, Any]:
    """Metrics stored at `path`, after loading its weights into `net`; raises ValueError with the
    reason when the file is unreadable, from another recipe or has incompatible weights."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated / garbage files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"unreadable ({first[:200]})") from None
    if not isinstance(payload, dict) or payload.get("format") != CACHE_FORMAT:
        raise ValueError("not a digits-classifier cache file")
    if payload.get("key") != key:
        raise ValueError("content hash differs from its file name")
    try:
        net.load_state_dict(payload["state_dict"])
        metrics = {k: payload[k] for k in ("heldout_accuracy", "heldout_attr_accuracy",
                                           "num_train", "num_heldout", "train_seconds")}
    except (KeyError, RuntimeError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"incompatible contents ({first[:200]})") from None
    return metrics


class DigitsExtractor(FeatureExtractor):
    """Features (penultimate, 128-d), class logits, argmax classes and 0/1 attributes of 1x16x16
    digits from the platform-trained `DigitsNet`."""

    def __init__(self, net: DigitsNet, *, key: str, metrics: dict[str, Any],
                 class_names: list[str], attr_names: list[str], cache_path: Path | None,
                 from_cache: bool, device: str | torch.device | None = None) -> None:
        self.device = torch.device(device) if device is not None else default_device()
        self.net = net.to(self.device).eval()
        self.key = key
        self.name = f"{NAME_PREFIX}-{key[:KEY_CHARS]}"
        self.feature_dim = FEATURE_DIM
        self.class_names = list(class_names)
        self.attr_names = list(attr_names)
        self.input_shape = (1, DIGITS_SIZE, DIGITS_SIZE)
        self.input_channels = None
        self.heldout_accuracy = float(metrics["heldout_accuracy"])
        self.heldout_attr_accuracy = {k: float(v)
                                      for k, v in metrics["heldout_attr_accuracy"].items()}
        self.num_train = int(metrics["num_train"])
        self.num_heldout = int(metrics["num_heldout"])
        self.train_seconds = float(metrics["train_seconds"])
        self.cache_path = cache_path
        self.from_cache = from_cache

    def metadata(self) -> dict[str, Any]:
        return {
            **super().metadata(),
            "recipe": RECIPE_VERSION,
            "content_hash": self.key,
            "heldout_accuracy": self.heldout_accuracy,
            "heldout_attr_accuracy": dict(self.heldout_attr_accuracy),
            "num_train": self.num_train,
            "num_heldout": self.num_heldout,
        }

    def _forward(self, batch: Tensor) -> dict[str, Tensor]:
        features, class_logits, attr_logits = self.net(_to_input(batch))
        return {
            "features": features,
            "logits": class_logits,
            "classes": class_logits.argmax(1),
            "attributes": (attr_logits > ATTR_LOGIT_THRESHOLD).to(torch.int8),
        }


PREDICTIONS["digits"] = ("class", *(f"attr:{name}" for name in DIGITS_ATTR_NAMES))


@EXTRACTORS.register("digits")
def load_or_train_digits_classifier(
    cache_dir: str | Path | None = None,
    progress: bool = False,
    *,
    device: str | torch.device | None = None,
) -> DigitsExtractor:
    """The digits extractor from the cache (keyed by data + recipe hash), training it first
    (< 1 min on CPU) when the cache has no valid copy. A corrupt cache file is rebuilt with a
    warning; an unwritable cache folder only costs a warning."""
    arrays = load_digits_arrays(DIGITS_SIZE)
    key = cache_key(arrays)
    path = resolve_cache_dir(cache_dir) / f"{NAME_PREFIX}-{key[:KEY_CHARS]}.pt"
    common = dict(key=key, class_names=arrays.class_names, attr_names=arrays.attr_names,
                  cache_path=path, device=device)
    if path.is_file():
        net = DigitsNet(len(arrays.class_names), len(arrays.attr_names))
        try:
            metrics = _load_cached(path, key, net)
            return DigitsExtractor(net.eval(), metrics=metrics, from_cache=True, **common)
        except ValueError as exc:
            warnings.warn(one_line(f"{path}: {exc}; retraining the digits classifier"),
                          stacklevel=2)
    net, metrics = train_digits_classifier(arrays, progress=progress)
    payload = {"format": CACHE_FORMAT, "key": key, "recipe": json.dumps(RECIPE, sort_keys=True),
               "state_dict": net.state_dict(), **metrics}
    try:
        save_checkpoint(payload, path)
    except OSError as exc:
        warnings.warn(one_line(f"{path}: cannot write the digits-classifier cache ({exc})"),
                      stacklevel=2)
        common["cache_path"] = None
    return DigitsExtractor(net, metrics=metrics, from_cache=False, **common)
