"""The one Parquet shard schema shared by every dataset, its `dataset.json` manifest, the content
hash, an atomic writer (shards + manifest go to a temp sibling folder, then are renamed in) and
N-D tensor columns (fixed-size lists with their shape in the field metadata)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from debiaslab.errors import ConfigError, DataError

FORMAT_VERSION = 1
MANIFEST_NAME = "dataset.json"
SPLITS_NAME = "splits.json"  # marks a folder holding several datasets (e.g. biased + reference)
SHARD_TEMPLATE = "shard-{:05d}.parquet"
DEFAULT_ROWS_PER_SHARD = 10_000
PNG_COMPRESS_LEVEL = 6
NO_LABEL = -1
SUPPORTED_CHANNELS = (1, 3)
SCHEMA_METADATA_KEY = b"debiaslab"
HASH_DOMAIN = b"debiaslab-rows-v1"
_LEN_BYTES = 8  # length prefixes in the row digest are unsigned 64-bit little endian
TENSOR_SHAPE_KEY = b"shape"  # field metadata of a tensor column: its per-row shape as JSON
TENSOR_DTYPE_KEY = b"dtype"  # ... and its numpy dtype name
TENSOR_DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                 "uint64", "float16", "float32", "float64")

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("label", pa.int64(), nullable=False),
        pa.field("attributes", pa.list_(pa.int8()), nullable=False),
    ]
)

_REQUIRED_KEYS: dict[str, type | tuple[type, ...]] = {
    "format_version": int,
    "name": str,
    "source": str,
    "num_classes": int,
    "class_names": list,
    "attr_names": list,
    "image_shape": list,
    "num_rows": int,
    "class_counts": list,
    "shards": list,
    "content_hash": str,
}


def one_line(text: str) -> str:
    """Collapse whitespace (newlines included) so an error message renders as a single line."""
    return " ".join(str(text).split())


def data_error(path: str | os.PathLike[str], problem: str) -> DataError:
    """A one-line DataError of the form '<path>: <problem>'."""
    return DataError(one_line(f"{path}: {problem}"))


@dataclass(frozen=True)
class DatasetMeta:
    """What a writer knows about a dataset besides its rows."""

    name: str
    source: str
    class_names: list[str]
    attr_names: list[str]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass(frozen=True)
class ImageArrays:
    """Decoded rows in memory: uint8 images (N, C, H, W), int64 labels (N,) with -1 for none,
    int8 0/1 attributes (N, A), unique string ids (N,)."""

    images: np.ndarray
    labels: np.ndarray
    attributes: np.ndarray
    class_names: list[str]
    attr_names: list[str]
    ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, indices: np.ndarray) -> "ImageArrays":
        """Rows at `indices`, in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        return ImageArrays(
            images=self.images[idx],
            labels=self.labels[idx],
            attributes=self.attributes[idx],
            class_names=list(self.class_names),
            attr_names=list(self.attr_names),
            ids=[self.ids[i] for i in idx],
        )


@dataclass(frozen=True)
class Manifest:
    """The validated contents of `dataset.json`."""

    path: Path
    name: str
    source: str
    class_names: list[str]
    attr_names: list[str]
    image_shape: tuple[int, int, int]
    num_rows: int
    class_counts: list[int]
    shards: list[dict[str, Any]]
    content_hash: str
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def shard_paths(self) -> list[Path]:
        return [self.path / shard["file"] for shard in self.shards]

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "name": self.name,
            "source": self.source,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "attr_names": list(self.attr_names),
            "image_shape": list(self.image_shape),
            "num_rows": self.num_rows,
            "class_counts": list(self.class_counts),
            "shards": list(self.shards),
            "content_hash": self.content_hash,
            "extra": self.extra,
        }


# ---------------------------------------------------------------------------------- images


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (C, H, W) image with C in {1, 3} (deterministic for a Pillow build)."""
    hwc = np.ascontiguousarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))
    buffer = io.BytesIO()
    Image.fromarray(hwc, mode="L" if image.shape[0] == 1 else "RGB").save(
        buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL
    )
    return buffer.getvalue()


def decode_png(data: bytes, channels: int) -> np.ndarray:
    """uint8 (C, H, W) array from encoded image bytes (raises PIL's errors on corrupt data)."""
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        array = np.asarray(img, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


# ---------------------------------------------------------------------------------- tensor columns


def _tensor_dtype(dtype: str | np.dtype | type, where: str) -> np.dtype:
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or resolved.name not in TENSOR_DTYPES:
        raise ConfigError(f"{where}: dtype {dtype!r} is not supported; use one of "
                          f"{', '.join(TENSOR_DTYPES)}")
    return resolved


def tensor_field(name: str, shape: Sequence[int], dtype: str | np.dtype | type = "float32"
                 ) -> pa.Field:
    """A non-null N-D tensor column: each row is a fixed_size_list of its C-order flattened
    values; the per-row `shape` and the dtype are kept in the field metadata."""
    dims = tuple(int(d) for d in shape)
    if not dims or any(d < 1 for d in dims):
        raise ConfigError(f"tensor column {name!r}: shape must be non-empty with sizes >= 1, "
                          f"got {list(shape)} (use a plain field for one value per row)")
    resolved = _tensor_dtype(dtype, f"tensor column {name!r}")
    metadata = {TENSOR_SHAPE_KEY: json.dumps(list(dims)).encode("utf-8"),
                TENSOR_DTYPE_KEY: resolved.name.encode("utf-8")}
    value_type = pa.from_numpy_dtype(resolved)
    return pa.field(name, pa.list_(value_type, int(np.prod(dims))), nullable=False,
                    metadata=metadata)


def column_field(name: str, dtype: str | np.dtype | type, shape: Sequence[int] = ()) -> pa.Field:
    """A non-null numeric column: a plain field for one value per row (`shape` ()), else a
    tensor_field."""
    if tuple(shape):
        return tensor_field(name, shape, dtype)
    resolved = _tensor_dtype(dtype, f"column {name!r}")
    return pa.field(name, pa.from_numpy_dtype(resolved), nullable=False)


def tensor_shape(field: pa.Field) -> tuple[int, ...] | None:
    """The per-row shape of a fixed_size_list field (from its metadata, else (list size,)),
    None for any other field."""
    if not pa.types.is_fixed_size_list(field.type):
        return None
    raw = (field.metadata or {}).get(TENSOR_SHAPE_KEY)
    if raw is None:
        return (field.type.list_size,)
    try:
        dims = tuple(int(d) for d in json.loads(raw))
    except (ValueError, TypeError):
        dims = ()
    if not dims or int(np.prod(dims)) != field.type.list_size:
        raise DataError(one_line(
            f"tensor column {field.name!r}: shape metadata {raw!r} does not match its "
            f"{field.type.list_size} values per row; rewrite the column"))
    return dims


def tensor_to_arrow(values: Any, field: pa.Field) -> pa.FixedSizeListArray:
    """The Arrow column of tensor `field` from a numpy array [N, *shape] (floats are cast to
    the field's dtype; a shape or kind mismatch is a DataError naming the column)."""
    shape = tensor_shape(field)
    if shape is None:
        raise ConfigError(f"column {field.name!r}: {field.type} is not a tensor field")
    array = np.asarray(values)
    dtype = np.dtype(field.type.value_type.to_pandas_dtype())
    if array.ndim < 1 or array.shape[1:] != shape:
        dims = ", ".join(map(str, shape))
        raise DataError(f"column {field.name!r}: expected an array [N, {dims}], got shape "
                        f"{list(array.shape)}; fix the mapper output")
    if array.dtype != dtype and not np.can_cast(array.dtype, dtype, casting="same_kind"):
        raise DataError(f"column {field.name!r}: {array.dtype} values cannot be stored as "
                        f"{dtype}; return {dtype} (or a same-kind dtype)")
    flat = np.ascontiguousarray(array, dtype=dtype).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), field.type.list_size)


def tensor_from_arrow(column: pa.Array | pa.ChunkedArray, field: pa.Field) -> np.ndarray:
    """A numpy array [N, *shape] in the stored dtype from a tensor column."""
    shape = tensor_shape(field)
    if shape is None:
        raise ConfigError(f"column {field.name!r}: {field.type} is not a tensor field")
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array(
            [], type=field.type)
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(column), *shape)


def table_to_numpy(table: pa.Table) -> dict[str, np.ndarray]:
    """Every column of `table` as numpy: tensor fields as [N, *shape] arrays, strings as
    object arrays, numbers in their stored dtype."""
    out: dict[str, np.ndarray] = {}
    for col_field in table.schema:
        column = table.column(col_field.name)
        if tensor_shape(col_field) is not None:
            out[col_field.name] = tensor_from_arrow(column, col_field)
        else:
            out[col_field.name] = column.to_numpy(zero_copy_only=False)
    return out


# ---------------------------------------------------------------------------------- hashing


def row_digest(row_id: str, image: bytes, label: int, attributes: np.ndarray) -> bytes:
    """sha256 of one row: length-prefixed id and image bytes, int64 label, length-prefixed
    int8 attributes (all little endian)."""
    id_bytes = row_id.encode("utf-8")
    attr_bytes = np.asarray(attributes, dtype=np.int8).tobytes()
    h = hashlib.sha256()
    for chunk in (id_bytes, image):
        h.update(len(chunk).to_bytes(_LEN_BYTES, "little"))
        h.update(chunk)
    h.update(int(label).to_bytes(_LEN_BYTES, "little", signed=True))
    h.update(len(attr_bytes).to_bytes(_LEN_BYTES, "little"))
    h.update(attr_bytes)
    return h.digest()


def combine_digests(digests: dict[str, bytes]) -> str:
    """Content hash: sha256 over the row digests in id order (Python string order), so it is
    independent of row order and shard layout."""
    h = hashlib.sha256(HASH_DOMAIN)
    for row_id in sorted(digests):
        h.update(digests[row_id])
    return h.hexdigest()


def table_digests(table: pa.Table) -> dict[str, bytes]:
    """Row digests of an Arrow table in SCHEMA, keyed by id."""
    ids = table.column("id").to_pylist()
    images = table.column("image").to_pylist()
    labels = table.column("label").to_numpy()
    attrs = table.column("attributes").to_pylist()
    return {
        row_id: row_digest(row_id, image, int(label), np.asarray(attr, dtype=np.int8))
        for row_id, image, label, attr in zip(ids, images, labels, attrs)
    }


# ---------------------------------------------------------------------------------- atomic folders


def _is_replaceable(target: Path) -> bool:
    if not target.is_dir():
        return False
    return (
        not any(target.iterdir())
        or (target / MANIFEST_NAME).is_file()
        or (target / SPLITS_NAME).is_file()
    )


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temp sibling folder; on success it replaces `target` by rename, on failure
    it is removed and `target` is untouched. Only empty folders or debiaslab datasets are replaced.
    """
    target = Path(target).absolute()
    if target.exists() and not _is_replaceable(target):
        raise data_error(target, "exists and is not a debiaslab dataset; refusing to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(target)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        swap_into(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def temp_sibling(target: Path) -> Path:
    """The temp folder a writer of ``target`` fills before :func:`swap_into` renames it in:
    ``.<name>.tmp-<pid>-<random>`` beside it (the PID tells a killed writer's leftovers)."""
    return target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def swap_into(tmp: Path, target: Path) -> None:
    """Rename the finished folder `tmp` onto `target`; an existing `target` is moved aside
    first and deleted only after the rename succeeded (restored if it fails)."""
    if not target.exists():
        os.replace(tmp, target)
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write pretty JSON and fsync it."""
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    _fsync_file(path)


# ---------------------------------------------------------------------------------- writing


def _validate_rows(
    out_dir: Path,
    n: int,
    labels: np.ndarray,
    attributes: np.ndarray,
    meta: DatasetMeta,
    ids: Sequence[str],
) -> None:
    if n == 0:
        raise data_error(out_dir, "no rows to write")
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise data_error(out_dir, f"labels must be integers of shape ({n},), got {labels.shape}")
    bad = (labels != NO_LABEL) & ((labels < 0) | (labels >= meta.num_classes))
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise data_error(
            out_dir,
            f"row {ids[first]!r}: label {int(labels[first])} out of range "
            f"[0, {meta.num_classes}) (or {NO_LABEL} for none)",
        )
    num_attrs = len(meta.attr_names)
    if attributes.shape != (n, num_attrs):
        raise data_error(
            out_dir, f"attributes must have shape ({n}, {num_attrs}), got {attributes.shape}"
        )
    if attributes.size and not np.isin(attributes, (0, 1)).all():
        raise data_error(out_dir, "attributes must be 0/1")
    if len(ids) != n:
        raise data_error(out_dir, f"expected {n} ids, got {len(ids)}")
    if len(set(ids)) != n:
        raise data_error(out_dir, "ids are not unique")


def _check_image(out_dir: Path, row_id: str, image: Any, shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.shape != shape:
        if isinstance(image, np.ndarray):
            got = f"{image.dtype} {image.shape}"
        else:
            got = type(image).__name__
        raise data_error(out_dir, f"row {row_id!r}: image must be uint8 {shape}, got {got}")
    return image


def write_dataset(
    out_dir: str | os.PathLike[str],
    images: np.ndarray | Sequence[np.ndarray],
    labels: np.ndarray | Sequence[int],
    attributes: np.ndarray | None,
    meta: DatasetMeta,
    *,
    ids: Sequence[str] | None = None,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
) -> Manifest:
    """Write rows as Parquet shards plus `dataset.json` into `out_dir`, atomically.

    `images` is a uint8 (N, C, H, W) array or a sequence of uint8 (C, H, W) arrays (checked row by
    row while writing); `ids` default to zero-padded row numbers. Returns the manifest.
    """
    out_path = Path(out_dir).absolute()
    n = len(images)
    labels_arr = np.asarray(labels)
    attrs_arr = (
        np.zeros((n, 0), dtype=np.int8) if attributes is None else np.asarray(attributes)
    )
    if attrs_arr.ndim == 1 and not meta.attr_names:
        attrs_arr = attrs_arr.reshape(n, 0)
    row_ids = [f"{i:0{len(str(max(n - 1, 0)))}d}" for i in range(n)] if ids is None else list(ids)
    _validate_rows(out_path, n, labels_arr, attrs_arr, meta, row_ids)
    if rows_per_shard < 1:
        raise data_error(out_path, f"rows_per_shard must be >= 1, got {rows_per_shard}")
    first = images[0]
    if not isinstance(first, np.ndarray) or first.ndim != 3 or first.shape[0] not in (
        SUPPORTED_CHANNELS
    ):
        got = getattr(first, "shape", type(first).__name__)
        raise data_error(
            out_path, f"images must be (C, H, W) with C in {SUPPORTED_CHANNELS}, got {got}"
        )
    shape = tuple(int(s) for s in first.shape)
    labels_arr = labels_arr.astype(np.int64)
    attrs_arr = attrs_arr.astype(np.int8)
    num_attrs = attrs_arr.shape[1]
    schema = SCHEMA.with_metadata(
        {
            SCHEMA_METADATA_KEY: json.dumps(
                {
                    "format_version": FORMAT_VERSION,
                    "name": meta.name,
                    "source": meta.source,
                    "class_names": meta.class_names,
                    "attr_names": meta.attr_names,
                    "image_shape": list(shape),
                }
            ).encode("utf-8")
        }
    )
    digests: dict[str, bytes] = {}
    shards: list[dict[str, Any]] = []
    with atomic_directory(out_path) as tmp:
        for shard_index, start in enumerate(range(0, n, rows_per_shard)):
            stop = min(start + rows_per_shard, n)
            pngs = []
            for i in range(start, stop):
                image = _check_image(out_path, row_ids[i], images[i], shape)
                png = encode_png(image)
                pngs.append(png)
                digests[row_ids[i]] = row_digest(row_ids[i], png, labels_arr[i], attrs_arr[i])
            offsets = np.arange(stop - start + 1) * num_attrs
            attr_col = pa.ListArray.from_arrays(
                pa.array(offsets.astype(np.int32)),
                pa.array(attrs_arr[start:stop].reshape(-1), type=pa.int8()),
            )
            table = pa.Table.from_arrays(
                [
                    pa.array(row_ids[start:stop], type=pa.string()),
                    pa.array(pngs, type=pa.binary()),
                    pa.array(labels_arr[start:stop], type=pa.int64()),
                    attr_col,
                ],
                schema=schema,
            )
            file_name = SHARD_TEMPLATE.format(shard_index)
            pq.write_table(table, tmp / file_name)
            _fsync_file(tmp / file_name)
            shards.append({"file": file_name, "num_rows": stop - start})
        labelled = labels_arr[labels_arr != NO_LABEL]
        manifest = Manifest(
            path=out_path,
            name=meta.name,
            source=meta.source,
            class_names=list(meta.class_names),
            attr_names=list(meta.attr_names),
            image_shape=shape,  # type: ignore[arg-type]
            num_rows=n,
            class_counts=np.bincount(labelled, minlength=meta.num_classes).tolist(),
            shards=shards,
            content_hash=combine_digests(digests),
            extra=dict(meta.extra),
        )
        write_json(tmp / MANIFEST_NAME, manifest.to_json())
    return manifest


# ---------------------------------------------------------------------------------- reading


def _check_str_list(path: Path, payload: dict[str, Any], key: str) -> list[str]:
    values = payload[key]
    if not all(isinstance(v, str) for v in values):
        raise data_error(path, f"{key!r} must be a list of strings")
    return list(values)


def read_manifest(dataset_dir: str | os.PathLike[str]) -> Manifest:
    """Read and validate `<dataset_dir>/dataset.json`; problems raise a one-line DataError."""
    root = Path(dataset_dir).absolute()
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise data_error(root, "dataset folder does not exist")
    if not path.is_file():
        raise data_error(path, "missing manifest (not a debiaslab dataset folder)")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise data_error(path, f"invalid JSON ({exc})") from None
    if not isinstance(payload, dict):
        raise data_error(path, "manifest must be a JSON object")
    for key, kind in _REQUIRED_KEYS.items():
        if key not in payload:
            raise data_error(path, f"missing key {key!r}")
        if not isinstance(payload[key], kind) or isinstance(payload[key], bool):
            raise data_error(path, f"key {key!r} has the wrong type")
    if payload["format_version"] != FORMAT_VERSION:
        raise data_error(
            path, f"format_version {payload['format_version']} unsupported (want {FORMAT_VERSION})"
        )
    class_names = _check_str_list(path, payload, "class_names")
    attr_names = _check_str_list(path, payload, "attr_names")
    if payload["num_classes"] != len(class_names):
        raise data_error(path, "num_classes does not match class_names")
    shape = payload["image_shape"]
    if (
        len(shape) != 3
        or not all(isinstance(s, int) and s > 0 for s in shape)
        or shape[0] not in SUPPORTED_CHANNELS
    ):
        raise data_error(path, f"image_shape must be [C, H, W] with C in {SUPPORTED_CHANNELS}")
    counts = payload["class_counts"]
    if len(counts) != len(class_names) or not all(isinstance(c, int) and c >= 0 for c in counts):
        raise data_error(path, "class_counts must hold one non-negative count per class")
    num_rows = payload["num_rows"]
    if sum(counts) > num_rows:
        raise data_error(path, "class_counts sum to more than num_rows")
    shard_rows = 0
    for shard in payload["shards"]:
        if not isinstance(shard, dict) or not isinstance(shard.get("file"), str) or not isinstance(
            shard.get("num_rows"), int
        ):
            raise data_error(path, "each shard needs 'file' (string) and 'num_rows' (int)")
        if Path(shard["file"]).name != shard["file"]:
            raise data_error(path, f"shard file {shard['file']!r} must be a plain file name")
        if not (root / shard["file"]).is_file():
            raise data_error(root / shard["file"], "shard listed in the manifest is missing")
        shard_rows += shard["num_rows"]
    if shard_rows != num_rows:
        raise data_error(path, f"shards hold {shard_rows} rows but num_rows is {num_rows}")
    extra = payload.get("extra", {})
    if not isinstance(extra, dict):
        raise data_error(path, "'extra' must be an object")
    return Manifest(
        path=root,
        name=payload["name"],
        source=payload["source"],
        class_names=class_names,
        attr_names=attr_names,
        image_shape=(shape[0], shape[1], shape[2]),
        num_rows=num_rows,
        class_counts=list(counts),
        shards=list(payload["shards"]),
        content_hash=payload["content_hash"],
        format_version=payload["format_version"],
        extra=extra,
    )
