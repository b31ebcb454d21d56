"""Every Ray-backed stage of every shipped recipe starts its Ray through our one start
(distributed.runtime.init_ray): no dashboard, our object-store cap, our temp folder, loopback
only, and no auth token written to the user's home. Ray Data or Ray Train starting a default Ray
by themselves (as the minority-score stage once did) fails here."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from debiaslab.config import load_config
from debiaslab.distributed.runtime import GIB, short_temp_dir
from debiaslab.recipes import RECIPES, resolve_backend

ROOT = Path(__file__).resolve().parents[1]
STORE_GB = 0.3  # far from Ray's default (30% of memory): a start without our cap shows
RAY_TMP = "/tmp/dl-raystart"
# the stages that use Ray when their backend is ray; data and evaluate never start it
RAY_USERS = {"train_stage", "sample_stage", "aux_model_stage.<locals>.run",
             "side_table_stage.<locals>.run"}


def shipped_ray_stages() -> dict[str, set[str]]:
    """{stage function: {config file}} of every stage a shipped config runs on Ray."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "configs" / "experiments").glob("*.yaml")):
        cfg = load_config(path)
        for stage in RECIPES.get(cfg.recipe).stages:
            if resolve_backend(cfg, stage) == "ray":
                found.setdefault(stage.fn.__qualname__, set()).add(path.name)
    return found


def test_our_default_temp_folder_is_not_rays():
    env = os.environ.pop("DEBIASLAB_RAY_TMP", None)
    try:
        assert short_temp_dir() != "/tmp/ray"
    finally:
        if env is not None:
            os.environ["DEBIASLAB_RAY_TMP"] = env


def test_every_ray_backed_stage_starts_ray_through_init_ray(tmp_path):
    shipped = shipped_ray_stages()
    assert RAY_USERS & set(shipped), shipped  # the shipped configs do run stages on Ray
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "DEBIASLAB_RAY_TMP": RAY_TMP,
           "PYTHONPATH": str(ROOT / "platform")}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "ray_start_probe.py"),
                           str(tmp_path / "out"), str(STORE_GB)],
                          capture_output=True, text=True, env=env, timeout=580, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    probe = json.loads(done.stdout.strip().splitlines()[-1])

    # the probe's recipe runs every kind of stage a shipped config puts on Ray
    ran = set(probe["stages"].values())
    assert set(shipped) <= ran, {k: v for k, v in shipped.items() if k not in ran}

    starts = probe["starts"]
    users = {name for start in starts for name in start["stack"] if name in RAY_USERS}
    assert users == RAY_USERS, f"stages that started Ray: {sorted(users)}"
    for start in starts:
        where = " <- ".join(start["stack"][:6])
        assert start["caller"] == "debiaslab.distributed.runtime", where
        assert not start["dashboard"], (start["dashboard"], where)
        assert start["object_store_memory"] == pytest.approx(STORE_GB * GIB, rel=0.01), where
        assert Path(start["temp_dir"]).is_relative_to(RAY_TMP), (start["temp_dir"], where)
        assert start["node_ip"] == "127.0.0.1", where
    assert not (home / ".ray" / "auth_token").exists()
