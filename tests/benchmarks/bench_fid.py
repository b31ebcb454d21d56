"""FID cost on Inception-sized features: debiaslab's fast path vs the scipy-sqrtm reference.

Run: .venv/bin/python tests/benchmarks/bench_fid.py [--n 10000 --dim 2048 --skip-sqrtm]
Prints seconds for gaussian_stats (x2), frechet_distance and frechet_distance_sqrtm, and their
relative disagreement (target: stats + distance < 5 s on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from debiaslab.metrics.fid import frechet_distance, frechet_distance_sqrtm, gaussian_stats

SHIFT = 0.1  # mean shift of the second set, so the distance is not ~0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--skip-sqrtm", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((args.dim, args.dim)).astype(np.float32) / np.sqrt(args.dim)
    a = rng.standard_normal((args.n, args.dim), dtype=np.float32)
    b = rng.standard_normal((args.n, args.dim), dtype=np.float32) @ mix + SHIFT
    print(f"features: 2 x [{args.n}, {args.dim}] float32; cpus={os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.2f}")

    t0 = time.perf_counter()
    mu1, sigma1 = gaussian_stats(a)
    t1 = time.perf_counter()
    mu2, sigma2 = gaussian_stats(b)
    t2 = time.perf_counter()
    fid = frechet_distance(mu1, sigma1, mu2, sigma2)
    t3 = time.perf_counter()
    print(f"gaussian_stats (set 1)      {t1 - t0:7.3f} s")
    print(f"gaussian_stats (set 2)      {t2 - t1:7.3f} s")
    print(f"frechet_distance            {t3 - t2:7.3f} s   FID = {fid:.6f}")
    print(f"total (stats + distance)    {t3 - t0:7.3f} s")
    if not args.skip_sqrtm:
        t4 = time.perf_counter()
        ref = frechet_distance_sqrtm(mu1, sigma1, mu2, sigma2)
        t5 = time.perf_counter()
        print(f"frechet_distance_sqrtm      {t5 - t4:7.3f} s   FID = {ref:.6f}  "
              f"(relative difference {abs(fid - ref) / abs(ref):.2e})")


if __name__ == "__main__":
    main()
