"""Per-step training cost of TIW-DSM relative to plain EDM DSM on the same score model.

Run: .venv/bin/python tests/benchmarks/bench_tiw.py [--steps N]
The digits TIW config's score model (configs/experiments/digits_lt_tiw.yaml) is trained once with
diffusion.loss = edm and once with tiw_dsm; the discriminator (the config's, trained for a few
steps: its cost per forward and backward does not depend on its weights) runs one forward and
one backward w.r.t. x per step. The two trainers alternate step by step (ABAB...) so machine noise
hits both alike; the ratio of median step times is printed (issue 19 aims at <= 1.6).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

from debiaslab import plugins
from debiaslab.config import load_config
from debiaslab.data.locate import load_training_data
from debiaslab.methods.tiw_dsm import DISCRIMINATOR
from debiaslab.stages import build_data
from debiaslab.training.classifier import classifier_experiment
from debiaslab.training.loop import Trainer

plugins.load()  # the methods register their sections, recipes and losses, as the CLI does

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(ROOT / "configs/experiments/digits_lt_tiw.yaml",
                          [f"output_dir={tmp}", "train.device=cpu",
                           "discriminator.train.steps=2", "discriminator.train.device=cpu"])
        build_data(cfg)
        ccfg = classifier_experiment(cfg, "discriminator", run_suffix="discriminator")
        checkpoint, _ = DISCRIMINATOR.train_local(ccfg, progress=False)
        tiw = dataclasses.replace(cfg, inputs={"discriminator": {"path": str(checkpoint),
                                                                 "hash": "bench"}})
        edm = load_config(ROOT / "configs/experiments/digits_lt_tiw.yaml",
                          [f"output_dir={tmp}", "train.device=cpu", "recipe=diffusion",
                           "diffusion.loss=edm", "name=edm"])
        dataset = load_training_data(cfg)
        runs = {"edm": Trainer(edm, dataset, Path(tmp) / "edm", progress=False),
                "tiw_dsm": Trainer(tiw, dataset, Path(tmp) / "tiw", progress=False)}
        times: dict[str, list[float]] = {name: [] for name in runs}
        for s in range(args.warmup + args.steps):
            for name, trainer in runs.items():
                t0 = time.perf_counter()
                trainer.train_step(trainer.make_batch(s))
                if s >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(t) for name, t in times.items()}
        print(f"score model: {cfg.model.net} mc={cfg.model.model_channels} "
              f"mult={cfg.model.channel_mult} batch={cfg.train.batch_size}; discriminator: "
              f"{cfg.discriminator.model.net} mc={cfg.discriminator.model.model_channels}; cpu, "
              f"{args.steps} alternating steps each")
        for name, m in med.items():
            print(f"{name:8s}: {1 / m:.2f} steps/s (median step {m * 1e3:.1f} ms)")
        print(f"ratio tiw_dsm/edm step time = {med['tiw_dsm'] / med['edm']:.3f} (aim <= 1.6)")


if __name__ == "__main__":
    main()
