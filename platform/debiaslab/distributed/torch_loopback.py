"""Ray Train's torch rendezvous kept on 127.0.0.1 when the Ray nodes are on loopback.

``init_process_group("env://")`` makes rank 0 host a c10d ``TCPStore``, and torch binds that
server to every interface (``::`` / ``0.0.0.0``) whatever ``MASTER_ADDR`` says; gloo and NCCL pick
their own interface for the pair sockets (the host's address when the hostname resolves to it).
On the local Ray that init_ray starts (node IP 127.0.0.1) this would be the one thing listening
on the network. So, only when rank 0's node IP is loopback: rank 0 first hosts a multi-tenant
store server on a socket bound to 127.0.0.1 (which the process group's own store then reuses:
same process, same port), and gloo / NCCL are pointed at the loopback interface. On a real
cluster (node IPs not loopback) everything is Ray's default.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Any

import ray
from ray.train.torch import TorchConfig
from ray.train.torch import config as _ray_torch_config
from ray.train.torch.config import _TorchBackend

_STORES: list[Any] = []  # rank 0's loopback store servers, alive as long as the worker
INTERFACE_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def _loopback_interface() -> str:
    names = {name for _, name in socket.if_nameindex()}
    return "lo" if "lo" in names else "lo0"


def _host_store_on_loopback(timeout_s: float) -> tuple[str, int] | None:
    """Rank 0: if this node is on loopback, serve the c10d store on it; returns (ip, port)."""
    ip = ray.util.get_node_ip_address()
    if not ipaddress.ip_address(ip).is_loopback:
        return None
    import torch.distributed as dist

    sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
    sock.bind((ip, 0))
    sock.listen(socket.SOMAXCONN)
    port = sock.getsockname()[1]
    _STORES.append(dist.TCPStore(ip, port, None, True, datetime.timedelta(seconds=timeout_s),
                                 wait_for_workers=False, multi_tenant=True,
                                 master_listen_fd=sock.detach()))
    return ip, port


def _use_loopback_interface() -> None:
    name = _loopback_interface()
    for key in INTERFACE_VARS:
        os.environ.setdefault(key, name)


class _LoopbackTorchBackend(_TorchBackend):
    def on_start(self, worker_group: Any, backend_config: Any) -> None:
        address = worker_group.execute_single(0, _host_store_on_loopback,
                                              backend_config.timeout_s)
        if address is None:  # a cluster: Ray's default rendezvous
            super().on_start(worker_group, backend_config)
            return
        worker_group.execute(_use_loopback_interface)
        # Ray asks rank 0 for (node IP, a free port) through this module-level function:
        # answer with the store already served on loopback
        original = _ray_torch_config.get_address_and_port
        _ray_torch_config.get_address_and_port = lambda: address
        try:
            super().on_start(worker_group, backend_config)
        finally:
            _ray_torch_config.get_address_and_port = original


@dataclass
class LoopbackTorchConfig(TorchConfig):
    """``TorchConfig`` whose rendezvous stays on 127.0.0.1 on a loopback-only (local) Ray."""

    @property
    def backend_cls(self):
        return _LoopbackTorchBackend


if not callable(getattr(_ray_torch_config, "get_address_and_port", None)):
    raise ImportError("ray.train.torch.config.get_address_and_port is gone: update "
                      "debiaslab.distributed.torch_loopback for this Ray version")
