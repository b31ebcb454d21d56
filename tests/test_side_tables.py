"""Side tables beside a dataset (written atomically, joined by id, never touching the images),
N-D tensor columns, and several datasets read as one with a source column."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from debiaslab.data.dataset import ImageDataset
from debiaslab.data.schema import (
    DatasetMeta,
    read_manifest,
    table_to_numpy,
    tensor_field,
    tensor_from_arrow,
    tensor_to_arrow,
    write_dataset,
)
from debiaslab.data.side_tables import (
    join,
    list_side_tables,
    read_datasets,
    read_side_table,
    side_table_path,
    write_side_table,
)
from debiaslab.data.sources import build_dataset
from debiaslab.errors import ConfigError, DataError

N = 40
SHAPE = (1, 8, 8)


def _write(folder: Path, seed: int = 0, prefix: str = "img") -> Path:
    rng = np.random.default_rng(seed)
    meta = DatasetMeta(name=folder.name, source="test", class_names=["a", "b"],
                       attr_names=["bold"])
    write_dataset(folder, rng.integers(0, 256, (N, *SHAPE), dtype=np.uint8),
                  rng.integers(0, 2, N), rng.integers(0, 2, (N, 1)), meta,
                  ids=[f"{prefix}-{i:03d}" for i in range(N)], rows_per_shard=15)
    return folder


@pytest.fixture()
def dataset(tmp_path) -> Path:
    return _write(tmp_path / "data")


def _columns(n: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"h": rng.standard_normal((n, 4, 2, 2)).astype(np.float16),
            "score": rng.standard_normal(n).astype(np.float32),
            "label": rng.integers(0, 5, n)}


def test_tensor_field_round_trip_and_errors():
    field = tensor_field("h", (3, 2, 2), "float16")
    assert field.type == pa.list_(pa.float16(), 12) and not field.nullable
    assert field.metadata == {b"shape": b"[3, 2, 2]", b"dtype": b"float16"}
    values = np.arange(5 * 12, dtype=np.float32).reshape(5, 3, 2, 2)
    column = tensor_to_arrow(values, field)  # float32 -> the field's float16
    back = tensor_from_arrow(pa.chunked_array([column.slice(0, 2), column.slice(2)]), field)
    assert back.dtype == np.float16 and back.shape == (5, 3, 2, 2)
    np.testing.assert_array_equal(back, values.astype(np.float16))
    table = table_to_numpy(pa.Table.from_arrays([column], schema=pa.schema([field])).slice(3))
    np.testing.assert_array_equal(table["h"], values[3:].astype(np.float16))
    with pytest.raises(DataError, match=r"column 'h': expected an array \[N, 3, 2, 2\]"):
        tensor_to_arrow(values.reshape(5, 12), field)
    with pytest.raises(ConfigError, match="dtype 'complex64'"):
        tensor_field("z", (2,), "complex64")


def test_write_read_join_and_dataset_unchanged(dataset):
    manifest_bytes = (dataset / "dataset.json").read_bytes()
    content_hash = ImageDataset.load(dataset).content_hash
    ids = [f"img-{i:03d}" for i in range(N)] + ["extra-1"]  # extra ids are fine
    order = np.random.default_rng(2).permutation(len(ids))
    cols = _columns(len(ids))
    path = write_side_table(dataset, "h", [ids[i] for i in order],
                            {k: v[order] for k, v in cols.items()},
                            producer={"stage": "h-vectors", "steps": 10}, rows_per_file=16)
    assert path == side_table_path(dataset, "h") == dataset.absolute() / "side" / "h"
    assert sorted(p.name for p in path.iterdir()) == [
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet", "side_table.json"]
    assert list_side_tables(dataset) == ["h"]

    table = read_side_table(dataset, "h")
    assert list(table.ids) == sorted(ids)
    assert table.manifest["num_rows"] == len(ids)
    assert table.manifest["dataset_content_hash"] == read_manifest(dataset).content_hash
    assert table.manifest["producer"] == {"stage": "h-vectors", "steps": 10}
    assert table.manifest["columns"] == [
        {"name": "h", "dtype": "float16", "shape": [4, 2, 2]},
        {"name": "score", "dtype": "float32", "shape": []},
        {"name": "label", "dtype": "int64", "shape": []}]
    data = ImageDataset.load(dataset)
    for name, values in cols.items():
        got = join(data.ids, table, name)
        assert got.dtype == values.dtype
        np.testing.assert_array_equal(got, values[:N])  # dataset ids are ids[:N], in order
    only = read_side_table(dataset, "h", columns=["score"])
    assert list(only.columns) == ["score"]

    # the dataset is untouched: same manifest bytes, same content hash, loads as before
    assert (dataset / "dataset.json").read_bytes() == manifest_bytes
    assert data.content_hash == content_hash and len(data) == N


def test_content_hash_does_not_depend_on_row_order_or_files(dataset):
    ids = [f"img-{i:03d}" for i in range(N)]
    cols = _columns(N)
    write_side_table(dataset, "a", ids, cols, producer={}, rows_per_file=7)
    rev = slice(None, None, -1)
    write_side_table(dataset, "b", ids[rev], {k: v[rev] for k, v in cols.items()}, producer={})
    hashes = [read_side_table(dataset, name).manifest["content_hash"] for name in ("a", "b")]
    assert hashes[0] == hashes[1]
    cols["score"][0] += 1
    write_side_table(dataset, "c", ids, cols, producer={})
    assert read_side_table(dataset, "c").manifest["content_hash"] != hashes[0]


def test_join_names_the_table_and_a_missing_id(dataset):
    ids = [f"img-{i:03d}" for i in range(N)]
    write_side_table(dataset, "score", ids[5:], {"score": np.zeros(N - 5, np.float32)},
                     producer={})
    table = read_side_table(dataset, "score")
    with pytest.raises(DataError, match=r"side table 'score' .* lacks 5 of 40 dataset ids "
                                        r"\(e\.g\. 'img-000'\); recompute") as info:
        join(ids, table, "score")
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="no column 'h'; columns: score"):
        join(ids, table, "h")


def test_rewrite_replaces_atomically_and_bad_input_is_one_line(dataset):
    ids = [f"img-{i:03d}" for i in range(N)]
    write_side_table(dataset, "w", ids, {"w": np.ones(N, np.float32)}, producer={"v": 1})
    write_side_table(dataset, "w", ids, {"w": np.full(N, 2, np.float32)}, producer={"v": 2})
    table = read_side_table(dataset, "w")
    assert table.manifest["producer"] == {"v": 2} and (table.columns["w"] == 2).all()
    assert [p.name for p in (dataset / "side").iterdir()] == ["w"]  # no temp folders left

    with pytest.raises(ConfigError, match=r"side table name '\.\./x'"):
        write_side_table(dataset, "../x", ids, {"w": np.ones(N)}, producer={})
    with pytest.raises(DataError, match=r"column 'w' has shape \[3\], want 40 rows"):
        write_side_table(dataset, "w", ids, {"w": np.ones(3)}, producer={})
    with pytest.raises(DataError, match="ids are not unique"):
        write_side_table(dataset, "w", ids[:-1] + ids[:1], {"w": np.ones(N)}, producer={})
    with pytest.raises(DataError, match="no such side table"):
        read_side_table(dataset, "missing")
    assert read_side_table(dataset, "w").manifest["producer"] == {"v": 2}  # still intact


def test_stale_or_changed_tables_are_refused(tmp_path):
    dataset = _write(tmp_path / "data")
    ids = [f"img-{i:03d}" for i in range(N)]
    path = write_side_table(dataset, "s", ids, {"s": np.arange(N, dtype=np.float32)},
                            producer={})
    part = path / "part-00000.parquet"
    changed = pq.read_table(part)
    changed = changed.set_column(1, "s", pa.array(np.zeros(N, np.float32)))
    pq.write_table(changed, part)
    with pytest.raises(DataError, match="content hash does not match side_table.json"):
        read_side_table(dataset, "s")
    assert (read_side_table(dataset, "s", verify=False).columns["s"] == 0).all()

    manifest = json.loads((path / "side_table.json").read_text())
    manifest["dataset_content_hash"] = "0" * 64
    (path / "side_table.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="computed from dataset contents 000000000000"):
        read_side_table(dataset, "s", verify=False)


def test_read_datasets_biased_and_reference(tmp_path):
    root = build_dataset("digits", tmp_path / "pair", imbalance="attribute_bias",
                         bias_attribute="bold", seed=0)
    biased, reference = ImageDataset.load(root / "biased"), ImageDataset.load(root / "reference")
    both = read_datasets({"reference": root / "reference", "biased": root / "biased"})
    n_b, n_r = len(biased), len(reference)
    assert len(both) == n_b + n_r and both.images.shape == (n_b + n_r, *biased.shape)
    assert both.ids == biased.ids + reference.ids  # keys in sorted order, rows as stored
    assert list(both.source) == ["biased"] * n_b + ["reference"] * n_r
    np.testing.assert_array_equal(both.images[:n_b], biased.images.numpy())
    np.testing.assert_array_equal(both.labels[n_b:], reference.labels.numpy())
    np.testing.assert_array_equal(both.attributes[n_b:], reference.attributes.numpy())
    assert both.content_hashes == {"biased": biased.content_hash,
                                   "reference": reference.content_hash}
    assert read_datasets({"biased": root / "biased", "reference": root / "reference"}).ids == (
        both.ids)

    with pytest.raises(DataError, match=r"datasets 'a' and 'b' share id '.*'; pass prefix_ids"):
        read_datasets({"a": root / "biased", "b": root / "biased"})
    twice = read_datasets({"a": root / "biased", "b": root / "biased"}, prefix_ids=True)
    assert twice.ids[:1] == [f"a/{biased.ids[0]}"] and twice.ids[n_b] == f"b/{biased.ids[0]}"


def test_read_datasets_refuses_datasets_of_different_kinds(tmp_path):
    first = _write(tmp_path / "one")
    other = tmp_path / "two"
    meta = DatasetMeta(name="two", source="test", class_names=["a", "b", "c"], attr_names=["bold"])
    write_dataset(other, np.zeros((2, *SHAPE), np.uint8), [0, 2], np.zeros((2, 1), np.int8), meta)
    with pytest.raises(DataError, match="has class_names"):
        read_datasets({"one": first, "two": other})
