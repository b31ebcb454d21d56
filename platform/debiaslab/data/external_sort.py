"""An external merge sort of Parquet files by a key column, in bounded memory (pure pyarrow).

Map jobs write their output as files whose order and split depend on scheduling; sorting them by
``id`` into files of a fixed row count makes the output byte-identical for any concurrency, block
layout or re-run. Memory stays bounded: sorted runs of about SORT_BUFFER_BYTES, merged at most
MERGE_FAN_IN at a time with about MERGE_BUFFER_BYTES of read buffers in all.
"""

from __future__ import annotations

import itertools
import math
import shutil
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SORT_KEY = "id"  # outputs are sorted by this column (when the schema has it)
SORT_BUFFER_BYTES = 4 * 2**20  # rows sorted in memory at once (runs of about this size)
MERGE_BUFFER_BYTES = 4 * 2**20  # read buffers of all runs merged at once, together
MERGE_FAN_IN = 64  # runs merged at once; more take several passes
MIN_MERGE_BATCH_ROWS = 64  # rows read at a time from a run, at least
VARIABLE_WIDTH_BYTES = 64  # per-row size assumed for a string / binary / list field
ROW_GROUP_ROWS = 1024  # output Parquet row groups (fixed, so the bytes do not depend on layout)
SORT_RUNS_DIR = ".sort-runs"  # run files, inside the job's temp folder
RUN_FILE_OPTIONS = {"compression": "none", "use_dictionary": False}  # temporary: write fast


def conform(batch: pa.RecordBatch | pa.Table, schema: pa.Schema) -> pa.Table:
    """`batch` as a table in exactly `schema` (Ray may drop field metadata or nullability)."""
    table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
    return table.select(schema.names).cast(schema)


def _row_bytes(files: list[Path]) -> int:
    """Mean uncompressed bytes per row of Parquet `files` (from their footers; at least 1)."""
    rows = size = 0
    for path in files:
        meta = pq.read_metadata(path)
        rows += meta.num_rows
        size += sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    return max(1, math.ceil(size / max(rows, 1)))


def schema_row_bytes(schema: pa.Schema) -> int:
    """Bytes per row of `schema` (fixed-width fields exactly, others VARIABLE_WIDTH_BYTES)."""
    total = 0
    for field in schema:
        kind = field.type
        width = kind.list_size if pa.types.is_fixed_size_list(kind) else 1
        kind = kind.value_type if pa.types.is_fixed_size_list(kind) else kind
        try:
            total += width * max(1, kind.bit_width // 8)
        except ValueError:  # not fixed width
            total += VARIABLE_WIDTH_BYTES
    return max(1, total)


def _row_groups(path: Path, schema: pa.Schema) -> Iterator[pa.Table]:
    """The row groups of a Parquet file one at a time, in `schema` (``iter_batches`` reads
    ahead most of the file on its first call; this holds one row group)."""
    reader = pq.ParquetFile(path)
    for index in range(reader.num_row_groups):
        yield conform(reader.read_row_group(index), schema)


def _sorted_runs(files: list[Path], runs_dir: Path, schema: pa.Schema, sort_key: str,
                 run_rows: int, batch_rows: int) -> list[Path]:
    """Read `files` a row group at a time, sort each `run_rows` (or a row group more) rows by
    `sort_key` and write them as a run file (row groups of `batch_rows`); deletes the inputs."""
    runs: list[Path] = []
    chunks: list[pa.Table] = []

    def flush() -> None:
        table = pa.concat_tables(chunks)
        table = table.take(pc.sort_indices(table, sort_keys=[(sort_key, "ascending")]))
        runs.append(runs_dir / f"run-{len(runs):06d}.parquet")
        pq.write_table(table, runs[-1], row_group_size=batch_rows, **RUN_FILE_OPTIONS)
        chunks.clear()

    for path in files:
        for group in _row_groups(path, schema):
            chunks.append(group)
            if sum(c.num_rows for c in chunks) >= run_rows:
                flush()
        path.unlink()
    if chunks:
        flush()
    return runs


def _merge_runs(runs: list[Path], schema: pa.Schema, sort_key: str) -> Iterator[pa.Table]:
    """k-way merge of sorted run files (written in small row groups): yields sorted
    tables, holding one row group of each run (plus what one step emits) in memory.

    Each step emits every buffered row whose key is <= the smallest last key of the buffers
    (no unread row can sort before it), so the buffer holding that key empties and is refilled.
    """
    readers = [_row_groups(run, schema) for run in runs]
    buffers: list[pa.Table | None] = [None] * len(runs)
    done = [False] * len(runs)
    while True:
        for i, reader in enumerate(readers):
            while not done[i] and (buffers[i] is None or buffers[i].num_rows == 0):
                batch = next(reader, None)
                done[i] = batch is None
                buffers[i] = batch
        live = [i for i, b in enumerate(buffers) if b is not None]
        if not live:
            return
        bound = min(buffers[i].column(sort_key)[-1].as_py() for i in live)
        pieces = []
        for i in live:
            keys = buffers[i].column(sort_key)
            take = pc.sum(pc.less_equal(keys, pa.scalar(bound, keys.type))).as_py() or 0
            if take:
                pieces.append(buffers[i].slice(0, take))
                buffers[i] = buffers[i].slice(take)
        merged = pa.concat_tables(pieces)
        yield merged.take(pc.sort_indices(merged, sort_keys=[(sort_key, "ascending")]))


def _rechunk(pieces: Iterable[pa.Table], sizes: Iterator[int]) -> Iterator[pa.Table]:
    """The rows of `pieces` regrouped into tables of the lengths `sizes` yields (the last may
    be shorter), each one contiguous chunk."""
    pending: list[pa.Table] = []
    have, want = 0, next(sizes)
    for piece in pieces:
        while piece.num_rows:
            take = min(want - have, piece.num_rows)
            pending.append(piece.slice(0, take))
            piece = piece.slice(take)
            have += take
            if have == want:
                yield pa.concat_tables(pending).combine_chunks()
                pending, have, want = [], 0, next(sizes)
    if have:
        yield pa.concat_tables(pending).combine_chunks()


def _group_sizes(rows_per_file: int, rows_per_group: int) -> Iterator[int]:
    """Row-group lengths: each file of `rows_per_file` rows in groups of `rows_per_group`."""
    while True:
        left = rows_per_file
        while left > 0:
            yield min(rows_per_group, left)
            left -= rows_per_group


def _write_parts(pieces: Iterable[pa.Table], folder: Path, template: str, schema: pa.Schema,
                 rows_per_file: int, rows_per_group: int) -> list[Path]:
    """Write the rows of `pieces` as files of `rows_per_file` rows named `template`, each in
    row groups of `rows_per_group`: the bytes depend only on the rows, not on the pieces."""
    parts: list[Path] = []
    writer, in_file = None, 0
    try:
        for group in _rechunk(pieces, _group_sizes(rows_per_file, rows_per_group)):
            if writer is None:
                parts.append(folder / template.format(len(parts)))
                writer = pq.ParquetWriter(parts[-1], schema)
            writer.write_table(group, row_group_size=group.num_rows)
            in_file += group.num_rows
            if in_file == rows_per_file:
                writer.close()
                writer, in_file = None, 0
    finally:
        if writer is not None:
            writer.close()
    return parts


def sort_parts(written: list[Path], folder: Path, template: str, schema: pa.Schema,
               rows_per_file: int, sort_key: str = SORT_KEY, *,
               sort_buffer_bytes: int = SORT_BUFFER_BYTES,
               merge_buffer_bytes: int = MERGE_BUFFER_BYTES,
               fan_in: int = MERGE_FAN_IN) -> list[Path]:
    """Replace the Parquet files ``written`` (in any order and split) by files of
    ``rows_per_file`` rows sorted by ``sort_key`` in ``folder``, named ``template``; the output
    bytes then depend only on the rows. Without a ``sort_key`` column the rows keep the order of
    ``written`` and are only re-split. The inputs are deleted.

    An external merge sort, so memory does not grow with the output: chunks of about
    ``sort_buffer_bytes`` are sorted into run files, then merged ``fan_in`` runs at a time
    (several passes if needed) reading about ``merge_buffer_bytes`` in all; output files are
    written in row groups of ROW_GROUP_ROWS as the merge goes.
    """
    if not written:
        return []
    row_bytes = _row_bytes(written)
    rows_per_group = min(rows_per_file, ROW_GROUP_ROWS)
    if sort_key not in schema.names:  # keep Ray's (task) order, re-split into equal files
        def pieces() -> Iterator[pa.Table]:
            for path in written:
                yield from _row_groups(path, schema)
        parts = _write_parts(pieces(), folder, template, schema, rows_per_file, rows_per_group)
        for path in written:
            path.unlink()
        return parts
    fan_in = max(2, fan_in)

    def batch_rows(num_runs: int) -> int:  # rows read at a time from each of num_runs runs
        return max(MIN_MERGE_BATCH_ROWS, merge_buffer_bytes // (min(num_runs, fan_in) * row_bytes))

    runs_dir = folder / SORT_RUNS_DIR
    runs_dir.mkdir()
    run_rows = max(1, sort_buffer_bytes // row_bytes)
    num_runs = math.ceil(sum(pq.read_metadata(p).num_rows for p in written) / run_rows)
    runs = _sorted_runs(written, runs_dir, schema, sort_key, run_rows, batch_rows(num_runs))
    merge_pass = 0
    while len(runs) > fan_in:  # merge groups of fan_in runs into longer runs
        merged, next_rows = [], batch_rows(math.ceil(len(runs) / fan_in))
        for start in range(0, len(runs), fan_in):
            group = runs[start:start + fan_in]
            out = runs_dir / f"pass{merge_pass:02d}-{start:06d}.parquet"
            with pq.ParquetWriter(out, schema, **RUN_FILE_OPTIONS) as writer:
                pieces = _merge_runs(group, schema, sort_key)
                for rows in _rechunk(pieces, itertools.repeat(next_rows)):
                    writer.write_table(rows, row_group_size=next_rows)
            for run in group:
                run.unlink()
            merged.append(out)
        runs, merge_pass = merged, merge_pass + 1
    parts = _write_parts(_merge_runs(runs, schema, sort_key), folder, template, schema,
                         rows_per_file, rows_per_group)
    shutil.rmtree(runs_dir)
    return parts
