"""The one atomic-write helper: a file is written under a temporary name in its own folder, then
renamed over the target, so a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any, Callable


def write_atomic(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any], *,
                 fsync: bool = False) -> Path:
    """Call ``write(fh)`` on a temp file beside ``path``, then rename it to ``path``.

    The temp name ``.<name>.tmp-<pid>`` carries the writer's PID, so files left by a killed
    writer can be recognised and removed. On any error the temp file is deleted and the error
    (e.g. ENOSPC naming the temp path) propagates.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, *, fsync: bool = False) -> Path:
    return write_atomic(path, lambda fh: fh.write(data), fsync=fsync)


def write_text_atomic(path: str | os.PathLike[str], text: str, *, fsync: bool = False) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"), fsync=fsync)


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: int = 2) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")
