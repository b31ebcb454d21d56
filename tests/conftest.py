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
