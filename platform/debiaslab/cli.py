"""`debiaslab` command line: thin subcommands that parse, load the config and call one function."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from debiaslab.config import ExperimentConfig

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _add_config_args(p: argparse.ArgumentParser, config_required: bool = False) -> None:
    p.add_argument("--config", "-c", required=config_required,
                   help="experiment YAML (configs/experiments/...); defaults apply when omitted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=200 (repeatable)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config, print it resolved, and exit without running")


def _load(args: argparse.Namespace):
    from debiaslab.config import dump_yaml, load_config

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        print(dump_yaml(cfg), end="")
        print("config OK (dry run: nothing was run)")
    return cfg


def _check_tracking(cfg: "ExperimentConfig") -> None:
    """Refuse a bad MLflow store before any work (not after a training run)."""
    if cfg.tracking.enabled:
        from debiaslab.tracking import check_tracking_uri, resolve_tracking_uri

        check_tracking_uri(resolve_tracking_uri(cfg.output_dir))


def cmd_data_build(args: argparse.Namespace) -> int:
    from debiaslab.stages import build_data

    cfg = _load(args)
    if not args.dry_run:
        build_data(cfg, force=args.force)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """The recipe's data and train stages (a stage whose inputs are unchanged is skipped)."""
    from debiaslab.experiment import run_experiment

    cfg = _load(args)
    if args.dry_run:
        return 0
    _check_tracking(cfg)
    result = run_experiment(cfg, stages=("data", "train"))
    print(f"checkpoint: {result.checkpoint}")
    _print_ui_hint(cfg)
    return 0


def _print_ui_hint(cfg: "ExperimentConfig") -> None:
    if cfg.tracking.enabled:
        from debiaslab.tracking import resolve_tracking_uri, ui_hint

        print(f"look: {ui_hint(resolve_tracking_uri(cfg.output_dir))}")


def cmd_sample(args: argparse.Namespace) -> int:
    from debiaslab.stages import sample

    cfg = _load(args)
    if args.dry_run:
        return 0
    result = sample(cfg, args.checkpoint, out_dir=args.out)
    for key, path in result.artifacts.items():
        print(f"{key}: {path}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from debiaslab.config import to_dict
    from debiaslab.report import format_table
    from debiaslab.stages import (
        EVAL_TABLE_COLUMNS,
        eval_notes,
        eval_row,
        evaluate_samples,
        reference_path,
        sample,
    )

    if args.reference:
        args.overrides.append(f"metrics.reference={args.reference}")
    cfg = _load(args)
    if args.dry_run:
        return 0
    if not args.samples and not args.checkpoint:
        from debiaslab.errors import ConfigError

        raise ConfigError("evaluate needs --samples PATH or --checkpoint PATH")
    _check_tracking(cfg)
    reference_path(cfg)  # fail fast on a bad reference, before any sampling
    sample_sets: dict[str, object] = {}
    if args.samples:
        sample_sets[args.name or "samples"] = args.samples
    else:
        sampled = sample(cfg, args.checkpoint, out_dir=args.out)
        for key, path in sampled.artifacts.items():
            if key.startswith("samples_"):
                sample_sets[key[len("samples_"):]] = path

    evaluations = []

    def run(tracker=None) -> list[dict]:
        rows = []
        for name, samples in sample_sets.items():
            ev = evaluate_samples(cfg, samples, tracker=tracker, name=name, progress=True,
                                  out_dir=args.out)
            rows.append(eval_row(name, ev))
            evaluations.append(ev)
            print(f"{name}: extractor {ev.meta['extractor']}, reference "
                  f"{ev.meta['reference_name']} ({ev.meta['reference_images']} images)")
        return rows

    if cfg.tracking.enabled:
        from debiaslab.tracking import Tracker

        with Tracker(cfg.output_dir, cfg.tracking.experiment,
                     cfg.tracking.run_name or f"eval-{cfg.name}") as tracker:
            tracker.log_config(to_dict(cfg))
            rows = run(tracker)
    else:
        rows = run()
    print(format_table(rows, EVAL_TABLE_COLUMNS))
    for note in eval_notes(evaluations):
        print(f"  {note}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from debiaslab.experiment import run_experiment, seed_configs
    from debiaslab.recipes import get_recipe

    cfg = _load(args)
    configs = seed_configs(args.config, args.overrides, args.seeds) if args.seeds else [cfg]
    recipe = get_recipe(cfg)
    for name in args.stage:
        recipe.stage(name)  # unknown stage names fail before any work
    if args.dry_run:
        for c in configs if args.seeds else []:
            print(f"seed {c.train.seed}: run {c.name} (group {c.tracking.group})")
        print(f"recipe {recipe.name}: "
              + " -> ".join(s.name for s in recipe.stages
                            if not args.stage or s.name in args.stage))
        return 0
    _check_tracking(cfg)
    for c in configs:
        result = run_experiment(c, stages=tuple(args.stage), force=args.force)
        for key, path in result.artifacts.items():
            print(f"{key}: {path}")
    return 0


def cmd_stages(args: argparse.Namespace) -> int:
    """List the stages of the config's recipe: inputs, outputs, backend, run name, state."""
    from debiaslab.recipes import get_recipe, read_record, resolve_backend
    from debiaslab.report import format_table

    cfg = _load(args)
    recipe = get_recipe(cfg)
    rows = []
    for stage in recipe.stages:
        record = read_record(cfg, stage)
        rows.append({"stage": stage.name,
                     "inputs": ", ".join(f"{k}:{v}" for k, v in stage.inputs.items()) or "-",
                     "outputs": ", ".join(f"{k}:{v}" for k, v in stage.outputs.items()),
                     "backend": resolve_backend(cfg, stage), "run": stage.run_name(cfg),
                     "last run": record["finished"] if record else "never"})
    print(f"recipe {recipe.name}: {recipe.description}")
    print(format_table(rows, ["stage", "inputs", "outputs", "backend", "run", "last run"]))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from debiaslab.compare import compare
    from debiaslab.errors import ConfigError
    from debiaslab.tracking import resolve_tracking_uri, ui_hint

    tags = {}
    for item in args.tag:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--tag {item!r}: expected KEY=VALUE")
        tags[key] = value
    uri = args.tracking_uri or resolve_tracking_uri(args.output_dir)
    result = compare(uri, experiments=args.experiment, tags=tags, run_ids=args.run_ids,
                     metrics=args.metrics, by=args.by,
                     out_dir=args.out or os.path.join(args.output_dir, "compare"),
                     log_to=None if args.no_log else (args.experiment or ["debiaslab"])[0])
    print(result.markdown)
    for key, path in result.files.items():
        print(f"{key}: {path}")
    if result.mlflow_run_id:
        print(f"logged to MLflow run {result.mlflow_run_id} ({ui_hint(uri)})")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from pathlib import Path

    from debiaslab.stages import build_data, extract_features

    cfg = _load(args)
    if args.dry_run:
        return 0
    if not args.dataset:
        build_data(cfg)
    out = extract_features(cfg, Path(args.dataset) if args.dataset else None,
                           Path(args.out) if args.out else None)
    print(f"features: {out}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    if args.dry_run:
        from debiaslab.sweeps import load_sweep

        sweep = load_sweep(args.config, args.overrides)
        if sweep.kind == "training" and sweep.base is not None:
            from debiaslab.experiment import check_training_sweep

            check_training_sweep(sweep.base, list(sweep.specs))
        print(f"sweep {sweep.name}: {sweep.kind} trials x {sweep.num_trials} over "
              f"{', '.join(sweep.specs)} of {sweep.experiment}; objective "
              + ", ".join(f"{o.metric} ({o.mode})" for o in sweep.objectives))
        print("sweep OK (dry run: nothing was run)")
        return 0
    from debiaslab.experiment import run_sweep

    result = run_sweep(args.config, args.overrides)
    print(f"best trial {result.best_trial_id}: {result.best_config}")
    shown = ["eval/fid", "eval/precision", "eval/recall", "eval/tail_recall"]
    print("  " + ", ".join(f"{k}={result.best_metrics[k]:.4g}" for k in shown
                           if k in result.best_metrics))
    print(f"parent MLflow run {result.parent_run_id}; Tune state {result.sweep_dir}")
    return 0


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (argparse prints the one-line usage error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def cmd_quickstart(args: argparse.Namespace) -> int:
    from debiaslab.quickstart import quickstart

    quickstart(output_dir=args.output_dir, overrides=args.overrides, dry_run=args.dry_run,
               processes=args.processes)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="debiaslab",
        description="Debiasing diffusion models: data builds, training, sampling, tracking.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also DEBIASLAB_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("quickstart", help="digits-LT: baseline vs Debias weighting, end to end",
                       description="Build digits-LT (rho=0.1), train a class-conditional baseline "
                       "and a Debias-weighted model, sample with two samplers, log to MLflow.")
    p.add_argument("--output-dir", default="outputs/quickstart", help="where everything goes")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override both experiments' config, e.g. --set train.steps=100")
    p.add_argument("--dry-run", action="store_true", help="validate both configs and exit")
    p.add_argument("--processes", type=positive_int, default=None, metavar="N",
                   help="experiments run at once, the cores split between them (default: one "
                        "per core, at most 2; 1 = one after the other)")
    p.set_defaults(func=cmd_quickstart)

    data = sub.add_parser("data", help="dataset commands",
                          description="Build datasets as Parquet shards with a content hash.")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    p = data_sub.add_parser("build", help="build the configured (imbalanced) dataset",
                            description="Load the source, apply the long-tail or attribute-bias "
                            "builder, write Parquet shards + dataset.json atomically.")
    _add_config_args(p)
    p.add_argument("--force", action="store_true", help="rebuild even if the dataset exists")
    p.set_defaults(func=cmd_data_build)

    p = sub.add_parser("train", help="the recipe's data and train stages",
                       description="Train the configured score model; resumes from the latest "
                       "checkpoint in <output_dir>/runs/<name>/checkpoints.")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="sample from a trained checkpoint",
                       description="Generate images with every configured sampler (per-sample "
                       "seeds); writes Parquet samples and PNG grids.")
    _add_config_args(p)
    p.add_argument("--checkpoint", help="checkpoint file or run folder (default: the config's run)")
    p.add_argument("--out", help="output folder (default: <run>/samples)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("evaluate", help="quality and fairness metrics of a sample set",
                       description="Compute FID, KID, precision/recall, density/coverage, "
                       "per-class FID/recall (head vs tail), fairness discrepancy and minority "
                       "metrics against a reference set; logs eval/... metrics, a JSON and "
                       "plots to MLflow and prints a table.")
    _add_config_args(p)
    p.add_argument("--samples", help="dataset folder, image folder (one subfolder per class) "
                   "or .parquet file of samples")
    p.add_argument("--checkpoint", help="sample from this checkpoint/run with the config's "
                   "sample settings, then evaluate")
    p.add_argument("--reference", help="reference dataset folder (default: metrics.reference, "
                   "else the source's full balanced set)")
    p.add_argument("--name", help="label for the sample set in tables and metric names")
    p.add_argument("--out", help="output folder for eval JSON and plots (default: <run>/eval)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("run", help="run the config's recipe of stages (one MLflow parent run, "
                                   "a child run per stage)",
                       description="Run the stages of the recipe the config names (recipe: ...). "
                                   "A stage whose config and inputs are unchanged since its last "
                                   "run is skipped.")
    _add_config_args(p)
    p.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                   help="run once per training seed (names <name>-s<seed>, one MLflow group)")
    p.add_argument("--stage", action="append", default=[], metavar="NAME",
                   help="run only this stage (repeatable); its inputs must exist from an "
                        "earlier run (see `debiaslab stages`)")
    p.add_argument("--force", action="store_true", help="re-run stages even when up to date")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("stages", help="list the stages of the config's recipe",
                       description="Stages with typed inputs and outputs, backend, run name and "
                                   "when each last ran.")
    _add_config_args(p)
    p.set_defaults(func=cmd_stages)

    p = sub.add_parser("extract", help="metric features of a dataset with a Ray Data actor pool",
                       description="Run the configured feature extractor over a dataset folder "
                                   "(Ray Data map job) and write Parquet features.")
    _add_config_args(p)
    p.add_argument("--dataset", help="dataset folder or s3:// / gs:// URI "
                                     "(default: the config's training data, built if missing)")
    p.add_argument("--out", help="output folder (default: <output_dir>/features/<dataset>-"
                                 "<extractor>)")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("sweep", help="Ray Tune + Optuna sweep (configs/sweeps/*.yaml)",
                       description="Search sampling or training knobs against an MLflow-logged "
                                   "metric; re-running an interrupted sweep resumes it.")
    p.add_argument("--config", "-c", required=True, help="sweep YAML (configs/sweeps/...)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a sweep field, e.g. --set num_trials=4 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="validate the sweep and exit")
    p.set_defaults(func=cmd_sweep)

    from debiaslab.compare import DEFAULT_METRICS

    p = sub.add_parser("compare", help="methods x metrics over seeds, from MLflow runs",
                       description="Group finished MLflow runs by setting (seeds pooled) and "
                                   "print mean ± 95%% CI per metric; writes compare.md and "
                                   "compare.png and logs them to a comparison run.")
    p.add_argument("--experiment", "-e", action="append", default=[],
                   help="MLflow experiment name (repeatable)")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                   help="only runs with this tag value (repeatable)")
    p.add_argument("--run-ids", nargs="+", default=[], help="compare exactly these runs")
    p.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS),
                   help="metric keys (default: %(default)s)")
    p.add_argument("--by", nargs="+", default=[],
                   help="group by these params (default: the debiaslab.group tag)")
    p.add_argument("--output-dir", default="outputs",
                   help="experiment output_dir holding mlflow.db (default: %(default)s)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, "
                                          "else <output-dir>/mlflow.db)")
    p.add_argument("--out", help="folder for compare.md/png (default: <output-dir>/compare)")
    p.add_argument("--no-log", action="store_true", help="do not log a comparison run")
    p.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point. A user's mistake or the environment's refusal prints one line and exits 2;
    ``--debug`` (or DEBIASLAB_DEBUG=1) shows the full traceback instead."""
    from debiaslab.errors import user_error_message
    from debiaslab.tracking import Killed

    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("DEBIASLAB_DEBUG", "") not in ("", "0")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        from debiaslab import plugins

        plugins.load()  # the methods register their sections, recipes and components
        return func(args)
    except KeyboardInterrupt:
        print("debiaslab: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Killed as exc:  # SIGTERM: the MLflow run was already ended as KILLED
        print(f"debiaslab: terminated by signal {exc.signum}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        message = user_error_message(exc)
        if message is None or debug:
            raise
        print(f"debiaslab: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
