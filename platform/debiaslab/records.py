"""Run records: what each stage of a run produced, with content hashes (the services layer).

A stage's record is ``<run_dir>/stages/<stage>.json``: its key (a hash of the config keys and
input hashes that define it), its output artifacts with their content hashes, and its summary
metrics, written atomically after the stage succeeds. The recipe engine (recipes.py) reads them to
skip stages that are up to date; sampling, sweeps and evaluations read them to find what an
earlier stage produced (:func:`recorded_outputs`).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from debiaslab.config import ExperimentConfig, to_dict
from debiaslab.errors import ConfigError
from debiaslab.fileio import write_text_atomic
from debiaslab.strict import flatten

RECORD_DIR = "stages"
RECORD_VERSION = 1


@dataclass(frozen=True)
class Artifact:
    """A stage output: its kind, where it is, and a content hash of what is there."""

    kind: str
    path: str
    hash: str

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "path": self.path, "hash": self.hash}


def config_values(cfg: ExperimentConfig, keys: Sequence[str]) -> dict[str, Any]:
    """{key: value} for dotted keys; a key ending in "." selects a whole section."""
    flat = flatten(to_dict(cfg))
    out: dict[str, Any] = {}
    for key in keys:
        if key.endswith("."):
            out.update({k: v for k, v in flat.items() if k.startswith(key)})
        elif key in flat:
            out[key] = flat[key]
        else:
            raise ValueError(f"stage key {key!r} is not a config key")
    return out


def record_path(cfg: ExperimentConfig, stage: Any) -> Path:
    """``<run_dir>/stages/<stage name>.json`` (``stage``: a recipes.Stage or its name)."""
    return cfg.run_dir / RECORD_DIR / f"{getattr(stage, 'name', stage)}.json"


def read_record(cfg: ExperimentConfig, stage: Any) -> dict[str, Any] | None:
    path = record_path(cfg, stage)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("version") == RECORD_VERSION else None


def recorded_outputs(cfg: ExperimentConfig) -> dict[str, str]:
    """{artifact name: path} of every stage output recorded in the run folder (what a method's
    evaluation or a sweep trial reads of the run that produced its checkpoint)."""
    out: dict[str, str] = {}
    folder = cfg.run_dir / RECORD_DIR
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("version") == RECORD_VERSION:
            out.update({k: str(v.get("path", "")) for k, v in record.get("outputs", {}).items()
                        if isinstance(v, dict)})
    return out


def write_record(cfg: ExperimentConfig, stage: Any, key: str,
                 artifacts: Mapping[str, Artifact], metrics: Mapping[str, float]) -> Path:
    """Record that ``stage`` produced ``artifacts`` (with their hashes) for stage key ``key``."""
    path = record_path(cfg, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"version": RECORD_VERSION, "stage": getattr(stage, "name", stage), "key": key,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "outputs": {k: a.to_json() for k, a in artifacts.items()},
              "metrics": dict(metrics)}
    return write_text_atomic(path, json.dumps(record, indent=2, sort_keys=True))


def up_to_date(cfg: ExperimentConfig, stage: Any, key: str) -> dict[str, Artifact] | None:
    """The recorded outputs when the stage already ran with this key and they are intact
    (``stage``: a recipes.Stage, whose declared outputs must all be recorded)."""
    record = read_record(cfg, stage)
    if record is None or record.get("key") != key:
        return None
    outputs = {k: Artifact(**v) for k, v in record.get("outputs", {}).items()}
    if set(outputs) != set(stage.outputs):
        return None
    for artifact in outputs.values():
        if artifact_hash(artifact.kind, Path(artifact.path)) != artifact.hash:
            return None
    return outputs


def artifact_hash(kind: str, path: Path) -> str | None:
    """Content hash of an artifact on disk (None when it is missing or unreadable)."""
    try:
        if kind in ("dataset", "side_table"):
            return _manifest_hash(path)
        if kind == "samples":  # a folder of per-sampler datasets
            parts = sorted(p for p in path.iterdir() if (p / "dataset.json").is_file())
            if not parts:
                return None
            joined = "".join(f"{p.name}:{_manifest_hash(p)};" for p in parts)
            return hashlib.sha256(joined.encode()).hexdigest()
        return file_hash(path)
    except (OSError, ValueError, KeyError):
        return None


def _manifest_hash(path: Path) -> str:
    """The content hash a dataset's (or side table's) manifest records, provided every data
    file it lists is still there with its recorded size (a cheap check; readers verify the
    bytes against the hash when they load)."""
    for name in ("dataset.json", "side_table.json"):
        if (path / name).is_file():
            manifest = json.loads((path / name).read_text())
            files = manifest.get("shards") or manifest.get("files") or []
            for entry in files:
                file = entry["file"] if isinstance(entry, dict) else entry
                size = entry.get("bytes") if isinstance(entry, dict) else None
                stat = (path / file).stat()  # FileNotFoundError: the artifact is incomplete
                if size is not None and stat.st_size != int(size):
                    raise ValueError(f"{path / file}: size changed")
            return str(manifest["content_hash"])
    raise FileNotFoundError(path)


def file_hash(path: Path) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative names and bytes)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    if not files:
        raise FileNotFoundError(path)
    for f in files:
        if f != path:
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def make_artifact(kind: str, path: Path | str) -> Artifact:
    path = Path(path)
    digest = artifact_hash(kind, path)
    if digest is None:
        raise ConfigError(f"stage output {path} ({kind}) is missing or unreadable")
    return Artifact(kind, str(path), digest)
