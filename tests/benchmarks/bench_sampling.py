"""Sampling throughput: debiaslab samplers vs a minimal hand-written DDIM loop, same model.

Run: .venv/bin/python tests/benchmarks/bench_sampling.py [--steps N --batch B]
Prints network evaluations per second (images x steps / s) and the ratio (target >= 0.95).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from debiaslab import plugins
from debiaslab.config import load_config
from debiaslab.diffusion.losses import build_loss
from debiaslab.diffusion.samplers import sample
from debiaslab.training.loop import build_net

plugins.load()  # the methods register their sections, recipes and losses, as the CLI does

ROOT = Path(__file__).resolve().parents[2]


@torch.no_grad()
def plain_ddim(net, abar: torch.Tensor, ts: list[int], x: torch.Tensor, y: torch.Tensor):
    for i, t in enumerate(ts):
        a_t = float(abar[t])
        a_n = float(abar[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        eps = net(x, torch.full((len(x),), float(t)), y=y)
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        x = math.sqrt(a_n) * x0 + math.sqrt(1 - a_n) * eps
    return x


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    cfg = load_config(ROOT / "configs/experiments/digits_lt_baseline.yaml")
    torch.manual_seed(0)
    net = build_net(cfg, (1, 16, 16), 10).eval()
    for p in net.parameters():  # a non-zero output head so the sampler does real arithmetic
        p.data.normal_(0, 0.02)
    loss = build_loss(cfg)
    denoiser = loss.denoiser(net)
    seeds = list(range(args.batch))
    y = torch.arange(args.batch) % 10
    ts = denoiser.schedule.timesteps(args.steps, "leading").tolist()
    evals = args.batch * args.steps
    res: dict[str, list[float]] = {"plain ddim": [], "ddim": [], "dpmpp_2m": []}
    for _ in range(args.rounds):
        x = torch.randn(args.batch, 1, 16, 16)
        t0 = time.perf_counter()
        plain_ddim(net, denoiser.schedule.alphas_cumprod, ts, x, y)
        res["plain ddim"].append(evals / (time.perf_counter() - t0))
        for name in ("ddim", "dpmpp_2m"):
            t0 = time.perf_counter()
            sample(name, denoiser, seeds, (1, 16, 16), steps=args.steps, cond={"y": y})
            res[name].append(evals / (time.perf_counter() - t0))
    base = max(res["plain ddim"])
    print(f"batch {args.batch}, {args.steps} steps, model mc={cfg.model.model_channels}, cpu")
    for name, vals in res.items():
        print(f"{name:11s}: {max(vals):8.1f} evals/s  ratio vs plain = {max(vals) / base:.3f}"
              f"  (rounds: {', '.join(f'{v:.1f}' for v in vals)})")


if __name__ == "__main__":
    main()
