"""Starting or joining Ray with settings that suit small machines and loopback-only tests."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator

from debiaslab.errors import ConfigError

GIB = 1024**3
DEFAULT_RAY_TMP = "/tmp/debiaslab-ray"  # ours, not Ray's default /tmp/ray (DEBIASLAB_RAY_TMP)
LOOPBACK_IP = "127.0.0.1"
RAY_ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",  # no telemetry to outside servers
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # node IP 127.0.0.1 for a local head; Ray reads it once, when ray is first imported
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}
# Only for the local Ray that init_ray starts, and only if RAY_AUTH_MODE is unset: it listens on
# 127.0.0.1 only (see _loopback_node_ip), so nothing off the machine reaches it; the driver, head
# and workers all inherit the value, so they agree (DESIGN.md pitfalls). On a multi-user host
# other local users could still connect: export RAY_AUTH_MODE=token there (cluster/SECURITY.md).
# Clusters use RAY_AUTH_MODE=token (cluster/SECURITY.md): joining one, we set nothing.
LOCAL_RAY_ENV = {"RAY_AUTH_MODE": "disabled"}
# Every Ray worker process of ours (Train workers, Data actors, Tune trials) runs
# worker_setup() before anything else (Ray's worker_process_setup_hook): it quiets Ray's own
# log noise and loads the method plugins, as the driver's entry point did. The plugins module
# sits above this layer, so it is named by its import path, never imported here statically.
SETUP_HOOK = "debiaslab.distributed.runtime.worker_setup"
PLUGINS_LOADER = "debiaslab.plugins"  # its load() fills the registries
PLUGINS_ENV = "DEBIASLAB_PLUGINS"  # plugins.ENV_VAR: module names its load() imports too

# Ray Train's placement-group cleaner (a detached actor) asks the State API once a second
# whether the controller is alive. Our local Ray runs without the dashboard's state module
# (include_dashboard=False), so every query fails and logs this warning: noise, never a fault.
STATE_API_NOISE = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",
                   "Failed to query Ray Train Controller actor state")


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def quiet_ray_logs() -> None:
    """Drop the placement-group cleaner's State API warning in this process (only that
    message: the cleaner's real warnings stay)."""
    name, prefix = STATE_API_NOISE
    logger = logging.getLogger(name)
    if not any(isinstance(f, _DropMessage) for f in logger.filters):
        logger.addFilter(_DropMessage(prefix))


def worker_setup() -> None:
    """Ray's worker_process_setup_hook for every worker process we start or submit to."""
    import importlib

    quiet_ray_logs()
    importlib.import_module(PLUGINS_LOADER).load()


def threads_for(cpus: float) -> int:
    """Torch threads of a Ray worker holding ``cpus`` CPUs: at least one. Ray Train does not
    set OMP_NUM_THREADS in its workers, so torch takes every core of the node, and two workers
    on one node oversubscribe it (measured: 0.55 steps/s instead of ~5 for two 0.5-CPU workers
    on 2 cores)."""
    return max(1, int(cpus))


def limit_threads(cpus: float) -> int:
    """Set this process's torch threads to :func:`threads_for` ``cpus``; returns the count."""
    import torch

    n = threads_for(cpus)
    torch.set_num_threads(n)
    return n


def ray_env() -> dict[str, str]:
    """Environment variables every Ray process of ours gets (set before ray is imported; the
    debiaslab.distributed package sets them when it is imported)."""
    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    return {k: os.environ[k] for k in RAY_ENV_DEFAULTS}


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@contextlib.contextmanager
def _loopback_node_ip() -> Iterator[None]:
    """Make a new local node's IP 127.0.0.1 whatever the import order.

    Ray 2.60 picks a new node's IP with ``services.get_node_ip_address()``, which returns the
    host's outward address unless ``ray_constants.ENABLE_RAY_CLUSTER`` is false, a constant read
    from RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when ray is imported; even ``_node_ip_address=
    "127.0.0.1"`` is mapped back to the outward address through it. gcs_server, the raylet, the
    driver and every worker then bind all interfaces unless that IP is exactly 127.0.0.1, and the
    dashboard and runtime-env agents bind the IP itself. A script that imported ray before
    debiaslab would so expose the local cluster: flip the constant for the start.
    """
    from ray._private import ray_constants

    old = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old


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
    env: dict[str, Any] = {"env_vars": dict(ray_env()), "worker_process_setup_hook": SETUP_HOOK}
    if os.environ.get(PLUGINS_ENV):  # a user's own method modules, for the workers too
        env["env_vars"][PLUGINS_ENV] = os.environ[PLUGINS_ENV]
    if not address:
        for key, value in LOCAL_RAY_ENV.items():
            env["env_vars"][key] = os.environ.setdefault(key, value)
    if runtime_env:
        env.update({k: v for k, v in runtime_env.items() if k != "env_vars"})
        env["env_vars"].update(runtime_env.get("env_vars", {}))
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return ray
    with _loopback_node_ip():
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 object_store_memory=int(object_store_memory_gb * GIB), runtime_env=env,
                 _temp_dir=short_temp_dir(), _node_ip_address=LOOPBACK_IP, log_to_driver=True)
    node_ip = ray.util.get_node_ip_address()
    if not _is_loopback(node_ip):  # a Ray whose internals changed: refuse to run exposed
        ray.shutdown()
        raise RuntimeError(f"local Ray came up on {node_ip}, not on loopback: refusing to run")
    return ray


def short_temp_dir() -> str:
    """Ray's temp dir must stay short (Unix socket paths are limited to ~107 bytes)."""
    path = Path(os.environ.get("DEBIASLAB_RAY_TMP", DEFAULT_RAY_TMP))
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
