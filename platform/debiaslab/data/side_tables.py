"""Side tables: per-image columns (scores, labels, h-vectors, weights) stored beside a dataset in
``<dataset>/side/<name>/`` (Parquet parts sorted by id + ``side_table.json``) and joined by id;
the images are never rewritten. Also `read_datasets`: several datasets as one, by source."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from debiaslab.data.schema import (
    DEFAULT_ROWS_PER_SHARD,
    TENSOR_DTYPES,
    column_field,
    data_error,
    read_manifest,
    swap_into,
    table_to_numpy,
    temp_sibling,
    tensor_shape,
    tensor_to_arrow,
    write_json,
)
from debiaslab.errors import ConfigError, DataError

SIDE_DIR = "side"  # <dataset>/side/<table name>/
SIDE_MANIFEST_NAME = "side_table.json"
SIDE_FORMAT_VERSION = 1
SIDE_PART_TEMPLATE = "part-{:05d}.parquet"
SIDE_ID = "id"
SIDE_HASH_DOMAIN = b"debiaslab-side-table-v1"
SIDE_ROW_GROUP_ROWS = 1024  # rows per Parquet row group of a written part
ID_PREFIX_SEPARATOR = "/"  # read_datasets(prefix_ids=True): "<key>/<id>"
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")
_MANIFEST_KEYS = {"format_version": int, "name": str, "num_rows": int, "columns": list,
                  "files": list, "dataset_content_hash": str, "content_hash": str,
                  "producer": dict}


def check_name(name: str, what: str = "side table name") -> str:
    """`name` if it is a plain name (letters, digits, . _ -, not starting with a dot)."""
    if not isinstance(name, str) or not _PLAIN_NAME.match(name) or name in (".", ".."):
        raise ConfigError(f"{what} {name!r}: use letters, digits, '.', '_' and '-' only "
                          f"(not starting with '.')")
    return name


def side_table_path(dataset_path: str | os.PathLike[str], name: str) -> Path:
    """``<dataset>/side/<name>`` (absolute; the name is checked, the folder need not exist)."""
    return Path(dataset_path).absolute() / SIDE_DIR / check_name(name)


def list_side_tables(dataset_path: str | os.PathLike[str]) -> list[str]:
    """Names of the finished side tables of a dataset, sorted (temp folders are skipped)."""
    root = Path(dataset_path) / SIDE_DIR
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if _PLAIN_NAME.match(p.name) and (p / SIDE_MANIFEST_NAME).is_file())


# ---------------------------------------------------------------------------------- columns


def side_table_columns(schema: pa.Schema) -> list[dict[str, Any]]:
    """Column specs ``{"name", "dtype", "shape"}`` of a side-table schema: a string ``id``
    field plus numeric plain or tensor fields (anything else is a ConfigError)."""
    if SIDE_ID not in schema.names or not pa.types.is_string(schema.field(SIDE_ID).type):
        raise ConfigError(f"side table schema {schema.names}: needs a string {SIDE_ID!r} column")
    specs = []
    for field in schema:
        if field.name == SIDE_ID:
            continue
        shape = tensor_shape(field)
        value_type = field.type.value_type if shape is not None else field.type
        try:
            dtype = np.dtype(value_type.to_pandas_dtype()).name
        except (NotImplementedError, TypeError):
            dtype = str(value_type)
        if dtype not in TENSOR_DTYPES:
            raise ConfigError(f"side table column {field.name!r}: type {field.type} is not "
                              f"numeric; use a plain numeric field or tensor_field(...)")
        specs.append({"name": field.name, "dtype": dtype, "shape": list(shape or ())})
    if not specs:
        raise ConfigError(f"side table schema {schema.names}: needs at least one column "
                          f"besides {SIDE_ID!r}")
    return specs


def _schema(specs: list[dict[str, Any]]) -> pa.Schema:
    return pa.schema([pa.field(SIDE_ID, pa.string(), nullable=False)]
                     + [column_field(s["name"], s["dtype"], s["shape"]) for s in specs])


class _TableHasher:
    """Content hash of a side table: one sha256 per column (ids: byte lengths + UTF-8 bytes;
    values: little-endian bytes in id order), so it does not depend on the file layout."""

    def __init__(self, specs: list[dict[str, Any]]) -> None:
        self.specs = specs
        self.id_lengths, self.id_bytes = hashlib.sha256(), hashlib.sha256()
        self.values = {s["name"]: hashlib.sha256() for s in specs}

    def update(self, table: pa.Table) -> None:
        ids = table.column(SIDE_ID)
        lengths = pc.binary_length(ids).to_numpy(zero_copy_only=False).astype("<i8")
        self.id_lengths.update(np.ascontiguousarray(lengths).tobytes())
        self.id_bytes.update("".join(ids.to_pylist()).encode("utf-8"))
        arrays = table_to_numpy(table.select([s["name"] for s in self.specs]))
        for spec in self.specs:
            self.update_column(spec, arrays[spec["name"]])

    def update_column(self, spec: dict[str, Any], values: np.ndarray) -> None:
        dtype = np.dtype(spec["dtype"]).newbyteorder("<")
        self.values[spec["name"]].update(np.ascontiguousarray(values, dtype=dtype).tobytes())

    def hexdigest(self) -> str:
        h = hashlib.sha256(SIDE_HASH_DOMAIN)
        h.update(json.dumps(self.specs, sort_keys=True).encode("utf-8"))
        h.update(self.id_lengths.digest())
        h.update(self.id_bytes.digest())
        for spec in self.specs:
            h.update(self.values[spec["name"]].digest())
        return h.hexdigest()


# ---------------------------------------------------------------------------------- writing


def finalize_side_table(folder: Path, parts: Sequence[Path], *, name: str, schema: pa.Schema,
                        dataset_content_hash: str, producer: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``side_table.json`` into `folder` for its sorted Parquet `parts` (read in row
    groups, so memory does not grow with the table); returns the manifest."""
    specs = side_table_columns(schema)
    hasher, num_rows, last = _TableHasher(specs), 0, None
    for part in parts:
        reader = pq.ParquetFile(part)
        for group in range(reader.num_row_groups):
            table = reader.read_row_group(group)
            ids = table.column(SIDE_ID)
            if table.num_rows:
                first = ids[0].as_py()
                if last is not None and first <= last:
                    raise data_error(part, f"ids are not sorted and unique (at {first!r})")
                last = ids[-1].as_py()
            hasher.update(table)
            num_rows += table.num_rows
    manifest = {"format_version": SIDE_FORMAT_VERSION, "name": name, "num_rows": num_rows,
                "columns": specs, "files": [Path(p).name for p in parts],
                "dataset_content_hash": dataset_content_hash,
                "content_hash": hasher.hexdigest(), "producer": dict(producer)}
    write_json(folder / SIDE_MANIFEST_NAME, manifest)
    return manifest


def _check_replaceable(target: Path) -> None:
    if target.exists() and not (target.is_dir() and (
            not any(target.iterdir()) or (target / SIDE_MANIFEST_NAME).is_file())):
        raise data_error(target, "exists and is not a side table; refusing to replace it")


def _check_producer(producer: Mapping[str, Any]) -> dict[str, Any]:
    try:
        json.dumps(dict(producer))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"side table producer must be a JSON object ({exc})") from None
    return dict(producer)


def write_side_table(dataset_path: str | os.PathLike[str], name: str, ids: Sequence[str],
                     columns: Mapping[str, Any], *, producer: Mapping[str, Any],
                     rows_per_file: int = DEFAULT_ROWS_PER_SHARD) -> Path:
    """Write numpy `columns` ([N] or [N, *shape], numeric) keyed by `ids` as side table `name`
    of a dataset folder, sorted by id, atomically (temp folder + rename; replaces an older
    table of that name). `producer`: free-form JSON about what computed it. Returns the folder."""
    target = side_table_path(dataset_path, name)
    dataset_hash = read_manifest(dataset_path).content_hash
    producer = _check_producer(producer)
    row_ids = np.asarray(list(ids), dtype=object)
    n = len(row_ids)
    if not all(isinstance(i, str) for i in row_ids):
        raise DataError(f"side table {name!r}: ids must be strings")
    if len(set(row_ids.tolist())) != n:
        raise DataError(f"side table {name!r}: ids are not unique")
    if not columns:
        raise ConfigError(f"side table {name!r}: no columns to write")
    arrays = {}
    for key, values in columns.items():
        if key == SIDE_ID or not isinstance(key, str) or not key:
            raise ConfigError(f"side table {name!r}: bad column name {key!r}")
        array = np.asarray(values)
        if array.ndim < 1 or len(array) != n:
            raise DataError(f"side table {name!r}: column {key!r} has shape {list(array.shape)}, "
                            f"want {n} rows (one per id)")
        arrays[key] = array
    schema = pa.schema([pa.field(SIDE_ID, pa.string(), nullable=False)]
                       + [column_field(k, a.dtype, a.shape[1:]) for k, a in arrays.items()])
    if rows_per_file < 1:
        raise ConfigError(f"side table {name!r}: rows_per_file must be >= 1, got {rows_per_file}")
    order = np.argsort(row_ids, kind="stable")
    _check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(target)
    tmp.mkdir()
    try:
        parts = []
        for index, start in enumerate(range(0, n, rows_per_file)):
            rows = order[start:start + rows_per_file]
            cols = [pa.array(row_ids[rows].tolist(), type=pa.string())]
            for field in schema:
                if field.name == SIDE_ID:
                    continue
                values = arrays[field.name][rows]
                cols.append(tensor_to_arrow(values, field) if tensor_shape(field) is not None
                            else pa.array(values, type=field.type))
            part = tmp / SIDE_PART_TEMPLATE.format(index)
            pq.write_table(pa.Table.from_arrays(cols, schema=schema), part,
                           row_group_size=SIDE_ROW_GROUP_ROWS)
            parts.append(part)
        finalize_side_table(tmp, parts, name=name, schema=schema,
                            dataset_content_hash=dataset_hash, producer=producer)
        swap_into(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# ---------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class SideTable:
    """A side table in memory: ids sorted (object array of str), numpy columns ([N] or
    [N, *shape] in the stored dtype) and its manifest."""

    name: str
    path: Path
    ids: np.ndarray
    columns: dict[str, np.ndarray]
    manifest: dict[str, Any]

    def __len__(self) -> int:
        return len(self.ids)

    def column(self, name: str) -> np.ndarray:
        if name not in self.columns:
            raise DataError(f"side table {self.name!r} ({self.path}): no column {name!r}; "
                            f"columns: {', '.join(self.columns) or '(none loaded)'}")
        return self.columns[name]


def read_side_manifest(path: Path) -> dict[str, Any]:
    """The validated ``side_table.json`` of side-table folder `path`."""
    file = path / SIDE_MANIFEST_NAME
    if not file.is_file():
        raise data_error(path, "no such side table (missing side_table.json); write it first")
    try:
        payload = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise data_error(file, f"invalid JSON ({exc})") from None
    if not isinstance(payload, dict):
        raise data_error(file, "must be a JSON object")
    for key, kind in _MANIFEST_KEYS.items():
        if not isinstance(payload.get(key), kind) or isinstance(payload.get(key), bool):
            raise data_error(file, f"key {key!r} is missing or has the wrong type")
    if payload["format_version"] != SIDE_FORMAT_VERSION:
        raise data_error(file, f"format_version {payload['format_version']} unsupported "
                         f"(want {SIDE_FORMAT_VERSION})")
    for spec in payload["columns"]:
        if not (isinstance(spec, dict) and isinstance(spec.get("name"), str)
                and spec.get("dtype") in TENSOR_DTYPES and isinstance(spec.get("shape"), list)):
            raise data_error(file, f"bad column entry {spec!r}")
    for name in payload["files"]:
        if not isinstance(name, str) or Path(name).name != name:
            raise data_error(file, f"file {name!r} must be a plain file name")
        if not (path / name).is_file():
            raise data_error(path / name, "part listed in side_table.json is missing")
    return payload


def read_side_table(dataset_path: str | os.PathLike[str], name: str,
                    columns: Sequence[str] | None = None, *, verify: bool = True,
                    check_dataset: bool = True) -> SideTable:
    """Read side table `name` of a dataset (all columns, or `columns`). With `check_dataset`,
    a table computed from other dataset contents is a DataError; with `verify`, the table's
    content hash is recomputed (reading all columns) and compared with its manifest."""
    path = side_table_path(dataset_path, name)
    manifest = read_side_manifest(path)
    available = [spec["name"] for spec in manifest["columns"]]
    wanted = available if columns is None else list(columns)
    unknown = [c for c in wanted if c not in available]
    if unknown:
        raise DataError(f"side table {name!r} ({path}): no columns {unknown}; "
                        f"columns: {', '.join(available)}")
    if check_dataset:
        current = read_manifest(dataset_path).content_hash
        if current != manifest["dataset_content_hash"]:
            raise data_error(path, f"computed from dataset contents "
                             f"{manifest['dataset_content_hash'][:12]}... but the dataset is now "
                             f"{current[:12]}...; recompute the side table")
    read_columns = [SIDE_ID] + (available if verify else wanted)
    tables = []
    for file in manifest["files"]:
        try:
            tables.append(pq.read_table(path / file, columns=read_columns))
        except (pa.ArrowException, OSError) as exc:
            raise data_error(path / file, f"cannot read side-table part ({exc})") from None
    schema = _schema([s for s in manifest["columns"] if s["name"] in read_columns])
    try:
        table = pa.concat_tables([t.cast(schema) for t in tables]) if tables else (
            schema.empty_table())
    except (pa.ArrowException, ValueError) as exc:
        raise data_error(path, f"parts do not match side_table.json ({exc})") from None
    if table.num_rows != manifest["num_rows"]:
        raise data_error(path, f"parts hold {table.num_rows} rows, manifest says "
                         f"{manifest['num_rows']}")
    if verify:
        hasher = _TableHasher(manifest["columns"])
        hasher.update(table)
        if hasher.hexdigest() != manifest["content_hash"]:
            raise data_error(path, "content hash does not match side_table.json (files changed "
                             "after writing?); recompute the side table")
    arrays = table_to_numpy(table.select([SIDE_ID] + wanted))
    ids = arrays.pop(SIDE_ID)
    if len(ids) > 1 and not (ids[1:] > ids[:-1]).all():
        raise data_error(path, "ids are not sorted and unique; recompute the side table")
    return SideTable(name=name, path=path, ids=ids, columns=arrays, manifest=manifest)


def join(dataset_ids: Iterable[str], table: SideTable, column: str) -> np.ndarray:
    """`table`'s `column` aligned to `dataset_ids` (row i belongs to dataset_ids[i]); every
    dataset id must be in the table (extra table ids are ignored)."""
    values = table.column(column)
    want = np.asarray(list(dataset_ids), dtype=object)
    if len(table.ids):
        pos = np.searchsorted(table.ids, want)
        clipped = np.minimum(pos, len(table.ids) - 1)
        found = (pos < len(table.ids)) & (table.ids[clipped] == want).astype(bool)
    else:
        clipped, found = np.zeros(len(want), np.int64), np.zeros(len(want), bool)
    if not found.all():
        missing = np.flatnonzero(~found)
        raise DataError(f"side table {table.name!r} ({table.path}) lacks {len(missing)} of "
                        f"{len(want)} dataset ids (e.g. {want[missing[0]]!r}); recompute it for "
                        f"this dataset")
    return values[clipped]


# ---------------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class CombinedDatasets:
    """Several datasets as one: uint8 images [N, C, H, W], int64 labels [N], int8 attributes
    [N, A], ids [N] and ``source`` [N] (the key of each row's dataset)."""

    images: np.ndarray
    labels: np.ndarray
    attributes: np.ndarray
    ids: list[str]
    source: np.ndarray
    class_names: list[str]
    attr_names: list[str]
    content_hashes: dict[str, str]

    def __len__(self) -> int:
        return len(self.ids)


def read_datasets(paths: Mapping[str, str | os.PathLike[str]], *, prefix_ids: bool = False,
                  verify: bool = True) -> CombinedDatasets:
    """Load datasets ``{key: folder}`` and concatenate them, keys in sorted order and each
    dataset in its stored row order. With `prefix_ids`, ids become ``<key>/<id>``; without it
    an id shared by two datasets is a DataError. Image shapes, classes and attributes must match.
    """
    from debiaslab.data.dataset import ImageDataset  # torch: only when datasets are loaded

    if not paths:
        raise ConfigError("read_datasets: no datasets given")
    loaded = {}
    for key in sorted(paths):
        check_name(key, "dataset key")
        loaded[key] = ImageDataset.load(paths[key], verify=verify)
    first_key, first = next(iter(loaded.items()))
    for key, data in loaded.items():
        for what in ("shape", "class_names", "attr_names"):
            if getattr(data, what) != getattr(first, what):
                raise DataError(f"read_datasets: {key!r} ({paths[key]}) has {what} "
                                f"{getattr(data, what)}, {first_key!r} has {getattr(first, what)}; "
                                f"combine only datasets of one kind")
    ids: list[str] = []
    owner: dict[str, str] = {}
    for key, data in loaded.items():
        for row_id in data.ids:
            full = f"{key}{ID_PREFIX_SEPARATOR}{row_id}" if prefix_ids else row_id
            if full in owner:
                raise DataError(f"read_datasets: datasets {owner[full]!r} and {key!r} share id "
                                f"{row_id!r}; pass prefix_ids=True (ids become 'key/id')")
            owner[full] = key
            ids.append(full)
    source = np.asarray([key for key, data in loaded.items() for _ in range(len(data))],
                        dtype=object)
    return CombinedDatasets(
        images=np.concatenate([d.images.numpy() for d in loaded.values()]),
        labels=np.concatenate([d.labels.numpy() for d in loaded.values()]),
        attributes=np.concatenate([d.attributes.numpy() for d in loaded.values()]),
        ids=ids, source=source, class_names=first.class_names, attr_names=first.attr_names,
        content_hashes={key: d.content_hash for key, d in loaded.items()})


def map_dataset(dataset_path: str | os.PathLike[str], mapper: Any, columns: Sequence[str], *,
                batch_size: int = 256, progress: bool = False, desc: str = "map"
                ) -> tuple[list[str], dict[str, np.ndarray]]:
    """Apply ``mapper`` (a callable on batches ``{"id", "pixels" uint8 [B, C, H, W], "label"}``
    returning ``{"id", <column>: [B, ...]}``, the form a Ray Data map job's actors get) to every
    image of a dataset folder in this process, in dataset order: (ids, {column: [N, ...]}).

    The local twin of distributed.data.map_to_side_table: the same mapper, the same batches."""
    from debiaslab.data.dataset import ImageDataset
    from debiaslab.progress import progress as progress_bar

    ds = ImageDataset.load(dataset_path)
    parts: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    bar = progress_bar(total=len(ds.ids), desc=desc, unit="img", disable=not progress)
    for start in range(0, len(ds.ids), batch_size):
        rows = slice(start, start + batch_size)
        batch = {"id": np.asarray(ds.ids[rows], dtype=object),
                 "pixels": ds.images[rows].numpy(), "label": ds.labels[rows].numpy()}
        out = mapper(batch)
        if [str(i) for i in out["id"]] != [str(i) for i in batch["id"]]:
            raise DataError(f"{dataset_path}: the mapper returned other ids than it was given")
        for column in columns:
            parts[column].append(np.asarray(out[column]))
        bar.update(len(batch["id"]))
    bar.close()
    return list(ds.ids), {c: np.concatenate(v) if v else np.empty(0) for c, v in parts.items()}
