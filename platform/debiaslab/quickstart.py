"""The quickstart: digits-LT (rho=0.1), a class-conditional baseline vs a Debias-weighted model."""

from __future__ import annotations

from pathlib import Path

from debiaslab.config import ExperimentConfig, dump_yaml, load_config
from debiaslab.experiment import run_experiment
from debiaslab.progress import log
from debiaslab.report import format_table
from debiaslab.stages import EVAL_TABLE_COLUMNS, StageResult, eval_notes, eval_row

REPO_ROOT = Path(__file__).resolve().parents[2]  # platform/debiaslab/quickstart.py -> repo
QUICKSTART_CONFIGS = ("digits_lt_baseline.yaml", "digits_lt_debias.yaml")


def quickstart_configs(output_dir: str | Path, overrides: list[str] | None = None
                       ) -> list[ExperimentConfig]:
    folder = REPO_ROOT / "configs" / "experiments"
    extra = [f"output_dir={Path(output_dir).resolve()}"] + list(overrides or [])
    return [load_config(folder / name, extra) for name in QUICKSTART_CONFIGS]


def quickstart(output_dir: str | Path = "outputs/quickstart", overrides: list[str] | None = None,
               dry_run: bool = False) -> dict[str, StageResult]:
    """Run both experiments end to end and print where to look."""
    from debiaslab.tracking import resolve_tracking_uri, ui_hint

    configs = quickstart_configs(output_dir, overrides)
    if dry_run:
        for cfg in configs:
            print(dump_yaml(cfg), end="---\n")
        print("configs OK (dry run: nothing was run)")
        return {}
    results = {}
    for cfg in configs:
        log(f"experiment {cfg.name}: weighting={cfg.diffusion.weighting}, "
            f"{cfg.train.steps} steps, samplers {', '.join(cfg.sample.samplers)}")
        results[cfg.name] = run_experiment(cfg)
    comparison = save_comparison(results, Path(configs[0].output_dir) / "comparison.png")
    uri = resolve_tracking_uri(configs[0].output_dir)
    print("\nquickstart finished. Where to look:")
    for name, res in results.items():
        print(f"  {name}: checkpoint {res.checkpoint}")
        for key, path in sorted(res.artifacts.items()):
            if key.startswith(("grid_", "class_counts")):
                print(f"    {key}: {path}")
        print(f"    MLflow run id: {res.mlflow_run_id}")
    print(f"  side by side: {comparison}")
    print("\nevaluation (" + describe_protocol(results) + "):")
    print(format_table([eval_row(f"{n}/{s}", ev) for n, r in results.items()
                        for s, ev in r.evaluations.items()], EVAL_TABLE_COLUMNS))
    for note in eval_notes([ev for r in results.values() for ev in r.evaluations.values()]):
        print(f"  {note}")
    print(f"  MLflow tracking URI: {uri}")
    print(f"  browse the runs: {ui_hint(uri)}")
    return results


def save_comparison(results: dict[str, StageResult], path: Path) -> Path:
    """One figure with every model x sampler grid, for a look at both models at once."""
    import numpy as np
    from PIL import Image

    from debiaslab.report import image_panels_figure, save_figure

    panels = {}
    for name, res in results.items():
        for key, grid in sorted(res.artifacts.items()):
            if key.startswith("grid_"):
                image = np.asarray(Image.open(grid).convert("L"))[..., None]
                panels[f"{name} / {key[len('grid_'):]}"] = image
    fig = image_panels_figure(panels, title="digits-LT samples (rows: classes 0-9)")
    return save_figure(fig, path)


def describe_protocol(results: dict[str, StageResult]) -> str:
    """Which extractor and reference set produced the numbers."""
    for res in results.values():
        for ev in res.evaluations.values():
            meta = ev.meta
            return (f"features: {meta['extractor']}; reference: {meta['reference_name']} "
                    f"({meta['reference_images']} images, hash {meta['reference_hash'][:12]}); "
                    f"{meta['num_samples']} samples per row; head/tail by training class counts")
    return "no evaluation"
