"""Ray Data feature extraction (actor pool, concurrency 1) vs a plain single-process loop doing
the same read -> decode -> extract -> write on the same images, model and batch size.

Run: .venv/bin/python tests/benchmarks/bench_ray_data.py [--tiles 100 --batch 256 --rounds 1]
Prints images/s of each and the ratio Ray / plain (target >= 0.9); ray.init is not timed.
In the Ray job the read tasks (0.5 CPU each) decode the PNGs while the one actor (1 CPU, one
torch thread) runs the extractor; the plain loop does both in turn on one thread.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from debiaslab.data.schema import DatasetMeta, decode_png, read_manifest, write_dataset
from debiaslab.data.sources import load_digits_source
from debiaslab.distributed import data as dd
from debiaslab.distributed.runtime import init_ray, shutdown_ray
from debiaslab.metrics.features import build_extractor

RAY_TMP = "/tmp/dl-bench"
ROWS_PER_SHARD = 10_000
ACTOR_CPUS = 1.0  # one actor, one torch thread; the plain loop gets the same thread count
EXTRACTOR = "digits"


def build_tiled(folder: Path, tiles: int) -> Path:
    """The embedded digits repeated `tiles` times (unique ids) as a dataset folder."""
    src = load_digits_source()
    n = len(src)
    ids = [f"t{t:02d}-{i:04d}" for t in range(tiles) for i in range(n)]
    meta = DatasetMeta(name="digits-tiled", source="digits", class_names=src.class_names,
                       attr_names=src.attr_names)
    write_dataset(folder, np.tile(src.images, (tiles, 1, 1, 1)), np.tile(src.labels, tiles),
                  np.tile(src.attributes, (tiles, 1)), meta, ids=ids,
                  rows_per_shard=ROWS_PER_SHARD)
    return folder


def plain_map(dataset_dir: Path, out_dir: Path, batch_size: int, mapper: Any,
              schema: pa.Schema, columns: tuple[str, ...] = ("id", "image")) -> int:
    """Read shards, decode, map and write Parquet in one process, as a Ray map job does with
    decoded batches (``id``, ``pixels`` and the other ``columns``); returns rows written."""
    manifest = read_manifest(dataset_dir)
    channels = manifest.image_shape[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = 0
    for index, shard in enumerate(manifest.shard_paths()):
        table = pq.read_table(shard, columns=list(columns))
        ids = np.asarray(table.column("id").to_pylist(), dtype=object)
        extra = {c: table.column(c).to_numpy() for c in columns if c not in ("id", "image")}
        blobs = table.column("image").to_pylist()
        parts = []
        for start in range(0, len(blobs), batch_size):
            rows_ = slice(start, start + batch_size)
            pixels = np.stack([decode_png(b, channels) for b in blobs[rows_]])
            batch = {"id": ids[rows_], "pixels": pixels, **{c: v[rows_] for c, v in extra.items()}}
            parts.append(dd.to_arrow(mapper(batch), schema))
        pq.write_table(pa.concat_tables(parts), out_dir / dd.PART_TEMPLATE.format(index))
        rows += table.num_rows
    return rows


def plain_loop(dataset_dir: Path, out_dir: Path, batch_size: int) -> int:
    """The feature job's work in one process (the digits extractor on every image)."""
    extractor = build_extractor(EXTRACTOR)

    def features(batch: dict[str, Any]) -> dict[str, Any]:
        out = extractor.extract(batch["pixels"], batch_size=batch_size)
        return {"id": batch["id"], "features": out.features, "class_pred": out.classes,
                "attr_pred": out.attributes}

    return plain_map(dataset_dir, out_dir, batch_size, features, dd.FEATURES_SCHEMA)


def main() -> None:
    ap = argparse.ArgumentParser()
    # 100 x 1797 = 179,700 images: Ray's fixed cost (actor process start, torch import, model
    # load; ~9 s on 2 busy cores) is then small next to the ~60 s of work
    ap.add_argument("--tiles", type=int, default=100)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    os.environ.setdefault("DEBIASLAB_RAY_TMP", RAY_TMP)
    work = Path(tempfile.mkdtemp(prefix="bench-ray-data-"))
    try:
        dataset = build_tiled(work / "digits-tiled", args.tiles)
        n = read_manifest(dataset).num_rows
        build_extractor(EXTRACTOR)  # train / cache the extractor outside the timings
        torch.set_num_threads(dd.actor_threads(ACTOR_CPUS))
        init_ray(num_cpus=2, object_store_memory_gb=1.0)
        plain, ray_rates = [], []
        for r in range(args.rounds):
            t0 = time.perf_counter()
            assert plain_loop(dataset, work / f"plain-{r}", args.batch) == n
            plain.append(n / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            dd.extract_features_job(dataset, EXTRACTOR, work / "ray", concurrency=1,
                                    batch_size=args.batch, num_cpus=ACTOR_CPUS, progress=False)
            ray_rates.append(n / (time.perf_counter() - t0))
        best_plain, best_ray = max(plain), max(ray_rates)
        print(f"{n} images 1x16x16, extractor {EXTRACTOR}, batch {args.batch}, "
              f"torch threads {torch.get_num_threads()}, cpu")
        print(f"plain loop : {best_plain:8.1f} img/s  (rounds: "
              f"{', '.join(f'{v:.1f}' for v in plain)})")
        print(f"ray data c1: {best_ray:8.1f} img/s  (rounds: "
              f"{', '.join(f'{v:.1f}' for v in ray_rates)})")
        print(f"ratio ray / plain = {best_ray / best_plain:.3f} (target >= 0.9)")
    finally:
        shutdown_ray()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
