"""Minority Guidance on digits: uniqueness and quality against the target class l and scale w,
over several training seeds of the backbone.

Run after the recipe for each seed (it trains the backbone, scores the digits, trains the
minority classifier):
  debiaslab run -c configs/experiments/digits_minority_guidance.yaml --seeds 0 1 2 \\
      --set output_dir=OUT
  .venv/bin/python tests/benchmarks/mg_results.py --output-dir OUT --seeds 0 1 2 \\
      [--targets 0 5 9 --scales 1 3 --num-samples 300]
(without --seeds: the config's own run).

For every seed it samples the same seeds unguided (w = 0) and guided toward each target at each
scale, with the experiment's sampler, and evaluates them: AvgkNN, LOF and Rarity against all
real digits, FID against all digits and cFID against the minority reference (the top 10% of
real minority scores). Prints a markdown table of mean ± 95% t-interval over the seeds and writes
a grid (OUT/mg_grid.png): unguided vs guided toward the rarest class at the largest scale, the
same seeds, first training seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import torch

from debiaslab import plugins
from debiaslab.compare import Summary
from debiaslab.config import load_config
from debiaslab.data.dataset import ImageDataset
from debiaslab.experiment import seed_configs
from debiaslab.recipes import recorded_outputs
from debiaslab.report import save_image_grid
from debiaslab.sampling import classifier_checkpoint
from debiaslab.stages import build_metric_extractor, evaluate_samples, sample

plugins.load()  # the methods register their sections, recipes and losses, as the CLI does

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs/experiments/digits_minority_guidance.yaml"
METRICS = ("avg_knn", "lof", "rarity", "cfid_minority", "fid")
GRID_SEEDS = 16


def cell(s: Summary) -> str:
    """mean ± 95% t half-width, both to the same decimals (fewer for larger values)."""
    decimals = 0 if abs(s.mean) >= 100 else 2 if abs(s.mean) >= 10 else 3
    if s.n < 2 or not math.isfinite(s.half_width):
        return f"{s.mean:.{decimals}f}"
    return f"{s.mean:.{decimals}f} ± {s.half_width:.{decimals}f}"


def guided(cfg, target: int, scale: float):
    entries = tuple({**e, "scale": scale, "target": target} if e["type"] == "classifier" else e
                    for e in cfg.sample.guidance)
    return dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, guidance=entries))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--output-dir", required=True)
    # training seeds of the backbone (runs <name>-s<seed>, as `debiaslab run --seeds`); none:
    # the config's own run
    ap.add_argument("--seeds", type=int, nargs="*", default=[])
    ap.add_argument("--targets", type=int, nargs="+", default=None)
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0])
    ap.add_argument("--num-samples", type=int, default=300)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    overrides = [f"output_dir={args.output_dir}", "tracking.enabled=false",
                 f"sample.num_samples={args.num_samples}", *args.overrides]
    configs = (seed_configs(str(CONFIG), overrides, args.seeds) if args.seeds
               else [load_config(CONFIG, overrides)])
    L = configs[0].minority.num_classes
    targets = args.targets if args.targets is not None else [0, L // 2, L - 1]
    cells = [("unguided", 0, 0.0)] + [(f"l={t}, w={w:g}", t, w) for t in targets
                                      for w in args.scales]
    values: dict[str, dict[str, list[float]]] = {c[0]: {m: [] for m in METRICS} for c in cells}
    grid = []
    sampler = configs[0].sample.samplers[0]
    for cfg in configs:
        extractor = build_metric_extractor(cfg)
        classifier = classifier_checkpoint(cfg, "")
        backbone = recorded_outputs(cfg)["score_model"]  # the train stage's (or a reused) model
        out = Path(args.output_dir) / "mg_results" / cfg.name
        for name, target, scale in cells:
            scfg = guided(cfg, target, scale)
            tag = "unguided" if scale == 0 else f"l{target}-w{scale:g}"
            res = sample(scfg, backbone, out_dir=out / tag, progress=False,
                         classifier=classifier)
            path = res.artifacts[f"samples_{sampler}"]
            ev = evaluate_samples(scfg, path, extractor=extractor, name=tag,
                                  out_dir=out / "eval")
            for m in METRICS:
                values[name][m].append(float(ev.metrics[m]))
            print(f"{cfg.name} {name}: " + ", ".join(f"{m} {ev.metrics[m]:.3f}"
                                                     for m in METRICS), flush=True)
            if cfg is configs[0] and (scale == 0 or (target == L - 1
                                                     and scale == max(args.scales))):
                ds = ImageDataset.load(path)
                order = sorted(range(len(ds.ids)), key=lambda i: ds.ids[i])[:GRID_SEEDS]
                grid.append(ds.to_float(ds.images[order]))
    path = save_image_grid(torch.cat(grid), Path(args.output_dir) / "mg_grid.png", GRID_SEEDS,
                           scale=2)
    c0 = configs[0]
    print(f"\n{len(configs)} backbone seeds, {args.num_samples} samples per cell, {sampler} "
          f"{c0.sample.steps} steps, backbone {c0.train.steps} steps, minority classifier "
          f"{c0.classifier.train.steps} steps, L = {L}, distance {c0.minority.distance}; "
          f"grid: {path}\n")
    print("| cell | " + " | ".join(METRICS) + " |")
    print("|---|" + "---|" * len(METRICS))
    for name, *_ in cells:
        print(f"| {name} | " + " | ".join(cell(Summary.of(values[name][m]))
                                          for m in METRICS) + " |")


if __name__ == "__main__":
    main()
