"""Ray execution: Ray Data map jobs, Ray Train DDP, Ray Tune sweeps (the only package importing
ray)."""

from debiaslab.distributed.runtime import ray_env as _ray_env

_ray_env()  # before any module of this package imports ray: Ray reads its bind settings then
