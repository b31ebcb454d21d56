"""Watching which sockets a command's process tree listens on (Linux /proc), for the loopback
checks of test_security_network (a recipe run) and test_sweep (a sweep driver).

Every LISTEN (TCP) or bound unconnected (UDP) socket held by the command's process tree (all
descendants, plus processes whose command line names the command's Ray temp dir, in case some
were reparented) must be on 127.0.0.1 / ::1.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
from pathlib import Path

POLL_S = 0.2
# loopback settings the subprocess must not inherit from this pytest process (set there by
# other tests' init_ray), or the check would pass without the code under test doing anything
SCRUBBED_ENV = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE", "RAY_ADDRESS",
                "RAY_NODE_IP_ADDRESS", "MLFLOW_TRACKING_URI", "GLOO_SOCKET_IFNAME",
                "MASTER_ADDR")
# `debiaslab` run by a user script that imported ray first (Ray's import-time settings once made
# a later local Ray bind every interface)
RAY_FIRST = ("import sys, ray; from debiaslab.cli import main; "
             "assert 'debiaslab.distributed' not in sys.modules; sys.exit(main(sys.argv[1:]))")
HAS_PROC = Path("/proc/net/tcp").exists()


def scrubbed_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    env.update(extra)
    return env


def check_loopback_only(watcher: "ListenWatcher", command: str) -> None:
    """The watched command listened somewhere, Ray's GCS among it, and only on loopback."""
    print(f"{command}: {len(watcher.processes)} processes, listening:",
          *sorted(watcher.listeners), sep="\n  ")
    assert watcher.listeners, f"saw no listening socket at all (processes: {watcher.processes})"
    assert not watcher.exposed(), (
        f"{command}: sockets on non-loopback addresses: {watcher.exposed()}")
    assert any(name.startswith("gcs_server") for *_, name in watcher.listeners), watcher.listeners


# ------------------------------------------------------------------------- the OS socket table


def _ip(hex_addr: str) -> str:
    raw = bytes.fromhex(hex_addr)  # /proc/net/*: 32-bit words in host (little-endian) order
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)


def bound_sockets() -> dict[int, tuple[str, str, int]]:
    """inode -> (protocol, address, port) of every listening TCP / unconnected UDP socket."""
    found = {}
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = Path(f"/proc/net/{proto}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            local, remote, state, inode = f[1], f[2], f[3], int(f[9])
            listening = state == "0A" if proto.startswith("tcp") else set(remote) <= set("0:")
            if listening and inode:
                addr, port = local.rsplit(":", 1)
                found[inode] = (proto, _ip(addr), int(port, 16))
    return found


def is_loopback(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def all_processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process."""
    procs = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            cmd = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except (OSError, ValueError):
            continue
        procs[int(entry.name)] = (ppid, cmd)
    return procs


def tree(root: int, marker: str) -> dict[int, str]:
    """root, its descendants, and processes whose command line mentions ``marker``."""
    procs = all_processes()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    todo, seen = [root], set()
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(children.get(pid, []))
    seen |= {pid for pid, (_, cmd) in procs.items() if marker in cmd}
    return {pid: procs[pid][1] for pid in seen if pid in procs}


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        for fd in os.scandir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(fd.path)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    except OSError:
        pass
    return inodes


def _name(cmd: str) -> str:
    """A short process name: the program, or the script a Python process runs."""
    words = cmd.split()
    if not words:
        return "?"
    prog = words[0].rsplit("/", 1)[-1]
    if prog.startswith("python"):
        script = next((w for w in words[1:] if w.endswith(".py")), "")
        if script:
            return script.rsplit("/", 1)[-1]
        if len(words) > 1:
            return "python " + words[1][:20]
    return prog[:40]


class ListenWatcher:
    """Polls the socket table for the process tree of ``root`` until stopped."""

    def __init__(self, root: int, marker: str):
        self.root, self.marker = root, marker
        self.listeners: set[tuple[str, str, int, str]] = set()  # (proto, addr, port, process)
        self.processes: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "ListenWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def poll(self) -> None:
        procs = tree(self.root, self.marker)
        table = bound_sockets()
        for pid, cmd in procs.items():
            name = _name(cmd) + f"[{pid}]"
            self.processes.add(name)
            for inode in socket_inodes(pid) & table.keys():
                proto, addr, port = table[inode]
                self.listeners.add((proto, addr, port, name))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(POLL_S)

    def exposed(self) -> list[tuple[str, str, int, str]]:
        return sorted(x for x in self.listeners if not is_loopback(x[1]))
