"""Ray Data jobs on a local Ray: feature extraction equals the single-process extractor, re-runs
replace their output, failed batches are retried, sampled images depend only on their seeds,
map outputs (N-D tensor columns too) are sorted and byte-identical for any layout, and a map job
writes a side table."""

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import TINY as TINY_CORE
from conftest import WORKER_PLUGIN, ship_by_value

from debiaslab.config import load_config
from debiaslab.data.dataset import ImageDataset
from debiaslab.data.schema import encode_png, read_manifest, tensor_field
from debiaslab.data.side_tables import join, list_side_tables, read_side_table
from debiaslab.data.sources import build_dataset
from debiaslab.distributed import data as dd
from debiaslab.metrics.features import build_extractor
from debiaslab.sampling import generate, load_trained, sample_labels
from debiaslab.training.loop import Trainer

FEATURE_TOLERANCE = 1e-5
TINY = TINY_CORE + ["train.steps=5", "train.warmup_steps=2", "train.checkpoint_every=5",
                    "name=tiny"]
SAMPLE_SEEDS = range(3, 15)
SAMPLE_STEPS = 4
FLAKY_ID = "digits-0700"  # the batch holding this row raises once
ID_SCHEMA = pa.schema([pa.field("id", pa.string(), nullable=False),
                       pa.field("label", pa.int64(), nullable=False)])
H_SHAPE = (3, 2, 2)
TENSOR_SCHEMA = pa.schema([pa.field("id", pa.string(), nullable=False),
                           tensor_field("h", H_SHAPE, "float16"),
                           pa.field("brightness", pa.float32(), nullable=False)])


PLUGIN = "batch_guidance_plugin"  # tests/batch_guidance_plugin.py: a batch-dependent guidance


@pytest.fixture(scope="module")
def ray_cluster(shared_ray):
    # actors unpickle this module's mapper classes by value (the test module is not importable);
    # the workers load the test plugin PLUGIN as a user's own method module (conftest)
    assert PLUGIN == WORKER_PLUGIN
    ship_by_value(sys.modules[__name__])
    yield


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    return build_dataset("digits", tmp_path_factory.mktemp("data") / "digits")


def _files(folder: Path) -> dict[str, pa.Table]:
    return {p.name: pq.read_table(p) for p in sorted(folder.glob("*.parquet"))}


def test_read_images_lists_manifest_shards(ray_cluster, digits_dir):
    ds = dd.read_images(digits_dir)
    assert ds.count() == read_manifest(digits_dir).num_rows
    assert ds.schema().names == ["id", "image", "label", "attributes"]


def test_read_images_decode_gives_the_dataset_pixels(ray_cluster, digits_dir):
    rows = dd.read_images(digits_dir, decode=True).take_batch(5000, batch_format="numpy")
    ref = ImageDataset.load(digits_dir)
    order = np.argsort(rows["id"])
    assert list(rows["id"][order]) == sorted(ref.ids)
    expected = ref.images.numpy()[np.argsort(np.asarray(ref.ids))]
    np.testing.assert_array_equal(rows[dd.PIXELS][order], expected)
    np.testing.assert_array_equal(rows["attributes"][order],
                                  ref.attributes.numpy()[np.argsort(np.asarray(ref.ids))])
    assert "image" not in rows


def test_extract_features_equals_single_process_and_rerun_replaces(ray_cluster, digits_dir,
                                                                    tmp_path):
    out = tmp_path / "features"
    dd.extract_features_job(digits_dir, "digits", out, concurrency=2, batch_size=128)
    ids, features, classes, attrs = dd.read_features(out)
    ref = ImageDataset.load(digits_dir)
    expected = build_extractor("digits").extract(ref.images.numpy(), batch_size=128)
    assert ids == ref.ids  # order preserved, every row once
    np.testing.assert_allclose(features, expected.features, rtol=FEATURE_TOLERANCE,
                               atol=FEATURE_TOLERANCE)
    np.testing.assert_array_equal(classes, expected.classes)
    np.testing.assert_array_equal(attrs, expected.attributes)
    first = _files(out)
    assert first and all(t.schema.equals(dd.FEATURES_SCHEMA) for t in first.values())

    dd.extract_features_job(digits_dir, "digits", out, concurrency=2, batch_size=128)
    second = _files(out)
    assert list(second) == list(first)
    assert all(second[name].equals(first[name]) for name in first)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


class FlakyMapper:
    """Raises once on the batch holding FLAKY_ID (a marker file records the failure)."""

    def __init__(self, marker: str) -> None:
        self.marker = Path(marker)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if FLAKY_ID in set(batch["id"]) and not self.marker.exists():
            self.marker.write_text("failed once")
            raise RuntimeError("injected failure")
        return {"id": batch["id"], "label": batch["label"]}


def test_failed_batch_is_retried(ray_cluster, digits_dir, tmp_path):
    marker = tmp_path / "failed"
    out = dd.run_map_job(dd.read_images(digits_dir, columns=["id", "label"]), FlakyMapper,
                         {"marker": str(marker)}, tmp_path / "out", ID_SCHEMA,
                         concurrency=1, batch_size=100, progress=False)
    assert marker.exists()
    table = pa.concat_tables(_files(out).values())
    assert table.schema.equals(ID_SCHEMA)
    assert table.column("id").to_pylist() == ImageDataset.load(digits_dir).ids


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, digits_dir) -> Path:
    run = tmp_path_factory.mktemp("run")
    cfg = load_config(None, TINY + [f"output_dir={run}"])
    result = Trainer(cfg, ImageDataset.load(digits_dir), run, progress=False).fit()
    return result.checkpoint


def _png_column(folder: Path) -> tuple[list[str], list[bytes], list[int]]:
    data = ImageDataset.load(folder)  # the output is a regular dataset folder (hash checked)
    table = pa.concat_tables(_files(folder).values())
    assert table.column("id").to_pylist() == data.ids
    return data.ids, table.column("image").to_pylist(), table.column("label").to_pylist()


def test_sample_job_images_depend_only_on_seeds(ray_cluster, tiny_checkpoint, tmp_path):
    common = dict(steps=SAMPLE_STEPS, labels_mode="balanced", guidance=[], options={},
                  progress=False)
    one = dd.sample_job(tiny_checkpoint, "ddim", SAMPLE_SEEDS, tmp_path / "one",
                        concurrency=1, seeds_per_task=len(SAMPLE_SEEDS), **common)
    two = dd.sample_job(tiny_checkpoint, "ddim", SAMPLE_SEEDS, tmp_path / "two",
                        concurrency=2, seeds_per_task=5, **common)
    ids, pngs, labels = _png_column(one)
    assert ids == [f"seed{s:08d}" for s in SAMPLE_SEEDS]
    assert _png_column(two) == (ids, pngs, labels)

    trained = load_trained(tiny_checkpoint, device="cpu")
    seeds = list(SAMPLE_SEEDS)
    y = sample_labels("balanced", trained.num_classes, seeds)
    images = generate(trained, "ddim", seeds, steps=SAMPLE_STEPS, labels=y)
    uint8 = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    assert pngs == [encode_png(img) for img in uint8]
    assert labels == y.tolist()


def test_batch_guidance_gives_the_same_images_on_ray_and_locally(ray_cluster, tiny_checkpoint,
                                                                 tmp_path):
    """The Ray sampling path batches the seeds as the local path does (sample.batch_size), so a
    guidance that depends on the whole batch gives byte-identical images on both."""
    from debiaslab.stages import sample

    def run(backend: str, batch: int) -> np.ndarray:
        cfg = load_config(None, TINY + [f"output_dir={tmp_path}", "sample.samplers=[ddim]",
                                        "sample.num_samples=8", f"sample.batch_size={batch}",
                                        f"sample.steps={SAMPLE_STEPS}", "sample.seed_start=3",
                                        "sample.guidance=[{type: batch_mean, scale: 0.5}]",
                                        f"distributed.backend={backend}"])
        out = tmp_path / f"{backend}-{batch}"
        sample(cfg, tiny_checkpoint, out_dir=out, progress=False, backend=backend)
        return ImageDataset.load(out / "ddim").images.numpy()

    local = run("local", 4)
    assert np.array_equal(run("ray", 4), local)
    assert not np.array_equal(run("local", 8), local)  # the guidance does depend on the batch


def test_extract_command_writes_features(ray_cluster, digits_dir, tmp_path, capsys):
    from debiaslab.cli import main

    out = tmp_path / "features"
    code = main(["extract", "--set", f"output_dir={tmp_path}", "--set", "metrics.extractor=digits",
                 "--dataset", str(digits_dir), "--out", str(out)])
    assert code == 0 and f"features: {out}" in capsys.readouterr().out
    ids, features, _, _ = dd.read_features(out)
    assert len(ids) == read_manifest(digits_dir).num_rows and features.shape[1] > 0


def tensor_columns(pixels: np.ndarray) -> dict[str, np.ndarray]:
    """A [N, 3, 2, 2] float16 and a [N] float32 column computed exactly from uint8 pixels."""
    x = pixels.astype(np.float32) / 255
    return {"h": x[:, 0, :3, :4].reshape(len(x), *H_SHAPE).astype(np.float16),
            "brightness": pixels.astype(np.int64).sum(axis=(1, 2, 3)).astype(np.float32) / 255}


class TensorMapper:
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"id": batch["id"], **tensor_columns(batch[dd.PIXELS])}


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.parquet"))}


def test_tensor_map_job_reads_back_exactly_and_is_byte_identical_for_any_layout(
        ray_cluster, digits_dir, tmp_path):
    ref = ImageDataset.load(digits_dir)
    expected = tensor_columns(ref.images.numpy())
    runs = {"c1": dict(concurrency=1, batch_size=256),
            "c2": dict(concurrency=2, batch_size=64, rows_per_block=97)}
    outputs = {}
    for key, options in runs.items():
        out = dd.run_map_job(dd.read_images(digits_dir, columns=["id", "image"], decode=True),
                             TensorMapper, {}, tmp_path / key, TENSOR_SCHEMA, progress=False,
                             rows_per_file=500, **options)
        outputs[key] = _bytes(out)
    assert len(outputs["c1"]) == 4  # 1797 rows in files of 500
    assert outputs["c1"] == outputs["c2"]

    got = dd.read_map_output(tmp_path / "c1")
    assert list(got["id"]) == sorted(ref.ids) == ref.ids
    assert got["h"].dtype == np.float16 and got["h"].shape == (len(ref), *H_SHAPE)
    assert got["brightness"].dtype == np.float32
    np.testing.assert_array_equal(got["h"], expected["h"])
    np.testing.assert_array_equal(got["brightness"], expected["brightness"])
    field = pq.read_schema(tmp_path / "c1" / dd.PART_TEMPLATE.format(0)).field("h")
    assert field.metadata[b"shape"] == b"[3, 2, 2]" and field.metadata[b"dtype"] == b"float16"


def test_normalize_parts_is_an_external_sort_independent_of_layout(tmp_path):
    """Many task files, tiny sort / merge buffers and fan-in 3 (several merge passes) give the
    same bytes as one task file; the output is sorted by id and no run files are left."""
    rng = np.random.default_rng(0)
    n = 3000
    ids = np.asarray([f"r{i:05d}" for i in range(n)], dtype=object)
    pixels = rng.integers(0, 256, (n, 1, 4, 4), dtype=np.uint8)
    table = dd.to_arrow({"id": ids, **tensor_columns(pixels)}, TENSOR_SCHEMA)

    def normalize(folder: Path, num_tasks: int, **buffers: int) -> dict[str, bytes]:
        folder.mkdir()
        order = rng.permutation(n)
        for task, chunk in enumerate(np.array_split(order, num_tasks)):
            pq.write_table(table.take(chunk), folder / f"task-{task:06d}-000000.parquet")
        parts = dd._normalize_parts(folder, dd.PART_TEMPLATE, TENSOR_SCHEMA, 700, **buffers)
        assert sorted(p.name for p in folder.iterdir()) == [p.name for p in parts]
        got = pa.concat_tables([pq.read_table(p) for p in parts])
        assert got.column("id").to_pylist() == ids.tolist()
        return _bytes(folder)

    one = normalize(tmp_path / "one", 1)
    assert len(one) == 5
    many = normalize(tmp_path / "many", 23, sort_buffer_bytes=2_000, merge_buffer_bytes=1_000,
                     fan_in=3)
    assert many == one


def test_map_to_side_table_joins_by_id_and_leaves_the_dataset_alone(ray_cluster, digits_dir):
    manifest_bytes = (digits_dir / "dataset.json").read_bytes()
    before = ImageDataset.load(digits_dir)
    path = dd.map_to_side_table(digits_dir, "h", TensorMapper, {}, TENSOR_SCHEMA,
                                producer={"stage": "test"}, read_columns=["id", "image"],
                                decode=True, concurrency=2, batch_size=128, progress=False)
    assert path == digits_dir.absolute() / "side" / "h" and list_side_tables(digits_dir) == ["h"]
    table = read_side_table(digits_dir, "h")
    assert table.manifest["producer"]["stage"] == "test"
    assert table.manifest["dataset_content_hash"] == before.content_hash
    assert table.manifest["columns"] == [{"name": "h", "dtype": "float16", "shape": [3, 2, 2]},
                                         {"name": "brightness", "dtype": "float32", "shape": []}]
    order = np.random.default_rng(1).permutation(len(before))
    ids = [before.ids[i] for i in order]
    expected = tensor_columns(before.images.numpy()[order])
    np.testing.assert_array_equal(join(ids, table, "h"), expected["h"])
    np.testing.assert_array_equal(join(ids, table, "brightness"), expected["brightness"])
    assert (digits_dir / "dataset.json").read_bytes() == manifest_bytes
    after = ImageDataset.load(digits_dir)  # verifies the content hash
    assert after.content_hash == before.content_hash and after.ids == before.ids
    assert not [p for p in (digits_dir / "side").iterdir() if p.name.startswith(".")]


def test_minority_score_job_is_byte_identical_at_any_concurrency(ray_cluster, digits_dir,
                                                                 tiny_checkpoint, tmp_path):
    """Minority Guidance's score stage (methods.minority_guidance): its Ray Data job at 1 and 2
    actors writes the same Parquet bytes (per-image noise seeds, one image per forward), and the
    scores of the local path, on 96 digits."""
    from debiaslab.data.schema import DatasetMeta, write_dataset
    from debiaslab.data.side_tables import side_table_path
    from debiaslab.methods.minority_guidance import (
        MinorityScoreMapper,
        score_dataset_local,
        score_settings,
    )

    full = ImageDataset.load(digits_dir)
    small = tmp_path / "small"
    write_dataset(small, full.images[:96].numpy(), full.labels[:96].numpy(), None,
                  DatasetMeta("small", "digits", full.class_names, []), ids=full.ids[:96],
                  rows_per_shard=32)
    cfg = load_config(None, TINY + ["minority.distance=l2", "minority.n_iter=2"])
    settings = score_settings(cfg)
    assert settings["t"] == 605 and settings["images_per_forward"] == 1
    schema = pa.schema([("id", pa.string()), ("score", pa.float32())])
    kwargs = {"checkpoint": str(tiny_checkpoint), "settings": settings, "device": "cpu"}
    for n in (1, 2):
        dd.map_to_side_table(small, f"ray{n}", MinorityScoreMapper, kwargs, schema,
                             read_columns=["id", "image", "label"], decode=True,
                             concurrency=n, batch_size=20, num_cpus=0.5, progress=False)
    parts = [sorted(side_table_path(small, f"ray{n}").glob("*.parquet")) for n in (1, 2)]
    assert parts[0] and [p.read_bytes() for p in parts[0]] == [p.read_bytes() for p in parts[1]]
    ids, local = score_dataset_local(small, tiny_checkpoint, settings, batch_size=40,
                                     device="cpu")
    ray = read_side_table(small, "ray2")
    assert ray.ids.tolist() == sorted(ids)
    order = np.argsort(np.asarray(ids, dtype=object))
    # the local path ran with this process's torch threads, the actors with one: conv / matmul
    # reductions are summed in another order, a few float32 ulps per score (measured <= 2)
    np.testing.assert_allclose(ray.column("score"), local[order], rtol=1e-5, atol=0)
