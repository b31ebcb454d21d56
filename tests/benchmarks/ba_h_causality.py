"""How much a Balancing Act backbone's output depends on its h-space: the condition for h-space
guidance to move an attribute at all.

  .venv/bin/python tests/benchmarks/ba_h_causality.py --output-dir OUT --name digits_ba-s0 \\
      [--attribute bold --alphas 0 1 2 --samples 200]

For the run's backbone and its h side table (run the recipe first): (1) per timestep, the mean
change of the Tweedie estimate x0_hat of real training images, noised to t, when h is replaced by
zero, relative to |x0|: the share of the prediction that flows through h rather than the skip
connections; (2) the attribute's share in samples (the config's sampler, the digits extractor's
attribute head) when every step from t = 978 down to 500 adds alpha |h| times the unit
class-mean difference of h at that timestep (mean h of the attribute's images minus the others',
from the side table): if h steered the attribute, the share would follow alpha.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from debiaslab import plugins
from debiaslab.config import load_config
from debiaslab.data.dataset import ImageDataset
from debiaslab.data.pixels import to_uint8
from debiaslab.data.side_tables import join, read_side_table
from debiaslab.diffusion.guidance import HSpaceGuidance
from debiaslab.diffusion.samplers import sample
from debiaslab.metrics.features import build_extractor
from debiaslab.recipes import recorded_outputs
from debiaslab.sampling import load_trained

plugins.load()  # the methods register their sections, recipes and losses, as the CLI does

from debiaslab.methods.balancing_act import h_table, kept_timesteps  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs/experiments/digits_balancing_act.yaml"
TIMESTEPS = (900, 733, 500, 300, 100)
EDIT_LOW, EDIT_HIGH = 500, 978


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--name", default="digits_ba-s0")
    ap.add_argument("--attribute", default="bold")
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.0, 1.0, 2.0])
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    cfg = load_config(CONFIG, [f"output_dir={args.output_dir}", f"name={args.name}",
                               "tracking.enabled=false", *args.overrides])
    trained = load_trained(recorded_outputs(cfg)["score_model"], device="cpu")
    net, schedule = trained.model, trained.denoiser.schedule
    dataset = ImageDataset.load(cfg.dataset_path / "biased")
    x0 = dataset.to_float(dataset.images[:256])
    torch.manual_seed(0)
    print(f"{args.name}: h {list(net.h_shape())}; x0_hat change when h = 0, relative to |x0| "
          f"({len(x0)} training images):")
    for t in TIMESTEPS:
        abar = schedule.alphas_cumprod[t].float()
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * torch.randn_like(x0)
        tt = torch.full((len(x0),), float(t))
        with torch.no_grad():
            eps = net(x_t, tt)
            with net.h_edit(lambda h, _t: torch.zeros_like(h)):
                eps_zero = net(x_t, tt)
        change = ((eps_zero - eps) * ((1 - abar) / abar).sqrt()).flatten(1).norm(dim=1)
        print(f"  t = {t:3d}: {float((change / x0.flatten(1).norm(dim=1)).mean()):.3f}")
    column = list(dataset.attr_names).index(args.attribute)
    table = read_side_table(dataset.manifest.path, h_table(cfg), ["h"])
    h = torch.from_numpy(join(dataset.ids, table, "h").astype(np.float32))
    member = dataset.attributes[:, column].bool()
    direction = h[member].mean(0) - h[~member].mean(0)  # [steps, C, H, W]
    grid = kept_timesteps(cfg.ba, cfg.diffusion.num_timesteps)
    extractor = build_extractor("digits")
    options = dict(cfg.sample.options.get("ddim", {}))
    seeds = list(range(args.samples))
    print(f"share of {args.attribute} = 1 in {args.samples} samples (ddim {options}), h += alpha "
          f"|h| u_t at t in [{EDIT_LOW}, {EDIT_HIGH}], u_t the unit class-mean difference:")
    for alpha in args.alphas:
        def edit(hh: torch.Tensor, t: torch.Tensor, alpha: float = alpha) -> torch.Tensor:
            tt = float(t.reshape(-1)[0])
            if not EDIT_LOW <= tt <= EDIT_HIGH:
                return hh
            k = int(np.argmin([abs(tt - g) for g in grid]))
            unit = direction[k] / direction[k].norm()
            return hh + alpha * hh.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * unit
        x = sample("ddim", HSpaceGuidance(trained.denoiser, edit), seeds, tuple(x0.shape[1:]),
                   steps=cfg.sample.steps, **options)
        ext = extractor.extract(to_uint8(x.clamp(-1, 1)).numpy())
        print(f"  alpha {alpha:g}: {float(ext.attributes[:, column].mean()):.3f}")


if __name__ == "__main__":
    main()
