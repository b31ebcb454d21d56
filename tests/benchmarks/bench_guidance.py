"""Guided sampling's cost per step relative to unguided sampling, same score model.

Run: .venv/bin/python tests/benchmarks/bench_guidance.py [--steps N --batch B --rounds R]

The score model and the noise-conditional classifier are the ones of
configs/experiments/digits_classifier_guidance.yaml (random weights: the cost does not depend on
them). Classifier guidance adds one classifier forward and one backward through the classifier
(not through the score model) per step. Prints seconds per step of each and the ratio guided /
unguided (target <= 2.5x) for the eps form (DDIM) and the mean-shift form (DDPM).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from debiaslab import plugins
from debiaslab.config import load_config
from debiaslab.diffusion.denoiser import VPDenoiser
from debiaslab.diffusion.guidance import GuidanceContext, build_guidance
from debiaslab.diffusion.samplers import sample
from debiaslab.diffusion.schedules import build_schedule
from debiaslab.nets import build_net

plugins.load()  # the methods register their sections, recipes and losses, as the CLI does

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs/experiments/digits_classifier_guidance.yaml"
SHAPE = (1, 16, 16)
NUM_CLASSES = 10


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    cfg = load_config(CONFIG)
    torch.manual_seed(0)
    net = build_net(cfg.model, shape=SHAPE, num_classes=NUM_CLASSES).eval()
    clf = build_net(cfg.classifier.model, shape=SHAPE, num_classes=NUM_CLASSES,
                    num_outputs=NUM_CLASSES, where="classifier.model").eval()
    for module in (net, clf):
        for p in module.parameters():  # non-zero heads so every layer does real arithmetic
            p.data.normal_(0, 0.02)
        module.requires_grad_(False)
    den = VPDenoiser(net, build_schedule(cfg.diffusion.schedule, cfg.diffusion.num_timesteps))
    seeds = list(range(args.batch))
    rows = []
    for sampler in ("ddim", "ddpm"):
        ctx = GuidanceContext(sampler=sampler, load_classifier=lambda path, device: (
            clf, {"num_outputs": NUM_CLASSES}))
        guided = build_guidance(den, [{"type": "classifier", "checkpoint": "x", "scale": 4.0}],
                                ctx)
        cond = guided.sample_cond(seeds)
        times = {"unguided": [], "guided": []}
        for _ in range(args.rounds):
            for name, d, c in (("unguided", den, {}), ("guided", guided, cond)):
                t0 = time.perf_counter()
                sample(sampler, d, seeds, SHAPE, steps=args.steps, cond=c)
                times[name].append((time.perf_counter() - t0) / args.steps)
        plain, with_cg = min(times["unguided"]), min(times["guided"])
        rows.append((sampler, guided.form, plain, with_cg, with_cg / plain))
    print(f"batch {args.batch}, {args.steps} steps, best of {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads")
    print(f"{'sampler':8} {'form':11} {'unguided s/step':>16} {'guided s/step':>14} "
          f"{'ratio':>6}")
    for sampler, form, plain, with_cg, ratio in rows:
        print(f"{sampler:8} {form:11} {plain:16.4f} {with_cg:14.4f} {ratio:6.2f}")
    print(f"target: guided / unguided <= 2.5 -> "
          f"{'met' if all(r[-1] <= 2.5 for r in rows) else 'NOT met'}")


if __name__ == "__main__":
    main()
