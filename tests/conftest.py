"""Shared test settings (no telemetry, small thread pools on the 2-core machines) and helpers.

Test modules import the helpers with ``from conftest import X``.
"""

import contextlib
import importlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Iterator

# `from conftest import X` in test modules: under --import-mode=importlib pytest registers this
# file as `tests.conftest` only, so alias it (the same module object, not a second import).
sys.modules.setdefault("conftest", sys.modules[__name__])
# helper modules beside this file (netwatch.py) import as top-level modules; appended, so they
# never shadow an installed package
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests use their own stores

import pytest  # noqa: E402

from debiaslab import plugins  # noqa: E402

plugins.load()  # as every entry point does: the methods register their components

BIN = Path(sys.executable).parent  # the venv's console scripts (mlflow, ray)

# The core of every tiny-model config override list; test modules extend it with their own
# train/sample/tracking settings (e.g. ``TINY + ["train.steps=8"]``).
TINY = ["model.model_channels=16", "model.channel_mult=[1,2]", "model.attention_resolutions=[]",
        "model.head_channels=16", "train.batch_size=16", "train.device=cpu"]


@pytest.fixture(scope="session", autouse=True)
def debiaslab_cache(tmp_path_factory):
    """One extractor cache per test session (the digits classifier trains once, not per test)."""
    path = tmp_path_factory.mktemp("debiaslab-cache")
    old = os.environ.get("DEBIASLAB_CACHE")
    os.environ["DEBIASLAB_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("DEBIASLAB_CACHE", None)
    else:
        os.environ["DEBIASLAB_CACHE"] = old


@pytest.fixture(scope="module")
def digits_lt(tmp_path_factory):
    """digits-LT (rho = 0.1, seed 0) in memory, built once per test module."""
    from debiaslab.data.dataset import ImageDataset
    from debiaslab.data.sources import build_dataset

    out = tmp_path_factory.mktemp("data") / "digits-lt"
    build_dataset("digits", out, imbalance="long_tail", imb_factor=0.1, seed=0)
    return ImageDataset.load(out)


def recipe_runs(client, experiment: str):
    """(parent run, {stage: child run}) of the one recipe run in an MLflow experiment."""
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    children = {r.data.tags["debiaslab.stage"]: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    return parents[0], children


# ------------------------------------------------------------------------- one-line errors


def one_line(exc: pytest.ExceptionInfo) -> str:
    """The message of a raised error, asserted non-empty and a single line."""
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


def sets(items):
    """CLI arguments ``--set a --set b ...`` for override strings."""
    return [a for item in items for a in ("--set", item)]


def one_line_error(capsys, argv, *needles):
    """Run the CLI in-process; assert exit 2, one stderr line holding every needle."""
    from debiaslab.cli import main

    code = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("debiaslab:")]
    assert code == 2, err
    assert len(lines) == 1, err  # progress lines of the work before the error may precede it
    assert "Traceback" not in err and "\x1b[" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ------------------------------------------------------------- local servers: MLflow, Ray


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Poll ``url`` until it answers with a success status: TimeoutError after ``timeout`` s,
    RuntimeError as soon as ``proc`` (the server, when given) has exited."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with code {proc.returncode} before {url} answered")
        if time.monotonic() > deadline:
            raise TimeoutError(url)
        time.sleep(0.5)


def stop(proc: subprocess.Popen, timeout: float = 40, *, group: bool = False) -> None:
    """SIGTERM, wait up to ``timeout`` s, then SIGKILL: the process, or with ``group`` its whole
    process group (a process started with ``start_new_session=True``; the group's id is its
    PID)."""

    def send(sig: int) -> None:
        if group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
        elif proc.poll() is None:
            proc.send_signal(sig)

    if not group and proc.poll() is not None:
        return
    send(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait(timeout=10)


@contextlib.contextmanager
def mlflow_server_process(root: Path, *, timeout: float,
                          env: dict[str, str] | None = None) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 (SQLite backend and artifacts under ``root``, log in
    ``root/server.log``), in its own process group, stopped by PID; yields its URI. A server that
    does not answer within ``timeout`` s fails the test with the log's tail."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts")]
    with open(root / "server.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True,
                                env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
                                     **(env or {})})
        try:
            try:
                wait_http(f"{uri}/health", timeout, proc)
            except (RuntimeError, TimeoutError) as exc:
                pytest.fail(f"mlflow server did not start ({exc}): "
                            f"{(root / 'server.log').read_text()[-2000:]}")
            yield uri
        finally:
            stop(proc, group=True)  # the server's own process group (start_new_session)


@contextlib.contextmanager
def ray_head_process(temp_dir: Path, env: dict[str, str]) -> Iterator[str]:
    """A real `ray start --head` on 127.0.0.1 (2 CPUs, 1 GiB object store, dashboard on a free
    port); yields the dashboard URL. Stopped by PID (and its process group), and the cluster
    address file it wrote is removed so that a later ray.init() does not try to attach.

    Its dashboard agent (which runs submitted jobs) listens on a free port: Ray's default, 52365,
    is taken by the agent of the run's shared in-process Ray, and an agent that cannot bind
    leaves every submitted job pending."""
    gcs, dash, agent = free_port(), free_port(), free_port()
    cluster_file = Path("/tmp/ray/ray_current_cluster")
    before = cluster_file.read_text() if cluster_file.exists() else None
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
         "--include-dashboard", "true", "--dashboard-agent-listen-port", str(agent),
         "--num-cpus", "2", "--object-store-memory",
         str(1024**3), "--temp-dir", str(temp_dir), "--disable-usage-stats"],
        env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{dash}/api/version", 180)
        yield f"http://127.0.0.1:{dash}"
    finally:
        stop(proc)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # any straggler the head left in its group
        if cluster_file.exists() and cluster_file.read_text() != before:
            cluster_file.unlink()


SHARED_RAY_TMP = "/tmp/dl-test-ray"  # short (socket paths), apart from other local clusters
# a user's own method module that the shared Ray's workers load (DEBIASLAB_PLUGINS), as a user's
# plugin would be loaded: the batch-dependent guidance of test_distributed_data
WORKER_PLUGIN = "batch_guidance_plugin"


@pytest.fixture(scope="session")
def shared_ray() -> Iterator[ModuleType]:
    """One small local Ray (2 CPUs, 1 GiB object store) for every in-process Ray test of the
    run, started by our own start (init_ray) on first use and shut down at the end of the run.

    Its workers import the tests folder's WORKER_PLUGIN as a user's method module. The temp
    folder is set for the start only, so no subprocess of a later test inherits it. Tests that
    need a Ray of their own (a fresh start, a killed driver, a network watch) run it in a
    subprocess."""
    from debiaslab.distributed.runtime import init_ray, ray_env, shutdown_ray

    importlib.import_module(WORKER_PLUGIN)  # the driver's registry gets it too
    old = os.environ.get("DEBIASLAB_RAY_TMP")
    os.environ["DEBIASLAB_RAY_TMP"] = SHARED_RAY_TMP
    try:
        ray_env()  # before ray is imported: loopback-only head, no telemetry
        import ray

        tests_dir = str(Path(__file__).resolve().parent)
        path = os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))
        init_ray(num_cpus=2, object_store_memory_gb=1.0,
                 runtime_env={"env_vars": {"DEBIASLAB_PLUGINS": WORKER_PLUGIN,
                                           "PYTHONPATH": path}})
    finally:
        if old is None:
            os.environ.pop("DEBIASLAB_RAY_TMP", None)
        else:
            os.environ["DEBIASLAB_RAY_TMP"] = old
    try:
        yield ray
    finally:
        shutdown_ray()


def ship_by_value(module: ModuleType) -> None:
    """Ray workers get a test module's functions and classes by value (they cannot import
    test modules)."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(module)
