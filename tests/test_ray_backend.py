"""`distributed.backend: ray` through the CLI: Ray Train trains, Ray Data samples, MLflow
records."""

from pathlib import Path

from conftest import TINY as TINY_CORE
from conftest import recipe_runs

from debiaslab.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_CORE + ["train.steps=8", "train.log_every=4", "train.checkpoint_every=4",
                    "sample.num_samples=20", "sample.steps=5", "sample.batch_size=20",
                    "sample.samplers=[ddim]", "metrics.bootstrap=10", "distributed.backend=ray",
                    "distributed.num_workers=1", "distributed.object_store_memory_gb=1",
                    "tracking.experiment=raybackend"]


def test_run_on_ray_backend(tmp_path):
    from mlflow import MlflowClient

    argv = ["run", "-c", str(ROOT / "configs/experiments/digits_lt_debias.yaml"),
            *[a for item in TINY + [f"output_dir={tmp_path}"] for a in ("--set", item)]]
    assert main(argv) == 0
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run, children = recipe_runs(client, "raybackend")
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(children["train"].info.run_id,
                                                       "train/loss")]
    assert steps == [4, 8]  # logged by rank 0 into the driver's run
    assert "eval/fid" in run.data.metrics
    samples = tmp_path / "runs" / "digits_lt_debias" / "samples"
    assert (samples / "grid_ddim.png").is_file() and (samples / "ddim" / "dataset.json").is_file()
