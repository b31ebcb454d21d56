"""Ray Train throughput: 1 worker vs the plain single-process Trainer, and 2-worker scaling.

Run: .venv/bin/python tests/benchmarks/bench_ray_train.py [--steps N]
Start-up is excluded: steps/s is the median of the loop's own ``train/steps_per_sec`` windows
(the first window, with warm-up, is dropped). Samples/s = steps/s * batch_size * workers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from debiaslab import plugins
from debiaslab.config import ExperimentConfig, load_config
from debiaslab.data.locate import load_training_data
from debiaslab.distributed.runtime import init_ray, ray_env, shutdown_ray
from debiaslab.stages import build_data
from debiaslab.training.loop import Trainer

plugins.load()  # the methods register their sections, recipes and losses, as the CLI does

MODEL = ["model.model_channels=16", "model.channel_mult=[1,2]", "model.attention_resolutions=[]",
         "model.head_channels=16", "train.device=cpu", "train.warmup_steps=5"]


def recorder(path: Path) -> Any:
    """An ``on_metrics`` hook appending each metrics window to ``path`` as a JSON line."""
    def on_metrics(step: int, metrics: dict[str, float]) -> None:
        with open(path, "a") as fh:
            fh.write(json.dumps({"step": step, **metrics}) + "\n")

    return on_metrics


def recording_factory(path: Path) -> Any:
    """A factory for `train_distributed` whose rank 0 records its metrics windows to ``path``."""
    def build(cfg: ExperimentConfig, **kwargs: Any) -> Trainer:
        kwargs["on_metrics"] = recorder(path)
        return Trainer(cfg, load_training_data(cfg), kwargs.pop("run_dir"), **kwargs)

    return build


def steady_steps_per_sec(path: Path) -> float:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return statistics.median(r["train/steps_per_sec"] for r in rows[1:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--log-every", type=int, default=25)
    args = ap.parse_args()
    ray_env()
    import ray.cloudpickle

    from debiaslab.distributed.train import train_distributed

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        out = Path(tmp)

        def cfg(name: str, workers: int) -> ExperimentConfig:
            c = load_config(None, MODEL + [
                f"output_dir={out}", f"name={name}", f"train.steps={args.steps}",
                f"train.batch_size={args.batch_size}", f"train.log_every={args.log_every}",
                f"train.checkpoint_every={args.steps}", f"distributed.num_workers={workers}",
                "distributed.cpus_per_worker=1"])
            build_data(c)
            return c

        torch.set_num_threads(1)  # the same CPU share a 1-CPU Ray worker gets
        plain_log = out / "plain.jsonl"
        plain_cfg = cfg("plain", 1)
        Trainer(plain_cfg, load_training_data(plain_cfg), out / "plain",
                on_metrics=recorder(plain_log), progress=False).fit()
        plain = steady_steps_per_sec(plain_log)
        init_ray(num_cpus=2, object_store_memory_gb=1.0)
        try:
            results = {}
            for workers in (1, 2):
                log = out / f"ray{workers}.jsonl"
                t0 = time.perf_counter()
                train_distributed(cfg(f"ray{workers}", workers), tracking_uri=None,
                                  mlflow_run_id=None, trainer_factory=recording_factory(log))
                results[workers] = (steady_steps_per_sec(log), time.perf_counter() - t0)
        finally:
            shutdown_ray()
    b = args.batch_size
    print(f"plain Trainer (1 thread): {plain:7.1f} steps/s  {plain * b:8.0f} samples/s")
    for w, (sps, wall) in results.items():
        print(f"Ray Train {w} worker(s):   {sps:7.1f} steps/s  {sps * b * w:8.0f} samples/s "
              f"(fit() wall {wall:.1f}s for {args.steps} steps)")
    print(f"ratio Ray(1 worker)/plain steps/s: {results[1][0] / plain:.3f} (target >= 0.9)")
    print(f"2-worker samples/s scaling vs 1 worker: {2 * results[2][0] / results[1][0]:.2f}x")


if __name__ == "__main__":
    main()
