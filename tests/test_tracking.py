"""Tests of debiaslab.tracking against real MLflow on local SQLite stores (no mocks)."""

from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import dataclasses
import selectors
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import debiaslab
from debiaslab import tracking
from debiaslab.report import class_count_figure
from debiaslab.tracking import (
    GIT_COMMIT_TAG,
    Killed,
    Tracker,
    artifact_location,
    flatten,
    git_commit,
    resolve_tracking_uri,
    ui_hint,
)

PLATFORM_DIR = Path(debiaslab.__file__).resolve().parents[1]
CHILD_ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(PLATFORM_DIR), os.environ.get("PYTHONPATH")])),
    "MLFLOW_DISABLE_TELEMETRY": "true",
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, object]:
    """One SQLite store shared by the module (initialising a db costs ~2 s)."""
    import mlflow

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    return root, uri, mlflow.MlflowClient(tracking_uri=uri)


def _status(client, run_id: str) -> str:
    return client.get_run(run_id).info.status


def test_round_trip_params_metrics_artifacts_tags(store, tmp_path: Path) -> None:
    root, uri, client = store
    config = {
        "method": {"name": "cbdm", "tau": 0.001, "gamma": 0.25},
        "data": {"classes": [0, 1, 2], "imbalance": 0.01, "paths": ("a", "b")},
        "notes": "x" * 7000,
    }
    extra = {f"sweep.p{i:03d}": i for i in range(250)}  # three batches of <= 100 params
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "b.txt").write_text("world")
    with Tracker(root, "roundtrip", run_name="rt", tags={"method": "cbdm"}, tracking_uri=uri) as tr:
        tr.log_config(config)
        tr.log_params(extra)
        tr.log_metrics({"train/loss": 1.5, "eval/fid": np.float32(30.0)}, step=0)
        tr.log_metrics({"train/loss": 0.5}, step=10)
        tr.log_metrics({"bias/share_3,bold=1": 0.25})  # characters MLflow refuses become _
        tr.log_artifact(tmp_path / "a.txt")
        tr.log_artifact(tmp_path / "dir", artifact_path="extra")
        tr.log_figure(class_count_figure([5, 3, 1], "counts"), "plots/counts")
        tr.log_image_grid(np.zeros((4, 1, 8, 8), dtype=np.float32), "samples/grid.png", nrow=2)
        tr.log_dataset("abc123", "digits_lt", "/data/digits_lt.parquet")
        tr.set_tag("stage", "train")
        run_id = tr.run_id
        assert tr.tracking_uri == uri
        assert tr.artifact_uri.startswith(artifact_location(root, "roundtrip"))
        assert client.get_run(run_id).info.status == "RUNNING"

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "rt"
    assert run.info.experiment_id == tr.experiment_id
    params = run.data.params
    assert params["method.name"] == "cbdm" and params["method.tau"] == "0.001"
    assert params["data.classes"] == "[0, 1, 2]" and params["data.paths"] == "['a', 'b']"
    assert len(params["notes"]) == 6000 and params["notes"].endswith("...[truncated]")
    assert len(params) == 7 + 250 and params["sweep.p249"] == "249"
    assert run.data.metrics == {"train/loss": 0.5, "eval/fid": 30.0, "bias/share_3_bold_1": 0.25}
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.5), (10, 0.5)]
    tags = run.data.tags
    assert tags["method"] == "cbdm" and tags["stage"] == "train"
    assert tags["dataset.digits_lt.hash"] == "abc123"
    assert tags["dataset.digits_lt.path"] == "/data/digits_lt.parquet"
    assert tags[GIT_COMMIT_TAG] == git_commit()  # the checkout this package runs from
    top = {f.path for f in client.list_artifacts(run_id)}
    assert top == {"a.txt", "config.yaml", "extra", "plots", "samples"}
    assert [f.path for f in client.list_artifacts(run_id, "extra")] == ["extra/b.txt"]
    assert [f.path for f in client.list_artifacts(run_id, "plots")] == ["plots/counts.png"]
    assert [f.path for f in client.list_artifacts(run_id, "samples")] == ["samples/grid.png"]
    local = client.download_artifacts(run_id, "config.yaml", str(tmp_path))
    loaded = yaml.safe_load(Path(local).read_text())
    assert loaded["method"] == config["method"] and loaded["data"]["paths"] == ["a", "b"]


def test_exception_ends_run_failed_and_propagates(store) -> None:
    root, uri, client = store
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(ValueError, match="boom"):
        with Tracker(root, "status", run_name="fails", tracking_uri=uri) as tr:
            assert signal.getsignal(signal.SIGTERM) != previous
            raise ValueError("boom")
    assert _status(client, tr.run_id) == "FAILED"
    assert signal.getsignal(signal.SIGTERM) == previous


def test_keyboard_interrupt_ends_run_killed(store) -> None:
    root, uri, client = store
    with pytest.raises(KeyboardInterrupt):
        with Tracker(root, "status", run_name="ctrl-c", tracking_uri=uri) as tr:
            raise KeyboardInterrupt
    assert _status(client, tr.run_id) == "KILLED"


def test_sigterm_in_process_unwinds_and_restores_handler(store) -> None:
    root, uri, client = store
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Killed) as info:
        with Tracker(root, "status", run_name="sigterm", tracking_uri=uri) as tr:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # interrupted by the handler
    assert info.value.exit_code == 128 + signal.SIGTERM
    assert _status(client, tr.run_id) == "KILLED"
    assert signal.getsignal(signal.SIGTERM) == previous


def test_sigterm_subprocess_ends_run_killed_promptly(store, tmp_path: Path) -> None:
    root, uri, client = store
    script = textwrap.dedent(
        f"""
        import sys, time
        from debiaslab.tracking import Tracker
        with Tracker({str(root)!r}, "status", run_name="child", tracking_uri={uri!r}) as tr:
            print(tr.run_id, flush=True)
            time.sleep(120)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=CHILD_ENV, cwd=tmp_path,
    )
    try:
        selector = selectors.DefaultSelector()
        selector.register(proc.stdout, selectors.EVENT_READ)
        assert selector.select(timeout=60), "child did not start a run in 60 s"
        run_id = proc.stdout.readline().strip()
        assert run_id, proc.stderr.read()
        assert _status(client, run_id) == "RUNNING"
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(timeout=30)
        elapsed = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read()
    assert returncode == 1, stderr
    assert "Killed: terminated by signal SIGTERM" in stderr
    assert elapsed < 10
    assert _status(client, run_id) == "KILLED"


def test_attach_to_run_id_from_worker_thread(store) -> None:
    root, uri, client = store
    with Tracker(root, "attach", run_name="driver", tracking_uri=uri) as driver:
        errors: list[BaseException] = []

        def worker() -> None:  # e.g. rank 0 of a Ray Train run: no signal handler off-main
            try:
                with Tracker(root, "attach", tracking_uri=uri, run_id=driver.run_id) as tr:
                    tr.log_metrics({"train/loss": 0.25}, step=3)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        assert not errors
        assert _status(client, driver.run_id) == "RUNNING"  # the attached tracker left it open
    run = client.get_run(driver.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics == {"train/loss": 0.25}
    with Tracker(root, "attach", tracking_uri=uri, run_id=driver.run_id, end_run=True) as tr:
        assert _status(client, tr.run_id) == "RUNNING"  # resumed
        tr.log_metrics({"train/loss": 0.125}, step=4)
    assert _status(client, driver.run_id) == "FINISHED"


def test_env_tracking_uri_honoured(store, tmp_path: Path, monkeypatch) -> None:
    root, uri, client = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert resolve_tracking_uri(tmp_path) == uri
    with Tracker(tmp_path / "out", "env", run_name="via-env") as tr:
        assert tr.tracking_uri == uri
    assert client.get_run(tr.run_id).info.run_name == "via-env"
    assert not (tmp_path / "out" / "mlflow.db").exists()
    assert tr.artifact_uri.startswith((root / "mlartifacts" / "env").as_uri())


def test_embedded_default_store(tmp_path: Path, monkeypatch) -> None:
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("out") == f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    with Tracker("out", "digits/cbdm", run_name="default") as tr:
        tr.log_metrics({"eval/fid": 1.0})
    assert (tmp_path / "out" / "mlflow.db").is_file()
    location = (tmp_path / "out" / "mlartifacts" / "digits_cbdm").as_uri()
    assert artifact_location(tmp_path / "out", "digits/cbdm") == location
    client = mlflow.MlflowClient(tracking_uri=tr.tracking_uri)
    assert client.get_experiment(tr.experiment_id).artifact_location == location
    assert client.get_run(tr.run_id).info.status == "FINISHED"
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()


def test_flatten() -> None:
    @dataclasses.dataclass
    class Sched:
        steps: int = 50
        kind: str = "ddim"

    config = {
        "a": {"b": {"c": 1}, "d": [1, 2], "e": (3, "x")},
        "f": None,
        "g": True,
        "h": {},
        "sched": Sched(),
        "long": "y" * 10_000,
    }
    flat = flatten(config)
    assert flat["a.b.c"] == "1" and flat["a.d"] == "[1, 2]" and flat["a.e"] == "[3, 'x']"
    assert flat["f"] == "None" and flat["g"] == "True" and flat["h"] == "{}"
    assert flat["sched.steps"] == "50" and flat["sched.kind"] == "ddim"
    assert len(flat["long"]) == 6000 and flat["long"].endswith("...[truncated]")
    assert set(flat) == {"a.b.c", "a.d", "a.e", "f", "g", "h", "sched.steps", "sched.kind", "long"}
    assert flatten({"x": {"y": 1}}, prefix="cfg") == {"cfg.x.y": "1"}


def _git(repo: Path, *args: str) -> str:
    env = {
        **os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    result = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, env=env, check=True
    )
    return result.stdout.strip()


def test_git_commit_repo_dirty_and_non_repo(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    assert git_commit(repo) is None  # no commit yet
    (repo / "f.txt").write_text("1")
    _git(repo, "add", "f.txt")
    _git(repo, "commit", "-q", "-m", "init")
    sha = _git(repo, "rev-parse", "HEAD")
    assert len(sha) == 40 and git_commit(repo) == sha
    (repo / "untracked.txt").write_text("u")
    assert git_commit(repo) == sha  # untracked files do not make the tree dirty
    (repo / "f.txt").write_text("2")
    assert git_commit(repo) == sha + "-dirty"
    plain = tmp_path / "plain"
    plain.mkdir()
    assert git_commit(plain) is None
    assert git_commit(tmp_path / "missing") is None


def test_retry_on_database_locked(monkeypatch) -> None:
    monkeypatch.setattr(tracking, "LOCK_RETRY_BASE_DELAY_S", 0.001)
    calls = []

    def flaky(value: int) -> int:
        calls.append(value)
        if len(calls) < 3:
            raise RuntimeError("write failed") from sqlite3.OperationalError("database is locked")
        return value * 2

    assert tracking._retry_locked(flaky, 21) == 42 and len(calls) == 3

    def broken() -> None:
        calls.append(0)
        raise ValueError("not a lock error")

    calls.clear()
    with pytest.raises(ValueError):
        tracking._retry_locked(broken)
    assert len(calls) == 1


def test_ui_hint() -> None:
    assert ui_hint("sqlite:////tmp/out/mlflow.db") == (
        "mlflow ui --backend-store-uri sqlite:////tmp/out/mlflow.db"
    )
    assert ui_hint("sqlite:////tmp/my out/mlflow.db") == (
        "mlflow ui --backend-store-uri 'sqlite:////tmp/my out/mlflow.db'"
    )
    assert ui_hint("http://127.0.0.1:5000") == "open http://127.0.0.1:5000 in a browser"


def test_import_is_cheap() -> None:
    code = "import sys, debiaslab.tracking; assert 'mlflow' not in sys.modules, 'mlflow imported'"
    subprocess.run([sys.executable, "-c", code], env=CHILD_ENV, check=True, timeout=60)
