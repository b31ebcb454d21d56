"""Shared test settings: no telemetry, small thread pools on the 2-core machines."""

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests use their own stores

import pytest  # noqa: E402


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
