"""Balancing Act on digits: vanilla vs sample guidance vs distribution guidance vs image-space
guidance, from one backbone per training seed, at matched sample counts and guidance batch.

  .venv/bin/python tests/benchmarks/ba_results.py --output-dir OUT --setting one \\
      [--seeds 0 1 2 --num-samples 500 --scale-distribution S --scale-sample S --scale-image S]

Settings: ``one``: a 90/10 bias on bold, heads and guidance on bold, p_ref 50/50; ``two``: a
joint 90/10 bias on (bold and even), heads on bold+even, p_ref 50/50 on each. For each training
seed the script runs the recipe (configs/experiments/digits_balancing_act.yaml: backbone,
h-vectors on Ray Data, heads on Ray Train; runs that are done are reused), trains the
image-space baseline's classifier of clean images once per attribute (recipe
subgroup_classifier on the same biased set, label attr:<a>, t = 0), then samples the same seeds
with each variant and evaluates them (FID against all digits; each attribute's share and its
FD to the target as the digits extractor's attribute heads see them; the joint FD). Prints a
markdown table of mean ± 95% t half-width over the seeds and writes OUT/ba_<setting>.png
(shares per variant) and OUT/ba_grid_<setting>.png (the same seeds per variant, first seed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from debiaslab import plugins
from debiaslab.compare import Summary
from debiaslab.config import load_config
from debiaslab.data.dataset import ImageDataset
from debiaslab.experiment import run_experiment, seed_configs
from debiaslab.recipes import recorded_outputs
from debiaslab.report import save_image_grid
from debiaslab.stages import build_metric_extractor, evaluate_samples, sample

plugins.load()  # the methods register their sections, recipes and losses, as the CLI does

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs/experiments/digits_balancing_act.yaml"
SETTINGS = {
    "one": {"attributes": ["bold"], "bias": "bold"},
    "two": {"attributes": ["bold", "even"], "bias": "bold+even"},
}
GRID_SEEDS = 20
CLASSIFIER = ["recipe=subgroup_classifier", "classifier.input=noisy_images",
              "classifier.timestep_range=[0, 0]", "classifier.val_fraction=0.1",
              "classifier.val_buckets=1", "classifier.model.options={pool: attention}",
              "classifier.train.steps=1000", "classifier.train.batch_size=128",
              "classifier.train.lr=1.0e-3", "classifier.train.weight_decay=0.05",
              "classifier.train.ema_decay=0.0"]


def base_overrides(setting: str, output_dir: str, num_samples: int, extra: list[str]) -> list:
    attrs = SETTINGS[setting]["attributes"]
    p_ref = [[0.5, 0.5]] * len(attrs)
    return [f"output_dir={output_dir}", "tracking.enabled=false",
            f"data.bias_attribute={SETTINGS[setting]['bias']}",
            f"h_classifier.label={'+'.join(f'attr:{a}' for a in attrs)}",
            f"sample.num_samples={num_samples}",
            f"sample.guidance=[{{type: balancing_act, scale: 1.0, p_ref: {p_ref}}}]",
            f"name={'digits_ba' if setting == 'one' else 'digits_ba_' + setting}", *extra]


def variants(setting: str, args: argparse.Namespace, classifiers: dict[str, str]) -> dict:
    """{name: sample.guidance entries}."""
    attrs = SETTINGS[setting]["attributes"]
    p_ref = tuple((0.5, 0.5) for _ in attrs)
    out = {"vanilla": (),
           "sample": ({"type": "balancing_act", "mode": "sample",
                       "scale": args.scale_sample},),
           "distribution": ({"type": "balancing_act", "mode": "distribution", "p_ref": p_ref,
                             "scale": args.scale_distribution},),
           "image_space": tuple({"type": "image_attribute", "mode": "distribution",
                                 "checkpoint": classifiers[a], "p_ref": ((0.5, 0.5),),
                                 "scale": args.scale_image} for a in attrs)}
    return out


def train_classifiers(setting: str, args: argparse.Namespace) -> dict[str, str]:
    """The image-space baseline's classifier of clean images, one per attribute (once)."""
    out = {}
    for a in SETTINGS[setting]["attributes"]:
        cfg = load_config(CONFIG, base_overrides(setting, args.output_dir, args.num_samples,
                                                 args.overrides)
                          + CLASSIFIER + [f"classifier.label=attr:{a}",
                                          f"name=digits_ba_{setting}_clf_{a}"])
        result = run_experiment(cfg, progress=False)
        out[a] = str(recorded_outputs(cfg)["classifier"])
        print(f"image classifier attr:{a}: val accuracy "
              f"{result.metrics.get('classifier/val/accuracy', float('nan')):.3f}", flush=True)
    return out


def cell(s: Summary) -> str:
    decimals = 1 if abs(s.mean) >= 10 else 3
    if s.n < 2 or not math.isfinite(s.half_width):
        return f"{s.mean:.{decimals}f}"
    return f"{s.mean:.{decimals}f} ± {s.half_width:.{decimals}f}"


def plot(shares: dict, attrs: list[str], path: Path) -> Path:
    from debiaslab.report import save_figure, shares_figure

    names = [f"{a}={c}" for a in attrs for c in (0, 1)]
    series = {v: [float(np.mean(shares[v][n])) for n in names] for v in shares}
    series = {"target (p_ref)": [0.5] * len(names), **series}
    return save_figure(shares_figure(series, names, title="digits: attribute shares "
                                     "(mean over training seeds)", xlabel="attribute = class"),
                       path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="one")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--num-samples", type=int, default=500)
    ap.add_argument("--scale-distribution", type=float, default=16.0)
    ap.add_argument("--scale-sample", type=float, default=16.0)
    ap.add_argument("--scale-image", type=float, default=1000.0)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    setting, attrs = args.setting, SETTINGS[args.setting]["attributes"]
    t_start = time.perf_counter()
    configs = seed_configs(str(CONFIG), base_overrides(setting, args.output_dir,
                                                       args.num_samples, args.overrides),
                           args.seeds)
    for cfg in configs:
        result = run_experiment(cfg, progress=False)
        print(f"{cfg.name}: heads val accuracy "
              f"{result.metrics.get('h_classifier/val/accuracy', float('nan')):.3f}", flush=True)
    classifiers = train_classifiers(setting, args)
    cells = variants(setting, args, classifiers)
    metrics = ["fid", *(f"ba/fd_target_{a}" for a in attrs)]
    if len(attrs) > 1:
        metrics.append("ba/fd_target_joint")
    values = {v: {m: [] for m in metrics} for v in cells}
    shares = {v: {f"{a}={c}": [] for a in attrs for c in (0, 1)} for v in cells}
    grid = []
    out_root = Path(args.output_dir) / f"ba_results_{setting}"
    for cfg in configs:
        extractor = build_metric_extractor(cfg)
        outputs = recorded_outputs(cfg)
        for name, entries in cells.items():
            scfg = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample,
                                                                       guidance=entries))
            out = out_root / cfg.name / name
            t0 = time.perf_counter()
            res = sample(scfg, outputs["score_model"], out_dir=out, progress=False,
                         artifacts={"h_classifier": outputs["h_classifier"]}, backend="local")
            seconds = time.perf_counter() - t0
            path = res.artifacts[f"samples_{scfg.sample.samplers[0]}"]
            ev = evaluate_samples(scfg, path, extractor=extractor, name=name,
                                  out_dir=out_root / cfg.name / "eval")
            for m in metrics:
                values[name][m].append(float(ev.metrics[m]))
            for a in attrs:
                for c in (0, 1):
                    shares[name][f"{a}={c}"].append(float(ev.metrics[f"ba/share_{a}_{c}"]))
            print(f"{cfg.name} {name} ({seconds:.0f} s): " + ", ".join(
                f"{m} {ev.metrics[m]:.3f}" for m in metrics) + ", shares " + ", ".join(
                f"{a}=1 {ev.metrics[f'ba/share_{a}_1']:.3f}" for a in attrs), flush=True)
            if cfg is configs[0]:
                ds = ImageDataset.load(path)
                order = sorted(range(len(ds.ids)), key=lambda i: ds.ids[i])[:GRID_SEEDS]
                grid.append(ds.to_float(ds.images[order]))
    grid_path = save_image_grid(torch.cat(grid), Path(args.output_dir) /
                                f"ba_grid_{setting}.png", GRID_SEEDS, scale=2)
    fig = plot(shares, attrs, Path(args.output_dir) / f"ba_{setting}.png")
    c0 = configs[0]
    print(f"\n{len(configs)} training seeds ({', '.join(map(str, args.seeds))}), "
          f"{args.num_samples} samples per cell, guidance batch {c0.sample.batch_size}, ddim "
          f"eta 1 {c0.sample.steps} steps (floor grid), backbone {c0.train.steps} steps, heads "
          f"{c0.h_classifier.train.steps} steps; scales: sample {args.scale_sample:g}, "
          f"distribution {args.scale_distribution:g}, image space {args.scale_image:g}; "
          f"{time.perf_counter() - t_start:.0f} s; grid {grid_path}; plot {fig}\n")
    share_cols = [f"{a}=1 share" for a in attrs]
    print("| variant | " + " | ".join(metrics + share_cols) + " |")
    print("|---|" + "---|" * (len(metrics) + len(share_cols)))
    for name in cells:
        row = [cell(Summary.of(values[name][m])) for m in metrics]
        row += [cell(Summary.of(shares[name][f"{a}=1"])) for a in attrs]
        print(f"| {name} | " + " | ".join(row) + " |")
    (Path(args.output_dir) / f"ba_{setting}.json").write_text(json.dumps(
        {"values": values, "shares": shares, "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
