"""Ray Data jobs over our Parquet shards: a generic actor-pool map job with a fixed output schema
(N-D tensor columns included) and atomic, sorted output folders, used for metric features,
seed-range sampling and side tables."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from debiaslab.data.external_sort import (
    MIN_MERGE_BATCH_ROWS,
    SORT_KEY,
    schema_row_bytes,
    sort_parts,
)
from debiaslab.data.pixels import to_uint8
from debiaslab.data.schema import (
    DEFAULT_ROWS_PER_SHARD,
    FORMAT_VERSION,
    MANIFEST_NAME,
    NO_LABEL,
    SCHEMA,
    SCHEMA_METADATA_KEY,
    SHARD_TEMPLATE,
    Manifest,
    combine_digests,
    data_error,
    decode_png,
    encode_png,
    read_manifest,
    swap_into,
    table_digests,
    table_to_numpy,
    temp_sibling,
    tensor_to_arrow,
    write_json,
)
from debiaslab.data.side_tables import (
    SIDE_MANIFEST_NAME,
    check_name,
    finalize_side_table,
    side_table_columns,
    side_table_path,
)
from debiaslab.errors import ConfigError, DataError

from .runtime import ray_env

JOB_MANIFEST_NAME = "map_job.json"  # marks a folder written by run_map_job (safe to replace)
PART_TEMPLATE = "part-{:05d}.parquet"
REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "hdfs://", "abfs://", "abfss://")
BLOCKS_PER_ACTOR = 4  # enough blocks that every actor gets work and the tail stays short
MAP_TASK_RETRIES = 3  # a map task whose mapper raises is retried this often
READ_TASK_CPUS = 0.5  # shard reads are I/O + Parquet decoding; leave room for the actors
DEFAULT_NUM_CPUS = 0.5  # fractional: concurrency 2 on 2 cores leaves CPU for the read tasks
DEFAULT_SEEDS_PER_TASK = 64
PIXELS = "pixels"  # decoded uint8 [N, C, H, W] column of read_images(decode=True)
_TASK_FILE = re.compile(r"^task-(\d+)-(\d+)\.parquet$")
TASK_ROW_GROUP_BYTES = 2**20  # Ray's task files: row groups of about this size (estimated)

FEATURES_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("features", pa.list_(pa.float32()), nullable=False),
        pa.field("class_pred", pa.int64(), nullable=False),
        pa.field("attr_pred", pa.list_(pa.int8()), nullable=False),
    ]
)


def _is_remote(path: str | os.PathLike[str]) -> bool:
    return str(path).startswith(REMOTE_SCHEMES)


# --------------------------------------------------------------------------------- reading


def read_dataset_manifest(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[str], Any]:
    """(manifest JSON, shard paths, pyarrow filesystem or None) of a local or remote dataset."""
    if not _is_remote(path):
        manifest = read_manifest(path)
        return manifest.to_json(), [str(p) for p in manifest.shard_paths()], None
    from pyarrow import fs as pafs

    filesystem, root = pafs.FileSystem.from_uri(str(path).rstrip("/"))
    try:
        with filesystem.open_input_stream(f"{root}/{MANIFEST_NAME}") as stream:
            payload = json.loads(stream.read().decode("utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise data_error(f"{path}/{MANIFEST_NAME}", f"cannot read manifest ({exc})") from None
    if payload.get("format_version") != FORMAT_VERSION or not isinstance(
        payload.get("shards"), list
    ):
        raise data_error(f"{path}/{MANIFEST_NAME}", "not a debiaslab dataset manifest")
    return payload, [f"{root}/{shard['file']}" for shard in payload["shards"]], filesystem


def _read_shards(batch: dict[str, np.ndarray], columns: list[str] | None,
                 decode_shape: tuple[int, ...]) -> pa.Table | dict[str, np.ndarray]:
    """Read task: the Parquet shards named in `batch` (local paths or URIs) as one table; with
    `decode_shape` (C, H, W), the PNG column is replaced by a uint8 ``pixels`` [N, C, H, W]
    column."""
    table = pa.concat_tables([pq.read_table(str(path), columns=columns) for path in batch["path"]])
    if not decode_shape:
        return table
    out = {name: table.column(name).to_numpy(zero_copy_only=False)
           for name in table.column_names if name not in ("image", "attributes")}
    if "attributes" in table.column_names:
        flat = table.column("attributes").combine_chunks().flatten().to_numpy()
        out["attributes"] = flat.astype(np.int8).reshape(table.num_rows, -1)
    blobs = table.column("image").to_pylist()
    pixels = np.empty((len(blobs), *decode_shape), np.uint8)
    for i, blob in enumerate(blobs):
        pixels[i] = decode_png(blob, decode_shape[0])
    out[PIXELS] = pixels
    return out


def read_images(path: str | os.PathLike[str], *, columns: list[str] | None = None,
                decode: bool = False) -> Any:
    """A ``ray.data.Dataset`` of a dataset folder's shards (columns id, image PNG bytes, label,
    attributes), local or remote (``s3://``, ``gs://``: pyarrow resolves the URIs in the tasks).

    With `decode`, the read tasks decode the PNGs into a uint8 ``pixels`` column [N, C, H, W]
    instead of ``image``: decoding then overlaps the actors' model work (it is about a third of
    the digits extractor's per-image time on one thread).

    One read task per shard listed in dataset.json. (``ray.data.read_parquet`` took 13-16 s per
    read of one small local file here, in its file-listing stage; this path takes 0.2 s.)
    """
    ray_env()
    import ray.data

    manifest, shards, filesystem = read_dataset_manifest(path)
    if decode and columns is not None and "image" not in columns:
        raise ConfigError(f"read_images({path}): decode needs the image column, got {columns}")
    decode_shape = tuple(int(v) for v in manifest["image_shape"]) if decode else ()
    if filesystem is not None:  # URIs keep their scheme so each task resolves its filesystem
        base = str(path).rstrip("/")
        shards = [f"{base}/{Path(s).name}" for s in shards]
    items = [{"path": shard} for shard in shards]
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _read_shards, fn_kwargs={"columns": columns, "decode_shape": decode_shape},
        batch_size=1, batch_format="numpy",
        num_cpus=READ_TASK_CPUS)


# --------------------------------------------------------------------------------- map job


def to_arrow(columns: dict[str, Any], schema: pa.Schema) -> pa.Table:
    """An Arrow table in exactly `schema` from mapper output (numpy arrays or lists; a 2-D
    array for a list<...> field becomes one list per row; an [N, *shape] array for a
    ``tensor_field`` becomes its fixed-size-list column)."""
    missing = [f.name for f in schema if f.name not in columns]
    if missing:
        raise DataError(f"mapper output lacks columns {missing}; schema wants {schema.names}")
    arrays = []
    for field in schema:
        value = columns[field.name]
        if pa.types.is_fixed_size_list(field.type) and isinstance(value, np.ndarray) and (
                value.ndim >= 2):
            arrays.append(tensor_to_arrow(value, field))
        elif pa.types.is_list(field.type) and isinstance(value, np.ndarray) and value.ndim == 2:
            rows, width = value.shape
            flat = np.ascontiguousarray(value).reshape(-1)
            offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * width)
            arrays.append(pa.ListArray.from_arrays(
                offsets, pa.array(flat, type=field.type.value_type)))
        else:
            if isinstance(value, np.ndarray) and value.dtype == object:
                value = value.tolist()
            arrays.append(pa.array(value, type=field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


class _MapActor:
    """Actor-pool worker: sets torch threads, builds the user's mapper ONCE, converts each
    output batch to the fixed Arrow schema."""

    def __init__(self, mapper_cls: type, mapper_kwargs: dict[str, Any], schema: pa.Schema,
                 num_threads: int) -> None:
        try:
            import torch

            torch.set_num_threads(num_threads)
        except ImportError:  # a mapper without torch
            pass
        self.mapper = mapper_cls(**mapper_kwargs)
        self.schema = schema

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        return to_arrow(self.mapper(batch), self.schema)


class _TaskFileNames:
    """Write-task file names ``task-<index>`` (replaced by sorted part files afterwards)."""

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"task-{task_index:06d}"


def _filename_provider() -> Any:
    from ray.data.datasource.filename_provider import FilenameProvider

    class TaskFileNames(_TaskFileNames, FilenameProvider):
        pass

    return TaskFileNames()


def _check_replaceable(target: Path) -> None:
    if target.exists() and not (
        target.is_dir() and (not any(target.iterdir()) or any(
            (target / marker).is_file()
            for marker in (JOB_MANIFEST_NAME, MANIFEST_NAME, SIDE_MANIFEST_NAME)))
    ):
        raise data_error(target, "exists and is not a debiaslab job output; refusing to replace it")


def _normalize_parts(folder: Path, template: str, schema: pa.Schema, rows_per_file: int,
                     sort_key: str = SORT_KEY, **buffers: int) -> list[Path]:
    """Replace Ray's ``task-*.parquet`` files in ``folder`` (their order and split depend on
    scheduling) by sorted files of ``rows_per_file`` rows (data.external_sort.sort_parts)."""
    written = sorted(p for p in folder.iterdir() if _TASK_FILE.match(p.name))
    return sort_parts(written, folder, template, schema, rows_per_file, sort_key, **buffers)


def actor_threads(num_cpus: float) -> int:
    """Torch intra-op threads for an actor holding `num_cpus` CPUs (rounded up, at least 1)."""
    return max(1, math.ceil(num_cpus))


def run_map_job(
    dataset: Any,
    mapper_cls: type,
    mapper_kwargs: dict[str, Any],
    output_dir: str | os.PathLike[str],
    output_schema: pa.Schema,
    *,
    concurrency: int = 1,
    batch_size: int = 256,
    num_cpus: float = DEFAULT_NUM_CPUS,
    num_gpus: float = 0.0,
    progress: bool = True,
    num_rows: int | None = None,
    rows_per_block: int | None = None,
    repartition: bool = True,
    rows_per_file: int = DEFAULT_ROWS_PER_SHARD,
    file_template: str = PART_TEMPLATE,
    finalize: Callable[[Path, list[Path]], dict[str, Any]] | None = None,
) -> Path:
    """Map `dataset` with an actor pool of `mapper_cls(**mapper_kwargs)` (built once per actor;
    called on numpy batches, returning columns) and write Parquet in `output_schema` to
    `output_dir` (local) atomically: a temp sibling folder renamed into place, so a re-run
    replaces the previous output. Failed batches are retried (MAP_TASK_RETRIES).

    With `repartition`, blocks hold `rows_per_block` rows (default: BLOCKS_PER_ACTOR blocks per
    actor, from `num_rows` or a count); output files hold `rows_per_file` rows sorted by id.
    `finalize(tmp_folder, part_files)` may write extra files before the rename and returns
    fields for ``map_job.json``. Returns the absolute output folder.
    """
    if concurrency < 1 or batch_size < 1 or num_cpus <= 0 or num_gpus < 0:
        raise ConfigError(f"map job: need concurrency >= 1, batch_size >= 1, num_cpus > 0 and "
                          f"num_gpus >= 0, got {concurrency}, {batch_size}, {num_cpus}, {num_gpus}")
    if _is_remote(output_dir):
        raise ConfigError(f"map job output {output_dir}: only local folders are written atomically")
    ray_env()
    from ray.data import ActorPoolStrategy, SaveMode

    target = Path(output_dir).absolute()
    _check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(target)
    ctx = dataset.context  # the dataset's own copy: settings do not leak into other jobs
    # Ray Data's bars redraw with carriage returns: only on a terminal, not in job logs
    from debiaslab.progress import is_interactive

    progress = progress and is_interactive(sys.stderr)
    ctx.enable_progress_bars = progress
    ctx.enable_operator_progress_bars = progress
    # A batch whose mapper raises is re-run in the same actor (blocks already produced by the
    # task are skipped, so no duplicates); a crashed actor is restarted by Ray's defaults.
    ctx.retried_map_errors = True
    ctx.max_map_retries = MAP_TASK_RETRIES
    ctx.execution_options.preserve_order = True  # deterministic blocks -> deterministic files
    if rows_per_block is None:
        rows = dataset.count() if num_rows is None else num_rows  # count() runs a Ray job
        rows_per_block = max(batch_size, math.ceil(rows / (concurrency * BLOCKS_PER_ACTOR)))
    if repartition:  # split big blocks so that every actor gets work (ray #41728)
        dataset = dataset.repartition(target_num_rows_per_block=rows_per_block)
    mapped = dataset.map_batches(
        _MapActor,
        fn_constructor_args=(mapper_cls, dict(mapper_kwargs), output_schema,
                             actor_threads(num_cpus)),
        batch_size=batch_size,
        batch_format="numpy",
        zero_copy_batch=True,  # mappers only read their inputs
        compute=ActorPoolStrategy(size=concurrency),
        num_cpus=num_cpus,
        num_gpus=num_gpus or None,
    )
    try:
        # A fresh temp folder per run: OVERWRITE only lifts Ray's unique-name (write uuid) check.
        mapped.write_parquet(str(tmp), filename_provider=_filename_provider(),
                             mode=SaveMode.OVERWRITE,
                             schema=output_schema,
                             min_rows_per_file=rows_per_block,
                             # small row groups: the driver then sorts them in bounded memory
                             row_group_size=max(MIN_MERGE_BATCH_ROWS, TASK_ROW_GROUP_BYTES
                                                // schema_row_bytes(output_schema)))
        tmp.mkdir(parents=True, exist_ok=True)  # an empty result writes no files
        parts = _normalize_parts(tmp, file_template, output_schema, rows_per_file)
        num_rows = sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
        info = {"files": [p.name for p in parts], "num_rows": num_rows,
                "schema": [[f.name, str(f.type)] for f in output_schema],
                "mapper": f"{mapper_cls.__module__}.{mapper_cls.__qualname__}"}
        if finalize is not None:
            info.update(finalize(tmp, parts))
        write_json(tmp / JOB_MANIFEST_NAME, info)
        swap_into(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_map_output(output_dir: str | os.PathLike[str],
                    columns: list[str] | None = None) -> dict[str, np.ndarray]:
    """The columns of a map job's output (files listed in map_job.json, in order) as numpy:
    tensor columns as [N, *shape] arrays in their stored dtype, strings as object arrays."""
    root = Path(output_dir)
    try:
        info = json.loads((root / JOB_MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise data_error(root / JOB_MANIFEST_NAME, f"cannot read the map job manifest ({exc}); "
                         f"run the job first") from None
    files = [root / name for name in info.get("files", [])]
    if not files:
        return {}
    tables = [pq.read_table(path, columns=columns) for path in files]
    return table_to_numpy(pa.concat_tables(tables))


def map_to_side_table(
    dataset_dir: str | os.PathLike[str],
    name: str,
    mapper_cls: type,
    mapper_kwargs: dict[str, Any],
    output_schema: pa.Schema,
    *,
    producer: dict[str, Any] | None = None,
    read_columns: list[str] | None = None,
    decode: bool = False,
    **job_options: Any,
) -> Path:
    """Run a map job over a local dataset folder and write its output as side table `name`
    (``<dataset>/side/<name>``, with ``side_table.json``); the images are not rewritten.

    The mapper gets ``read_images(dataset_dir, columns=read_columns, decode=decode)`` batches
    and returns an ``id`` column plus numeric / ``tensor_field`` columns of `output_schema`.
    `job_options` go to run_map_job (concurrency, batch_size, num_cpus, num_gpus, ...)."""
    check_name(name)
    side_table_columns(output_schema)  # a side-table schema, checked before any work
    if _is_remote(dataset_dir):
        raise ConfigError(f"side table {name!r}: dataset {dataset_dir} must be a local folder")
    manifest = read_manifest(dataset_dir)
    info = {"mapper": f"{mapper_cls.__module__}.{mapper_cls.__qualname__}",
            "mapper_kwargs": {k: v for k, v in mapper_kwargs.items()
                              if isinstance(v, (str, int, float, bool, type(None)))},
            **(producer or {})}

    def finalize(folder: Path, parts: list[Path]) -> dict[str, Any]:
        side = finalize_side_table(folder, parts, name=name, schema=output_schema,
                                   dataset_content_hash=manifest.content_hash, producer=info)
        return {"side_table": name, "content_hash": side["content_hash"]}

    dataset = read_images(dataset_dir, columns=read_columns, decode=decode)
    job_options.setdefault("num_rows", manifest.num_rows)
    return run_map_job(dataset, mapper_cls, mapper_kwargs, side_table_path(dataset_dir, name),
                       output_schema, finalize=finalize, **job_options)


# --------------------------------------------------------------------------------- features


class FeatureMapper:
    """Runs a feature extractor (built once) on decoded ``pixels`` rows (or decodes PNG
    ``image`` rows itself)."""

    def __init__(self, extractor_name: str, channels: int, extractor_options: dict[str, Any],
                 batch_size: int, cache_dir: str = "") -> None:
        from debiaslab.metrics.features import build_extractor

        if cache_dir:  # the driver's extractor cache (it trained / fetched the weights)
            os.environ.setdefault("DEBIASLAB_CACHE", cache_dir)
        self.extractor = build_extractor(extractor_name, **extractor_options)
        self.channels = channels
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        if PIXELS in batch:
            images = np.asarray(batch[PIXELS], dtype=np.uint8)
        else:
            images = np.stack([decode_png(blob, self.channels) for blob in batch["image"]])
        out = self.extractor.extract(images, batch_size=self.batch_size)
        n = len(images)
        classes = out.classes if out.classes is not None else np.full(n, NO_LABEL)
        attrs = out.attributes if out.attributes is not None else np.zeros((n, 0), np.int8)
        return {"id": batch["id"], "features": out.features.astype(np.float32, copy=False),
                "class_pred": classes.astype(np.int64), "attr_pred": attrs.astype(np.int8)}


def extract_features_job(
    dataset_dir: str | os.PathLike[str],
    extractor_name: str,
    output_dir: str | os.PathLike[str],
    *,
    extractor_options: dict[str, Any] | None = None,
    concurrency: int = 1,
    batch_size: int = 256,
    num_cpus: float = DEFAULT_NUM_CPUS,
    num_gpus: float = 0.0,
    progress: bool = True,
) -> Path:
    """Metric features of every image of a dataset folder as Parquet (FEATURES_SCHEMA: id,
    features, class_pred (-1 if none), attr_pred), equal to ``build_extractor(name).extract``."""
    from debiaslab.metrics.features import build_extractor

    options = dict(extractor_options or {})
    # Built once here: checks the name early and fills the weights cache the actors load from.
    extractor = build_extractor(extractor_name, **options)
    manifest, shards, _ = read_dataset_manifest(dataset_dir)
    channels = int(manifest["image_shape"][0])
    cache = os.environ.get("DEBIASLAB_CACHE", "")
    kwargs = dict(extractor_name=extractor_name, channels=channels, extractor_options=options,
                  batch_size=batch_size, cache_dir=cache)
    meta = {"extractor": extractor.metadata(), "dataset": str(dataset_dir),
            "dataset_content_hash": manifest.get("content_hash", "")}
    dataset = read_images(dataset_dir, columns=["id", "image"], decode=True)
    return run_map_job(dataset, FeatureMapper, kwargs, output_dir,
                       FEATURES_SCHEMA, concurrency=concurrency, batch_size=batch_size,
                       num_cpus=num_cpus, num_gpus=num_gpus, progress=progress,
                       num_rows=int(manifest["num_rows"]),
                       repartition=len(shards) < concurrency * BLOCKS_PER_ACTOR,
                       finalize=lambda tmp, parts: meta)


def read_features(output_dir: str | os.PathLike[str]) -> tuple[list[str], np.ndarray, np.ndarray,
                                                                np.ndarray]:
    """(ids, features [N, D] float32, class_pred [N] int64, attr_pred [N, A] int8) of a
    feature job's output, in file order."""
    root = Path(output_dir)
    info = json.loads((root / JOB_MANIFEST_NAME).read_text(encoding="utf-8"))
    tables = [pq.read_table(root / name) for name in info["files"]]
    table = pa.concat_tables(tables) if tables else FEATURES_SCHEMA.empty_table()
    n = table.num_rows

    def matrix(column: str, dtype: type) -> np.ndarray:
        flat = table.column(column).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return flat.astype(dtype).reshape(n, -1) if n else np.zeros((0, 0), dtype)

    return (table.column("id").to_pylist(), matrix("features", np.float32),
            table.column("class_pred").to_numpy().astype(np.int64), matrix("attr_pred", np.int8))


# --------------------------------------------------------------------------------- sampling


class SampleMapper:
    """Loads a checkpoint once; turns seed ranges into rows of the dataset schema."""

    def __init__(self, checkpoint: str, sampler: str, steps: int, labels_mode: str,
                 guidance: list[dict[str, Any]], options: dict[str, Any], use_ema: bool,
                 device: str, generate_batch_size: int, clip_x0: bool | None = None) -> None:
        from debiaslab.sampling import guided_denoiser, load_trained

        self.trained = load_trained(checkpoint, use_ema=use_ema, device=device)
        self.sampler, self.steps, self.labels_mode = sampler, steps, labels_mode
        self.options, self.clip_x0 = options, clip_x0
        # built as on the local path (sampling.guided_denoiser), once per actor
        self.denoiser = guided_denoiser(self.trained, sampler, guidance)
        self.generate_batch_size = generate_batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:

        from debiaslab.sampling import generate, seed_labels

        seeds = [s for start, stop in zip(batch["start"], batch["stop"])
                 for s in range(int(start), int(stop))]
        labels, recorded = seed_labels(self.trained, self.labels_mode, seeds, self.denoiser)
        images = generate(self.trained, self.sampler, seeds, steps=self.steps, labels=labels,
                          denoiser=self.denoiser, batch_size=self.generate_batch_size,
                          options=self.options, clip_x0=self.clip_x0)
        uint8 = to_uint8(images)
        n = len(seeds)
        return {"id": [f"seed{s:08d}" for s in seeds],
                "image": [encode_png(img) for img in uint8.numpy()],
                "label": recorded.numpy() if recorded is not None else np.full(n, NO_LABEL),
                "attributes": np.zeros((n, 0), np.int8)}


def seed_chunks(seeds: range, seeds_per_task: int) -> list[dict[str, int]]:
    """Contiguous [start, stop) chunks of a step-1 seed range, `seeds_per_task` seeds each."""
    if seeds.step != 1:
        raise ConfigError(f"sample job: seeds must be a contiguous range, got {seeds}")
    if seeds_per_task < 1:
        raise ConfigError(f"sample job: seeds_per_task must be >= 1, got {seeds_per_task}")
    return [{"start": s, "stop": min(s + seeds_per_task, seeds.stop)}
            for s in range(seeds.start, seeds.stop, seeds_per_task)]


def _dataset_manifest(folder: Path, parts: list[Path], name: str, source: str,
                      class_names: list[str], shape: tuple[int, int, int]) -> Manifest:
    """The `dataset.json` of shards written by a job (hash from the stored bytes)."""
    digests: dict[str, bytes] = {}
    shards, counts = [], np.zeros(len(class_names), np.int64)
    for part in parts:
        table = pq.read_table(part)
        digests.update(table_digests(table))
        labels = table.column("label").to_numpy()
        counts += np.bincount(labels[labels != NO_LABEL], minlength=len(class_names))
        shards.append({"file": part.name, "num_rows": table.num_rows})
    if not digests:
        raise data_error(folder, "sample job produced no images")
    return Manifest(path=folder, name=name, source=source, class_names=list(class_names),
                    attr_names=[], image_shape=shape, num_rows=len(digests),
                    class_counts=counts.tolist(), shards=shards,
                    content_hash=combine_digests(digests))


def sample_job(
    checkpoint: str | os.PathLike[str],
    sampler: str,
    seeds: range,
    output_dir: str | os.PathLike[str],
    *,
    steps: int,
    labels_mode: str = "balanced",
    guidance: list[dict[str, Any]] | None = None,
    options: dict[str, Any] | None = None,
    clip_x0: bool | None = None,
    seeds_per_task: int = DEFAULT_SEEDS_PER_TASK,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    use_ema: bool = True,
    device: str = "auto",
    concurrency: int = 1,
    num_cpus: float = DEFAULT_NUM_CPUS,
    num_gpus: float = 0.0,
    progress: bool = True,
) -> Path:
    """Generate one image per seed with actors that load `checkpoint` once, sharded by seed
    ranges; write a dataset folder (Parquet in the dataset SCHEMA + dataset.json, ids
    ``seed%08d``) that ``ImageDataset.load`` reads. Images depend only on their seeds.
    ``clip_x0``: cfg.sample.clip_x0, as in ``sampling.generate`` (None = the sampler's default).
    ``guidance``: resolved ``sample.guidance`` entries (sampling.resolve_guidance)."""
    import ray.data

    from debiaslab.sampling import load_trained

    chunks = seed_chunks(seeds, seeds_per_task)
    if not chunks:
        raise ConfigError("sample job: no seeds to sample")
    trained = load_trained(checkpoint, use_ema=use_ema, device="cpu")  # checks it, reads names
    mapper_kwargs = dict(checkpoint=str(Path(checkpoint).absolute()), sampler=sampler,
                         steps=steps, labels_mode=labels_mode, guidance=list(guidance or []),
                         options=dict(options or {}), use_ema=use_ema, device=device,
                         generate_batch_size=seeds_per_task, clip_x0=clip_x0)
    name = Path(output_dir).name
    source = f"samples:{trained.checkpoint}"
    schema = SCHEMA.with_metadata({SCHEMA_METADATA_KEY: json.dumps({
        "format_version": FORMAT_VERSION, "name": name, "source": source,
        "class_names": trained.class_names, "attr_names": [],
        "image_shape": list(trained.shape)}).encode("utf-8")})

    def finalize(folder: Path, parts: list[Path]) -> dict[str, Any]:
        manifest = _dataset_manifest(folder, parts, name, source, trained.class_names,
                                     trained.shape)
        manifest.extra.update({"sampler": sampler, "steps": steps, "labels": labels_mode,
                               "guidance": list(guidance or []),
                               "seeds": [seeds.start, seeds.stop],
                               "clip_x0": clip_x0})
        write_json(folder / MANIFEST_NAME, manifest.to_json())
        return {"sampler": sampler, "seeds": [seeds.start, seeds.stop]}

    dataset = ray.data.from_items(chunks, override_num_blocks=len(chunks))
    return run_map_job(dataset, SampleMapper, mapper_kwargs, output_dir, schema,
                       concurrency=concurrency, batch_size=1, num_cpus=num_cpus,
                       num_gpus=num_gpus, progress=progress, rows_per_block=1,
                       rows_per_file=rows_per_shard, file_template=SHARD_TEMPLATE,
                       finalize=finalize)
