"""The external merge sort of map-job outputs (data.external_sort), without Ray: sorted output
whose bytes depend only on the rows, several merge passes under tiny buffers, input order kept
when there is no sort key, inputs and run files removed, and no Ray imported on the way."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from debiaslab.data import external_sort as es

SCHEMA = pa.schema([pa.field("id", pa.string(), nullable=False),
                    pa.field("value", pa.float32(), nullable=False),
                    pa.field("vec", pa.list_(pa.float32(), 3), nullable=False)])
NO_KEY = pa.schema([f for f in SCHEMA if f.name != "id"])
TEMPLATE = "part-{:05d}.parquet"


def rows(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    vec = rng.standard_normal((n, 3)).astype(np.float32)
    return pa.table({"id": [f"r{i:06d}" for i in range(n)],
                     "value": rng.standard_normal(n).astype(np.float32),
                     "vec": pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel()), 3)},
                    schema=SCHEMA)


def scatter(table: pa.Table, folder: Path, num_files: int, seed: int) -> list[Path]:
    """The rows of ``table`` shuffled into ``num_files`` files of uneven row groups."""
    folder.mkdir()
    order = np.random.default_rng(seed).permutation(table.num_rows)
    files = []
    for i, chunk in enumerate(np.array_split(order, num_files)):
        files.append(folder / f"in-{i:04d}.parquet")
        pq.write_table(table.take(chunk), files[-1], row_group_size=max(1, len(chunk) // 3 + 1))
    return files


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_sorted_output_is_the_same_bytes_for_any_input_split_and_buffers(tmp_path):
    table = rows(2500)
    outputs = []
    for key, num_files, buffers in [("one", 1, {}),
                                    ("many", 17, {}),
                                    ("passes", 31, {"sort_buffer_bytes": 1500,
                                                    "merge_buffer_bytes": 800, "fan_in": 2})]:
        folder = tmp_path / key
        files = scatter(table, folder, num_files, seed=len(key))
        parts = es.sort_parts(files, folder, TEMPLATE, SCHEMA, 600, **buffers)
        assert [p.name for p in parts] == [TEMPLATE.format(i) for i in range(5)]
        assert sorted(p.name for p in folder.iterdir()) == [p.name for p in parts]  # no leftovers
        got = pa.concat_tables([pq.read_table(p) for p in parts])
        assert got.equals(table)  # sorted by id, every column intact
        assert [pq.read_metadata(p).num_rows for p in parts] == [600, 600, 600, 600, 100]
        outputs.append(contents(folder))
    assert outputs[0] == outputs[1] == outputs[2]


def test_without_the_sort_key_the_input_order_is_kept_and_resplit(tmp_path):
    table = rows(1000).select(NO_KEY.names)
    folder = tmp_path / "out"
    folder.mkdir()
    files = []
    for i, start in enumerate(range(0, 1000, 333)):
        files.append(folder / f"in-{i}.parquet")
        pq.write_table(table.slice(start, 333), files[-1])
    parts = es.sort_parts(files, folder, TEMPLATE, NO_KEY, 400)
    assert [pq.read_metadata(p).num_rows for p in parts] == [400, 400, 200]
    assert pa.concat_tables([pq.read_table(p) for p in parts]).equals(table)
    assert not any(f.exists() for f in files)


def test_no_input_writes_nothing(tmp_path):
    assert es.sort_parts([], tmp_path, TEMPLATE, SCHEMA, 10) == []
    assert list(tmp_path.iterdir()) == []


def test_row_size_estimate_counts_fixed_width_fields_exactly():
    assert es.schema_row_bytes(NO_KEY) == 4 + 3 * 4
    assert es.schema_row_bytes(SCHEMA) == es.VARIABLE_WIDTH_BYTES + 4 + 3 * 4


def test_the_sort_runs_without_ray(tmp_path):
    """The module is pure pyarrow: a fresh interpreter sorts a folder and never imports ray."""
    code = (
        "import sys; from pathlib import Path; import pyarrow as pa, pyarrow.parquet as pq\n"
        "from debiaslab.data.external_sort import sort_parts\n"
        "s = pa.schema([pa.field('id', pa.string())]); d = Path(sys.argv[1])\n"
        "pq.write_table(pa.table({'id': ['b', 'c']}, schema=s), d / 'x.parquet')\n"
        "pq.write_table(pa.table({'id': ['a']}, schema=s), d / 'y.parquet')\n"
        "parts = sort_parts([d / 'x.parquet', d / 'y.parquet'], d, 'p{}.parquet', s, 10)\n"
        "assert pq.read_table(parts[0]).column('id').to_pylist() == ['a', 'b', 'c']\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
