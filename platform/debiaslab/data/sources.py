"""Source loaders (digits, CIFAR-10/100, CelebA, image folders, Parquet) keyed by name in SOURCES,
and `build_dataset`: load -> imbalance builder -> Parquet via the atomic `write_dataset`."""

from __future__ import annotations

import importlib
import inspect
import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from debiaslab.data.builders import (
    attribute_bias_indices,
    long_tail_indices,
    long_tail_reference_indices,
    reference_size,
)
from debiaslab.data.digits import DIGITS_SIZE, load_digits_arrays
from debiaslab.data.schema import (
    DEFAULT_ROWS_PER_SHARD,
    NO_LABEL,
    SPLITS_NAME,
    DatasetMeta,
    ImageArrays,
    atomic_directory,
    data_error,
    write_dataset,
    write_json,
)
from debiaslab.errors import ConfigError, DataError
from debiaslab.progress import progress
from debiaslab.registry import Registry

SourceLoader = Callable[..., ImageArrays]
SOURCES: Registry[SourceLoader] = Registry("data source")

PROGRESS_MIN_IMAGES = 1000  # show a progress bar when decoding at least this many images
RESAMPLE = Image.Resampling.BILINEAR  # Pillow's bilinear filter antialiases when downsampling
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
MAX_KEYS_SHOWN = 6  # keys listed when a pickle lacks an expected one

CIFAR_SIDE = 32
CIFAR_CHANNELS = 3
CIFAR_ROW_BYTES = CIFAR_CHANNELS * CIFAR_SIDE * CIFAR_SIDE
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILES = ("test_batch",)
CIFAR10_META = "batches.meta"
CIFAR100_DIR = "cifar-100-python"
CIFAR100_META = "meta"
CIFAR_SPLITS = ("train", "test")

CELEBA_SIZE = 64
CELEBA_CROP = 140  # the usual CelebA-64 recipe: 140x140 center crop of the aligned 178x218 image
CELEBA_IMAGE_DIR = "img_align_celeba"
CELEBA_ATTR_FILE = "list_attr_celeba.txt"
CELEBA_PARTITION_FILE = "list_eval_partition.txt"
CELEBA_SPLITS = {"train": 0, "valid": 1, "test": 2}
CELEBA_ALL = "all"
CELEBA_ATTR_VALUES = {-1: 0, 1: 1}

FOLDER_SIZE = 32
FOLDER_CHANNELS = 3

IMBALANCE_NONE = "none"
IMBALANCE_LONG_TAIL = "long_tail"
IMBALANCE_ATTRIBUTE_BIAS = "attribute_bias"
IMBALANCE_LONG_TAIL_REFERENCE = "long_tail_reference"
DEFAULT_IMB_FACTOR = 0.01
DEFAULT_BIAS_RATIO = 0.9
DEFAULT_REFERENCE_FRACTION = 0.05
BIASED_NAME = "biased"
REFERENCE_NAME = "reference"
OBSERVED_NAME = "observed"  # D_obs = D_bias U D_ref, written beside them (TIW-DSM's DSM(obs))
# imbalances that write a biased set and a reference set (BIASED_NAME/, REFERENCE_NAME/)
SPLIT_IMBALANCES = (IMBALANCE_ATTRIBUTE_BIAS, IMBALANCE_LONG_TAIL_REFERENCE)


# ---------------------------------------------------------------------------------- helpers


def _require(path: Path, what: str = "path", kind: str = "any") -> Path:
    if kind == "dir" and not path.is_dir():
        raise data_error(path, f"{what} does not exist or is not a folder")
    if kind == "file" and not path.is_file():
        raise data_error(path, f"{what} does not exist or is not a file")
    if not path.exists():
        raise data_error(path, f"{what} does not exist")
    return path


def _check_channels(channels: int) -> None:
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}")


def _check_size(size: int | None) -> None:
    if size is not None and size < 1:
        raise DataError(f"size must be >= 1, got {size}")


def _describe(exc: BaseException) -> str:
    """Short reason for a Pillow decode failure (its own text names a BytesIO for bytes input)."""
    if isinstance(exc, UnidentifiedImageError):
        return "unknown format or corrupt header"
    return f"{type(exc).__name__}: {exc}"


def decode_image(
    src: str | os.PathLike[str] | bytes,
    where: str,
    channels: int,
    size: int | None,
    crop_size: int | None = None,
) -> np.ndarray:
    """Decode any Pillow format to uint8 (C, H, W). With `size`, center-crop a square of side
    min(crop_size, W, H) (crop_size None: min(W, H)) and resize it to size x size."""
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as img:
            img.load()
            img = img.convert("L" if channels == 1 else "RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise data_error(where, f"cannot decode image ({_describe(exc)})") from None
    if size is not None:
        width, height = img.size
        side = min(width, height) if crop_size is None else min(crop_size, width, height)
        left, top = (width - side) // 2, (height - side) // 2
        img = img.crop((left, top, left + side, top + side))
        if img.size != (size, size):
            img = img.resize((size, size), RESAMPLE)
    array = np.asarray(img, dtype=np.uint8)
    return array[None].copy() if channels == 1 else array.transpose(2, 0, 1).copy()


def _decode_many(
    items: Sequence[tuple[Any, str]],
    desc: str,
    channels: int,
    size: int | None,
    crop_size: int | None = None,
) -> np.ndarray:
    """Decode (source, where) pairs into one (N, C, H, W) uint8 array; all shapes must agree."""
    out: np.ndarray | None = None
    bar = progress(items, desc=desc, unit="img", disable=len(items) < PROGRESS_MIN_IMAGES)
    for i, (src, where) in enumerate(bar):
        image = decode_image(src, where, channels, size, crop_size)
        if out is None:
            out = np.empty((len(items), *image.shape), dtype=np.uint8)
        elif image.shape != out.shape[1:]:
            raise data_error(
                where,
                f"image is {image.shape[2]}x{image.shape[1]} but earlier ones are "
                f"{out.shape[3]}x{out.shape[2]}; pass size= to resize",
            )
        out[i] = image
    if out is None:
        raise DataError(f"{desc}: no images found")
    return out


def _check_labels(where: str | Path, labels: np.ndarray, num_classes: int) -> None:
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise data_error(
            where, f"label {int(labels[first])} at row {first} out of range [0, {num_classes})"
        )


# ---------------------------------------------------------------------------------- digits


@SOURCES.register("digits")
def load_digits_source(size: int = DIGITS_SIZE) -> ImageArrays:
    """scikit-learn's bundled digits at size x size (see digits.py)."""
    return load_digits_arrays(size)


# ---------------------------------------------------------------------------------- CIFAR


# Globals a CIFAR pickle may name: numpy array / dtype / scalar reconstruction (numpy 1.x writes
# numpy.core.*, 2.x numpy._core.*; protocol 5 uses _frombuffer) and _codecs.encode, which
# protocol <= 2 pickles written by Python 3 use for bytes. Values: (numpy submodule, name).
_CIFAR_NUMPY_GLOBALS: dict[tuple[str, str], tuple[str, str]] = {
    **{
        (f"numpy.{core}.{sub}", name): (sub, name)
        for core in ("core", "_core")
        for sub, name in (
            ("multiarray", "_reconstruct"),
            ("multiarray", "scalar"),
            ("numeric", "_frombuffer"),
        )
    },
    ("numpy", "ndarray"): ("", "ndarray"),
    ("numpy", "dtype"): ("", "dtype"),
}
_CIFAR_OTHER_GLOBALS = {("_codecs", "encode")}


def _numpy_global(submodule: str, name: str) -> Any:
    """`name` from numpy (submodule "") or numpy's core `submodule`, for the installed numpy."""
    if not submodule:
        return getattr(np, name)
    try:
        module = importlib.import_module(f"numpy._core.{submodule}")
    except ImportError:  # numpy 1.x without the numpy._core alias
        module = importlib.import_module(f"numpy.core.{submodule}")
    return getattr(module, name)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for the official CIFAR python format: dicts, lists, bytes, str, ints and numpy
    arrays only. Any other global (os.system, builtins.eval, ...) is a one-line DataError, so
    a crafted batch file cannot run code."""

    def __init__(self, file: Any, where: str | os.PathLike[str], **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _CIFAR_NUMPY_GLOBALS:
            return _numpy_global(*_CIFAR_NUMPY_GLOBALS[module, name])
        if (module, name) in _CIFAR_OTHER_GLOBALS:
            return super().find_class(module, name)
        raise data_error(
            self.where,
            f"refused to unpickle global {module}.{name} (not part of the CIFAR format); "
            "use the official CIFAR python files",
        )


def _unpickle(path: Path) -> dict[Any, Any]:
    """Load one CIFAR pickle (the official python format) with RestrictedUnpickler."""
    _require(path, "CIFAR file", "file")
    try:
        with path.open("rb") as f:
            payload = RestrictedUnpickler(f, path, encoding="bytes").load()
    except DataError:
        raise
    except Exception as exc:  # arbitrary bytes can raise almost any exception type in pickle
        raise data_error(path, f"not a CIFAR pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict):
        raise data_error(path, f"not a CIFAR pickle (holds {type(payload).__name__}, not a dict)")
    return payload


def _key(path: Path, payload: dict[Any, Any], key: str) -> Any:
    for candidate in (key.encode(), key):
        if candidate in payload:
            return payload[candidate]
    found = ", ".join(sorted(map(str, payload))[:MAX_KEYS_SHOWN])
    raise data_error(path, f"missing key b'{key}' (found {found})")


def _cifar_root(root: str | os.PathLike[str], folder_name: str) -> Path:
    path = _require(Path(root), "CIFAR folder", "dir")
    return path / folder_name if (path / folder_name).is_dir() else path


def _read_cifar(
    files: Sequence[Path], label_key: str, class_names: list[str], split: str
) -> ImageArrays:
    images, labels = [], []
    for path in files:
        payload = _unpickle(path)
        data = np.asarray(_key(path, payload, "data"))
        batch_labels = np.asarray(_key(path, payload, label_key))
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR_ROW_BYTES:
            raise data_error(
                path, f"b'data' must be uint8 (N, {CIFAR_ROW_BYTES}), got {data.dtype} {data.shape}"
            )
        if batch_labels.ndim != 1 or len(batch_labels) != len(data):
            raise data_error(
                path, f"{len(batch_labels)} labels for {len(data)} images in b'{label_key}'"
            )
        if not np.issubdtype(batch_labels.dtype, np.integer):
            raise data_error(path, f"b'{label_key}' must hold integers")
        _check_labels(path, batch_labels, len(class_names))
        images.append(data.reshape(-1, CIFAR_CHANNELS, CIFAR_SIDE, CIFAR_SIDE))
        labels.append(batch_labels.astype(np.int64))
    all_labels = np.concatenate(labels)
    return ImageArrays(
        images=np.concatenate(images),
        labels=all_labels,
        attributes=np.zeros((len(all_labels), 0), dtype=np.int8),
        class_names=class_names,
        attr_names=[],
        ids=[f"{split}-{i:05d}" for i in range(len(all_labels))],
    )


def _class_names(path: Path, key: str) -> list[str]:
    names = _key(path, _unpickle(path), key)
    if not isinstance(names, (list, tuple)) or not names:
        raise data_error(path, f"b'{key}' must be a non-empty list of names")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _check_split(split: str, allowed: Sequence[str]) -> None:
    if split not in allowed:
        raise DataError(f"split must be one of {', '.join(allowed)}; got {split!r}")


@SOURCES.register("cifar10")
def load_cifar10(root: str | os.PathLike[str], split: str = "train") -> ImageArrays:
    """CIFAR-10, official python version: `cifar-10-batches-py/` (or its parent)."""
    _check_split(split, CIFAR_SPLITS)
    folder = _cifar_root(root, CIFAR10_DIR)
    names = _class_names(folder / CIFAR10_META, "label_names")
    files = CIFAR10_TRAIN_FILES if split == "train" else CIFAR10_TEST_FILES
    return _read_cifar([folder / f for f in files], "labels", names, split)


@SOURCES.register("cifar100")
def load_cifar100(root: str | os.PathLike[str], split: str = "train") -> ImageArrays:
    """CIFAR-100, official python version: `cifar-100-python/` (or its parent), fine labels."""
    _check_split(split, CIFAR_SPLITS)
    folder = _cifar_root(root, CIFAR100_DIR)
    names = _class_names(folder / CIFAR100_META, "fine_label_names")
    return _read_cifar([folder / split], "fine_labels", names, split)


# ---------------------------------------------------------------------------------- CelebA


def _read_celeba_attrs(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """Parse list_attr_celeba.txt: count, attribute names, then `name v1 .. vA` with -1/1."""
    _require(path, "CelebA attribute file", "file")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(lines) < 2:
        raise data_error(path, "expected a count line and an attribute-name line")
    try:
        count = int(lines[0].strip())
    except ValueError:
        raise data_error(path, f"line 1 must be the image count, got {lines[0][:40]!r}") from None
    attr_names = lines[1].split()
    names, rows = [], []
    for line_no, line in enumerate(lines[2:], start=3):
        tokens = line.split()
        if len(tokens) != len(attr_names) + 1:
            raise data_error(
                path,
                f"line {line_no}: expected {len(attr_names) + 1} columns "
                f"(name + {len(attr_names)} attributes), got {len(tokens)}",
            )
        try:
            values = [CELEBA_ATTR_VALUES[int(v)] for v in tokens[1:]]
        except (ValueError, KeyError):
            raise data_error(path, f"line {line_no}: attribute values must be -1 or 1") from None
        names.append(tokens[0])
        rows.append(values)
    if len(names) != count:
        raise data_error(path, f"line 1 says {count} images but {len(names)} are listed")
    return attr_names, names, np.asarray(rows, dtype=np.int8).reshape(len(names), len(attr_names))


def _read_celeba_partition(path: Path, names: list[str], split: str) -> np.ndarray:
    _require(path, "CelebA partition file", "file")
    partition: dict[str, int] = {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) != 2 or not tokens[1].isdigit():
            raise data_error(path, f"line {line_no}: expected '<image> <0|1|2>'")
        partition[tokens[0]] = int(tokens[1])
    missing = [n for n in names if n not in partition]
    if missing:
        raise data_error(path, f"no partition for {missing[0]!r}")
    return np.asarray([partition[n] == CELEBA_SPLITS[split] for n in names])


@SOURCES.register("celeba")
def load_celeba(
    root: str | os.PathLike[str],
    size: int = CELEBA_SIZE,
    crop_size: int | None = CELEBA_CROP,
    label_attribute: str | int | None = None,
    split: str = CELEBA_ALL,
    limit: int | None = None,
) -> ImageArrays:
    """CelebA: `img_align_celeba/*.jpg` + `list_attr_celeba.txt`; all attributes as 0/1. Label is
    -1, or attribute `label_attribute` (name or index) as classes [not_<attr>, <attr>]."""
    _check_size(size)
    _check_split(split, (CELEBA_ALL, *CELEBA_SPLITS))
    folder = _require(Path(root), "CelebA folder", "dir")
    image_dir = _require(folder / CELEBA_IMAGE_DIR, "CelebA image folder", "dir")
    attr_names, names, attributes = _read_celeba_attrs(folder / CELEBA_ATTR_FILE)
    if split != CELEBA_ALL:
        keep = _read_celeba_partition(folder / CELEBA_PARTITION_FILE, names, split)
        names = [n for n, k in zip(names, keep) if k]
        attributes = attributes[keep]
    if limit is not None:
        names, attributes = names[:limit], attributes[:limit]
    if not names:
        raise data_error(folder, f"no images selected (split={split!r}, limit={limit})")
    labels = np.full(len(names), NO_LABEL, dtype=np.int64)
    class_names: list[str] = []
    if label_attribute is not None:
        index = _attr_index(label_attribute, attr_names, folder / CELEBA_ATTR_FILE)
        labels = attributes[:, index].astype(np.int64)
        class_names = [f"not_{attr_names[index]}", attr_names[index]]
    items = []
    for name in names:
        path = image_dir / name
        if not path.is_file():
            raise data_error(path, f"listed in {CELEBA_ATTR_FILE} but missing")
        items.append((path, str(path)))
    images = _decode_many(items, "decoding celeba", 3, size, crop_size)
    return ImageArrays(images, labels, attributes, class_names, list(attr_names), list(names))


def _attr_index(attribute: str | int, attr_names: Sequence[str], where: str | Path) -> int:
    if isinstance(attribute, int) and not isinstance(attribute, bool):
        if not 0 <= attribute < len(attr_names):
            raise data_error(
                where, f"attribute index {attribute} out of range [0, {len(attr_names)})"
            )
        return attribute
    if attribute not in attr_names:
        raise data_error(
            where, f"unknown attribute {attribute!r}; available: {', '.join(attr_names) or 'none'}"
        )
    return list(attr_names).index(attribute)


# ---------------------------------------------------------------------------------- image folder


def _image_extensions() -> set[str]:
    return {ext.lower() for ext in Image.registered_extensions()}


@SOURCES.register("folder")
def load_image_folder(
    root: str | os.PathLike[str],
    size: int = FOLDER_SIZE,
    channels: int = FOLDER_CHANNELS,
) -> ImageArrays:
    """One subfolder per class (sorted names = class order), images of any Pillow format
    (by extension), center-cropped to a square and resized to size x size."""
    _check_size(size)
    _check_channels(channels)
    folder = _require(Path(root), "image folder", "dir")
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise data_error(folder, "no class subfolders found")
    extensions = _image_extensions()
    items, labels, ids = [], [], []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(
            p
            for p in class_dir.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in extensions
        )
        if not files:
            raise data_error(class_dir, "class folder holds no images")
        for path in files:
            items.append((path, str(path)))
            labels.append(label)
            ids.append(f"{class_dir.name}/{path.name}")
    images = _decode_many(items, f"decoding {folder.name}", channels, size)
    return ImageArrays(
        images=images,
        labels=np.asarray(labels, dtype=np.int64),
        attributes=np.zeros((len(labels), 0), dtype=np.int8),
        class_names=[p.name for p in class_dirs],
        attr_names=[],
        ids=ids,
    )


# ---------------------------------------------------------------------------------- Parquet


def _image_bytes_column(path: Path, table: pa.Table, column: str) -> list[Any]:
    col = table.column(column)
    kind = col.type
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:  # Hugging Face Image
        return [None if v is None else v.get("bytes") for v in col.to_pylist()]
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return col.to_pylist()
    raise data_error(path, f"column {column!r} has type {kind}; expected encoded image bytes")


def _int_column(path: Path, table: pa.Table, column: str, fill: int) -> np.ndarray:
    col = table.column(column)
    if not (pa.types.is_integer(col.type) or pa.types.is_boolean(col.type)):
        raise data_error(path, f"column {column!r} has type {col.type}; expected integers")
    return np.asarray([fill if v is None else int(v) for v in col.to_pylist()], dtype=np.int64)


@SOURCES.register("parquet")
def load_parquet(
    path: str | os.PathLike[str],
    image_column: str = "image",
    label_column: str | None = None,
    id_column: str | None = None,
    attr_columns: Sequence[str] = (),
    class_names: Sequence[str] | None = None,
    size: int | None = None,
    channels: int | None = None,
) -> ImageArrays:
    """A user Parquet file or folder: encoded image bytes (or a Hugging Face Image struct),
    optional integer label column (null = -1), optional 0/1 attribute columns and id column."""
    _check_size(size)
    source = _require(Path(path), "Parquet path")
    try:
        table = pq.read_table(source)
    except (pa.ArrowException, OSError) as exc:
        raise data_error(source, f"cannot read as Parquet ({exc})") from None
    wanted = [image_column, label_column, id_column, *attr_columns]
    for column in (c for c in wanted if c is not None):
        if column not in table.column_names:
            raise data_error(
                source, f"missing column {column!r}; columns: {', '.join(table.column_names)}"
            )
    if table.num_rows == 0:
        raise data_error(source, "holds no rows")
    blobs = _image_bytes_column(source, table, image_column)
    for row, blob in enumerate(blobs):
        if not blob:
            raise data_error(source, f"row {row}: image is null or empty")
    if channels is None:
        channels = _infer_channels(blobs[0], f"{source} row 0")
    _check_channels(channels)
    items = [(blob, f"{source} row {row}") for row, blob in enumerate(blobs)]
    images = _decode_many(items, f"decoding {source.name}", channels, size)
    if label_column is None:
        labels = np.full(table.num_rows, NO_LABEL, dtype=np.int64)
        names = list(class_names or [])
    else:
        labels = _int_column(source, table, label_column, NO_LABEL)
        if (labels < NO_LABEL).any():
            first = int(np.flatnonzero(labels < NO_LABEL)[0])
            raise data_error(source, f"row {first}: negative label {int(labels[first])}")
        names = (
            list(class_names)
            if class_names is not None
            else [str(c) for c in range(int(labels.max()) + 1)]
        )
        labelled = labels != NO_LABEL
        _check_labels(source, np.where(labelled, labels, 0), max(len(names), 1))
        if labelled.any() and not names:
            raise data_error(source, "labels given but class_names is empty")
    attributes = np.zeros((table.num_rows, len(attr_columns)), dtype=np.int8)
    for j, column in enumerate(attr_columns):
        values = _int_column(source, table, column, 0)
        if not np.isin(values, (0, 1)).all():
            raise data_error(source, f"attribute column {column!r} must hold 0/1 values")
        attributes[:, j] = values
    if id_column is None:
        ids = [f"{i:06d}" for i in range(table.num_rows)]
    else:
        ids = [str(v) for v in table.column(id_column).to_pylist()]
        if len(set(ids)) != len(ids):
            raise data_error(source, f"id column {id_column!r} has duplicates")
    return ImageArrays(images, labels, attributes, names, list(attr_columns), ids)


def _infer_channels(blob: bytes, where: str) -> int:
    try:
        with Image.open(io.BytesIO(blob)) as img:
            return 1 if img.mode in GRAY_MODES else 3
    except (OSError, SyntaxError, ValueError) as exc:
        raise data_error(where, f"cannot decode image ({_describe(exc)})") from None


# ---------------------------------------------------------------------------------- build


@dataclass(frozen=True)
class ImbalanceSpec:
    """Parameters of the imbalance builders (each uses the ones it needs)."""

    imb_factor: float = DEFAULT_IMB_FACTOR
    n_max: int | None = None
    bias_attribute: str | int | None = None
    bias_ratio: float = DEFAULT_BIAS_RATIO
    reference_fraction: float = DEFAULT_REFERENCE_FRACTION
    seed: int = 0
    reference_count: int = 0  # > 0: the reference's size, instead of the fraction


ImbalanceBuilder = Callable[[ImageArrays, ImbalanceSpec], dict[str, np.ndarray]]
IMBALANCES: Registry[ImbalanceBuilder] = Registry("imbalance")


@IMBALANCES.register(IMBALANCE_NONE)
def _no_imbalance(data: ImageArrays, spec: ImbalanceSpec) -> dict[str, np.ndarray]:
    return {"": np.arange(len(data))}


@IMBALANCES.register(IMBALANCE_LONG_TAIL)
def _long_tail(data: ImageArrays, spec: ImbalanceSpec) -> dict[str, np.ndarray]:
    if data.num_classes == 0:
        raise DataError("long_tail needs a labelled source (this one has no classes)")
    return {
        "": long_tail_indices(
            data.labels,
            spec.imb_factor,
            spec.seed,
            spec.n_max,
            num_classes=data.num_classes,
            class_names=list(data.class_names),
        )
    }


def bias_column(data: ImageArrays, attribute: str | int) -> np.ndarray:
    """The 0/1 column an attribute bias skews: one attribute (name or index), or a joint one,
    names joined by "+" (e.g. ``bold+even``): 1 where every named attribute is 1, so a 90/10
    bias puts 90% of the biased set in that one joint group."""
    parts = attribute.split("+") if isinstance(attribute, str) else [attribute]
    columns = [data.attributes[:, _attr_index(p, data.attr_names, "bias_attribute")]
               for p in parts]
    return np.logical_and.reduce([c == 1 for c in columns]).astype(np.int8)


@IMBALANCES.register(IMBALANCE_ATTRIBUTE_BIAS)
def _attribute_bias(data: ImageArrays, spec: ImbalanceSpec) -> dict[str, np.ndarray]:
    if spec.bias_attribute is None:
        raise DataError("attribute_bias needs bias_attribute (an attribute name or index)")
    biased, reference = attribute_bias_indices(
        bias_column(data, spec.bias_attribute), spec.bias_ratio, spec.reference_fraction,
        spec.seed, spec.reference_count
    )
    return {BIASED_NAME: biased, REFERENCE_NAME: reference}


@IMBALANCES.register(IMBALANCE_LONG_TAIL_REFERENCE)
def _long_tail_reference(data: ImageArrays, spec: ImbalanceSpec) -> dict[str, np.ndarray]:
    if data.num_classes == 0:
        raise DataError("long_tail_reference needs a labelled source (this one has no classes)")
    n_ref = reference_size(len(data), spec.reference_fraction, spec.reference_count)
    biased, reference = long_tail_reference_indices(
        data.labels, spec.imb_factor, n_ref, spec.seed, spec.n_max,
        num_classes=data.num_classes, class_names=list(data.class_names))
    return {BIASED_NAME: biased, REFERENCE_NAME: reference}


SOURCE_PATH_PARAMETERS = ("root", "path")  # a loader's parameter that data.path fills


def _loader(source: str) -> SourceLoader:
    try:
        return SOURCES.get(source)
    except ConfigError as exc:
        raise ConfigError(f"data.source: {exc}") from None


def check_source_options(
    source: str, options: Mapping[str, Any] | None = None, *, complete: bool = False
) -> None:
    """Check `options` against loader `source`'s signature without loading anything: an
    unknown source or option is a one-line ConfigError naming data.source_options. With
    `complete`, required options (e.g. root) must be present too; without it (config
    validation, before data.path is bound) only unknown options are errors."""
    signature = inspect.signature(_loader(source))
    try:
        if complete:
            signature.bind(**dict(options or {}))
        else:
            signature.bind_partial(**dict(options or {}))
    except TypeError as exc:
        valid = ", ".join(signature.parameters) or "(none)"
        raise ConfigError(
            f"data.source_options: data source {source!r}: {exc}; options: {valid}"
        ) from None


def source_path_parameter(source: str) -> str | None:
    """The parameter of loader `source` that takes its file or folder (root / path), if any."""
    parameters = inspect.signature(_loader(source)).parameters
    return next((name for name in SOURCE_PATH_PARAMETERS if name in parameters), None)


def bind_source_path(
    source: str, options: Mapping[str, Any], path: str | os.PathLike[str]
) -> dict[str, Any]:
    """A copy of `options` with `path` (data.path) bound to the loader's path parameter: `root`
    for cifar10/100, celeba and folder, `path` for parquet. A source without one (digits), or
    options that already give that parameter another value, is a ConfigError."""
    parameter = source_path_parameter(source)
    if parameter is None:
        takes = [name for name in SOURCES.names() if source_path_parameter(name)]
        raise ConfigError(
            f"data.path: source {source!r} takes no path; remove data.path "
            f"(sources that read files: {', '.join(takes)})"
        )
    bound = dict(options)
    if parameter in bound and not _same_path(bound[parameter], path):
        raise ConfigError(
            f"data.source_options.{parameter}: {_jsonable(bound[parameter])!r} conflicts with "
            f"data.path {os.fspath(path)!r}; set only one of them"
        )
    bound[parameter] = path
    return bound


def _same_path(a: Any, b: str | os.PathLike[str]) -> bool:
    if not isinstance(a, (str, os.PathLike)):
        return False
    return os.path.normpath(os.fspath(a)) == os.path.normpath(os.fspath(b))


def load_source(source: str, options: Mapping[str, Any] | None = None) -> ImageArrays:
    """Run the registered loader `source` with `options`; unknown or missing options are a
    ConfigError (see check_source_options)."""
    check_source_options(source, options, complete=True)
    return SOURCES.get(source)(**dict(options or {}))


def _jsonable(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def build_dataset(
    source: str,
    out_dir: str | os.PathLike[str],
    *,
    source_options: Mapping[str, Any] | None = None,
    imbalance: str = IMBALANCE_NONE,
    imb_factor: float = DEFAULT_IMB_FACTOR,
    n_max: int | None = None,
    bias_attribute: str | int | None = None,
    bias_ratio: float = DEFAULT_BIAS_RATIO,
    reference_fraction: float = DEFAULT_REFERENCE_FRACTION,
    seed: int = 0,
    reference_count: int = 0,
    name: str | None = None,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
) -> Path:
    """Load `source`, apply `imbalance` and write Parquet; returns `out_dir`.

    `none` / `long_tail` write one dataset at `out_dir`. `attribute_bias` and
    `long_tail_reference` write two disjoint datasets, `out_dir/biased` and `out_dir/reference`,
    their union `out_dir/observed` (D_obs) and `out_dir/splits.json`, all written into a temp
    folder and renamed into place together. Rows keep their source ids.
    """
    builder = IMBALANCES.get(imbalance)
    spec = ImbalanceSpec(imb_factor, n_max, bias_attribute, bias_ratio, reference_fraction, seed,
                         reference_count)
    data = load_source(source, source_options)
    parts = builder(data, spec)
    if set(parts) == {BIASED_NAME, REFERENCE_NAME}:  # the observed set: both, biased rows first
        parts[OBSERVED_NAME] = np.concatenate([parts[BIASED_NAME], parts[REFERENCE_NAME]])
    out_path = Path(out_dir).absolute()
    base_name = name or out_path.name
    recipe = {
        "source": source,
        "source_options": _jsonable(dict(source_options or {})),
        "imbalance": imbalance,
        "imb_factor": imb_factor,
        "n_max": n_max,
        "bias_attribute": bias_attribute,
        "bias_ratio": bias_ratio,
        "reference_fraction": reference_fraction,
        "seed": seed,
    }
    if reference_count:  # recorded only when set, so earlier manifests read the same
        recipe["reference_count"] = reference_count

    def write(target: Path, role: str, indices: np.ndarray) -> None:
        subset = data.subset(indices)
        meta = DatasetMeta(
            name=f"{base_name}/{role}" if role else base_name,
            source=source,
            class_names=subset.class_names,
            attr_names=subset.attr_names,
            extra={"build": {**recipe, "role": role or None}},
        )
        write_dataset(
            target,
            subset.images,
            subset.labels,
            subset.attributes,
            meta,
            ids=subset.ids,
            rows_per_shard=rows_per_shard,
        )

    if set(parts) == {""}:
        write(out_path, "", parts[""])
        return out_path
    with atomic_directory(out_path) as tmp:
        for role, indices in parts.items():
            write(tmp / role, role, indices)
        write_json(
            tmp / SPLITS_NAME,
            {"datasets": {role: role for role in parts}, "build": recipe},
        )
    return out_path

