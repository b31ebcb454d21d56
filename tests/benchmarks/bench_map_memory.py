"""Peak driver memory of a Ray Data map job as the dataset grows (1x, 10x, 100x the 1,797 digits):
the job's output normalization (sort by id, equal files) must not grow with the output.

Run: .venv/bin/python tests/benchmarks/bench_map_memory.py [--sizes 1 10 100] [--legacy]
Each size runs in a fresh subprocess (own Ray); the driver's peak RSS during the job (VmHWM,
reset just before it) minus its RSS just before the job is printed, the same for the output
normalization step alone, and the peak of Arrow's memory pool in the driver (allocator caching
excluded). The mapper outputs a [N, 4, 4, 4] float16 tensor per image. --legacy also runs the
old in-memory normalization.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from debiaslab.data.schema import DatasetMeta, read_manifest, tensor_field, write_dataset
from debiaslab.data.sources import load_digits_source

RAY_TMP = "/tmp/dl-bench-mem"
ROWS_PER_SHARD = 10_000
H_SHAPE = (4, 4, 4)
SAMPLE_SECONDS = 0.01  # RSS sampling period (a cross-check of VmHWM)
MIB = 2**20
SCHEMA = pa.schema([pa.field("id", pa.string(), nullable=False),
                    tensor_field("h", H_SHAPE, "float16")])


class BlockMeans:
    """h = means of 4x4 pixel blocks of the 16x16 digit, as [N, 4, 4, 4] float16 (4 copies)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from debiaslab.distributed.data import PIXELS

        x = batch[PIXELS][:, 0].astype(np.float32) / 255  # [N, 16, 16]
        n = len(x)
        means = x.reshape(n, 4, 4, 4, 4).mean(axis=(2, 4))  # [N, 4, 4]
        h = np.broadcast_to(means[:, None], (n, *H_SHAPE)).astype(np.float16)
        return {"id": batch["id"], "h": h}


def legacy_normalize_parts(folder: Path, template: str, schema: pa.Schema, rows_per_file: int,
                           sort_key: str = "id") -> list[Path]:
    """The previous normalization: all task files concatenated in the driver, sorted, rewritten."""
    from debiaslab.distributed.data import _TASK_FILE

    written = sorted(p for p in folder.iterdir() if _TASK_FILE.match(p.name))
    if not written:
        return []
    table = pa.concat_tables([pq.read_table(p, schema=schema) for p in written])
    if sort_key in schema.names:
        table = table.take(pc.sort_indices(table, sort_keys=[(sort_key, "ascending")]))
    for path in written:
        path.unlink()
    parts = []
    for index, start in enumerate(range(0, table.num_rows, rows_per_file)):
        part = folder / template.format(index)
        pq.write_table(table.slice(start, rows_per_file), part)
        parts.append(part)
    return parts


def build_tiled(folder: Path, tiles: int) -> Path:
    """The embedded digits repeated `tiles` times (unique ids) as a sharded dataset folder."""
    src = load_digits_source()
    n = len(src)
    ids = [f"t{t:03d}-{i:04d}" for t in range(tiles) for i in range(n)]
    meta = DatasetMeta(name=f"digits-x{tiles}", source="digits", class_names=src.class_names,
                       attr_names=src.attr_names)
    write_dataset(folder, np.tile(src.images, (tiles, 1, 1, 1)), np.tile(src.labels, tiles),
                  np.tile(src.attributes, (tiles, 1)), meta, ids=ids,
                  rows_per_shard=ROWS_PER_SHARD)
    return folder


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def _reset_peak() -> int:
    """Reset VmHWM to the current RSS (Linux clear_refs 5); returns the RSS in KiB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_kib("VmRSS")


def child(dataset: str, out: str, normalizer: str, concurrency: int, batch: int) -> None:
    """One measured job in this (fresh) process; prints one JSON line."""
    os.environ.setdefault("DEBIASLAB_RAY_TMP", RAY_TMP)
    import ray.data  # noqa: F401 (imported before the baseline, like a real driver)

    from debiaslab.distributed import data as dd
    from debiaslab.distributed.runtime import init_ray, shutdown_ray

    normalize = legacy_normalize_parts if normalizer == "old" else dd._normalize_parts
    phase: dict[str, int] = {}

    def measured_normalize(*a, **kw):  # the normalization's own peak (VmHWM reset before it)
        phase["job_hwm"] = _status_kib("VmHWM")
        phase["base"] = _reset_peak()
        parts = normalize(*a, **kw)
        phase["peak"] = _status_kib("VmHWM")
        return parts

    dd._normalize_parts = measured_normalize
    init_ray(num_cpus=2, object_store_memory_gb=1.0)
    rows = read_manifest(dataset).num_rows
    base_kib = _reset_peak()
    peak = [base_kib]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _status_kib("VmRSS"))
            time.sleep(SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    dd.run_map_job(dd.read_images(dataset, columns=["id", "image"], decode=True), BlockMeans, {},
                   out, SCHEMA, concurrency=concurrency, batch_size=batch, progress=False,
                   num_rows=rows)
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    peak_kib = max(peak[0], _status_kib("VmHWM"), phase["job_hwm"])
    written = sum(pq.ParquetFile(p).metadata.num_rows for p in Path(out).glob("*.parquet"))
    assert written == rows, (written, rows)
    shutdown_ray()
    print(json.dumps({"rows": rows, "wall_s": wall, "base_mib": base_kib / 1024,
                      "delta_mib": (peak_kib - base_kib) / 1024,
                      "normalize_mib": (phase["peak"] - phase["base"]) / 1024,
                      "arrow_mib": pa.default_memory_pool().max_memory() / MIB}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100])
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--legacy", action="store_true", help="also run the old normalization")
    ap.add_argument("--child", nargs=3, metavar=("DATASET", "OUT", "NORMALIZER"))
    args = ap.parse_args()
    if args.child:
        child(*args.child, concurrency=args.concurrency, batch=args.batch)
        return
    work = Path(tempfile.mkdtemp(prefix="bench-map-memory-"))
    normalizers = ["new", "old"] if args.legacy else ["new"]
    results: dict[tuple[str, int], dict[str, float]] = {}
    try:
        for size in args.sizes:
            dataset = build_tiled(work / f"x{size}", size)
            for normalizer in normalizers:
                cmd = [sys.executable, __file__, "--child", str(dataset),
                       str(work / f"out-{normalizer}-x{size}"), normalizer,
                       "--concurrency", str(args.concurrency), "--batch", str(args.batch)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"{normalizer} x{size} failed:\n{done.stderr[-3000:]}")
                results[normalizer, size] = json.loads(done.stdout.strip().splitlines()[-1])
                shutil.rmtree(work / f"out-{normalizer}-x{size}", ignore_errors=True)
            shutil.rmtree(dataset, ignore_errors=True)
        print(f"map job: [N, {', '.join(map(str, H_SHAPE))}] float16 per image, concurrency "
              f"{args.concurrency}, batch {args.batch}, shards of {ROWS_PER_SHARD} rows, cpu")
        print(f"{'normalize':>9} {'size':>5} {'rows':>8} {'wall s':>7} {'base RSS MiB':>12} "
              f"{'driver peak RSS delta MiB':>25} {'normalize step MiB':>18} "
              f"{'arrow peak MiB':>14}")
        for (normalizer, size), r in results.items():
            print(f"{normalizer:>9} {size:>4}x {int(r['rows']):>8} {r['wall_s']:>7.1f} "
                  f"{r['base_mib']:>12.1f} {r['delta_mib']:>25.1f} {r['normalize_mib']:>18.1f} "
                  f"{r['arrow_mib']:>14.1f}")
        lo, hi = min(args.sizes), max(args.sizes)
        for normalizer in normalizers:
            a, b = results[normalizer, lo], results[normalizer, hi]
            ratios = [b[k] / max(a[k], 1e-9) for k in ("delta_mib", "normalize_mib", "arrow_mib")]
            print(f"{normalizer}: {hi}x / {lo}x: driver RSS delta {ratios[0]:.2f}, normalize step "
                  f"{ratios[1]:.2f}, arrow peak {ratios[2]:.2f} (target: close to 1, not "
                  f"{hi / lo:.0f})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
