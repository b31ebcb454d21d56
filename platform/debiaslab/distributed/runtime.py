"""Starting or joining Ray with settings that suit small machines and loopback-only tests."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

from debiaslab.errors import ConfigError

GIB = 1024**3
RAY_ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",  # no telemetry to outside servers
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keeps a local head on 127.0.0.1
    "RAY_AUTH_MODE": "disabled",  # head and client must agree (DESIGN.md pitfalls)
}


def ray_env() -> dict[str, str]:
    """Environment variables every Ray process of ours gets (set before ray is imported)."""
    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    return {k: os.environ[k] for k in RAY_ENV_DEFAULTS}


def init_ray(address: str = "", *, object_store_memory_gb: float = 2.0,
             num_cpus: int | None = None, runtime_env: dict[str, Any] | None = None) -> Any:
    """Start a local Ray (``address=""``, never attaching to a stale cluster file) or join one.

    The object store is capped (default 2 GiB) and the dashboard is off for local runs.
    """
    ray_env()
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS", "")  # set inside `ray job submit` jobs
    env = {"env_vars": dict(ray_env())}
    if runtime_env:
        env.update({k: v for k, v in runtime_env.items() if k != "env_vars"})
        env["env_vars"].update(runtime_env.get("env_vars", {}))
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 object_store_memory=int(object_store_memory_gb * GIB), runtime_env=env,
                 _temp_dir=short_temp_dir(), log_to_driver=True)
    return ray


def short_temp_dir() -> str:
    """Ray's temp dir must stay short (Unix socket paths are limited to ~107 bytes)."""
    path = Path(os.environ.get("DEBIASLAB_RAY_TMP", "/tmp/ray"))
    if len(str(path)) > 40:
        raise ConfigError(f"DEBIASLAB_RAY_TMP={path} is too long for Ray's socket paths")
    return str(path)


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


@contextlib.contextmanager
def ray_session(address: str = "", *, object_store_memory_gb: float = 2.0) -> Iterator[Any]:
    """Use the running Ray, or start one for the block and shut it down afterwards."""
    import ray

    started = not ray.is_initialized()
    if started:
        init_ray(address, object_store_memory_gb=object_store_memory_gb)
    try:
        yield ray
    finally:
        if started:
            shutdown_ray()
