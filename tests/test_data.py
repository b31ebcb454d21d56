"""Data package tests on real files in tmp_path: schema round trip, content hash, atomic writes,
imbalance builders, the embedded digits, and every source loader with its bad-input errors."""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from debiaslab.data.builders import (
    attribute_bias_indices,
    long_tail_counts,
    long_tail_indices,
)
from debiaslab.data.dataset import ImageDataset
from debiaslab.data.digits import load_digits_arrays
from debiaslab.data.schema import (
    MANIFEST_NAME,
    DatasetMeta,
    ImageArrays,
    read_manifest,
    write_dataset,
)
from debiaslab.data.sources import (
    SOURCES,
    bind_source_path,
    build_dataset,
    check_source_options,
    load_source,
)
from debiaslab.errors import ConfigError, DataError

CIFAR10_LT_COUNTS = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
CIFAR100_LT_TOTAL = 10_847
N_DIGITS = 1797
IMAGES_PER_BATCH = 4
CIFAR10_CLASSES = [f"c{i}" for i in range(10)]
CELEBA_ATTRS = [f"Attr{i:02d}" for i in range(38)] + ["Male", "Smiling"]


def expect_data_error(fn: Callable[[], Any], needle: str) -> str:
    """Call fn, require a one-line DataError whose message contains `needle`."""
    with pytest.raises(DataError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message, message
    assert needle in message, message
    return message


def leftovers(folder: Path) -> list[str]:
    """Hidden temp/old folders left beside datasets."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def digits() -> ImageArrays:
    return load_digits_arrays()


def meta_for(data: ImageArrays, name: str = "t") -> DatasetMeta:
    return DatasetMeta(name, "test", data.class_names, data.attr_names)


# ---------------------------------------------------------------------------------- builders


def test_long_tail_counts_match_cbdm() -> None:
    assert long_tail_counts(5000, 10, 0.01) == CIFAR10_LT_COUNTS
    counts100 = long_tail_counts(500, 100, 0.01)
    assert sum(counts100) == CIFAR100_LT_TOTAL
    assert counts100[0] == 500 and counts100[-1] == 5
    assert long_tail_counts(7, 1, 0.5) == [7]
    for bad in (0.0, 1.5, -0.1):
        expect_data_error(lambda bad=bad: long_tail_counts(10, 3, bad), "imb_factor")


def test_digits_arrays(digits: ImageArrays) -> None:
    assert digits.images.shape == (N_DIGITS, 1, 16, 16) and digits.images.dtype == np.uint8
    assert digits.labels.dtype == np.int64
    assert sorted(set(digits.labels.tolist())) == list(range(10))
    assert digits.class_names == [str(d) for d in range(10)]
    assert digits.attr_names[:2] == ["bold", "even"]
    assert digits.attributes.shape == (N_DIGITS, 2) and digits.attributes.dtype == np.int8
    assert np.array_equal(digits.attributes[:, 1], (digits.labels % 2 == 0).astype(np.int8))
    bold = digits.attributes[:, 0]
    assert 0.4 < bold.mean() <= 0.5  # strictly above the median
    ink = digits.images.reshape(N_DIGITS, -1).astype(np.int64).sum(1)
    assert ink[bold == 1].mean() > ink[bold == 0].mean()
    assert digits.images.max() == 255 and digits.images.min() == 0
    again = load_digits_arrays()
    assert np.array_equal(again.images, digits.images)
    assert np.array_equal(again.attributes, digits.attributes)


def test_long_tail_indices_on_digits(digits: ImageArrays) -> None:
    labels = digits.labels
    n_max = int(np.bincount(labels).min())
    idx = long_tail_indices(labels, 0.1, seed=0)
    assert np.bincount(labels[idx], minlength=10).tolist() == long_tail_counts(n_max, 10, 0.1)
    assert len(set(idx.tolist())) == len(idx)
    assert np.array_equal(idx, long_tail_indices(labels, 0.1, seed=0))
    assert not np.array_equal(idx, long_tail_indices(labels, 0.1, seed=1))
    # the CBDM reference code: np.random.seed(seed), then per class np.random.shuffle(idx)
    np.random.seed(0)
    reference = []
    for c, n_c in enumerate(long_tail_counts(n_max, 10, 0.1)):
        class_idx = np.where(labels == c)[0]
        np.random.shuffle(class_idx)
        reference.append(class_idx[:n_c])
    assert np.array_equal(idx, np.concatenate(reference))
    expect_data_error(lambda: long_tail_indices(labels, 0.0), "imb_factor")
    expect_data_error(lambda: long_tail_indices(labels, 0.1, n_max=1000), "class 0")
    expect_data_error(lambda: long_tail_indices(np.full(5, -1), 0.1), "label")


def test_long_tail_factor_that_empties_classes_is_an_error(
    tmp_path: Path, digits: ImageArrays
) -> None:
    n_max = int(np.bincount(digits.labels).min())  # 174: tail classes get 0.17, 0.37, 0.81
    assert long_tail_counts(n_max, 10, 0.001)[-3:] == [0, 0, 0]
    message = expect_data_error(
        lambda: long_tail_indices(digits.labels, 0.001, class_names=digits.class_names),
        "data.imb_factor: 0.001",
    )
    assert "class(es) 7, 8, 9 with zero images" in message
    assert f"1/{n_max}" in message
    smallest = float(message.rsplit(">= ", 1)[1])
    assert 1 / n_max <= smallest < 1.01 / n_max
    assert min(long_tail_counts(n_max, 10, smallest)) == 1
    assert min(np.bincount(digits.labels[long_tail_indices(digits.labels, smallest)])) == 1
    out = tmp_path / "lt"
    expect_data_error(
        lambda: build_dataset("digits", out, imbalance="long_tail", imb_factor=0.001),
        "data.imb_factor",
    )
    assert not out.exists()


def test_attribute_bias_split(digits: ImageArrays) -> None:
    bold = digits.attributes[:, 0]
    biased, reference = attribute_bias_indices(bold, 0.9, 0.1, seed=3)
    assert not set(biased.tolist()) & set(reference.tolist())
    assert len(reference) == round(0.1 * N_DIGITS)
    assert bold[reference].sum() * 2 == len(reference)  # exactly 50/50
    frac = bold[biased].mean()
    assert abs(frac - 0.9) <= 1.0 / len(biased)
    # as large as availability allows: one side of the remainder is used up
    rest_pos = int(bold.sum()) - int(bold[reference].sum())
    rest_neg = N_DIGITS - int(bold.sum()) - int((1 - bold[reference]).sum())
    assert int(bold[biased].sum()) == rest_pos or int((1 - bold[biased]).sum()) == rest_neg
    same = attribute_bias_indices(bold, 0.9, 0.1, seed=3)
    assert np.array_equal(same[0], biased) and np.array_equal(same[1], reference)
    expect_data_error(lambda: attribute_bias_indices(bold, 1.5, 0.1), "bias_ratio")
    expect_data_error(lambda: attribute_bias_indices(bold, 0.9, 0.0), "reference_fraction")
    expect_data_error(lambda: attribute_bias_indices(bold, 0.9, 1.0), "reference_fraction")
    expect_data_error(lambda: attribute_bias_indices(digits.labels, 0.9, 0.1), "binary")
    expect_data_error(lambda: attribute_bias_indices(np.ones(50), 0.9, 0.1), "balanced")


# ---------------------------------------------------------------------------------- schema


def test_round_trip_and_content_hash(tmp_path: Path, digits: ImageArrays) -> None:
    data = digits.subset(np.arange(200))
    manifest = write_dataset(
        tmp_path / "a", data.images, data.labels, data.attributes, meta_for(data),
        ids=data.ids, rows_per_shard=64,
    )
    assert len(manifest.shards) == 4
    loaded = ImageDataset.load(tmp_path / "a")
    assert torch.equal(loaded.images, torch.from_numpy(data.images))
    assert torch.equal(loaded.labels, torch.from_numpy(data.labels))
    assert torch.equal(loaded.attributes, torch.from_numpy(data.attributes))
    assert loaded.ids == data.ids and loaded.shape == (1, 16, 16)
    assert loaded.class_counts() == np.bincount(data.labels, minlength=10).tolist()
    assert loaded.num_classes == 10 and loaded.attr_names == data.attr_names
    on_disk = read_manifest(tmp_path / "a")
    assert on_disk.num_rows == 200 and on_disk.content_hash == loaded.content_hash
    floats = ImageDataset.to_float(loaded.images[:8])
    assert floats.dtype == torch.float32 and floats.min() >= -1.0 and floats.max() <= 1.0
    assert float(ImageDataset.to_float(torch.tensor([0, 255], dtype=torch.uint8)).sum()) == 0.0
    image, label = loaded[3]
    assert image.shape == (1, 16, 16) and label == int(data.labels[3])

    # same rows, other shard sizes and row order -> same hash
    order = np.arange(200)[::-1]
    other = write_dataset(
        tmp_path / "b", data.images[order], data.labels[order], data.attributes[order],
        meta_for(data), ids=[data.ids[i] for i in order], rows_per_shard=1000,
    )
    assert len(other.shards) == 1 and other.content_hash == manifest.content_hash
    # one changed pixel -> different hash
    changed = data.images.copy()
    changed[17, 0, 5, 5] ^= 1
    third = write_dataset(
        tmp_path / "c", changed, data.labels, data.attributes, meta_for(data), ids=data.ids
    )
    assert third.content_hash != manifest.content_hash
    # tampering after writing is caught by verify, skipped without it
    path = tmp_path / "a" / MANIFEST_NAME
    payload = json.loads(path.read_text())
    payload["content_hash"] = third.content_hash
    path.write_text(json.dumps(payload))
    expect_data_error(lambda: ImageDataset.load(tmp_path / "a"), "content hash")
    assert len(ImageDataset.load(tmp_path / "a", verify=False)) == 200


def test_write_is_atomic(tmp_path: Path, digits: ImageArrays) -> None:
    data = digits.subset(np.arange(100))
    good = list(data.images)
    bad = list(data.images)
    bad[70] = np.zeros((1, 8, 8), dtype=np.uint8)  # fails after two shards are on disk
    target = tmp_path / "ds"

    def failing_write() -> None:
        write_dataset(target, bad, data.labels, data.attributes, meta_for(data), rows_per_shard=32)

    expect_data_error(failing_write, "image must be uint8")
    assert not target.exists() and list(tmp_path.iterdir()) == []

    first = write_dataset(target, good, data.labels, data.attributes, meta_for(data))
    expect_data_error(failing_write, "ds")
    assert leftovers(tmp_path) == []
    intact = ImageDataset.load(target)
    assert intact.content_hash == first.content_hash
    assert torch.equal(intact.images, torch.from_numpy(data.images))

    # a successful rewrite replaces it and leaves nothing behind
    second = write_dataset(
        target, good[:50], data.labels[:50], data.attributes[:50], meta_for(data)
    )
    assert read_manifest(target).num_rows == 50 and second.content_hash != first.content_hash
    assert leftovers(tmp_path) == []
    # a folder that is not a dataset is never replaced
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    expect_data_error(
        lambda: write_dataset(other, good, data.labels, data.attributes, meta_for(data)),
        "refusing",
    )
    assert (other / "notes.txt").read_text() == "keep"


def test_write_validation(tmp_path: Path, digits: ImageArrays) -> None:
    data = digits.subset(np.arange(10))
    meta = meta_for(data)
    labels = data.labels.copy()
    labels[4] = 10
    expect_data_error(
        lambda: write_dataset(tmp_path / "x", data.images, labels, data.attributes, meta),
        "out of range",
    )
    expect_data_error(
        lambda: write_dataset(
            tmp_path / "x", data.images, data.labels, data.attributes, meta, ids=["a"] * 10
        ),
        "unique",
    )
    expect_data_error(
        lambda: write_dataset(tmp_path / "x", data.images, data.labels, data.attributes * 2, meta),
        "0/1",
    )
    assert list(tmp_path.iterdir()) == []


def test_read_manifest_errors(tmp_path: Path, digits: ImageArrays) -> None:
    expect_data_error(lambda: read_manifest(tmp_path / "nope"), "nope")
    (tmp_path / "empty").mkdir()
    expect_data_error(lambda: read_manifest(tmp_path / "empty"), MANIFEST_NAME)
    data = digits.subset(np.arange(10))
    write_dataset(tmp_path / "ds", data.images, data.labels, data.attributes, meta_for(data))
    path = tmp_path / "ds" / MANIFEST_NAME
    original = path.read_text()
    path.write_text("{not json")
    expect_data_error(lambda: read_manifest(tmp_path / "ds"), "invalid JSON")
    payload = json.loads(original)
    del payload["class_names"]
    path.write_text(json.dumps(payload))
    expect_data_error(lambda: read_manifest(tmp_path / "ds"), "class_names")
    path.write_text(original)
    (tmp_path / "ds" / "shard-00000.parquet").unlink()
    expect_data_error(lambda: read_manifest(tmp_path / "ds"), "shard-00000.parquet")


# ---------------------------------------------------------------------------------- CIFAR


def fake_cifar10(root: Path, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    data_all, labels_all = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(IMAGES_PER_BATCH, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=IMAGES_PER_BATCH).tolist()
        with (folder / name).open("wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f)
        if name != "test_batch":
            data_all.append(data)
            labels_all += labels
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in CIFAR10_CLASSES]}, f)
    return np.concatenate(data_all), np.asarray(labels_all)


def test_cifar10_loader_and_build(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    raw, labels = fake_cifar10(tmp_path / "c10", rng)
    data = load_source("cifar10", {"root": tmp_path / "c10"})
    assert data.images.shape == (20, 3, 32, 32) and data.class_names == CIFAR10_CLASSES
    assert np.array_equal(data.labels, labels)
    assert np.array_equal(data.images[7, 1].ravel(), raw[7, 1024:2048])  # channel-first rows
    test = load_source("cifar10", {"root": tmp_path / "c10" / "cifar-10-batches-py",
                                   "split": "test"})
    assert len(test) == IMAGES_PER_BATCH and test.ids[0] == "test-00000"
    out = build_dataset("cifar10", tmp_path / "out", source_options={"root": tmp_path / "c10"})
    loaded = ImageDataset.load(out)
    assert torch.equal(loaded.images, torch.from_numpy(data.images))
    assert read_manifest(out).extra["build"]["source_options"]["root"] == str(tmp_path / "c10")
    with pytest.raises(ConfigError):
        load_source("cifar10", {"root": tmp_path / "c10", "bogus": 1})


def test_cifar10_bad_inputs(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    root = tmp_path / "c10"
    fake_cifar10(root, rng)
    folder = root / "cifar-10-batches-py"
    load = lambda: load_source("cifar10", {"root": root})  # noqa: E731
    expect_data_error(lambda: load_source("cifar10", {"root": tmp_path / "none"}), "none")
    with (folder / "data_batch_3").open("wb") as f:
        pickle.dump({b"data": np.zeros((4, 3072), np.uint8)}, f)
    expect_data_error(load, "data_batch_3")
    expect_data_error(load, "b'labels'")
    with (folder / "data_batch_3").open("wb") as f:
        pickle.dump({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 10, 2]}, f)
    expect_data_error(load, "label 10")
    with (folder / "data_batch_3").open("wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}, f)
    expect_data_error(load, "data_batch_3")
    (folder / "data_batch_3").write_bytes(b"\x00garbage, not a pickle")
    expect_data_error(load, "data_batch_3")
    (folder / "batches.meta").unlink()
    expect_data_error(load, "batches.meta")
    expect_data_error(lambda: load_source("cifar10", {"root": root, "split": "val"}), "split")
    out = tmp_path / "out"
    expect_data_error(lambda: build_dataset("cifar10", out, source_options={"root": root}),
                      "batches.meta")
    assert not out.exists() and leftovers(tmp_path) == []


def test_cifar100_loader(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 100, size=20).tolist()
    data = rng.integers(0, 256, size=(20, 3072), dtype=np.uint8)
    for split in ("train", "test"):
        with (folder / split).open("wb") as f:
            pickle.dump({b"data": data, b"fine_labels": labels, b"coarse_labels": labels}, f)
    with (folder / "meta").open("wb") as f:
        pickle.dump({b"fine_label_names": [f"f{i}".encode() for i in range(100)]}, f)
    loaded = SOURCES.get("cifar100")(tmp_path)
    assert loaded.images.shape == (20, 3, 32, 32) and len(loaded.class_names) == 100
    assert loaded.labels.tolist() == labels
    with (folder / "train").open("wb") as f:
        pickle.dump({b"data": data, b"fine_labels": [100] + labels[1:]}, f)
    expect_data_error(lambda: SOURCES.get("cifar100")(tmp_path), "label 100")


class TouchOnLoad:
    """Unpickling this calls Path.touch(marker): code execution if the loader trusts pickles."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (Path.touch, (self.marker,))


def test_cifar_pickle_cannot_run_code(tmp_path: Path) -> None:
    root = tmp_path / "c10"
    fake_cifar10(root, np.random.default_rng(5))
    batch = root / "cifar-10-batches-py" / "data_batch_1"
    marker = tmp_path / "pwned"
    with batch.open("wb") as f:
        pickle.dump({b"data": TouchOnLoad(marker), b"labels": [0, 1, 2, 3]}, f)
    message = expect_data_error(lambda: load_source("cifar10", {"root": root}), str(batch))
    assert "refused to unpickle global" in message and "Path.touch" in message
    assert not marker.exists()
    out = tmp_path / "out"
    expect_data_error(
        lambda: build_dataset("cifar10", out, source_options={"root": root}), "Path.touch"
    )
    assert not marker.exists() and not out.exists()
    # a global hidden in the class-name file is refused as well
    meta = root / "cifar-10-batches-py" / "batches.meta"
    with meta.open("wb") as f:
        pickle.dump({b"label_names": TouchOnLoad(marker)}, f)
    expect_data_error(lambda: load_source("cifar10", {"root": root}), "batches.meta")
    assert not marker.exists()


@pytest.mark.parametrize(
    "protocol,core", [(2, "numpy.core"), (2, "numpy._core"), (4, None), (5, None)]
)
def test_cifar_pickle_numpy_formats_load(tmp_path: Path, protocol: int, core: str | None) -> None:
    """Official-format batches load whichever numpy (1.x numpy.core, 2.x numpy._core) and
    pickle protocol wrote them. Protocol 2 names globals as text, so the numpy core module can
    be renamed in place to mimic the other numpy major version."""
    root = tmp_path / "c10"
    raw, labels = fake_cifar10(root, np.random.default_rng(6))
    folder = root / "cifar-10-batches-py"
    for i, name in enumerate(f"data_batch_{j}" for j in range(1, 6)):
        rows = slice(i * IMAGES_PER_BATCH, (i + 1) * IMAGES_PER_BATCH)
        payload = pickle.dumps(
            {b"data": raw[rows], b"labels": labels[rows].tolist(),
             b"batch_label": name.encode(), b"count": np.int64(IMAGES_PER_BATCH)},
            protocol=protocol,
        )
        if core is not None:
            for other in (b"cnumpy.core.", b"cnumpy._core."):  # GLOBAL opcode 'c' + module
                payload = payload.replace(other, b"c" + f"{core}.".encode())
            assert f"{core}.".encode() in payload
        (folder / name).write_bytes(payload)
    data = load_source("cifar10", {"root": root})
    assert np.array_equal(data.images.reshape(len(raw), -1), raw)
    assert np.array_equal(data.labels, labels)


# ---------------------------------------------------------------------------------- CelebA


def fake_celeba(root: Path, n: int = 6) -> np.ndarray:
    image_dir = root / "img_align_celeba"
    image_dir.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for i in range(n):
        pixels = np.full((50, 40, 3), 20 * i, dtype=np.uint8)
        Image.fromarray(pixels).save(image_dir / f"{i + 1:06d}.jpg", quality=95)
    values = rng.choice([-1, 1], size=(n, len(CELEBA_ATTRS)))
    lines = [str(n), " ".join(CELEBA_ATTRS)]
    lines += [f"{i + 1:06d}.jpg " + "  ".join(str(v) for v in row) for i, row in enumerate(values)]
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    partition = [f"{i + 1:06d}.jpg {i % 3}" for i in range(n)]
    (root / "list_eval_partition.txt").write_text("\n".join(partition) + "\n")
    return (values > 0).astype(np.int8)


def test_celeba_loader(tmp_path: Path) -> None:
    attrs = fake_celeba(tmp_path / "celeba")
    data = load_source("celeba", {"root": tmp_path / "celeba", "size": 16})
    assert data.images.shape == (6, 3, 16, 16) and data.attr_names == CELEBA_ATTRS
    assert np.array_equal(data.attributes, attrs) and (data.labels == -1).all()
    assert abs(int(data.images[3].astype(int).mean()) - 60) <= 2  # solid color survives JPEG
    male = load_source("celeba", {"root": tmp_path / "celeba", "size": 8,
                                  "label_attribute": "Male"})
    assert male.class_names == ["not_Male", "Male"]
    assert np.array_equal(male.labels, attrs[:, CELEBA_ATTRS.index("Male")])
    test = load_source("celeba", {"root": tmp_path / "celeba", "size": 8, "split": "test"})
    assert test.ids == ["000003.jpg", "000006.jpg"]
    default = load_source("celeba", {"root": tmp_path / "celeba", "limit": 2})
    assert default.images.shape == (2, 3, 64, 64)


def test_celeba_bad_inputs(tmp_path: Path) -> None:
    root = tmp_path / "celeba"
    fake_celeba(root)
    load = lambda: load_source("celeba", {"root": root, "size": 8})  # noqa: E731
    attr_file = root / "list_attr_celeba.txt"
    original = attr_file.read_text()
    lines = original.splitlines()
    lines[4] = lines[4].rsplit(" ", 1)[0]  # drop one column
    attr_file.write_text("\n".join(lines))
    expect_data_error(load, "list_attr_celeba.txt")
    expect_data_error(load, "columns")
    attr_file.write_text(original.replace(" 1", " 2", 1))
    expect_data_error(load, "-1 or 1")
    attr_file.write_text("7\n" + "\n".join(original.splitlines()[1:]))
    expect_data_error(load, "7 images")
    attr_file.write_text(original)
    (root / "img_align_celeba" / "000003.jpg").write_bytes(b"\xff\xd8\xff garbage")
    expect_data_error(load, "000003.jpg")
    (root / "img_align_celeba" / "000003.jpg").unlink()
    expect_data_error(load, "000003.jpg")
    expect_data_error(
        lambda: load_source("celeba", {"root": root, "label_attribute": "Bald"}), "Bald"
    )
    attr_file.unlink()
    expect_data_error(load, "list_attr_celeba.txt")


# ---------------------------------------------------------------------------------- folder, Parquet


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_folder_loader(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    for name in ("dog", "cat"):
        (root / name).mkdir(parents=True)
    Image.fromarray(np.full((12, 20, 3), 200, np.uint8)).save(root / "cat" / "a.png")
    Image.fromarray(np.full((9, 9), 50, np.uint8)).save(root / "cat" / "b.bmp")
    Image.fromarray(np.full((30, 10, 3), 90, np.uint8)).save(root / "dog" / "c.jpg")
    (root / "dog" / "notes.txt").write_text("not an image")
    rgb = load_source("folder", {"root": root, "size": 8})
    assert rgb.class_names == ["cat", "dog"] and rgb.labels.tolist() == [0, 0, 1]
    assert rgb.images.shape == (3, 3, 8, 8) and rgb.ids == ["cat/a.png", "cat/b.bmp", "dog/c.jpg"]
    assert (rgb.images[0] == 200).all() and (rgb.images[1] == 50).all()
    gray = load_source("folder", {"root": root, "size": 4, "channels": 1})
    assert gray.images.shape == (3, 1, 4, 4)
    out = build_dataset("folder", tmp_path / "out", source_options={"root": root, "size": 8})
    assert ImageDataset.load(out).class_counts() == [2, 1]

    (root / "dog" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    expect_data_error(lambda: load_source("folder", {"root": root}), "bad.png")
    expect_data_error(lambda: load_source("folder", {"root": root, "channels": 4}), "channels")
    (tmp_path / "flat").mkdir()
    expect_data_error(lambda: load_source("folder", {"root": tmp_path / "flat"}), "flat")
    expect_data_error(lambda: load_source("folder", {"root": tmp_path / "missing"}), "missing")


def test_parquet_loader(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    pixels = rng.integers(0, 256, size=(5, 6, 6, 3), dtype=np.uint8)
    table = pa.table(
        {
            "img": [png_bytes(p) for p in pixels],
            "y": [0, 2, 1, None, 2],
            "smile": [True, False, True, True, False],
            "key": ["e", "d", "c", "b", "a"],
        }
    )
    path = tmp_path / "user.parquet"
    pq.write_table(table, path)
    data = load_source(
        "parquet",
        {"path": path, "image_column": "img", "label_column": "y", "id_column": "key",
         "attr_columns": ["smile"]},
    )
    assert np.array_equal(data.images, pixels.transpose(0, 3, 1, 2))
    assert data.labels.tolist() == [0, 2, 1, -1, 2] and data.class_names == ["0", "1", "2"]
    assert data.attributes[:, 0].tolist() == [1, 0, 1, 1, 0] and data.ids[0] == "e"
    out = build_dataset(
        "parquet", tmp_path / "out",
        source_options={"path": path, "image_column": "img", "label_column": "y"},
    )
    assert ImageDataset.load(out).class_counts() == [1, 1, 2]

    expect_data_error(lambda: load_source("parquet", {"path": path}), "'image'")
    expect_data_error(
        lambda: load_source("parquet", {"path": path, "image_column": "img",
                                        "label_column": "y", "class_names": ["a", "b"]}),
        "label 2",
    )
    expect_data_error(
        lambda: load_source("parquet", {"path": path, "image_column": "y"}), "user.parquet"
    )
    corrupt = table.set_column(0, "img", pa.array([b"junk"] + table["img"].to_pylist()[1:]))
    pq.write_table(corrupt, tmp_path / "corrupt.parquet")
    expect_data_error(
        lambda: load_source("parquet", {"path": tmp_path / "corrupt.parquet",
                                        "image_column": "img"}),
        "corrupt.parquet",
    )
    negative = table.set_column(1, "y", pa.array([0, -5, 1, 1, 1]))
    pq.write_table(negative, tmp_path / "neg.parquet")
    expect_data_error(
        lambda: load_source("parquet", {"path": tmp_path / "neg.parquet", "image_column": "img",
                                        "label_column": "y"}),
        "neg.parquet",
    )
    (tmp_path / "text.parquet").write_text("hello")
    expect_data_error(
        lambda: load_source("parquet", {"path": tmp_path / "text.parquet"}), "text.parquet"
    )


# ---------------------------------------------------------------------------------- build


def test_build_long_tail_digits(tmp_path: Path, digits: ImageArrays) -> None:
    out = build_dataset("digits", tmp_path / "lt", imbalance="long_tail", imb_factor=0.1,
                        seed=0, rows_per_shard=300)
    loaded = ImageDataset.load(out)
    n_max = int(np.bincount(digits.labels).min())
    assert loaded.class_counts() == long_tail_counts(n_max, 10, 0.1)
    manifest = read_manifest(out)
    assert manifest.class_counts == loaded.class_counts()
    assert manifest.extra["build"]["imbalance"] == "long_tail"
    again = build_dataset("digits", tmp_path / "lt2", imbalance="long_tail", imb_factor=0.1,
                          seed=0, rows_per_shard=50)
    assert ImageDataset.load(again).content_hash == loaded.content_hash
    with pytest.raises(ConfigError):
        build_dataset("digits", tmp_path / "x", imbalance="sideways")
    with pytest.raises(ConfigError):
        build_dataset("mnist", tmp_path / "x")


def test_build_attribute_bias_digits(tmp_path: Path) -> None:
    out = build_dataset("digits", tmp_path / "ab", imbalance="attribute_bias",
                        bias_attribute="bold", bias_ratio=0.9, reference_fraction=0.1, seed=0)
    assert sorted(os.listdir(out)) == ["biased", "observed", "reference", "splits.json"]
    biased = ImageDataset.load(out / "biased")
    reference = ImageDataset.load(out / "reference")
    assert not set(biased.ids) & set(reference.ids)
    assert abs(float(biased.attributes[:, 0].float().mean()) - 0.9) <= 1.0 / len(biased)
    assert int(reference.attributes[:, 0].sum()) * 2 == len(reference)
    # rebuilding over it works; a failure leaves the old pair intact
    build_dataset("digits", out, imbalance="attribute_bias", bias_attribute="even",
                  reference_fraction=0.1)
    expect_data_error(
        lambda: build_dataset("digits", out, imbalance="attribute_bias", bias_attribute="even",
                              reference_fraction=0.1, bias_ratio=1.5),
        "bias_ratio",
    )
    expect_data_error(
        lambda: build_dataset("digits", tmp_path / "y", imbalance="attribute_bias"),
        "bias_attribute",
    )
    assert read_manifest(out / "biased").extra["build"]["bias_attribute"] == "even"
    assert leftovers(tmp_path) == [] and not (tmp_path / "y").exists()


def expect_config_error(fn: Callable[[], Any], *needles: str) -> str:
    """Call fn, require a one-line ConfigError whose message contains every needle."""
    with pytest.raises(ConfigError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message, message
    assert all(n in message for n in needles), message
    return message


def test_bind_source_path(tmp_path: Path) -> None:
    options = {"split": "test"}
    for source in ("cifar10", "cifar100", "celeba", "folder"):
        assert bind_source_path(source, options, "/data/x") == {"split": "test", "root": "/data/x"}
    assert options == {"split": "test"}  # a copy; the input is left alone
    bound = bind_source_path("parquet", {"image_column": "img"}, str(tmp_path / "u.parquet"))
    assert bound == {"image_column": "img", "path": str(tmp_path / "u.parquet")}
    # the same value given twice is fine; another value is a conflict
    assert bind_source_path("folder", {"root": Path("/data/x/")}, "/data/x") == {"root": "/data/x"}
    expect_config_error(lambda: bind_source_path("folder", {"root": "/a"}, "/b"),
                        "data.source_options.root", "'/a'", "data.path '/b'")
    expect_config_error(lambda: bind_source_path("parquet", {"path": "a.parquet"}, "b.parquet"),
                        "data.source_options.path", "a.parquet", "b.parquet")
    expect_config_error(lambda: bind_source_path("digits", {}, "/data/x"),
                        "data.path: source 'digits' takes no path", "parquet")
    expect_config_error(lambda: bind_source_path("mnist", {}, "/x"), "data.source", "mnist")
    # the bound options load: parquet reads `path`, which a `root` default would not satisfy
    pixels = np.random.default_rng(7).integers(0, 256, size=(3, 4, 4, 3), dtype=np.uint8)
    pq.write_table(pa.table({"img": [png_bytes(p) for p in pixels]}), tmp_path / "u.parquet")
    assert np.array_equal(load_source("parquet", bound).images, pixels.transpose(0, 3, 1, 2))


def test_check_source_options_without_loading(tmp_path: Path) -> None:
    missing = tmp_path / "not-there"
    check_source_options("cifar10", {"root": missing, "split": "test"})  # no file is read
    check_source_options("cifar10", {})  # root comes later from data.path
    check_source_options("digits", None)
    expect_config_error(lambda: check_source_options("cifar10", {"root": missing, "bogus": 1}),
                        "data.source_options", "'cifar10'", "bogus", "options: root, split")
    expect_config_error(lambda: check_source_options("digits", {"root": "/x"}),
                        "data.source_options", "'root'", "options: size")
    expect_config_error(lambda: check_source_options("cifar10", {}, complete=True),
                        "data.source_options", "'root'")
    expect_config_error(lambda: check_source_options("mnist", {}), "data.source", "mnist")
    # load_source rejects the same options with the same message, before touching any file
    message = expect_config_error(lambda: load_source("cifar10", {"root": missing, "bogus": 1}),
                                  "data.source_options", "bogus")
    assert "not-there" not in message
    expect_config_error(lambda: load_source("cifar10", {}), "data.source_options", "'root'")
