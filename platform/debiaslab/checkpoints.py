"""Atomic checkpoints (temp name + rename) loaded with ``torch.load(weights_only=True)``.

Every checkpoint holds a digest of each of its tensors (``integrity``: dtype, shape and the
sha256 of the bytes, :func:`tensor_digests`). Loading verifies them: a file whose tensor bytes
changed on disk is a one-line :class:`CheckpointCorrupt` naming it and the tensor, never weights
silently used; :func:`latest_intact_checkpoint` lets resume fall back to the newest
intact checkpoint. Checkpoints written before hashes were kept still load, unverified."""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path
from typing import Any

import torch

from debiaslab.errors import ANSI_CODES, CheckpointError, describe_error
from debiaslab.fileio import write_atomic

CHECKPOINT_PATTERN = re.compile(r"^ckpt_(\d{8})\.pt$")
TEMP_PATTERN = re.compile(r"^\.ckpt_\d{8}\.pt\.tmp-(\d+)$")
MINIMAL_KEYS = ("model", "step")
TRAINER_KEYS = ("model", "ema", "optimizer", "scheduler", "step", "config", "rng", "data")
UNSUPPORTED_GLOBAL = re.compile(r"(?i)unsupported\s+global:?\s+(?:GLOBAL\s+)?([\w.]+)")
WEIGHTS_ONLY_REASON = re.compile(r"WeightsUnpickler error:\s*([^\n]+)")
INTEGRITY_KEY = "integrity"  # {"tensors": tensor_digests(state)}, written by save_checkpoint


class CheckpointCorrupt(CheckpointError):
    """A checkpoint whose content no longer matches the hash recorded when it was written."""


def tensor_digests(state: Any) -> dict[str, str]:
    """{key path: "dtype:shape:sha256 of the bytes"} of every tensor a checkpoint holds (the
    ``integrity`` entry excluded)."""
    out: dict[str, str] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            digest = hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            out[key] = f"{t.dtype}:{tuple(t.shape)}:{digest.hexdigest()}"
        elif isinstance(value, dict):
            for k, v in value.items():
                if not (key == "" and k == INTEGRITY_KEY):
                    walk(v, f"{key}/{k}")
        elif isinstance(value, (list, tuple)):
            for n, v in enumerate(value):
                walk(v, f"{key}/{n}")

    walk(state, "")
    return out


def verify_state(state: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """``state`` without its integrity entry, its tensors checked against the digests recorded
    when it was written: a tensor of the recorded dtype and shape whose bytes differ is
    CheckpointCorrupt (bytes flipped on disk). Tensors of another shape, and everything else,
    are left to the checks that know what they mean (a model that does not fit, a bad config).
    Checkpoints written before digests were kept load unverified."""
    record = state.pop(INTEGRITY_KEY, None)
    if not isinstance(record, dict) or not isinstance(record.get("tensors"), dict):
        return state
    recorded = record["tensors"]
    for key, now in tensor_digests(state).items():
        was = recorded.get(key)
        if isinstance(was, str) and was != now and was.rsplit(":", 1)[0] == now.rsplit(":", 1)[0]:
            raise CheckpointCorrupt(f"{path}: tensor {key.lstrip('/')} does not match the "
                                    f"digest recorded when the file was written (its bytes "
                                    f"changed on disk); do not use it: delete it, or re-run "
                                    f"its stage with --force")
    return state


def checkpoint_name(step: int) -> str:
    return f"ckpt_{step:08d}.pt"


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically: a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()  # serialize first: a failing write then raises the OS's own error
    sealed = {**state, INTEGRITY_KEY: {"tensors": tensor_digests(state)}}
    torch.save(sealed, buffer)  # (ENOSPC, EROFS...) instead of torch's "unexpected pos"
    try:
        write_atomic(path, lambda fh: fh.write(buffer.getbuffer()), fsync=True)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    return path


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_orphan_temps(directory: str | Path) -> list[Path]:
    """Delete the temp files (``.ckpt_*.pt.tmp-PID``) that writers killed mid-write left
    behind; a temp file of a live process is kept."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        m = TEMP_PATTERN.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    required: tuple[str, ...] = MINIMAL_KEYS) -> dict[str, Any]:
    """Load a checkpoint safely (no pickled code); a missing or corrupt file, or one without the
    ``required`` keys, is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt files
        raise CheckpointError(f"{path}: not a readable checkpoint ({load_failure_reason(exc)})"
                              ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a debiaslab checkpoint (holds "
                              f"{type(state).__name__}, not a dict)")
    verify_state(state, path)
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a debiaslab checkpoint (missing "
                              f"{', '.join(map(repr, missing))})")
    return state


def load_failure_reason(exc: BaseException) -> str:
    """Why torch.load refused a file, in one line: the weights-only unpickler's reason (e.g.
    "Unsupported global: GLOBAL os.system") rather than its generic first line."""
    text = ANSI_CODES.sub("", str(exc))
    match = UNSUPPORTED_GLOBAL.search(text)
    if match:
        return f"unsupported global: {match.group(1)}; the file holds code, not only tensors"
    match = WEIGHTS_ONLY_REASON.search(text)
    if match:
        return match.group(1).strip().rstrip(".")[:200]
    return describe_error(exc, 200)


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint in ``directory``, ascending by step."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = CHECKPOINT_PATTERN.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(directory: str | Path) -> Path | None:
    ckpts = list_checkpoints(directory)
    return ckpts[-1][1] if ckpts else None


def latest_intact_checkpoint(directory: str | Path, log: Any = None) -> Path | None:
    """The newest checkpoint whose bytes match its recorded hash; each damaged newer one is
    reported through ``log(msg)`` and skipped (resume falls back, saying so)."""
    for _, path in reversed(list_checkpoints(directory)):
        try:
            load_checkpoint(path)
        except CheckpointCorrupt as exc:
            if log is not None:
                log(f"{exc}; skipped, falling back to an older checkpoint")
            continue
        return path
    return None


def prune_checkpoints(directory: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints."""
    for _, path in list_checkpoints(directory)[:-keep]:
        path.unlink(missing_ok=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the latest checkpoint in a run or checkpoints folder."""
    path = Path(path)
    if path.is_file():
        return path
    for folder in (path, path / "checkpoints"):
        latest = latest_checkpoint(folder)
        if latest is not None:
            return latest
    raise CheckpointError(f"no checkpoint found at {path}")
