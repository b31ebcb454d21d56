"""Balancing Act's h-vector extraction: the hvectors stage's Ray Data job (one actor) vs a plain
single-process loop doing the same read -> decode -> invert and record h -> write on the same
images, backbone and batch size.

Run: .venv/bin/python tests/benchmarks/bench_ba_hvectors.py [--tiles 1 --batch 64]
Prints images/s of each and the ratio Ray / plain (target >= 1.0); ray.init is not timed.
The backbone is the one of configs/experiments/digits_balancing_act.yaml after one training
step (the cost does not depend on the weights); the grid, dtype and images per forward are the
config's.
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
from debiaslab.data.schema import read_manifest, tensor_field
from debiaslab.distributed import data as dd
from debiaslab.distributed.runtime import init_ray, shutdown_ray
from debiaslab.training.loop import Trainer

plugins.load()  # the methods register their sections, recipes and losses, as the CLI does

from debiaslab.methods.balancing_act import HVectorMapper, h_settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs/experiments/digits_balancing_act.yaml"
RAY_TMP = "/tmp/dl-bench"
ACTOR_CPUS = 1.0


def main() -> None:
    from bench_ray_data import build_tiled, plain_map

    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    os.environ.setdefault("DEBIASLAB_RAY_TMP", RAY_TMP)
    work = Path(tempfile.mkdtemp(prefix="bench-hvec-"))
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
        settings = h_settings(cfg)
        torch.set_num_threads(dd.actor_threads(ACTOR_CPUS))
        mapper = HVectorMapper(str(checkpoint), settings, "cpu")
        shape = (len(settings["timesteps"]), *mapper.trained.model.h_shape())
        schema = pa.schema([("id", pa.string()), tensor_field("h", shape, settings["dtype"])])
        t0 = time.perf_counter()
        assert plain_map(dataset, work / "plain", args.batch, mapper, schema,
                         ("id", "image", "label")) == n
        plain = n / (time.perf_counter() - t0)
        init_ray(num_cpus=2, object_store_memory_gb=1.0)
        t0 = time.perf_counter()
        dd.map_to_side_table(dataset, "bench", HVectorMapper,
                             {"checkpoint": str(checkpoint), "settings": settings,
                              "device": "cpu"},
                             schema, read_columns=["id", "image", "label"], decode=True,
                             concurrency=1, batch_size=args.batch, num_cpus=ACTOR_CPUS,
                             progress=False)
        ray_rate = n / (time.perf_counter() - t0)
        print(f"{n} images 1x16x16, h {list(shape)} {settings['dtype']}, grid "
              f"{settings['n_steps']}, {settings['images_per_forward']} per forward, batch "
              f"{args.batch}, torch threads {torch.get_num_threads()}, cpu")
        print(f"plain loop : {plain:8.1f} img/s")
        print(f"ray data c1: {ray_rate:8.1f} img/s")
        print(f"ratio ray / plain = {ray_rate / plain:.3f} (target >= 1.0)")
    finally:
        shutdown_ray()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
