"""Run safety: resume refuses a changed meaning, one writer per run folder, a killed run leaves
no temp files or zombie MLflow runs behind, datasets are keyed by everything that defines them."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY as TINY_CORE

from debiaslab.checkpoints import latest_checkpoint, load_checkpoint
from debiaslab.cli import main
from debiaslab.config import load_config
from debiaslab.errors import CheckpointError, DataError, RunLocked
from debiaslab.runlock import run_lock
from debiaslab.stages import build_data, check_resumable, train

ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_CORE + ["train.log_every=2", "train.checkpoint_every=2", "tracking.enabled=false"]


def cfg_at(out: Path, *extra: str):
    return load_config(None, TINY + [f"output_dir={out}", "name=r", *extra])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run trained to step 4 (its folder is copied by tests that resume it)."""
    out = tmp_path_factory.mktemp("resume")
    cfg = cfg_at(out, "train.steps=4")
    build_data(cfg)
    train(cfg, progress=False)
    return out


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("changes, keys", [
    (["train.lr=0.005"], ["train.lr"]),
    (["train.seed=3", "diffusion.weighting=debias"], ["train.seed", "diffusion.weighting"]),
    (["diffusion.loss=cbdm"], ["diffusion.loss"]),
    (["train.batch_size=8"], ["train.batch_size"]),
])
def test_resume_refuses_a_changed_config_listing_the_keys(trained_run, tmp_path, changes, keys):
    out = copy_run(trained_run, tmp_path / "o")
    with pytest.raises(CheckpointError) as info:
        train(cfg_at(out, "train.steps=8", *changes), progress=False)
    msg = str(info.value)
    assert "\n" not in msg and "ckpt_00000004.pt" in msg
    for key in keys:
        assert key in msg
    assert latest_checkpoint(out / "runs" / "r" / "checkpoints").name == "ckpt_00000004.pt"


def test_world_size_is_compared_not_the_backend(tmp_path):
    from debiaslab.config import to_dict
    from debiaslab.training.resume import config_differences

    local = to_dict(cfg_at(tmp_path))
    assert config_differences(local, cfg_at(tmp_path, "distributed.backend=ray")) == {}
    assert config_differences(local, cfg_at(tmp_path, "distributed.num_workers=4")) == {}
    two = cfg_at(tmp_path, "distributed.backend=ray", "distributed.num_workers=2")
    assert config_differences(local, two) == {"distributed.num_workers": (1, 2)}


def test_bookkeeping_changes_resume_freely(trained_run, tmp_path):
    out = copy_run(trained_run, tmp_path / "o")
    cfg = cfg_at(out, "train.steps=6", "train.log_every=3", "train.checkpoint_every=3",
                 "sample.steps=7", "metrics.k=3", "tracking.experiment=other")
    assert check_resumable(cfg) == {}
    result = train(cfg, progress=False)
    assert load_checkpoint(result.checkpoint)["step"] == 6


def test_resume_allow_accepts_the_listed_key_and_applies_it(trained_run, tmp_path, digits_lt):
    out = copy_run(trained_run, tmp_path / "o")
    cfg = cfg_at(out, "train.steps=6", "train.lr=0.0002", "train.resume_allow=[train.lr]")
    assert check_resumable(cfg) == {"train.lr": (0.001, 0.0002)}
    from debiaslab.data.locate import load_training_data
    from debiaslab.training.loop import Trainer

    trainer = Trainer(cfg, load_training_data(cfg), cfg.run_dir, progress=False)
    assert trainer.resume() is not None and trainer.step == 4
    lam = min(1.0, (trainer.scheduler.last_epoch + 1) / cfg.train.warmup_steps)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0002 * lam, rel=1e-12)
    # listing a key does not open the door to others
    other = cfg_at(out, "train.steps=6", "train.lr=0.0002", "train.seed=5",
                   "train.resume_allow=[train.lr]")
    with pytest.raises(CheckpointError, match="train.seed"):
        check_resumable(other)


def test_resume_below_the_checkpoint_step_is_an_error(trained_run, tmp_path):
    out = copy_run(trained_run, tmp_path / "o")
    with pytest.raises(CheckpointError, match="step 4.*train.steps=2"):
        train(cfg_at(out, "train.steps=2"), progress=False)


def test_resume_on_other_data_is_refused(trained_run, tmp_path):
    out = copy_run(trained_run, tmp_path / "o")
    cfg = cfg_at(out, "train.steps=6", "data.dataset_dir=" + str(tmp_path / "otherdata"),
                 "data.seed=1")
    build_data(cfg)
    with pytest.raises(CheckpointError, match="trained on dataset"):
        train(cfg, progress=False)


def test_cli_refuses_before_opening_an_mlflow_run(trained_run, tmp_path, capsys):
    out = copy_run(trained_run, tmp_path / "o")
    argv = ["train", *[a for t in TINY[:-1] for a in ("--set", t)], "--set", f"output_dir={out}",
            "--set", "name=r", "--set", "train.steps=8", "--set", "train.lr=0.01"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "train.lr" in err and "resume_allow" in err
    assert not (out / "mlflow.db").exists()  # no MLflow run recorded values that never applied


# ----------------------------------------------------------------------------- run lock

HOLD = """
import sys, time
from debiaslab.runlock import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def hold_lock(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_gets_the_holders_pid_and_a_dead_holder_is_stale(tmp_path):
    run_dir = tmp_path / "runs" / "x"
    holder = hold_lock(run_dir)
    try:
        with pytest.raises(RunLocked, match=f"PID {holder.pid}"):
            with run_lock(run_dir):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run_dir / ".lock").exists()  # the dead holder's lock file is still there...
    with run_lock(run_dir):  # ...and is taken over
        with run_lock(run_dir):  # re-entrant within one process
            pass


def test_two_trainings_of_one_name_do_not_interleave(tmp_path, capsys):
    cfg = cfg_at(tmp_path, "train.steps=4")
    build_data(cfg)
    holder = hold_lock(cfg.run_dir)
    try:
        argv = ["train", *[a for t in TINY for a in ("--set", t)], "--set",
                f"output_dir={tmp_path}", "--set", "name=r", "--set", "train.steps=4"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"PID {holder.pid}" in err and str(cfg.run_dir) in err
        assert not (cfg.run_dir / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()


# ----------------------------------------------------------------------------- kill -9


def test_killed_training_leaves_no_temp_files_or_zombie_runs(tmp_path):
    """kill -9 a real training; the next start of the same run removes the dead writer's temp
    files and ends its MLflow run KILLED, then finishes."""
    from debiaslab.tracking import find_runs, resolve_tracking_uri

    sets = [a for t in TINY[:-1] for a in ("--set", t)] + [
        "--set", f"output_dir={tmp_path}", "--set", "name=k", "--set", "train.steps=400",
        "--set", "train.checkpoint_every=2"]
    proc = subprocess.Popen([sys.executable, "-m", "debiaslab.cli", "train", *sets],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "runs" / "k" / "checkpoints"
    deadline = time.time() + 240
    while latest_checkpoint(ckpts) is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert latest_checkpoint(ckpts) is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    uri = resolve_tracking_uri(tmp_path)
    zombies = find_runs(uri, experiments=["debiaslab"], statuses=("RUNNING",))
    assert sorted(r.name for r in zombies) == ["k", "k/train"]  # the parent and its train stage
    orphan = ckpts / f".ckpt_00000400.pt.tmp-{proc.pid}"  # what a kill mid-write leaves
    orphan.write_bytes(b"x" * 1000)
    live = ckpts / f".ckpt_00000400.pt.tmp-{os.getppid()}"  # a live writer's file stays
    live.write_bytes(b"y")
    step = load_checkpoint(latest_checkpoint(ckpts))["step"]
    done = subprocess.run([sys.executable, "-m", "debiaslab.cli", "train", *sets[:-4],
                           "--set", f"train.steps={step + 2}", "--set", "train.checkpoint_every=2"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not orphan.exists() and live.exists()
    runs = {r.run_id: r for r in find_runs(uri, experiments=["debiaslab"], statuses=())}
    assert all(runs[z.run_id].status == "KILLED" for z in zombies)
    others = sorted((r.name, r.status) for r in runs.values()
                    if r.run_id not in {z.run_id for z in zombies})
    # the first data stage finished; the restart skipped it (up to date) and trained on
    assert others == [("k", "FINISHED"), ("k/data", "FINISHED"), ("k/train", "FINISHED")]


# ----------------------------------------------------------------------------- dataset keys


def _digits_parquet(path: Path, rows: slice) -> Path:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    blobs = []
    for img in digits.images[rows]:
        buf = io.BytesIO()
        Image.fromarray((img * 16).clip(0, 255).astype(np.uint8)).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    pq.write_table(pa.table({"image": blobs, "label": digits.target[rows].tolist()}), path)
    return path


def test_datasets_are_keyed_by_path_and_options(tmp_path):
    a = _digits_parquet(tmp_path / "a.parquet", slice(0, 300))
    b = _digits_parquet(tmp_path / "b.parquet", slice(300, 700))
    common = ["data.source=parquet", "data.imbalance=none",
              "data.source_options={label_column: label}"]
    cfg_a = cfg_at(tmp_path / "out", *common, f"data.path={a}")
    cfg_b = cfg_at(tmp_path / "out", *common, f"data.path={b}")
    assert cfg_a.dataset_path != cfg_b.dataset_path
    from debiaslab.data.schema import read_manifest

    n_a = read_manifest(build_data(cfg_a)).num_rows
    n_b = read_manifest(build_data(cfg_b)).num_rows
    assert (n_a, n_b) == (300, 400)
    # the same folder given explicitly for another recipe is refused, not silently reused
    pinned = cfg_at(tmp_path / "out", *common, f"data.path={b}",
                    f"data.dataset_dir={cfg_a.dataset_path}")
    with pytest.raises(DataError, match="another recipe.*--force"):
        build_data(pinned)
    assert read_manifest(build_data(pinned, force=True)).num_rows == 400
