"""The side-table stage: map every image of the dataset to side-table columns, by a Ray Data map
job or by the same mapper on the same batches in this process."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from debiaslab.config import ExperimentConfig


def side_table_stage(name: str, *, output: str, table: Callable[[ExperimentConfig], str],
                     mapper: type, mapper_kwargs: Callable[[ExperimentConfig, Any], dict],
                     schema: Callable[[ExperimentConfig, Any], Any],
                     inputs: dict[str, str] | None = None,
                     keys: tuple[str, ...] = (),
                     producer: Callable[[ExperimentConfig, Any], dict] | None = None,
                     prepare: Callable[[ExperimentConfig, Any], None] | None = None,
                     summary: Callable[[ExperimentConfig, Path], dict[str, float]] | None = None,
                     backend: str = "ray", description: str = "") -> Any:
    """A stage that maps every image of the dataset to side-table columns: a Ray Data map job
    (backend ray: ``mapper(**mapper_kwargs)`` built once per actor) or the same mapper on the
    same batches in this process (local). Writes side table ``table(cfg)`` of the dataset as
    artifact ``output``.

    ``schema(cfg, ctx)``: the pyarrow schema of the mapper's output (``id`` plus its columns);
    ``producer``: what computed the table (recorded in it); ``prepare``: runs first in this
    process (checks options, fills caches the actors read); ``summary``: metrics of the written
    table (logged to the stage's run and copied to the parent)."""
    from debiaslab.recipes import Stage

    def run(cfg: ExperimentConfig, ctx: Any) -> Any:
        from debiaslab.recipes import StageOutput, make_artifact

        dataset = Path(ctx.inputs["dataset"].path)
        kwargs = mapper_kwargs(cfg, ctx)
        info = producer(cfg, ctx) if producer is not None else {}
        name_ = table(cfg)
        out_schema = schema(cfg, ctx)
        if prepare is not None:
            prepare(cfg, ctx)
        d = cfg.distributed
        if ctx.backend == "ray":
            from debiaslab.distributed.data import map_to_side_table
            from debiaslab.distributed.runtime import ray_session

            with ray_session(d.address, object_store_memory_gb=d.object_store_memory_gb):
                folder = map_to_side_table(
                    dataset, name_, mapper, kwargs, out_schema, producer=info,
                    read_columns=["id", "image", "label"], decode=True,
                    concurrency=d.map_concurrency, batch_size=d.map_batch_size,
                    num_cpus=d.map_num_cpus, num_gpus=d.map_num_gpus, progress=ctx.progress)
        else:
            from debiaslab.data.side_tables import map_dataset, write_side_table

            columns = [f.name for f in out_schema if f.name != "id"]
            ids, values = map_dataset(dataset, mapper(**kwargs), columns,
                                      batch_size=d.map_batch_size, progress=ctx.progress,
                                      desc=name)
            folder = write_side_table(dataset, name_, ids, values, producer=info)
        metrics = summary(cfg, folder) if summary is not None else {}
        if ctx.tracker is not None and metrics:
            ctx.tracker.log_metrics(metrics)
        return StageOutput(artifacts={output: make_artifact("side_table", folder)},
                           metrics=metrics)

    return Stage(name, run, inputs={"dataset": "dataset", **(inputs or {})},
                 outputs={output: "side_table"}, keys=keys, backend=backend,  # type: ignore
                 description=description)
