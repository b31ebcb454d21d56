"""The quickstart: digits-LT (rho=0.1), a class-conditional baseline vs a Debias-weighted model.

The two experiments run side by side when the machine has the cores: one spawned process per
experiment, the cores split evenly between them (one thread each on 2 cores). Each model trains
with the same thread count whether it runs beside the other or alone, so the checkpoints are the
same bits either way (tests/test_quickstart_parallel.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from debiaslab.config import ExperimentConfig, dump_yaml, load_config
from debiaslab.experiment import run_experiment
from debiaslab.progress import log, set_process_label
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
               dry_run: bool = False, processes: int | None = None
               ) -> dict[str, StageResult]:
    """Run both experiments end to end and print where to look."""
    from debiaslab.tracking import resolve_tracking_uri, ui_hint

    configs = quickstart_configs(output_dir, overrides)
    if dry_run:
        for cfg in configs:
            print(dump_yaml(cfg), end="---\n")
        print("configs OK (dry run: nothing was run)")
        return {}
    processes, threads = side_by_side_plan(len(configs), processes=processes)
    for cfg in configs:
        log(f"experiment {cfg.name}: weighting={cfg.diffusion.weighting}, "
            f"{cfg.train.steps} steps, samplers {', '.join(cfg.sample.samplers)}")
    how = "side by side" if processes > 1 else "one at a time"
    log(f"running {len(configs)} experiments {how} ({processes} process(es), {threads} "
        f"thread(s) each)")
    start = time.monotonic()
    results = run_experiments(configs, processes=processes, threads=threads)
    wall = time.monotonic() - start
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
    print(f"\ntime: {wall:.0f} s for both experiments ({how}); stages that ran, in seconds:")
    print(format_table(phase_rows(results), ["experiment", *PHASES]))
    return results


PHASES = ("data", "train", "sample", "evaluate")


def phase_rows(results: dict[str, StageResult]) -> list[dict[str, Any]]:
    """Per experiment, the wall time of each stage that ran ("-": skipped, up to date)."""
    return [{"experiment": name, **{p: f"{r.seconds[p]:.0f}" if p in r.seconds else "-"
                                    for p in PHASES}} for name, r in results.items()]


# ------------------------------------------------------------------------------ side by side

def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def side_by_side_plan(n: int, cores: int | None = None, *, processes: int | None = None
                      ) -> tuple[int, int]:
    """(processes, threads per process) for ``n`` experiments: one process per experiment while
    cores last (or ``processes``, at most ``n``), and the cores shared evenly between them."""
    cores = cores or usable_cores()
    processes = max(1, min(n, processes or cores))
    return processes, max(1, cores // processes)


def run_experiments(configs: Sequence[ExperimentConfig], *, processes: int, threads: int,
                    progress: bool = True) -> dict[str, StageResult]:
    """Run every config's recipe, ``processes`` at a time, each with ``threads`` torch threads.

    ``processes == 1`` runs them one after the other in this process. Otherwise each runs in a
    spawned process (fresh torch and plugin state; its lines carry the experiment's name), after
    this process built their datasets and created the MLflow store, which they then share. A
    failure or a SIGTERM here ends the other processes too (SIGTERM: their MLflow runs end as
    KILLED); an error raised in a process is raised here. A script that calls this with
    ``processes > 1`` needs the usual ``if __name__ == "__main__":`` guard (spawned processes
    import the main module)."""
    from debiaslab.stages import build_data

    if processes == 1:
        with torch_threads(threads):
            return {cfg.name: run_experiment(cfg, progress=progress) for cfg in configs}
    for cfg in configs:
        build_data(cfg)  # once, before the processes share the dataset folders
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    _create_tracking_stores(configs)
    pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_process, initargs=(threads,))
    try:
        with _sigterm_raises():
            jobs = {cfg.name: pool.submit(_run_labelled, cfg, progress) for cfg in configs}
            return {name: job.result() for name, job in jobs.items()}
    except BaseException:
        for child in multiprocessing.active_children():  # the pool's processes still running
            child.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _create_tracking_stores(configs: Sequence[ExperimentConfig]) -> None:
    """Create each embedded MLflow store (its SQLite schema) here, once, so that the processes
    never race to create it."""
    from debiaslab.tracking import make_client, resolve_tracking_uri, store_errors

    for uri in {resolve_tracking_uri(c.output_dir) for c in configs if c.tracking.enabled}:
        with store_errors(uri):
            make_client(uri).search_experiments(max_results=1)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises tracking.Killed here, so that the children are terminated instead of being
    left running without their parent."""
    from debiaslab.tracking import Killed

    def handler(signum: int, frame: Any) -> None:
        raise Killed(signum)

    try:
        before = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: signals are not ours to handle
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _init_process(threads: int) -> None:
    """A spawned experiment process: the methods registered, ``threads`` torch threads."""
    import torch

    from debiaslab import plugins

    plugins.load()
    torch.set_num_threads(threads)


def _run_labelled(cfg: ExperimentConfig, progress: bool) -> StageResult:
    set_process_label(cfg.name)
    return run_experiment(cfg, progress=progress)


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
