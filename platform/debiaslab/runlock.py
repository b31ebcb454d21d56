"""One writer per run folder: an exclusive lock held while a process trains or samples a run.

The lock is ``fcntl.flock`` on ``<run_dir>/.lock``, which also holds the owner's PID, host and
start time. The kernel drops the lock when its process dies, so a lock file left by a killed
process is stale and is taken over. Within one process the lock is re-entrant (a whole-experiment
run holds it across its train and sample stages). POSIX only, like Ray.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from debiaslab.errors import RunLocked

LOCK_NAME = ".lock"
_held: dict[Path, tuple[int, int]] = {}  # run_dir -> (fd, depth) held by this process


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    return f"PID {info.get('pid', '?')} on {info.get('host', '?')} (since {since})"


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the run folder's lock for the block; a live holder is a one-line RunLocked."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        fd, depth = _held[run_dir]
        _held[run_dir] = (fd, depth + 1)
        try:
            yield run_dir
        finally:
            fd, depth = _held[run_dir]
            _held[run_dir] = (fd, depth - 1)
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunLocked(f"{run_dir} is in use by {_holder(path)}; wait for it to finish, or use "
                        f"another name") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.time()}).encode())
        _held[run_dir] = (fd, 1)
        yield run_dir
    finally:
        _held.pop(run_dir, None)
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # releases the flock
