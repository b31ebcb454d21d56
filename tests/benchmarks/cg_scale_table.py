"""Classifier guidance on digits: accuracy on the target class and FID against the guidance scale.

Run after the recipe (which trains the score model and the classifier):
  debiaslab run -c configs/experiments/digits_classifier_guidance.yaml --set output_dir=OUT
  .venv/bin/python tests/benchmarks/cg_scale_table.py --output-dir OUT [--scales 0 1 2 4 8]

For every scale it samples the same seeds (image i steered toward digit i mod 10) with the
experiment's sampler, evaluates them with the experiment's metrics against all 1,797 digits,
prints a markdown table (label accuracy, FID, precision, recall, coverage), and writes a grid
image: one row per scale, the same seeds in every row (OUT/cg_scales.png).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from debiaslab import plugins
from debiaslab.config import load_config
from debiaslab.data.dataset import ImageDataset
from debiaslab.data.locate import train_data_path
from debiaslab.report import save_image_grid
from debiaslab.sampling import classifier_checkpoint
from debiaslab.stages import build_metric_extractor, evaluate_samples, reference_path, sample

plugins.load()  # the methods register their sections, recipes and losses, as the CLI does

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs/experiments/digits_classifier_guidance.yaml"
GRID_SEEDS = 20  # two per digit in the grid


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 2.0, 4.0, 8.0])
    ap.add_argument("--num-samples", type=int, default=500)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    cfg = load_config(CONFIG, [f"output_dir={args.output_dir}", "tracking.enabled=false",
                               f"sample.num_samples={args.num_samples}", *args.overrides])
    classifier = classifier_checkpoint(cfg, "")
    extractor = build_metric_extractor(cfg)
    reference_path(cfg)
    out = Path(args.output_dir) / "cg_scales"
    rows, grid = [], []
    for scale in args.scales:
        guidance = tuple({**e, "scale": scale} if e["type"] == "classifier" else e
                         for e in cfg.sample.guidance)
        scfg = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, guidance=guidance))
        t0 = time.perf_counter()
        res = sample(scfg, cfg.run_dir, out_dir=out / f"w{scale:g}", progress=False,
                     classifier=classifier)
        seconds = time.perf_counter() - t0
        sampler = cfg.sample.samplers[0]
        ev = evaluate_samples(scfg, res.artifacts[f"samples_{sampler}"], extractor=extractor,
                              name=f"w{scale:g}", out_dir=out / "eval")
        m = ev.metrics
        rows.append((scale, m["label_accuracy"], m["fid"], m["precision"], m["recall"],
                     m["coverage"], seconds))
        ds = ImageDataset.load(res.artifacts[f"samples_{sampler}"])
        order = sorted(range(len(ds.ids)), key=lambda i: ds.ids[i])[:GRID_SEEDS]
        grid.append(ds.to_float(ds.images[order]))
        print(f"scale {scale:g}: accuracy {m['label_accuracy']:.3f}, FID {m['fid']:.1f} "
              f"({seconds:.0f} s sampling)", flush=True)
    path = save_image_grid(torch.cat(grid), Path(args.output_dir) / "cg_scales.png",
                           GRID_SEEDS, scale=2)
    n_train = len(ImageDataset.load(train_data_path(cfg)).ids)
    print(f"\n{args.num_samples} samples per scale, {cfg.sample.samplers[0]} "
          f"{cfg.sample.steps} steps, score model {cfg.train.steps} steps, classifier "
          f"{cfg.classifier.train.steps} steps, {n_train} training images; grid: {path}\n")
    print("| scale w | accuracy on target | FID | precision | recall | coverage | s |")
    print("|---|---|---|---|---|---|---|")
    for scale, acc, fid, prec, rec, cov, sec in rows:
        print(f"| {scale:g} | {acc:.3f} | {fid:.1f} | {prec:.3f} | {rec:.3f} | {cov:.3f} | "
              f"{sec:.0f} |")


if __name__ == "__main__":
    main()
