"""Training throughput: debiaslab's Trainer vs a minimal hand-written PyTorch loop, same model.

Run: .venv/bin/python tests/benchmarks/bench_training.py [--steps N]
Prints steps/s of both and their ratio (target >= 0.95), measured in one run, interleaved.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from debiaslab.config import load_config
from debiaslab.data.dataset import ImageDataset
from debiaslab.data.sources import build_dataset
from debiaslab.diffusion.schedules import build_schedule
from debiaslab.training.loop import Trainer, build_net

ROOT = Path(__file__).resolve().parents[2]


def plain_loop(cfg, dataset, steps: int) -> float:
    """The minimal loop: random batch, random t, eps loss, AdamW. Returns steps/s."""
    torch.manual_seed(0)
    net = build_net(cfg, tuple(dataset.shape), dataset.num_classes)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.train.lr)
    abar = build_schedule("linear").alphas_cumprod.float()
    images = dataset.images
    labels = dataset.labels
    b = cfg.train.batch_size
    t0 = None
    for i in range(steps + 5):
        if i == 5:
            t0 = time.perf_counter()
        idx = torch.randint(len(images), (b,))
        x0 = images[idx].float() / 127.5 - 1
        t = torch.randint(0, 1000, (b,))
        eps = torch.randn_like(x0)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = (net(x_t, t.float(), y=labels[idx]) - eps).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()
    return steps / (time.perf_counter() - t0)


def ours(cfg, dataset, steps: int, workdir: Path) -> float:
    warm = 5
    cfg.train.steps = warm
    cfg.train.checkpoint_every = 10**9
    trainer = Trainer(cfg, dataset, workdir, progress=False)
    trainer.fit()
    trainer.cfg.train.steps = warm + steps
    t0 = time.perf_counter()
    for s in range(warm, warm + steps):
        trainer.train_step(trainer.make_batch(s))
    return steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = build_dataset("digits", Path(tmp) / "d", imbalance="long_tail", imb_factor=0.1)
        dataset = ImageDataset.load(data)
        cfg = load_config(ROOT / "configs/experiments/digits_lt_baseline.yaml",
                          [f"output_dir={tmp}", "train.device=cpu", "train.checkpoint_every=100000"])
        r_ours, r_plain = [], []
        for r in range(args.rounds):  # interleave so machine noise hits both alike
            r_plain.append(plain_loop(cfg, dataset, args.steps))
            r_ours.append(ours(cfg, dataset, args.steps, Path(tmp) / f"run{r}"))
        best_ours, best_plain = max(r_ours), max(r_plain)
        print(f"model: {cfg.model.net} mc={cfg.model.model_channels} "
              f"mult={cfg.model.channel_mult} batch={cfg.train.batch_size}, device=cpu")
        print(f"plain loop : {best_plain:.2f} steps/s (rounds: "
              + ", ".join(f"{v:.2f}" for v in r_plain) + ")")
        print(f"debiaslab  : {best_ours:.2f} steps/s (rounds: "
              + ", ".join(f"{v:.2f}" for v in r_ours) + ")")
        print(f"ratio debiaslab/plain = {best_ours / best_plain:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
