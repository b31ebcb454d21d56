"""The local Ray that debiaslab starts listens on loopback only.

Each kind of Ray-using command with ``distributed.backend=ray`` runs as a user runs it: a recipe
run whose train stage uses Ray Train and whose sample stage uses Ray Data (one Ray session; the
test also checks what that run recorded in MLflow; `extract` and the minority-score stage take
the same Ray Data map-job path as the sample stage), and a Tune sweep. Each runs in a subprocess
while the OS socket table is polled: every LISTEN (TCP) or bound unconnected (UDP) socket held
by the command's process tree (all descendants, plus processes whose command line names the
command's Ray temp dir, in case some were reparented) must be on 127.0.0.1 / ::1. The sweep
imports ``ray`` before debiaslab (a user script that did so), which Ray's import-time settings
made bind every interface. Linux only: reads /proc.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")

COMMAND_TIMEOUT_S = 300
POLL_S = 0.2
# loopback settings the subprocess must not inherit from this pytest process (set there by
# other tests' init_ray), or the check would pass without the code under test doing anything
SCRUBBED_ENV = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE", "RAY_ADDRESS",
                "RAY_NODE_IP_ADDRESS", "MLFLOW_TRACKING_URI", "GLOO_SOCKET_IFNAME",
                "MASTER_ADDR")
EXPERIMENT = {
    "name": "net", "model": {"model_channels": 16, "channel_mult": [1, 2],
                             "attention_resolutions": [], "head_channels": 16},
    "train": {"steps": 2, "batch_size": 16, "warmup_steps": 1, "checkpoint_every": 2,
              "log_every": 1, "device": "cpu"},
    "sample": {"samplers": ["ddim"], "steps": 2, "num_samples": 20, "batch_size": 20,
               "labels": "uniform", "guidance": [{"type": "cfg", "omega": 0.0}]},
    "metrics": {"bootstrap": 0},
    "distributed": {"backend": "ray", "num_workers": 1, "cpus_per_worker": 1.0,
                    "object_store_memory_gb": 0.5},
    "tracking": {"experiment": "net"},
}
RAY_FIRST = ("import sys, ray; from debiaslab.cli import main; "
             "assert 'debiaslab.distributed' not in sys.modules; sys.exit(main(sys.argv[1:]))")


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


def _procs() -> dict[int, tuple[int, str]]:
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
    procs = _procs()
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


# ------------------------------------------------------------------------- running the commands


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """One experiment, dataset and (plain-loop) checkpoint shared by all commands."""
    from debiaslab.config import load_config
    from debiaslab.data.dataset import ImageDataset
    from debiaslab.pipeline import build_data
    from debiaslab.training.loop import Trainer

    root = tmp_path_factory.mktemp("net")
    exp = dict(EXPERIMENT, output_dir=str(root / "out"))
    path = root / "experiment.yaml"
    path.write_text(yaml.safe_dump(exp))
    cfg = load_config(path, ["distributed.backend=local"])
    build_data(cfg)
    Trainer(cfg, ImageDataset.load(cfg.dataset_path), cfg.run_dir, progress=False).fit()
    sweep = {"name": "net_sweep", "experiment": str(path), "kind": "sampling",
             "params": {"sample.guidance.cfg.omega": {"type": "float", "low": 0.0, "high": 3.0}},
             "objective": {"metric": "eval/fid", "mode": "min"}, "num_trials": 1,
             "startup_trials": 1, "cpus_per_trial": 1.0}
    (root / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    return root


def run_watched(args: list[str], ray_tmp: str, *, ray_first: bool) -> ListenWatcher:
    """Run one CLI command to completion while watching its sockets."""
    assert len(ray_tmp) < 40
    shutil.rmtree(ray_tmp, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    env.update(DEBIASLAB_RAY_TMP=ray_tmp, PYTHONUNBUFFERED="1")
    prefix = [sys.executable, "-c", RAY_FIRST] if ray_first else [
        sys.executable, "-m", "debiaslab.cli"]
    proc = subprocess.Popen(prefix + args, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        with ListenWatcher(proc.pid, ray_tmp) as watcher:
            proc.wait(timeout=COMMAND_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
        # leftovers of this command's Ray only (their command lines name its temp dir), by pid
        for pid, cmd in _procs().items():
            if ray_tmp in cmd[1] and pid != os.getpid():
                try:
                    os.kill(pid, 9)
                except OSError:
                    pass
        reader.join(timeout=10)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, "".join(lines[-60:])
    return watcher


COMMANDS = {
    # name: (argv after `debiaslab`, import ray before debiaslab?)
    "run": (["run", "--stage", "data", "--stage", "train", "--stage", "sample",
             "--set", "name=net_ray_run"], False),
    "sweep": (["sweep"], True),
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_local_ray_listens_on_loopback_only(workspace, command):
    argv, ray_first = COMMANDS[command]
    if command == "sweep":
        args = [*argv, "-c", str(workspace / "sweep.yaml")]
    else:
        args = [*argv, "-c", str(workspace / "experiment.yaml")]
    watcher = run_watched(args, f"/tmp/dl-net-{command}", ray_first=ray_first)
    print(f"{command}: {len(watcher.processes)} processes, listening:",
          *sorted(watcher.listeners), sep="\n  ")
    assert watcher.listeners, f"saw no listening socket at all (processes: {watcher.processes})"
    assert not watcher.exposed(), (
        f"{command}: sockets on non-loopback addresses: {watcher.exposed()}")
    assert any(name.startswith("gcs_server") for *_, name in watcher.listeners), watcher.listeners
    if command == "run":
        check_recipe_run_on_ray(workspace / "out")


def check_recipe_run_on_ray(out: Path) -> None:
    """What the `run` command above did on ``distributed.backend: ray``: Ray Train trained (rank 0
    logged into the driver's train child run), Ray Data sampled, each stage has its child run."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("net").experiment_id],
                              filter_string="attributes.run_name = 'net_ray_run'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", runs
    parent = runs[0]
    children = {r.data.tags["debiaslab.stage"]: r for r in client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    assert set(children) == {"data", "train", "sample"}  # evaluate runs in-process anyway
    steps = [m.step for m in client.get_metric_history(children["train"].info.run_id,
                                                       "train/loss")]
    assert steps == [1, 2]
    samples = out / "runs" / "net_ray_run" / "samples"
    assert (samples / "grid_ddim.png").is_file() and (samples / "ddim" / "dataset.json").is_file()


def test_socket_table_reader_sees_an_exposed_listener():
    """The check itself can fail: a socket on 0.0.0.0 in this process is reported as exposed."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        watcher = ListenWatcher(os.getpid(), "no-such-marker")
        watcher.poll()
        port = s.getsockname()[1]
    assert ("tcp", "0.0.0.0", port) in {x[:3] for x in watcher.exposed()}
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("::") and not is_loopback("0.0.0.0")
