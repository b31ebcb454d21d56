"""Tests of the metric feature extractors: the platform-trained digits classifier (accuracy, cache,
determinism, input errors) and Inception-v3 through torch-fidelity with random weights."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_line

from debiaslab.data.digits import load_digits_arrays
from debiaslab.data.schema import ImageArrays
from debiaslab.errors import CheckpointError, ConfigError, DataError, DebiaslabError
from debiaslab.metrics.digits_classifier import (
    CACHE_ENV,
    FEATURE_DIM,
    HOLDOUT_FRACTION,
    RECIPE,
    DigitsExtractor,
    cache_key,
    load_or_train_digits_classifier,
    resolve_cache_dir,
    stratified_holdout,
)
from debiaslab.metrics.features import EXTRACTORS, Extracted, build_extractor
from debiaslab.metrics.inception import (
    INCEPTION_NAME,
    INCEPTION_WEIGHTS_FILE,
    LOGITS_DIM,
    POOL3_DIM,
    WEIGHTS_OPTION,
    default_weights_path,
    file_sha256,
)

MIN_CLASS_ACCURACY = 0.95
MIN_ATTR_ACCURACY = 0.9
TRAIN_BUDGET_S = 60.0
CACHE_HIT_BUDGET_S = 5.0
NUM_DIGITS = 1797
NUM_CLASSES = 10
INCEPTION_SEED = 0
INCEPTION_BATCH = 2  # test images per Inception call (299x299 forwards are slow on CPU)


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def digits_arrays() -> ImageArrays:
    return load_digits_arrays()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's temporary cache when conftest set one (the classifier then trains once per
    session, shared with other test modules), else a temporary folder of this module."""
    if os.environ.get(CACHE_ENV):
        return resolve_cache_dir()
    return tmp_path_factory.mktemp("extractor-cache")


@pytest.fixture(scope="module")
def digits(cache_dir: Path) -> DigitsExtractor:
    """Trained once per module, into the temporary cache."""
    return load_or_train_digits_classifier(cache_dir=cache_dir, device="cpu")


@pytest.fixture(scope="module")
def digits_extracted(digits: DigitsExtractor, digits_arrays: ImageArrays) -> Extracted:
    return digits.extract(digits_arrays.images)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised state dict with torch-fidelity's keys and shapes, written without any
    network access: torchvision's Inception3 (1008 classes, no aux head) has the same layout."""
    from torchvision.models import inception_v3

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INCEPTION_SEED)
        net = inception_v3(weights=None, aux_logits=False, init_weights=True,
                           num_classes=LOGITS_DIM)
    path = tmp_path_factory.mktemp("inception") / INCEPTION_WEIGHTS_FILE
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def inception(inception_weights: Path):
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("the Inception extractor tried to download weights")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tfi, "load_state_dict_from_url", no_download)
        return build_extractor("inception", weights_path=str(inception_weights), device="cpu")


# ------------------------------------------------------------------------ digits classifier


def test_digits_heldout_accuracy(digits: DigitsExtractor) -> None:
    assert digits.heldout_accuracy >= MIN_CLASS_ACCURACY
    assert set(digits.heldout_attr_accuracy) == {"bold", "even"}
    assert min(digits.heldout_attr_accuracy.values()) >= MIN_ATTR_ACCURACY
    assert digits.train_seconds < TRAIN_BUDGET_S
    assert digits.num_heldout + digits.num_train == NUM_DIGITS
    assert re.fullmatch(r"digits-classifier-[0-9a-f]{12}", digits.name)
    meta = digits.metadata()
    assert meta["extractor"] == digits.name
    assert meta["heldout_accuracy"] == digits.heldout_accuracy
    assert meta["content_hash"].startswith(digits.name.rsplit("-", 1)[1])
    assert digits.cache_path is not None and digits.cache_path.is_file()
    assert not digits.supports_inception_score


def test_digits_extract_outputs(digits: DigitsExtractor, digits_arrays: ImageArrays,
                                digits_extracted: Extracted) -> None:
    out = digits_extracted
    assert out.features.shape == (NUM_DIGITS, FEATURE_DIM) and out.features.dtype == np.float32
    assert out.logits is not None and out.logits.shape == (NUM_DIGITS, NUM_CLASSES)
    assert out.classes is not None and out.classes.dtype == np.int64
    assert out.attributes is not None and out.attributes.dtype == np.int8
    assert out.attributes.shape == digits_arrays.attributes.shape
    assert set(np.unique(out.attributes)) <= {0, 1}
    assert np.mean(out.classes == digits_arrays.labels) >= MIN_CLASS_ACCURACY
    assert np.isfinite(out.features).all()
    assert digits.class_names == digits_arrays.class_names
    assert digits.attr_names == digits_arrays.attr_names


def test_digits_batching_float_and_tensor_inputs(digits: DigitsExtractor,
                                                 digits_arrays: ImageArrays,
                                                 digits_extracted: Extracted) -> None:
    images = digits_arrays.images[:50]
    small = digits.extract(images, batch_size=7)
    np.testing.assert_allclose(small.features, digits_extracted.features[:50],
                               rtol=1e-5, atol=1e-5)
    as_float = torch.from_numpy(images).float() / 127.5 - 1.0  # exactly invertible to uint8
    from_float = digits.extract(as_float)
    np.testing.assert_array_equal(from_float.classes, digits_extracted.classes[:50])
    np.testing.assert_allclose(from_float.features, digits_extracted.features[:50],
                               rtol=1e-5, atol=1e-5)


def test_digits_cache_hit_is_fast_and_identical(digits: DigitsExtractor, cache_dir: Path,
                                                digits_arrays: ImageArrays,
                                                digits_extracted: Extracted) -> None:
    start = time.perf_counter()
    again = load_or_train_digits_classifier(cache_dir=cache_dir, device="cpu")
    assert time.perf_counter() - start < CACHE_HIT_BUDGET_S
    assert again.from_cache and again.name == digits.name
    assert again.heldout_accuracy == digits.heldout_accuracy
    assert again.heldout_attr_accuracy == digits.heldout_attr_accuracy
    np.testing.assert_array_equal(again.extract(digits_arrays.images).features,
                                  digits_extracted.features)


def test_corrupt_cache_is_rebuilt_bit_identically(digits: DigitsExtractor,
                                                  tmp_path: Path) -> None:
    """A truncated cache file is retrained with a warning; retraining reproduces every weight
    bit for bit (deterministic training), and the rewritten file is a valid cache again."""
    assert digits.cache_path is not None
    corrupt = tmp_path / digits.cache_path.name
    shutil.copyfile(digits.cache_path, corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="retraining the digits classifier"):
        rebuilt = load_or_train_digits_classifier(cache_dir=tmp_path, device="cpu")
    assert not rebuilt.from_cache and rebuilt.name == digits.name
    original, retrained = digits.net.state_dict(), rebuilt.net.state_dict()
    assert original.keys() == retrained.keys()
    for name in original:
        assert torch.equal(original[name], retrained[name]), name
    assert load_or_train_digits_classifier(cache_dir=tmp_path, device="cpu").from_cache


def test_cache_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_cache_dir() == tmp_path / "home" / ".cache" / "debiaslab" / "extractors"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "root"))
    assert resolve_cache_dir() == tmp_path / "root" / "extractors"
    assert resolve_cache_dir(tmp_path / "explicit") == tmp_path / "explicit"


def test_stratified_holdout_and_cache_key(digits_arrays: ImageArrays) -> None:
    labels = digits_arrays.labels
    train, held = stratified_holdout(labels, HOLDOUT_FRACTION, seed=0)
    assert not set(train) & set(held) and len(train) + len(held) == len(labels)
    for c in range(NUM_CLASSES):
        count = np.sum(labels == c)
        assert abs(np.sum(labels[held] == c) - HOLDOUT_FRACTION * count) <= 0.5
    again = stratified_holdout(labels, HOLDOUT_FRACTION, seed=0)
    np.testing.assert_array_equal(held, again[1])
    key = cache_key(digits_arrays)
    assert key == cache_key(digits_arrays)
    assert key != cache_key(digits_arrays, {**RECIPE, "epochs": RECIPE["epochs"] + 1})
    flipped = ImageArrays(images=digits_arrays.images.copy(), labels=labels,
                          attributes=digits_arrays.attributes,
                          class_names=digits_arrays.class_names,
                          attr_names=digits_arrays.attr_names, ids=digits_arrays.ids)
    flipped.images[0, 0, 0, 0] ^= 1
    assert key != cache_key(flipped)


@pytest.mark.parametrize(
    "images, pattern",
    [
        (np.zeros((4, 1, 8, 8), np.uint8), r"got images of shape 1x8x8 .* expected 1x16x16"),
        (np.zeros((4, 3, 16, 16), np.uint8), r"got images of shape 3x16x16 .* expected 1x16x16"),
        (np.zeros((0, 1, 16, 16), np.uint8), r"got N = 0"),
        (np.zeros((1, 16, 16), np.uint8), r"expected images \[N, C, H, W\] .* got shape"),
        (np.zeros((2, 1, 16, 16), np.int64), r"expected uint8 images or floats .* got int64"),
        (np.full((2, 1, 16, 16), 2.0, np.float32), r"must lie in \[-1, 1\], got values"),
        (np.full((2, 1, 16, 16), np.nan, np.float32), r"must lie in \[-1, 1\]"),
    ],
)
def test_digits_input_errors_are_one_line(digits: DigitsExtractor, images: np.ndarray,
                                          pattern: str) -> None:
    with pytest.raises(DataError) as excinfo:
        digits.extract(images)
    assert re.search(pattern, one_line(excinfo))


def test_registry_and_bad_options(digits: DigitsExtractor) -> None:
    build_extractor("digits", cache_dir=digits.cache_path.parent)  # registers the built-ins
    assert {"digits", "inception"} <= set(EXTRACTORS.names())
    with pytest.raises(ConfigError, match="unknown feature extractor 'nope'"):
        build_extractor("nope")
    with pytest.raises(ConfigError, match="batch_size"):
        digits.extract(np.zeros((1, 1, 16, 16), np.uint8), batch_size=0)


# ------------------------------------------------------------------------------- Inception


def test_inception_random_weights_shapes_and_determinism(inception, inception_weights: Path
                                                         ) -> None:
    gen = torch.Generator().manual_seed(1)
    gray = torch.randint(0, 256, (INCEPTION_BATCH, 1, 16, 16), generator=gen, dtype=torch.uint8)
    first = inception.extract(gray, batch_size=1)
    assert first.features.shape == (INCEPTION_BATCH, POOL3_DIM)
    assert first.features.dtype == np.float32
    assert first.logits is not None and first.logits.shape == (INCEPTION_BATCH, LOGITS_DIM)
    assert first.classes is None and first.attributes is None
    assert np.isfinite(first.features).all() and np.isfinite(first.logits).all()
    assert not np.allclose(first.features[0], first.features[1])
    # grayscale is repeated to RGB: the same call on explicit RGB gives bit-identical outputs,
    # which also shows the extraction is deterministic
    as_rgb = inception.extract(gray.repeat(1, 3, 1, 1), batch_size=1)
    np.testing.assert_array_equal(as_rgb.features, first.features)
    np.testing.assert_array_equal(as_rgb.logits, first.logits)
    batched = inception.extract(gray.numpy(), batch_size=INCEPTION_BATCH)
    np.testing.assert_allclose(batched.features, first.features, rtol=1e-5)
    rgb = torch.randint(0, 256, (1, 3, 20, 24), generator=gen, dtype=torch.uint8)
    assert inception.extract(rgb).features.shape == (1, POOL3_DIM)
    assert inception.name == INCEPTION_NAME
    meta = inception.metadata()
    assert meta["extractor"] == INCEPTION_NAME and meta["feature_dim"] == POOL3_DIM
    assert inception.supports_inception_score
    assert file_sha256(inception_weights).startswith(meta["weights_sha256"])
    assert meta["implementation"].startswith("torch-fidelity")


def test_inception_input_errors(inception) -> None:
    with pytest.raises(DataError) as excinfo:
        inception.extract(np.zeros((2, 2, 16, 16), np.uint8))
    assert re.search(r"got images of shape 2x16x16 .* expected 1/3 channels",
                     one_line(excinfo))
    with pytest.raises(DataError) as excinfo:
        inception.extract(np.zeros((0, 3, 16, 16), np.uint8))
    one_line(excinfo)


def test_inception_missing_weights_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    expected = tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE
    assert default_weights_path() == expected
    with pytest.raises(DebiaslabError) as excinfo:
        build_extractor("inception")
    message = one_line(excinfo)
    assert str(expected) in message and WEIGHTS_OPTION in message and "never downloads" in message
    missing = tmp_path / "elsewhere" / "inception.pth"
    with pytest.raises(DebiaslabError) as excinfo:
        build_extractor("inception", weights_path=str(missing))
    message = one_line(excinfo)
    assert str(missing) in message and WEIGHTS_OPTION in message
    assert not expected.exists()  # nothing was fetched into the hub cache


def test_inception_bad_weights_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError) as excinfo:
        build_extractor("inception", weights_path=str(garbage))
    assert "not a readable Inception weights file" in one_line(excinfo)
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(CheckpointError) as excinfo:
        build_extractor("inception", weights_path=str(wrong))
    assert "not torch-fidelity Inception-v3 weights" in one_line(excinfo)
