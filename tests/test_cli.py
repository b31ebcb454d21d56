"""The `debiaslab` CLI: --help everywhere, dry runs, one-line errors, and a tiny end-to-end run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY as TINY_CORE
from conftest import recipe_runs, sets

from debiaslab.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_CORE + ["train.steps=12", "train.log_every=4", "train.checkpoint_every=6",
                    "sample.num_samples=20", "sample.steps=5", "sample.batch_size=20",
                    "metrics.bootstrap=20"]


@pytest.mark.parametrize("argv", [[], ["quickstart"], ["data"], ["data", "build"], ["train"],
                                  ["sample"], ["run"]])
def test_help_on_every_subcommand(argv):
    proc = subprocess.run([sys.executable, "-m", "debiaslab.cli", *argv, "--help"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "usage: debiaslab" in proc.stdout


def test_dry_run_validates_without_running(tmp_path, capsys):
    cfg = ROOT / "configs/experiments/digits_lt_debias.yaml"
    assert main(["train", "-c", str(cfg), "--dry-run", "--set", f"output_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "weighting: debias" in out and "config OK" in out
    assert not any(tmp_path.iterdir())  # nothing was built or trained
    assert main(["quickstart", "--dry-run", "--output-dir", str(tmp_path)]) == 0
    assert not any(tmp_path.iterdir())


def test_bad_config_is_one_line_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "debiaslab.cli", "train", "--set", "train.sheduler=cosine",
         "--dry-run"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.sheduler" in lines[0] and "Traceback" not in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "debiaslab.cli", "sample", "--checkpoint", str(tmp_path / "x.pt"),
         "--set", f"output_dir={tmp_path}"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "x.pt" in proc.stderr


def test_parser_lists_required_commands():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"quickstart", "data", "train", "sample", "run"} <= set(sub.choices)


def test_run_end_to_end_records_mlflow(tmp_path, capsys):
    from mlflow import MlflowClient

    argv = ["run", "-c", str(ROOT / "configs/experiments/digits_lt_baseline.yaml"),
            *sets(TINY + [f"output_dir={tmp_path}", "tracking.experiment=e2e"])]
    assert main(argv) == 0
    run_dir = tmp_path / "runs" / "digits_lt_baseline"
    for name in ["grid_ddim.png", "grid_dpmpp_2m.png"]:
        assert (run_dir / "samples" / name).stat().st_size > 0
    assert (run_dir / "class_counts.png").is_file()
    assert (run_dir / "samples" / "ddim" / "dataset.json").is_file()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id])
    (run,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]  # the parent
    children = {r.data.tags["debiaslab.stage"]: r for r in runs if r is not run}
    assert set(children) == {"data", "train", "sample", "evaluate"}
    assert all(c.data.tags["mlflow.parentRunId"] == run.info.run_id for c in children.values())
    assert all(c.info.status == "FINISHED" for c in children.values())
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "12"
    assert run.data.params["diffusion.weighting"] == "constant"
    assert run.data.tags["debiaslab.method"] == "diffusion"  # the recipe, not the loss
    train = children["train"]
    assert train.data.params["stage.train.steps"] == "12"
    history = client.get_metric_history(train.info.run_id, "train/loss")
    assert [m.step for m in history] == [4, 8, 12]
    assert children["data"].data.tags["dataset.train.hash"]
    assert "debiaslab.git_commit" in run.data.tags
    arts = {a.path for a in client.list_artifacts(children["sample"].info.run_id, "samples")}
    assert {"samples/grid_ddim.png", "samples/grid_dpmpp_2m.png"} <= arts
    # a second run finds every stage up to date and says so
    assert main(argv) == 0
    assert capsys.readouterr().out.count("up to date") == 4
    (second,) = [r for r in client.search_runs([exp.experiment_id])
                 if "mlflow.parentRunId" not in r.data.tags and r.info.run_id != run.info.run_id]
    assert second.data.tags["debiaslab.skipped_stages"] == "data,train,sample,evaluate"
    # sample again from the finished run through the CLI
    assert main(["sample", "-c", str(run_dir / "config.yaml"), "--out", str(tmp_path / "s2"),
                 "--set", "sample.samplers=[ddpm]"]) == 0
    assert (tmp_path / "s2" / "grid_ddpm.png").is_file()
    # evaluate straight from the checkpoint: samples with the config's settings, then metrics
    assert main(["evaluate", "-c", str(run_dir / "config.yaml"), "--checkpoint", str(run_dir),
                 "--out", str(tmp_path / "ev"), "--set", "sample.samplers=[ddim]",
                 "--set", "tracking.enabled=false"]) == 0
    out = capsys.readouterr().out
    assert "ddim" in out and "fid" in out
    assert (tmp_path / "ev" / "eval_ddim.json").is_file()
    # the run itself logged the evaluation of its first sampler in the eval/ namespace
    assert {"eval/fid", "eval/ddim/fid", "eval/dpmpp_2m/fid"} <= set(run.data.metrics)


# every `ray job submit` entry point that takes an experiment config, with the config it is used
# with; all of them run in one interpreter (runpy, as `python jobs/X.py` would) to pay the torch
# and ray imports once
JOBS = {job: "configs/experiments/digits_lt_baseline.yaml"
        for job in ("build_data", "extract", "train", "sample", "evaluate", "pipeline")}
JOBS["classifier"] = "configs/experiments/digits_classifier_guidance.yaml"
RUN_JOBS = """
import contextlib, io, json, runpy, sys
out_dir, jobs = sys.argv[1], json.loads(sys.argv[2])
result = {}
for job, config in jobs.items():
    sys.argv = [f"jobs/{job}.py", "-c", config, "--set", f"output_dir={out_dir}", "--dry-run"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            runpy.run_path(f"jobs/{job}.py", run_name="__main__")
            code = None
        except SystemExit as exc:
            code = exc.code
    result[job] = [code, buf.getvalue()]
print(json.dumps(result))
"""


def test_job_entry_points_dry_run(tmp_path):
    proc = subprocess.run([sys.executable, "-c", RUN_JOBS, str(tmp_path), json.dumps(JOBS)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == set(JOBS)
    for job, (code, output) in result.items():
        assert code == 0, f"jobs/{job}.py: exit {code}: {output}"
        assert "config OK" in output, f"jobs/{job}.py: {output}"


def test_quickstart_end_to_end_tiny(tmp_path, capsys):
    """The main job, shrunk: both experiments, both samplers, comparison figure, MLflow runs."""
    from mlflow import MlflowClient

    argv = ["quickstart", "--output-dir", str(tmp_path), *sets(TINY)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "mlflow ui --backend-store-uri" in out and "comparison.png" in out
    assert (tmp_path / "comparison.png").stat().st_size > 0
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("quickstart")
    runs = [r for r in client.search_runs([exp.experiment_id])
            if "mlflow.parentRunId" not in r.data.tags]
    assert sorted(r.data.params["diffusion.weighting"] for r in runs) == ["constant", "debias"]
    assert all(r.info.status == "FINISHED" for r in runs)


def test_sigterm_during_training_ends_run_killed(tmp_path):
    """A real SIGTERM mid-training: exit 143, one-line message, MLflow run KILLED, checkpoint
    kept."""
    import signal
    import time

    from mlflow import MlflowClient

    argv = [sys.executable, "-m", "debiaslab.cli", "train", *sets(
        TINY + [f"output_dir={tmp_path}", "train.steps=100000", "train.checkpoint_every=3",
                "tracking.experiment=sigterm"])]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    ckpts = tmp_path / "runs" / "experiment" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not any(ckpts.glob("ckpt_*.pt")):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in err and "terminated by signal 15" in err
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run, children = recipe_runs(client, "sigterm")
    assert run.info.status == "KILLED" and children["train"].info.status == "KILLED"
    from debiaslab.checkpoints import latest_checkpoint, load_checkpoint

    assert load_checkpoint(latest_checkpoint(ckpts))["step"] % 3 == 0
