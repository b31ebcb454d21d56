"""TIW-DSM on digits: the baselines, both loss forms and the ablations, over training seeds.

  .venv/bin/python tests/benchmarks/tiw_results.py --setting long_tail --output-dir OUT \\
      [--seeds 0 1 2] [--methods ...] [--processes 2]

Settings (the data build; everything else is the shipped digits TIW configs):
  long_tail       digits-LT (rho 0.1) and a 50-image class-balanced reference
                  (configs/experiments/digits_lt_*.yaml as shipped);
  attribute_bias  90/10 on the derived attribute `bold` and a 64-image reference balanced over it
                  (the same configs with the data section overridden, names digits_bold_*).

Methods: dsm_obs, dsm_ref, iw_dsm, tiw_paper, tiw_code, w_only (no correction), c_only (no
weight). Every (method, seed) is one experiment run by the recipe (finished stages are skipped,
so an interrupted run continues), `--processes` of them side by side, one torch thread each.

Prints a markdown table of mean ± 95% t half-width over the seeds (FID against all digits,
precision, recall, the bias statistic's TV to the reference and to the biased shares, and the
minority share: the summed sample share of the subgroups rarer in the biased set than in the
reference), and writes OUT/tiw_<setting>.png: FID against TV to the reference, one point per
method with both intervals. Then the weights of the TIW run's discriminator (seed 0) on the
biased set: over sigma, and per subgroup (where they put the minority's share).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from debiaslab import plugins
from debiaslab.compare import Summary
from debiaslab.data.dataset import ImageDataset
from debiaslab.data.pixels import from_uint8
from debiaslab.data.sources import BIASED_NAME
from debiaslab.experiment import seed_configs
from debiaslab.quickstart import run_experiments
from debiaslab.records import RECORD_DIR

plugins.load()  # the methods register their sections, recipes and losses, as the CLI does

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = ROOT / "configs/experiments"

# method -> (shipped config, overrides, label in the table)
METHODS = {
    "dsm_obs": ("digits_lt_dsm_obs.yaml", [], "DSM(obs)"),
    "dsm_ref": ("digits_lt_dsm_ref.yaml", [], "DSM(ref)"),
    "iw_dsm": ("digits_lt_iw_dsm.yaml", [], "IW-DSM"),
    "iw_dsm_a025": ("digits_lt_iw_dsm.yaml", ["tiw.alpha=0.25"], "IW-DSM, alpha 0.25"),
    "tiw_paper": ("digits_lt_tiw.yaml", [], "TIW-DSM, paper form"),
    # the released formulas (weight 2D) need a mixture of both sets: D_obs, untiled here
    "tiw_code": ("digits_lt_tiw.yaml", ["tiw.form=code", "data.train_on=observed"],
                 "TIW-DSM, code form (D_obs)"),
    "w_only": ("digits_lt_tiw.yaml", ["tiw.correction=false"], "W-only (paper form)"),
    "c_only": ("digits_lt_tiw.yaml", ["tiw.weight=false"], "C-only (paper form)"),
}
EXTRA_METHODS = ("iw_dsm_a025",)  # run only when named: not one of the seven
SETTINGS = {
    "long_tail": ("digits_lt", []),
    "attribute_bias": ("digits_bold", ["data.imbalance=attribute_bias",
                                       "data.bias_attribute=bold", "data.bias_ratio=0.9",
                                       "data.reference_count=64"]),
}
METRICS = (("eval/fid", "FID ↓"), ("eval/precision", "precision ↑"),
           ("eval/recall", "recall ↑"), ("eval/bias/tv_reference", "TV to reference ↓"),
           ("eval/bias/tv_biased", "TV to biased"), ("minority_share", "minority share"))


def configs(setting: str, methods: list[str], seeds: list[int], output_dir: Path) -> dict:
    """{(method, seed): config}, seeds outer so that every method's first seed finishes first."""
    prefix, data = SETTINGS[setting]
    out = {}
    for method in methods:
        file, extra, _ = METHODS[method]
        name = f"{prefix}_{method}"
        overrides = [f"output_dir={output_dir}", "distributed.backend=local", *data, *extra,
                     f"name={name}", f"tracking.experiment=tiw-digits-{setting}"]
        for seed, cfg in zip(seeds, seed_configs(str(EXPERIMENTS / file), overrides, seeds)):
            out[(method, seed)] = cfg
    return dict(sorted(out.items(), key=lambda item: (item[0][1], methods.index(item[0][0]))))


def bias_statistic(cfg) -> dict:
    """The bias statistic the run's evaluation recorded (subgroup names and shares)."""
    saved = cfg.run_dir / "eval" / f"eval_{cfg.sample.samplers[0]}.json"
    return json.loads(saved.read_text())["meta"]["bias_statistic"]


def rarer_groups(stat: dict) -> list[int]:
    """The subgroups rarer in the biased set than in the reference (the minority)."""
    return [g for g, (b, r) in enumerate(zip(stat["biased"], stat["reference"])) if b < r]


def evaluation(cfg) -> dict[str, float]:
    """The evaluate stage's recorded metrics, plus the minority share, from the bias statistic
    the evaluation recorded (its samples', reference's and biased set's subgroup shares)."""
    record = json.loads((cfg.run_dir / RECORD_DIR / "evaluate.json").read_text())
    metrics = dict(record["metrics"])
    stat = bias_statistic(cfg)
    rarer = rarer_groups(stat)
    metrics["minority_share"] = float(sum(stat["samples"][g] for g in rarer))
    metrics["minority_groups"] = [stat["names"][g] for g in rarer]
    metrics["minority_share_reference"] = float(sum(stat["reference"][g] for g in rarer))
    metrics["minority_share_biased"] = float(sum(stat["biased"][g] for g in rarer))
    return metrics


SIGMAS = np.geomspace(0.002, 80.0, 25)


def weights_of_run(cfg) -> dict:
    """methods.tiw_dsm.weight_diagnostics of the run's discriminator on the biased set, over a
    fine sigma grid."""
    from debiaslab.methods.tiw_dsm import weight_diagnostics

    disc, data = discriminator_and_biased_set(cfg)
    return weight_diagnostics(disc, from_uint8(data.images), SIGMAS.tolist())


def discriminator_and_biased_set(cfg) -> tuple:
    """The run's recorded discriminator and the biased set it weighs."""
    import dataclasses

    from debiaslab.methods.tiw_dsm import load_discriminator
    from debiaslab.records import recorded_outputs

    path = recorded_outputs(cfg)["discriminator"]
    disc = load_discriminator(dataclasses.replace(
        cfg, inputs={"discriminator": {"path": path, "hash": ""}}))
    return disc, ImageDataset.load(cfg.dataset_path / BIASED_NAME)


SUBGROUP_SIGMAS = (0.1, 0.5, 1.0, 2.0)


def subgroup_weights(cfg, stat: dict) -> list[tuple[str, float, float, float]]:
    """Where the weights go: on the biased set, the mean weight on the minority images (the
    subgroups rarer there than in the reference), on the rest, and the minority's share of the
    summed weight; clean (IW-DSM's w(x0)) and at SUBGROUP_SIGMAS (TIW's w_t, one noise draw).
    A calibrated ratio gives the minority the reference's share."""
    import torch

    from debiaslab.methods.tiw_dsm import _truth, iw_weight, tiw_terms

    disc, data = discriminator_and_biased_set(cfg)
    x = from_uint8(data.images)
    _, groups = _truth(stat["by"], data, str(cfg.dataset_path / BIASED_NAME))
    minority = torch.from_numpy(np.isin(groups, rarer_groups(stat)))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    rows = []
    for sigma in (0.0, *SUBGROUP_SIGMAS):
        if sigma == 0.0:
            w = torch.cat([iw_weight(disc, x[i:i + 256]) for i in range(0, len(x), 256)])
        else:
            w = torch.cat([tiw_terms(disc, x[i:i + 256] + sigma * noise[i:i + 256],
                                     torch.full((len(x[i:i + 256]),), sigma)).weight
                           for i in range(0, len(x), 256)])
        w = w.double()
        rows.append(("clean" if sigma == 0.0 else f"{sigma:g}", float(w[minority].mean()),
                     float(w[~minority].mean()), float(w[minority].sum() / w.sum())))
    return rows


GRID_SAMPLES = 24


def save_grid(cfgs: dict, methods: list[str], setting: str, path: Path) -> Path:
    """One row per method (first training seed): its first GRID_SAMPLES samples, which share
    their seeds across methods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from debiaslab.report import image_grid

    rows = {}
    for method in methods:
        cfg = cfgs[(method, min(s for m, s in cfgs if m == method))]
        folder = cfg.run_dir / "samples" / cfg.sample.samplers[0]
        if (folder / "dataset.json").is_file():
            images = ImageDataset.load(folder).images[:GRID_SAMPLES]
            rows[METHODS[method][2]] = image_grid(images, nrow=GRID_SAMPLES, scale=2)
    fig, axes = plt.subplots(len(rows), 1, figsize=(12, 0.75 * len(rows) + 0.5), squeeze=False)
    for ax, (label, strip) in zip(axes[:, 0], rows.items()):
        ax.imshow(strip.squeeze(-1) if strip.shape[-1] == 1 else strip, cmap="gray")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f"digits, {setting.replace('_', ' ')}: the same sample seeds, training seed 0",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_weights(diag: dict, setting: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.semilogx(diag["sigma"], diag["ess"], "o-", label="TIW-DSM w_t(x_t): ESS / n")
    ax.axhline(diag["iw_ess"], color="C1", ls="--", label="IW-DSM w(x0): ESS / n")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("sigma (EDM noise level)")
    ax.set_ylabel("effective sample size / n (biased images)")
    ax2 = ax.twinx()
    ax2.loglog(diag["sigma"], diag["mean"], "s:", color="C2", label="TIW mean weight")
    ax2.set_ylabel("mean weight (1 if calibrated)", color="C2")
    ax.set_title(f"digits, {setting.replace('_', ' ')}: importance weights of the seed-0 "
                 f"discriminator", fontsize=9)
    lines = ax.get_legend_handles_labels()
    more = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cell(s: Summary) -> str:
    decimals = 1 if abs(s.mean) >= 10 else 3
    if s.n < 2 or not math.isfinite(s.half_width):
        return f"{s.mean:.{decimals}f}"
    return f"{s.mean:.{decimals}f} ± {s.half_width:.{decimals}f}"


def plot(summaries: dict, setting: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for method, s in summaries.items():
        fid, tv = s["eval/fid"], s["eval/bias/tv_reference"]
        err = [[h if math.isfinite(h) else 0.0] for h in (fid.half_width,)]
        yerr = [[h if math.isfinite(h) else 0.0] for h in (tv.half_width,)]
        ax.errorbar([fid.mean], [tv.mean], xerr=err, yerr=yerr, fmt="o", capsize=3,
                    label=METHODS[method][2])
    ax.set_xlabel("FID against all digits (lower is better)")
    ax.set_ylabel("TV of subgroup shares to the reference (lower is fairer)")
    ax.set_title(f"TIW-DSM on digits, {setting.replace('_', ' ')}: mean ± 95% t over seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setting", choices=sorted(SETTINGS), required=True)
    ap.add_argument("--output-dir", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", choices=list(METHODS),
                    default=[m for m in METHODS if m not in EXTRA_METHODS])
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--collect-only", action="store_true",
                    help="only tabulate the runs that finished")
    args = ap.parse_args()

    cfgs = configs(args.setting, args.methods, args.seeds, args.output_dir.resolve())
    if not args.collect_only:
        start = time.time()
        run_experiments(list(cfgs.values()), processes=args.processes, threads=1)
        print(f"all runs: {time.time() - start:.0f} s wall, {args.processes} processes")
    values: dict = {m: {key: [] for key, _ in METRICS} for m in args.methods}
    extra = {}
    for (method, _seed), cfg in cfgs.items():
        try:
            ev = evaluation(cfg)
        except FileNotFoundError:
            print(f"{cfg.name}: not evaluated yet")
            continue
        for key, _ in METRICS:
            values[method][key].append(float(ev[key]))
        extra = {k: ev[k] for k in ("minority_groups", "minority_share_reference",
                                    "minority_share_biased")}
        print(f"{cfg.name}: " + ", ".join(f"{key} {ev[key]:.4f}" for key, _ in METRICS))
    summaries = {m: {key: Summary.of(v) for key, v in values[m].items()} for m in args.methods
                 if values[m]["eval/fid"]}
    print(f"\nsetting {args.setting}; minority groups {extra.get('minority_groups')}: share "
          f"{extra.get('minority_share_reference', math.nan):.3f} in the reference, "
          f"{extra.get('minority_share_biased', math.nan):.3f} in the biased set\n")
    print("| method | seeds | " + " | ".join(label for _, label in METRICS) + " |")
    print("|---|---|" + "---|" * len(METRICS))
    for method, s in summaries.items():
        print(f"| {METHODS[method][2]} | {s['eval/fid'].n} | "
              + " | ".join(cell(s[key]) for key, _ in METRICS) + " |")
    if summaries:
        path = args.output_dir / f"tiw_{args.setting}.png"
        plot(summaries, args.setting, path)
        print(f"\nplot: {path}")
    if summaries:
        grid = args.output_dir / f"tiw_grid_{args.setting}.png"
        print(f"grid: {save_grid(cfgs, list(summaries), args.setting, grid)}")
    first = [cfg for (method, _s), cfg in cfgs.items() if method == "tiw_paper"]
    if first and (first[0].run_dir / RECORD_DIR / "evaluate.json").is_file():
        diag = weights_of_run(first[0])
        print("\nimportance weights on the biased set (discriminator of " + first[0].name + "):")
        print("  IW-DSM w(x0): mean {iw_mean:.3g}, ESS/n {iw_ess:.3f}".format(**diag))
        for sigma, m, e in zip(diag["sigma"], diag["mean"], diag["ess"]):
            print(f"  TIW sigma {sigma:8.3f}: mean weight {m:9.3g}, ESS/n {e:.3f}")
        path = args.output_dir / f"tiw_weights_{args.setting}.png"
        plot_weights(diag, args.setting, path)
        print(f"plot: {path}")
        stat = bias_statistic(first[0])
        if "+" not in stat["by"]:
            ev = evaluation(first[0])
            ref, bia = ev["minority_share_reference"], ev["minority_share_biased"]
            print(f"\nweights per subgroup on the biased set (minority: {stat['by']} rarer in "
                  f"it than in the reference; calibrated: mean {ref / bia:.3g} on the minority, "
                  f"{(1 - ref) / (1 - bia):.3g} on the rest, minority weight share {ref:.3f})")
            print("| sigma | mean weight, minority | mean weight, rest | minority share of the "
                  "weight |\n|---|---|---|---|")
            for level, w_min, w_rest, share in subgroup_weights(first[0], stat):
                print(f"| {level} | {w_min:.3f} | {w_rest:.3f} | {share:.3f} |")


if __name__ == "__main__":
    main()
