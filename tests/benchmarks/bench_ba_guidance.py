"""Balancing Act's guidance cost per step relative to unguided sampling, same backbone.

Run: .venv/bin/python tests/benchmarks/bench_ba_guidance.py [--batch B --rounds R]

The backbone and the heads have the shapes of configs/experiments/digits_balancing_act.yaml
(random weights: the cost does not depend on them); the sampler is the config's stochastic DDIM
on the 50-step floor grid. Distribution and sample guidance add, per guided step, one forward
and one backward of the linear head on h (never through the UNet); the image-space baseline
adds a backward through the UNet and a classifier. Prints seconds per step of each and the
ratio guided / unguided (target for h-space guidance: <= 1.15x).
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

from debiaslab.methods.balancing_act import HHeads, kept_timesteps  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs/experiments/digits_balancing_act.yaml"
SHAPE = (1, 16, 16)
TARGET = 1.15


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    cfg = load_config(CONFIG)
    torch.manual_seed(0)
    net = build_net(cfg.model, shape=SHAPE, num_classes=0).eval()
    grid = kept_timesteps(cfg.ba, cfg.diffusion.num_timesteps)
    heads = HHeads(net.h_shape(), 2, grid=grid).eval()
    clf = build_net(cfg.classifier.model, shape=SHAPE, num_classes=0, num_outputs=2,
                    where="classifier.model").eval()
    for module in (net, heads, clf):
        for p in module.parameters():  # non-zero weights so every layer does real arithmetic
            p.data.normal_(0, 0.02)
        module.requires_grad_(False)
    den = VPDenoiser(net, build_schedule(cfg.diffusion.schedule, cfg.diffusion.num_timesteps))
    info = {"checkpoint": "x", "h_heads": {"grid": grid, "groups": [2],
                                           "attributes": ["attr:bold"]},
            "input": "noisy_images", "label": "attr:bold", "num_outputs": 2, "time_input": True}
    models = {"balancing_act": heads, "image_attribute": clf}
    ctx = GuidanceContext(sampler="ddim", load_classifier=lambda path, device: (
        models[path], info))
    variants = {
        "unguided": (den, {}),
        "distribution": (build_guidance(den, [{"type": "balancing_act", "checkpoint":
                                               "balancing_act", "scale": 2.0}], ctx), {}),
        "sample": None,
        "image_space": None,
    }
    seeds = list(range(args.batch))
    for name, entry in (("sample", {"type": "balancing_act", "checkpoint": "balancing_act",
                                    "mode": "sample", "scale": 2.0}),
                        ("image_space", {"type": "image_attribute",
                                         "checkpoint": "image_attribute", "mode": "sample",
                                         "scale": 2.0})):
        guided = build_guidance(den, [entry], ctx)
        variants[name] = (guided, guided.sample_cond(seeds))
    options = dict(cfg.sample.options["ddim"])
    steps = cfg.sample.steps
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):  # interleaved, best of rounds: the machine is shared
        for name, (d, cond) in variants.items():
            t0 = time.perf_counter()
            sample("ddim", d, seeds, SHAPE, steps=steps, cond=cond, **options)
            times[name].append((time.perf_counter() - t0) / steps)
    base = min(times["unguided"])
    print(f"batch {args.batch}, {steps} steps (ddim eta {options['eta']}, spacing "
          f"{options['spacing']}), best of {args.rounds} rounds, {torch.get_num_threads()} "
          f"threads, h {list(net.h_shape())}, {len(grid)} heads")
    print(f"{'guidance':14} {'s/step':>8} {'ratio':>6}")
    for name in variants:
        print(f"{name:14} {min(times[name]):8.4f} {min(times[name]) / base:6.2f}")
    h_space = max(min(times[n]) / base for n in ("distribution", "sample"))
    print(f"target: h-space guided / unguided <= {TARGET} -> "
          f"{'met' if h_space <= TARGET else 'NOT met'}")


if __name__ == "__main__":
    main()
