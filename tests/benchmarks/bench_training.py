"""Training throughput: debiaslab's Trainer vs a minimal hand-written PyTorch loop, same model.

Run: .venv/bin/python tests/benchmarks/bench_training.py [--steps N]
The two loops alternate step by step (ABAB...) so machine noise hits both alike; the ratio of
median step times is printed (target >= 0.95). Our step includes EMA, grad clipping, LR warm-up
and the NaN guard; the plain loop has none of them.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from debiaslab import plugins
from debiaslab.config import load_config
from debiaslab.data.dataset import ImageDataset
from debiaslab.data.sources import build_dataset
from debiaslab.diffusion.schedules import build_schedule
from debiaslab.training.loop import Trainer, build_net

plugins.load()  # the methods register their sections, recipes and losses, as the CLI does

ROOT = Path(__file__).resolve().parents[2]


class PlainLoop:
    """The minimal loop: random batch, random t, eps MSE, AdamW."""

    def __init__(self, cfg, dataset) -> None:
        torch.manual_seed(0)
        self.net = build_net(cfg, tuple(dataset.shape), dataset.num_classes)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.train.lr)
        self.abar = build_schedule("linear").alphas_cumprod.float()
        self.images, self.labels = dataset.images, dataset.labels
        self.batch = cfg.train.batch_size

    def step(self) -> float:
        idx = torch.randint(len(self.images), (self.batch,))
        x0 = self.images[idx].float() / 127.5 - 1
        t = torch.randint(0, 1000, (self.batch,))
        eps = torch.randn_like(x0)
        a = self.abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = (self.net(x_t, t.float(), y=self.labels[idx]) - eps).pow(2).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--warmup", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = build_dataset("digits", Path(tmp) / "d", imbalance="long_tail", imb_factor=0.1)
        dataset = ImageDataset.load(data)
        cfg = load_config(ROOT / "configs/experiments/digits_lt_baseline.yaml",
                          [f"output_dir={tmp}", "train.device=cpu"])
        plain = PlainLoop(cfg, dataset)
        trainer = Trainer(cfg, dataset, Path(tmp) / "run", progress=False)
        t_plain, t_ours = [], []
        for s in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            plain.step()
            t1 = time.perf_counter()
            trainer.train_step(trainer.make_batch(s))
            t2 = time.perf_counter()
            if s >= args.warmup:
                t_plain.append(t1 - t0)
                t_ours.append(t2 - t1)
        med_plain, med_ours = statistics.median(t_plain), statistics.median(t_ours)
        print(f"model: {cfg.model.net} mc={cfg.model.model_channels} "
              f"mult={cfg.model.channel_mult} batch={cfg.train.batch_size}, cpu, "
              f"{args.steps} alternating steps each")
        print(f"plain loop : {1 / med_plain:.2f} steps/s (median step {med_plain * 1e3:.1f} ms)")
        print(f"debiaslab  : {1 / med_ours:.2f} steps/s (median step {med_ours * 1e3:.1f} ms)")
        print(f"ratio debiaslab/plain steps/s = {med_plain / med_ours:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
