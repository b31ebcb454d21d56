"""Ray Tune + Optuna sweeps on local Ray with a real MLflow store: sampling and training trials,
best trial = lowest logged FID, parent/child runs, bad input before any trial, and resume after
the driver is really killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from netwatch import HAS_PROC, RAY_FIRST, ListenWatcher, check_loopback_only, scrubbed_env

from debiaslab.config import load_config
from debiaslab.data.dataset import ImageDataset
from debiaslab.errors import ConfigError
from debiaslab.experiment import run_sweep
from debiaslab.stages import build_data
from debiaslab.sweeps import load_sweep
from debiaslab.tracking import find_runs, resolve_tracking_uri
from debiaslab.training.loop import Trainer

RAY_TMP = "/tmp/dl-sweep-test"
KILL_AFTER_FINISHED = 1
RESUME_TRIALS = 2  # killed after 1 finished: one trial is left for the restored run
KILL_TIMEOUT_S = 600
EXPERIMENT = {
    "name": "tiny", "model": {"model_channels": 16, "channel_mult": [1, 2],
                              "attention_resolutions": [], "head_channels": 16},
    "diffusion": {"loss": "cbdm"},
    "train": {"steps": 4, "batch_size": 16, "warmup_steps": 2, "checkpoint_every": 4,
              "log_every": 2, "device": "cpu"},
    "sample": {"samplers": ["ddim"], "steps": 3, "num_samples": 40, "batch_size": 40,
               "labels": "uniform", "guidance": [{"type": "cfg", "omega": 0.0}]},
    "metrics": {"bootstrap": 0},
    "distributed": {"num_workers": 1, "cpus_per_worker": 1.0},
    "tracking": {"experiment": "sweeps"},
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny CBDM experiment on digits-LT with a trained checkpoint (single process)."""
    root = tmp_path_factory.mktemp("sweep")
    exp = dict(EXPERIMENT, output_dir=str(root / "out"))
    path = root / "experiment.yaml"
    path.write_text(yaml.safe_dump(exp))
    cfg = load_config(path)
    build_data(cfg)
    Trainer(cfg, ImageDataset.load(cfg.dataset_path), cfg.run_dir, progress=False).fit()
    return root, path, cfg


@pytest.fixture(scope="module")
def ray_env_tmp(shared_ray):
    """The run's shared local Ray (conftest.shared_ray): each in-process sweep reuses it."""
    yield


def write_sweep(root: Path, experiment: Path, name: str, **fields) -> Path:
    sweep = {"name": name, "experiment": str(experiment), "kind": "sampling",
             "params": {"sample.guidance.cfg.omega": {"type": "float", "low": 0.0,
                                                      "high": 3.0}},
             "objective": {"metric": "eval/fid", "mode": "min"}, "num_trials": 4,
             "cpus_per_trial": 1.0}
    sweep.update(fields)
    sweep = {k: v for k, v in sweep.items() if v is not None}  # None: leave the key out
    path = root / f"{name.replace('/', '_')}.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def terminated(state_dir: Path) -> set[str]:
    """Trial ids Tune's saved experiment state marks TERMINATED (what a restore skips)."""
    import json

    states = sorted(state_dir.glob("experiment_state-*.json"))
    if not states:
        return set()
    try:
        data = json.loads(states[-1].read_text())
    except (OSError, json.JSONDecodeError):  # being rewritten: try again
        return set()
    trials = [json.loads(t[0]) for t in data.get("trial_data", [])]
    return {t["trial_id"] for t in trials if t.get("status") == "TERMINATED"}


def children(cfg, sweep_name: str) -> list:
    """The sweep's trial runs ([] while the driver has not created the experiment yet)."""
    from debiaslab.errors import DebiaslabError

    try:
        return find_runs(resolve_tracking_uri(cfg.output_dir), experiments=["sweeps"],
                         tags={"debiaslab.sweep": sweep_name, "debiaslab.kind": "trial"},
                         statuses=())
    except DebiaslabError:
        return []


@pytest.mark.parametrize("change, message", [
    ({"params": {"sample.guidance.cfg.omega": {"type": "float", "low": 2.0, "high": 1.0}}},
     "params.sample.guidance.cfg.omega: empty or inverted range"),
    ({"params": {"sample.guidance.cfg.omega": {"type": "float", "low": 1.0, "high": 1.0}}},
     "empty or inverted range"),
    ({"params": {"sample.guidance.cfg.omegaa": {"type": "float", "low": 0.0, "high": 1.0}}},
     "params.sample.guidance.cfg.omegaa: unknown config key 'sample.guidance[0].omegaa'"),
    ({"params": {"cbdm.tau": {"type": "log", "low": 0.1, "high": 1.0}}},
     "a sampling sweep reuses one checkpoint"),
    ({"params": {"sample.steps": {"type": "categorical", "choices": []}}},
     "non-empty choices"),
    ({"objective": {"metric": "eval/fidd", "mode": "min"}},
     "objective metric 'eval/fidd' is not reported by any trial; trials report: "),
    ({"search": "grid"},
     "params.sample.guidance.cfg.omega: search: grid needs a categorical choices list, got type "
     "float"),
    ({"search": "grid", "params": {"sample.guidance.cfg.omega": {"type": "categorical",
                                                                 "choices": [0.0, 1.0]}}},
     "num_trials: search: grid runs each of its 2 combinations once; drop num_trials or set it "
     "to 2"),
    ({"search": "grid", "params": {"sample.guidance.cfg.omega": {"type": "categorical",
                                                                 "choices": [1.0, 1.0]}}},
     "params.sample.guidance.cfg.omega: choices repeat a value"),
    ({"checkpoint": "/nonexistent/run"}, "checkpoint: no trained checkpoint at /nonexistent/run"),
    ({"sweep_name": "../escape"}, "name: '../escape' is not a plain name"),
    ({"params": {"sample.guidance.cfg.omega": {"type": "float", "low": 0.0, "high": float("inf")}}},
     "params.sample.guidance.cfg.omega.high: must be a finite number"),
])
def test_bad_sweeps_fail_in_one_line_before_any_trial(base, tmp_path, change, message,
                                                     monkeypatch):
    import ray

    import debiaslab.distributed.sweep as tune_sweep

    root, experiment, _ = base
    name = change.pop("sweep_name", "bad")
    path = write_sweep(tmp_path, experiment, name, **change)
    running = ray.is_initialized()  # the run's shared Ray, if an earlier test started it
    starts = []
    monkeypatch.setattr(tune_sweep, "init_ray", lambda *a, **k: starts.append(a))
    with pytest.raises(ConfigError) as info:
        run_sweep(path)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not starts and ray.is_initialized() == running  # nothing started
    assert not (tmp_path / "out").exists()


def test_sampling_trials_load_the_model_the_train_stage_recorded(base, tmp_path):
    """A recipe whose train stage was found up to date may record a model in another run's
    folder: the sweep's trials load that one, not the base run folder's (which has none)."""
    import json

    from debiaslab.checkpoints import resolve_checkpoint
    from debiaslab.distributed.sweep import _sampling_checkpoint
    from debiaslab.recipes import RECORD_DIR, RECORD_VERSION, recorded_outputs

    root, experiment, cfg = base
    moved = tmp_path / "moved-experiment.yaml"
    moved.write_text(yaml.safe_dump({**yaml.safe_load(experiment.read_text()), "name": "moved"}))
    path = write_sweep(tmp_path, moved, "moved")
    sweep = load_sweep(path)
    with pytest.raises(ConfigError, match="no trained checkpoint at"):
        _sampling_checkpoint(sweep, recorded_outputs(sweep.base))  # no record, no checkpoint
    ckpt = resolve_checkpoint(cfg.run_dir)
    record = sweep.base.run_dir / RECORD_DIR / "train.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"version": RECORD_VERSION, "stage": "train", "key": "k",
                                  "outputs": {"score_model": {"kind": "checkpoint",
                                                              "path": str(ckpt), "hash": "h"}}}))
    assert _sampling_checkpoint(sweep, recorded_outputs(sweep.base)) == str(ckpt)


def test_sampling_sweep_multi_objective_with_asha(base, ray_env_tmp):
    root, experiment, cfg = base
    path = write_sweep(root, experiment, "omega", rungs=2, scheduler={"type": "asha"},
                       second_objective={"metric": "eval/tail_recall", "mode": "max"})
    result = run_sweep(path, progress=False)
    runs = children(cfg, "omega")
    assert len(runs) == 4 and all(r.status == "FINISHED" for r in runs)
    assert len({r.tags["debiaslab.trial_id"] for r in runs}) == 4
    assert {r.tags["mlflow.parentRunId"] for r in runs} == {result.parent_run_id}
    complete = [r for r in runs if r.tags["debiaslab.stopped_early"] == "false"]
    assert complete  # ASHA keeps at least one trial to the last rung
    best = min(complete, key=lambda r: r.metrics["eval/fid"])  # lowest FID logged in MLflow
    assert best.tags["debiaslab.trial_id"] == result.best_trial_id
    assert result.best_metrics["eval/fid"] == pytest.approx(best.metrics["eval/fid"])
    parent = find_runs(resolve_tracking_uri(cfg.output_dir), run_ids=[result.parent_run_id])[0]
    assert float(parent.params["best.sample.guidance.cfg.omega"]) == pytest.approx(
        result.best_config["sample.guidance.cfg.omega"])
    assert parent.status == "FINISHED"
    for name in ("trials.md", "objective_vs_params.png", "param_importance.png"):
        assert (result.sweep_dir / "summary" / name).is_file(), name


def test_grid_sweep_runs_every_combination_once_and_plots_its_front(base, ray_env_tmp):
    """``search: grid``: the trials are exactly the grid, whatever runs concurrently; with two
    objectives the summary plots them against each other."""
    root, experiment, cfg = base
    omegas = [0.0, 1.5, 3.0]
    path = write_sweep(root, experiment, "omega_grid", search="grid", num_trials=None,
                       params={"sample.guidance.cfg.omega": {"type": "categorical",
                                                             "choices": omegas}},
                       second_objective={"metric": "eval/tail_recall", "mode": "max"})
    result = run_sweep(path, progress=False)
    assert sorted(t["params"]["sample.guidance.cfg.omega"] for t in result.trials) == omegas
    runs = children(cfg, "omega_grid")
    assert sorted(float(r.params["sweep.sample.guidance.cfg.omega"]) for r in runs) == omegas
    for name in ("trials.md", "objective_vs_params.png", "front.png"):
        assert (result.sweep_dir / "summary" / name).is_file(), name


def test_training_sweep_trains_each_trial_with_ray_train(base, ray_env_tmp):
    root, experiment, cfg = base
    path = write_sweep(root, experiment, "tau", kind="training", num_trials=1,
                       cpus_per_trial=0.5,
                       params={"cbdm.tau": {"type": "log", "low": 0.1, "high": 10.0}})
    result = run_sweep(path, progress=False)
    runs = children(cfg, "tau")
    # one trial (each costs a Ray Train start, ~20 s here); the search itself is tested above
    assert len(runs) == 1 and all(r.status == "FINISHED" for r in runs)
    for run in runs:  # rank 0 of the trial's Ray Train run logged into the child run
        assert "train/loss" in run.metrics and "eval/fid" in run.metrics
        ckpt = Path(cfg.output_dir) / "ray_results" / run.name
        assert any(ckpt.glob("checkpoint_*")), ckpt
    best = min(runs, key=lambda r: r.metrics["eval/fid"])
    assert best.tags["debiaslab.trial_id"] == result.best_trial_id
    assert set(result.best_config) == {"cbdm.tau"}


def test_killed_driver_resumes_without_rerunning_or_duplicating(base, tmp_path, ray_env_tmp):
    """The driver is `debiaslab sweep` started by a script that imported ``ray`` first, without
    this process's Ray settings; until it is killed its process tree listens on loopback only
    (the sweep command's network check, tests/netwatch.py)."""
    root, experiment, cfg = base
    path = write_sweep(root, experiment, "resume", num_trials=RESUME_TRIALS,
                       max_concurrent_trials=1)
    driver_tmp = RAY_TMP + "-driver"
    driver = subprocess.Popen([sys.executable, "-c", RAY_FIRST, "sweep", "-c", str(path)],
                              env=scrubbed_env(DEBIASLAB_RAY_TMP=driver_tmp),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.time() + KILL_TIMEOUT_S
    state_dir = Path(cfg.output_dir) / "ray_results" / "resume"
    try:
        with ListenWatcher(driver.pid, driver_tmp) as watcher:
            while time.time() < deadline:
                if len(terminated(state_dir)) >= KILL_AFTER_FINISHED or driver.poll() is not None:
                    break
                time.sleep(0.5)
        assert driver.poll() is None, "the sweep ended before it could be killed"
        os.kill(driver.pid, signal.SIGKILL)  # the driver process only, mid-sweep
        driver.wait()
        if HAS_PROC:
            check_loopback_only(watcher, "sweep")
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        # the killed driver's local Ray (its own temp dir) goes too: no state for later tests
        subprocess.run(["pkill", "-9", "-f", driver_tmp], check=False)
        time.sleep(2.0)
    finished_before = terminated(state_dir)  # what Tune had recorded as finished
    assert len(finished_before) >= KILL_AFTER_FINISHED
    result = run_sweep(path, progress=False)
    assert result.restored
    runs = children(cfg, "resume")
    ids = [r.tags["debiaslab.trial_id"] for r in runs]
    assert len(ids) == len(set(ids)) == RESUME_TRIALS  # no duplicate child runs, the total
    assert len(result.trials) == RESUME_TRIALS
    assert all(r.status == "FINISHED" for r in runs)
    for trial_id in finished_before:  # finished trials ran exactly once
        attempts = Path(cfg.output_dir) / "runs" / f"resume-{trial_id}" / "attempts.txt"
        assert len(attempts.read_text().splitlines()) == 1, trial_id


def test_summary_plots_survive_degenerate_trials(base):
    """fANOVA is undefined with equal objective values: the plot says so instead of failing."""
    from debiaslab.sweeps import importance_and_scatter_figures

    _, experiment, _ = base
    sweep = load_sweep(write_sweep(base[0], experiment, "plots"))
    same = [{"params": {"sample.guidance.cfg.omega": w}, "metrics": {"eval/fid": 7.0}}
            for w in (0.5, 2.0)]
    figures = importance_and_scatter_figures(sweep, same)
    assert set(figures) == {"objective_vs_params", "param_importance"}
    text = [t.get_text() for t in figures["param_importance"].axes[0].texts]
    assert text and "undefined" in text[0]
    varied = [{"params": {"sample.guidance.cfg.omega": w}, "metrics": {"eval/fid": 10.0 + w * w}}
              for w in (0.1, 0.7, 1.5, 2.2, 2.9)]
    bars = importance_and_scatter_figures(sweep, varied)["param_importance"].axes[0].patches
    assert len(bars) == 1 and bars[0].get_width() == pytest.approx(1.0)


def test_best_breaks_ties_by_the_second_objective_and_marks_the_pareto_front():
    """Measured on the classifier-guidance scale sweep: several scales reach accuracy 1.0; the
    best is the one of them with the lowest FID, and the front lists the trade-offs."""
    from debiaslab.sweeps import Objective, pareto_front, ranking_key

    objectives = [Objective("eval/label_accuracy", "max"), Objective("eval/fid", "min")]
    trials = [{"eval/label_accuracy": a, "eval/fid": f} for a, f in
              [(1.0, 202.5), (1.0, 201.4), (0.9967, 120.0), (0.95, 57.0), (0.25, 88.8),
               (1.0, float("nan"))]]
    best = min(range(len(trials)), key=lambda i: ranking_key(trials[i], objectives))
    assert best == 1
    assert pareto_front(trials, objectives) == [False, True, True, True, False, False]
    assert pareto_front(trials[:1], objectives[:1]) == [True]


def test_front_and_per_choice_means_in_the_summary_plots(base):
    """Two objectives: the front plot labels each trial and joins the Pareto-optimal ones; a
    categorical parameter that trials repeat (a grid over seeds) gets its mean per choice."""
    from debiaslab.sweeps import importance_and_scatter_figures

    _, experiment, _ = base
    sweep = load_sweep(write_sweep(
        base[0], experiment, "front", search="grid", num_trials=None,
        params={"sample.guidance.cfg.omega": {"type": "categorical", "choices": [0.0, 2.0]},
                "sample.seed_start": {"type": "categorical", "choices": [0, 100]}},
        second_objective={"metric": "eval/tail_recall", "mode": "max"}))
    assert sweep.num_trials == 4
    metrics = {(0.0, 0): (50.0, 0.1), (0.0, 100): (54.0, 0.2), (2.0, 0): (60.0, 0.5),
               (2.0, 100): (70.0, 0.3)}
    trials = [{"params": {"sample.guidance.cfg.omega": w, "sample.seed_start": s},
               "metrics": {"eval/fid": f, "eval/tail_recall": r}}
              for (w, s), (f, r) in metrics.items()]
    figures = importance_and_scatter_figures(sweep, trials)
    assert set(figures) == {"objective_vs_params", "param_importance", "front"}
    front = figures["front"].axes[0]
    labels = sorted(t.get_text() for t in front.texts)
    assert labels == ["omega=0, seed_start=0", "omega=0, seed_start=100",
                      "omega=2, seed_start=0", "omega=2, seed_start=100"]
    line = front.get_lines()[0]  # (recall, FID) of the undominated trials, by recall
    assert list(line.get_xdata()) == [0.1, 0.2, 0.5] and list(line.get_ydata()) == [50, 54, 60]
    panels = figures["objective_vs_params"].axes
    assert len(panels) == 4  # 2 objectives x 2 parameters
    mean = panels[0].get_lines()[0]  # FID vs omega: mean per choice
    assert list(mean.get_ydata()) == [52.0, 65.0]
