"""The sample stage: every configured sampler with the configured guidance, locally or on a Ray
Data actor pool (same batches on both paths), written as Parquet datasets and grids."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from debiaslab.config import ExperimentConfig
from debiaslab.progress import log
from debiaslab.stages.common import StageResult, on_ray

GRID_COLUMNS = 10
GRID_SCALE = 2  # 16x16 digits are easier to read enlarged


def sample(cfg: ExperimentConfig, checkpoint: str | Path | None = None, *, tracker: Any = None,
           out_dir: str | Path | None = None, progress: bool = True,
           classifier: str | Path | None = None,
           artifacts: dict[str, str | Path] | None = None,
           backend: str | None = None) -> StageResult:
    """Sample with every configured sampler and ``sample.guidance``; write images (Parquet)
    and grids. ``artifacts``: the recipe's auxiliary models by artifact name, which guidance
    entries with checkpoint "" use (``classifier``: shorthand for the "classifier" one)."""
    import numpy as np
    import torch

    from debiaslab.data.pixels import to_uint8
    from debiaslab.data.schema import NO_LABEL, DatasetMeta, write_dataset
    from debiaslab.report import save_image_grid
    from debiaslab.sampling import (
        generate,
        guided_denoiser,
        load_trained,
        resolve_guidance,
        seed_labels,
    )

    trained = load_trained(checkpoint or cfg.run_dir, use_ema=cfg.sample.use_ema,
                           device=cfg.train.device)
    s = cfg.sample
    ray = on_ray(cfg, "sample", backend)
    out = Path(out_dir) if out_dir else cfg.run_dir / "samples"
    seeds = list(range(s.seed_start, s.seed_start + s.num_samples))
    guidance = resolve_guidance(cfg, classifier=classifier, artifacts=artifacts)
    write_sampling_record(out, cfg, guidance)
    if guidance and tracker is not None:
        import json

        tracker.set_tag("sample.guidance", json.dumps(guidance))
        # a batch-coupled guidance (Balancing Act's p_hat) means something else at another size
        tracker.set_tag("sample.guidance_batch_size", str(s.batch_size))
    result = StageResult(run_dir=cfg.run_dir, checkpoint=trained.checkpoint)
    for name in s.samplers:
        t0 = time.perf_counter()
        denoiser = guided_denoiser(trained, name, guidance)
        # labels: the network's; targets: what each image was steered toward (recorded)
        labels, targets = seed_labels(trained, s.labels, seeds, denoiser)
        if ray:
            images = sample_on_ray(cfg, trained.checkpoint, name, out / name, guidance)
        else:
            images = generate(trained, name, seeds, steps=s.steps, labels=labels,
                              denoiser=denoiser, batch_size=s.batch_size,
                              progress=progress, options=s.options.get(name, {}),
                              clip_x0=s.clip_x0)
        seconds = time.perf_counter() - t0
        order = (torch.argsort(targets, stable=True) if targets is not None
                 else torch.arange(len(seeds)))
        grid = save_image_grid(images[order], out / f"grid_{name}.png", GRID_COLUMNS,
                               scale=GRID_SCALE)
        uint8 = to_uint8(images).numpy()
        lab = targets.numpy() if targets is not None else np.full(len(seeds), NO_LABEL)
        meta = DatasetMeta(name=f"{cfg.name}-{name}", source=f"samples:{trained.checkpoint}",
                           class_names=trained.class_names, attr_names=[])
        if not ray:  # the Ray job wrote the same dataset itself
            write_dataset(out / name, uint8, lab, None, meta,
                          ids=[f"seed{sd:08d}" for sd in seeds])
        result.artifacts[f"grid_{name}"] = Path(grid)
        result.artifacts[f"samples_{name}"] = out / name
        result.metrics[f"sample/{name}/images_per_sec"] = len(seeds) / seconds
        log(f"{name}: {len(seeds)} images in {seconds:.1f}s -> {grid}")
        if tracker is not None:
            tracker.log_artifact(grid, "samples")
            tracker.log_metrics({f"sample/{name}/images_per_sec": len(seeds) / seconds},
                                step=trained.step)
    return result


def write_sampling_record(out: Path, cfg: ExperimentConfig, guidance: list[dict[str, Any]]
                          ) -> Path:
    """``sampling.json`` beside the sample sets: samplers, steps, options, seeds and the resolved
    guidance with every field (scale mode, window, ...), and the guidance batch: the images a
    batch-coupled guidance sees at once (``sample.batch_size``, on both sampling paths)."""
    import json

    from debiaslab.fileio import write_text_atomic

    s = cfg.sample
    record = {"samplers": list(s.samplers), "steps": s.steps, "options": s.options,
              "seeds": [s.seed_start, s.seed_start + s.num_samples],
              "guidance_batch_size": s.batch_size, "guidance": guidance}
    out.mkdir(parents=True, exist_ok=True)
    path = out / "sampling.json"
    write_text_atomic(path, json.dumps(record, indent=2, sort_keys=True, default=str))
    return path


def sample_on_ray(cfg: ExperimentConfig, checkpoint: Path, sampler: str, out: Path,
                  guidance: list[dict[str, Any]]) -> Any:
    """Sample with a Ray Data actor pool over seed ranges; returns the images in [-1, 1]."""
    from debiaslab.data.dataset import ImageDataset
    from debiaslab.distributed.data import sample_job
    from debiaslab.distributed.runtime import ray_session

    s, d = cfg.sample, cfg.distributed
    with ray_session(d.address, object_store_memory_gb=d.object_store_memory_gb):
        sample_job(checkpoint, sampler, range(s.seed_start, s.seed_start + s.num_samples), out,
                   steps=s.steps, labels_mode=s.labels, guidance=guidance,
                   options=s.options.get(sampler, {}), clip_x0=s.clip_x0, use_ema=s.use_ema,
                   seeds_per_task=s.batch_size,  # the local path's batches: batch guidance agrees
                   device=cfg.train.device, concurrency=d.map_concurrency,
                   num_cpus=d.map_num_cpus, num_gpus=d.map_num_gpus)
    ds = ImageDataset.load(out)
    order = sorted(range(len(ds.ids)), key=lambda i: ds.ids[i])  # seed order
    return ds.to_float(ds.images[order])


def sample_stage(cfg: ExperimentConfig, ctx: Any) -> Any:
    """Sample every configured sampler with the configured guidance."""
    from debiaslab.recipes import StageOutput, make_artifact

    out = cfg.run_dir / "samples"
    models = {k: a.path for k, a in ctx.inputs.items()  # the recipe's auxiliary models
              if a.kind == "checkpoint" and k != "score_model"}
    result = sample(cfg, ctx.inputs["score_model"].path, tracker=ctx.tracker,
                    progress=ctx.progress, out_dir=out, artifacts=models, backend=ctx.backend)
    return StageOutput(artifacts={"samples": make_artifact("samples", out)},
                       metrics=dict(result.metrics), result=result)
