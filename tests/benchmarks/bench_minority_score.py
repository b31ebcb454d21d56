"""Minority-score extraction: the score stage's Ray Data job (one actor) vs a plain
single-process loop doing the same read -> decode -> score -> write on the same images, model,
distance and batch size.

Run: .venv/bin/python tests/benchmarks/bench_minority_score.py [--tiles 4 --batch 64]
Prints images/s of each and the ratio Ray / plain (target >= 1.0); ray.init is not timed.
The score model is the backbone of configs/experiments/digits_minority_guidance.yaml after one
training step (the cost does not depend on the weights); distance and n_iter are the config's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch

from debiaslab import plugins
from debiaslab.config import load_config
from debiaslab.data.dataset import ImageDataset
from debiaslab.data.schema import read_manifest
from debiaslab.distributed import data as dd
from debiaslab.distributed.runtime import init_ray, shutdown_ray
from debiaslab.methods.minority_guidance import MinorityScoreMapper, score_settings
from debiaslab.training.loop import Trainer

plugins.load()  # the methods register their sections, recipes and losses, as the CLI does

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs/experiments/digits_minority_guidance.yaml"
RAY_TMP = "/tmp/dl-bench"
ACTOR_CPUS = 1.0
SCHEMA = pa.schema([("id", pa.string()), ("score", pa.float32())])


def build_tiled(folder: Path, tiles: int) -> Path:
    from bench_ray_data import build_tiled as tiled  # the same tiled digits as bench_ray_data

    return tiled(folder, tiles)


def plain_loop(dataset_dir: Path, out: Path, mapper: MinorityScoreMapper, batch: int) -> int:
    from bench_ray_data import plain_map  # read -> decode -> map -> write, one process

    return plain_map(dataset_dir, out, batch, mapper, SCHEMA, ("id", "image", "label"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    os.environ.setdefault("DEBIASLAB_RAY_TMP", RAY_TMP)
    work = Path(tempfile.mkdtemp(prefix="bench-mscore-"))
    try:
        cfg = load_config(CONFIG, [f"output_dir={work}", "train.steps=1", "train.warmup_steps=0",
                                   "train.checkpoint_every=1", "tracking.enabled=false",
                                   "data.imbalance=none"])
        from debiaslab.stages import build_data

        build_data(cfg)
        checkpoint = Trainer(cfg, ImageDataset.load(cfg.dataset_path), cfg.run_dir,
                             progress=False).fit().checkpoint
        dataset = build_tiled(work / "digits-tiled", args.tiles)
        n = read_manifest(dataset).num_rows
        settings = score_settings(cfg)
        torch.set_num_threads(dd.actor_threads(ACTOR_CPUS))
        mapper = MinorityScoreMapper(str(checkpoint), settings, "cpu")  # warms caches
        t0 = time.perf_counter()
        assert plain_loop(dataset, work / "plain", mapper, args.batch) == n
        plain = n / (time.perf_counter() - t0)
        init_ray(num_cpus=2, object_store_memory_gb=1.0)
        t0 = time.perf_counter()
        dd.map_to_side_table(dataset, "bench", MinorityScoreMapper,
                             {"checkpoint": str(checkpoint), "settings": settings,
                              "device": "cpu",
                              "cache_dir": os.environ.get("DEBIASLAB_CACHE", "")},
                             SCHEMA, read_columns=["id", "image", "label"], decode=True,
                             concurrency=1, batch_size=args.batch, num_cpus=ACTOR_CPUS,
                             progress=False)
        ray_rate = n / (time.perf_counter() - t0)
        print(f"{n} images 1x16x16, distance {settings['distance']}, n_iter "
              f"{settings['n_iter']}, t {settings['t']}, batch {args.batch}, torch threads "
              f"{torch.get_num_threads()}, cpu")
        print(f"plain loop : {plain:8.1f} img/s")
        print(f"ray data c1: {ray_rate:8.1f} img/s")
        print(f"ratio ray / plain = {ray_rate / plain:.3f} (target >= 1.0)")
    finally:
        shutdown_ray()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
