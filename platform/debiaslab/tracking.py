"""MLflow run lifecycle, params/metrics/artifacts, through MlflowClient with explicit run ids.

The only module outside `distributed/` that imports mlflow, and only lazily (inside functions).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, TypeVar

from debiaslab.errors import DebiaslabError, TrackingError
from debiaslab.strict import flatten as flatten_keys  # the one rule for dotted keys

MAX_PARAM_VALUE_CHARS = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_VALUE_CHARS = 8000  # mlflow.utils.validation.MAX_TAG_VAL_LENGTH
PARAMS_PER_BATCH = 100  # mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH
METRICS_PER_BATCH = 1000  # mlflow.utils.validation.MAX_METRICS_PER_BATCH
LOCK_RETRY_ATTEMPTS = 6
LOCK_RETRY_BASE_DELAY_S = 0.2
LOCK_RETRY_MAX_DELAY_S = 5.0
GIT_TIMEOUT_S = 10.0
TRUNCATION_MARK = "...[truncated]"
DB_FILE_NAME = "mlflow.db"
ARTIFACTS_DIR_NAME = "mlartifacts"
GIT_COMMIT_TAG = "debiaslab.git_commit"
REPO_ROOT = Path(__file__).resolve().parents[2]  # platform/debiaslab/tracking.py -> repo root

T = TypeVar("T")


class Killed(BaseException):
    """Raised inside a `Tracker` block by its SIGTERM handler so the block unwinds.

    A BaseException (like SystemExit) so `except Exception` does not swallow it; `exit_code` is the
    shell convention 128 + signal number for a CLI that catches it.
    """

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(int(signum))  # args stay (signum,) so the exception pickles
        self.signum = int(signum)
        self.exit_code = 128 + int(signum)

    def __str__(self) -> str:
        return f"terminated by signal {signal.Signals(self.signum).name}"


def _import_mlflow() -> Any:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    return mlflow


def resolve_tracking_uri(output_dir: str | os.PathLike[str]) -> str:
    """`MLFLOW_TRACKING_URI` if set, else the embedded `sqlite:///<abs output_dir>/mlflow.db`."""
    env_uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env_uri:
        return env_uri
    return "sqlite:///" + str(Path(output_dir).resolve() / DB_FILE_NAME)


def _sqlite_db_path(tracking_uri: str) -> Path | None:
    """The database file of a local `sqlite:///` URI, or None for any other store."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri.removeprefix("sqlite:///").split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path).resolve()


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "experiment"


def artifact_location(output_dir: str | os.PathLike[str], experiment: str) -> str:
    """file:// URI of `<abs output_dir>/mlartifacts/<experiment>` (name made filesystem-safe)."""
    path = Path(output_dir).resolve() / ARTIFACTS_DIR_NAME / _safe_name(experiment)
    return path.as_uri()


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[: limit - len(TRUNCATION_MARK)] + TRUNCATION_MARK


def _param_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        value = list(value)
    return _truncate(str(value), MAX_PARAM_VALUE_CHARS)


def flatten(config: Mapping[str, Any] | Any, prefix: str = "") -> dict[str, str]:
    """Flatten nested dicts (or dataclasses) into `{"a.b.c": str(value)}` MLflow params.

    Lists and tuples become one string (`"[1, 2]"`), an empty dict becomes `"{}"`, and values longer
    than MLflow's 6000-character limit are truncated with a `...[truncated]` mark.
    """
    plain = _plain(config)
    flat = flatten_keys(plain, f"{prefix}." if prefix else "")
    return {k: "{}" if isinstance(v, Mapping) and not v else _param_value(v)
            for k, v in flat.items()}


def _plain(value: Any) -> Any:
    """Convert a config into YAML/JSON-safe builtins (dataclasses, tuples, paths, numpy scalars)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item") and callable(value.item):
        try:
            return _plain(value.item())
        except (TypeError, ValueError):
            pass
    return str(value)


def git_commit(repo_dir: str | os.PathLike[str] = REPO_ROOT) -> str | None:
    """HEAD commit of the git work tree at `repo_dir` (`<sha>-dirty` if tracked files changed).

    None when `repo_dir` is not inside a repository, has no commit yet, or git is unavailable.
    """
    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", "-C", str(repo_dir), *args],
            capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=False,
        )

    try:
        head = git("rev-parse", "--verify", "HEAD")
        if head.returncode != 0:
            return None
        sha = head.stdout.strip()
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    if not sha:
        return None
    if status.returncode == 0 and status.stdout.strip():
        return sha + "-dirty"
    return sha


def ui_hint(tracking_uri: str) -> str:
    """The command (or address) a user runs to browse the runs of `tracking_uri`."""
    if tracking_uri.startswith(("http://", "https://", "databricks")):
        return f"open {tracking_uri} in a browser"
    return f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri)}"


def _is_locked_error(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if "database is locked" in str(current).lower():
            return True
        current = current.__cause__ or current.__context__
    return False


def _retry_locked(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call `fn`, retrying with jittered exponential backoff on SQLite "database is locked"."""
    for attempt in range(LOCK_RETRY_ATTEMPTS):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - re-raised unless it is a lock error
            if attempt == LOCK_RETRY_ATTEMPTS - 1 or not _is_locked_error(exc):
                raise
            delay = min(LOCK_RETRY_MAX_DELAY_S, LOCK_RETRY_BASE_DELAY_S * 2**attempt)
            time.sleep(delay * (0.5 + random.random()))
    raise AssertionError("unreachable")


OWNER_HOST_TAG, OWNER_PID_TAG = "debiaslab.host", "debiaslab.pid"
TRACKING_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql",
                    "databricks")
PROBE_TIMEOUT_S = 5.0


def check_tracking_uri(tracking_uri: str) -> None:
    """Fail fast, in one line, on a tracking URI MLflow could only refuse slowly or cryptically:
    an unknown scheme, an unreachable server, a SQLite file that is not a database."""
    from urllib.parse import urlsplit

    parts = urlsplit(tracking_uri)
    scheme = parts.scheme.split("+", 1)[0]
    where = _uri_source(tracking_uri)
    if scheme not in TRACKING_SCHEMES:
        raise TrackingError(f"{where}: unsupported tracking URI {tracking_uri!r}; use "
                            f"sqlite:///PATH or http(s)://HOST:PORT")
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise TrackingError(f"{where}: {tracking_uri!r} names no host")
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise TrackingError(f"{where}: {tracking_uri!r} has an invalid port") from None
        try:
            socket.create_connection((parts.hostname, port), timeout=PROBE_TIMEOUT_S).close()
        except OSError as exc:
            raise TrackingError(f"{where}: cannot reach the MLflow server at {tracking_uri} "
                                f"({exc.strerror or exc}); start it or unset "
                                f"MLFLOW_TRACKING_URI") from None
    db_path = _sqlite_db_path(tracking_uri)
    if db_path is not None and db_path.is_file() and db_path.stat().st_size > 0:
        with open(db_path, "rb") as fh:
            header = fh.read(16)
        if header != b"SQLite format 3\x00":
            raise TrackingError(f"{db_path}: not an SQLite database, so not an MLflow store; "
                                f"move it away or set MLFLOW_TRACKING_URI")


def _uri_source(tracking_uri: str) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI", "").strip() == tracking_uri:
        return "MLFLOW_TRACKING_URI"
    return "tracking URI"


def make_client(tracking_uri: str) -> Any:
    """An `MlflowClient` for a checked URI (local SQLite folders are created)."""
    check_tracking_uri(tracking_uri)
    db_path = _sqlite_db_path(tracking_uri)
    if db_path is not None:
        db_path.parent.mkdir(parents=True, exist_ok=True)
    return _import_mlflow().MlflowClient(tracking_uri=tracking_uri)


@contextlib.contextmanager
def store_errors(tracking_uri: str) -> Iterator[None]:
    """Turn the tracking store's refusals (MLflow, SQLAlchemy, HTTP) into one-line
    `TrackingError`s naming the store; our own errors, OS errors and bugs pass through."""
    try:
        yield
    except (DebiaslabError, OSError):
        raise
    except Exception as exc:
        module = type(exc).__module__.split(".", 1)[0]
        if module not in ("mlflow", "sqlalchemy", "requests", "urllib3", "alembic", "sqlite3"):
            raise
        from debiaslab.errors import describe_error

        raise TrackingError(f"MLflow store {tracking_uri}: {describe_error(exc)}") from None


def end_dead_runs(client: Any, experiment_id: str, run_name: str) -> list[str]:
    """Runs named ``run_name`` still RUNNING whose process on this host is gone (killed with
    -9, a crashed machine) are ended KILLED, so the MLflow UI shows no zombies."""
    from debiaslab.checkpoints import pid_alive

    host = socket.gethostname()
    quoted = run_name.replace("'", "\\'")
    runs = client.search_runs([experiment_id], filter_string=(
        f"attributes.run_name = '{quoted}' and attributes.status = 'RUNNING' and "
        f"tags.`{OWNER_HOST_TAG}` = '{host}'"))
    ended = []
    for run in runs:
        pid = run.data.tags.get(OWNER_PID_TAG, "")
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            _retry_locked(client.set_tag, run.info.run_id, "debiaslab.ended_by",
                          f"cleanup: process {pid} was gone")
            _retry_locked(client.set_terminated, run.info.run_id, status="KILLED")
            ended.append(run.info.run_id)
    return ended


_METRIC_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. :/]")


def metric_key(name: Any) -> str:
    """``name`` with every character MLflow refuses in a metric name (anything but letters,
    digits, ``_ - . : /`` and space) replaced by ``_``: ``bias/share_bold=1`` ->
    ``bias/share_bold_1``."""
    return _METRIC_UNSAFE.sub("_", str(name))


def _chunks(items: list[T], size: int) -> Iterable[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Tracker:
    """Context manager around one MLflow run, addressed by explicit run id (no fluent state).

    On enter: creates the experiment if missing (artifacts beside a local SQLite db), creates a run
    or attaches to `run_id`, tags the git commit, and in the main thread installs a SIGTERM handler
    raising `Killed`. On exit: FINISHED; FAILED on an exception; KILLED on KeyboardInterrupt or
    SIGTERM; the previous SIGTERM handler is restored. `end_run=None` ends the run only if this
    Tracker created it (a worker attached to a driver's run leaves it open); pass True to resume
    and end an earlier run. The handler fires once: later SIGTERMs are ignored while unwinding.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        experiment: str,
        run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        tracking_uri: str | None = None,
        run_id: str | None = None,
        end_run: bool | None = None,
    ) -> None:
        self.output_dir = Path(output_dir).resolve()
        self.experiment = experiment
        self.run_name = run_name
        self.tags = dict(tags or {})
        self._tracking_uri = tracking_uri or resolve_tracking_uri(self.output_dir)
        self._run_id = run_id
        self._end_run = end_run if end_run is not None else run_id is None
        self._experiment_id: str | None = None
        self._artifact_uri: str | None = None
        self._client: Any = None
        self._previous_sigterm: Any = None
        self._sigterm_installed = False
        self._killed = False

    # ----------------------------------------------------------------- lifecycle
    def __enter__(self) -> Tracker:
        with store_errors(self._tracking_uri):
            return self._enter()

    def _enter(self) -> Tracker:
        from mlflow.entities import RunStatus

        client = self.client
        if self._run_id is None:
            self._experiment_id = self._get_or_create_experiment()
            if self.run_name:
                end_dead_runs(client, self._experiment_id, self.run_name)
            run = _retry_locked(
                client.create_run, self._experiment_id, run_name=self.run_name,
                tags={OWNER_HOST_TAG: socket.gethostname(), OWNER_PID_TAG: str(os.getpid())},
            )
        else:
            run = client.get_run(self._run_id)
            self._experiment_id = run.info.experiment_id
            if self._end_run and run.info.status != RunStatus.to_string(RunStatus.RUNNING):
                _retry_locked(client.update_run, self._run_id, status="RUNNING")
        self._run_id = run.info.run_id
        self._artifact_uri = run.info.artifact_uri
        try:
            commit = git_commit()
            tags = dict(self.tags)
            if commit is not None:
                tags.setdefault(GIT_COMMIT_TAG, commit)
            self.set_tags(tags)
        except BaseException:
            if self._end_run:
                _retry_locked(client.set_terminated, self._run_id, status="FAILED")
            raise
        self._install_sigterm()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._end_run and self._run_id is not None:
                if exc_type is None:
                    status = "FINISHED"
                elif issubclass(exc_type, (Killed, KeyboardInterrupt)) or self._killed:
                    status = "KILLED"
                else:
                    status = "FAILED"
                _retry_locked(self.client.set_terminated, self._run_id, status=status)
        finally:
            self._restore_sigterm()

    def _install_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._sigterm_installed = True

    def _restore_sigterm(self) -> None:
        if self._sigterm_installed:
            previous = self._previous_sigterm
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
            self._sigterm_installed = False

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if self._killed:  # already unwinding: do not interrupt the cleanup a second time
            return
        self._killed = True
        raise Killed(signum)

    def _get_or_create_experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        client = self.client
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is None:
            db_path = _sqlite_db_path(self._tracking_uri)
            location = artifact_location(db_path.parent, self.experiment) if db_path else None
            try:
                return _retry_locked(
                    client.create_experiment, self.experiment, artifact_location=location
                )
            except MlflowException:  # created meanwhile by another process
                experiment = client.get_experiment_by_name(self.experiment)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            _retry_locked(client.restore_experiment, experiment.experiment_id)
        return experiment.experiment_id

    # ---------------------------------------------------------------- properties
    @property
    def client(self) -> Any:
        """The `mlflow.MlflowClient` bound to this Tracker's tracking URI."""
        if self._client is None:
            self._client = make_client(self._tracking_uri)
        return self._client

    @property
    def tracking_uri(self) -> str:
        return self._tracking_uri

    @property
    def run_id(self) -> str:
        return self._require(self._run_id, "run_id")

    @property
    def experiment_id(self) -> str:
        return self._require(self._experiment_id, "experiment_id")

    @property
    def artifact_uri(self) -> str:
        return self._require(self._artifact_uri, "artifact_uri")

    @staticmethod
    def _require(value: str | None, name: str) -> str:
        if value is None:
            raise RuntimeError(f"Tracker.{name} is only known inside the `with Tracker(...)` block")
        return value

    # ------------------------------------------------------------------- logging
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log flat params in batches of 100 (values stringified and truncated to 6000 chars)."""
        from mlflow.entities import Param

        items = [Param(str(k), _param_value(v)) for k, v in params.items()]
        for chunk in _chunks(items, PARAMS_PER_BATCH):
            _retry_locked(self.client.log_batch, self.run_id, params=chunk)

    def log_config(
        self, config: Mapping[str, Any] | Any, artifact_file: str = "config.yaml"
    ) -> None:
        """Log the flattened config as params and the whole config as a YAML artifact."""
        self.log_params(flatten(config))
        plain = _plain(config)
        try:
            import yaml

            text = yaml.safe_dump(plain, sort_keys=False, default_flow_style=False)
        except ImportError:
            text = json.dumps(plain, indent=2)
        self.log_text(text, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Log `text` as the artifact `artifact_file` (e.g. `notes/summary.md`)."""
        with tempfile.TemporaryDirectory(prefix="debiaslab-") as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_text(text, encoding="utf-8")
            self.log_artifact(path, _artifact_dir(artifact_file))

    def log_metrics(self, metrics: Mapping[str, Any], step: int = 0) -> None:
        """Log metrics at `step` in batches of up to 1000; values go through float(), names
        through metric_key (MLflow refuses the whole batch for one bad character)."""
        from mlflow.entities import Metric

        timestamp_ms = int(time.time() * 1000)
        items = [Metric(metric_key(k), float(v), timestamp_ms, int(step))
                 for k, v in metrics.items()]
        for chunk in _chunks(items, METRICS_PER_BATCH):
            _retry_locked(self.client.log_batch, self.run_id, metrics=chunk)

    def log_artifact(
        self, path: str | os.PathLike[str], artifact_path: str | None = None
    ) -> None:
        """Log a file, or a directory's contents, under `artifact_path` of the run."""
        local = Path(path)
        if local.is_dir():
            _retry_locked(self.client.log_artifacts, self.run_id, str(local), artifact_path)
        else:
            _retry_locked(self.client.log_artifact, self.run_id, str(local), artifact_path)

    def log_figure(self, fig: Any, name: str, dpi: int = 100) -> None:
        """Save a matplotlib Figure as PNG artifact `name` (".png" appended if missing)."""
        if not name.endswith(".png"):
            name += ".png"
        with tempfile.TemporaryDirectory(prefix="debiaslab-") as tmp:
            path = Path(tmp) / Path(name).name
            fig.savefig(path, format="png", dpi=dpi, bbox_inches="tight")
            self.log_artifact(path, _artifact_dir(name))

    def log_image_grid(self, images: Any, name: str, nrow: int = 8, scale: int = 1) -> None:
        """Log images [N,C,H,W] (floats in [-1,1] or uint8) as one PNG grid artifact `name`."""
        from debiaslab.report import save_image_grid

        if not name.endswith(".png"):
            name += ".png"
        with tempfile.TemporaryDirectory(prefix="debiaslab-") as tmp:
            path = Path(tmp) / Path(name).name
            save_image_grid(images, path, nrow=nrow, scale=scale)
            self.log_artifact(path, _artifact_dir(name))

    def set_tag(self, key: str, value: Any) -> None:
        self.set_tags({key: value})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags in batches (values stringified and truncated to 8000 chars)."""
        from mlflow.entities import RunTag

        items = [RunTag(str(k), _truncate(str(v), MAX_TAG_VALUE_CHARS)) for k, v in tags.items()]
        for chunk in _chunks(items, PARAMS_PER_BATCH):
            _retry_locked(self.client.log_batch, self.run_id, tags=chunk)

    def log_dataset(self, hash: str, name: str, path: str | os.PathLike[str]) -> None:
        """Record a dataset by content hash: tags `dataset.<name>.hash` and `.path`."""
        self.set_tags({f"dataset.{name}.hash": hash, f"dataset.{name}.path": str(path)})


def _artifact_dir(artifact_file: str) -> str | None:
    parent = Path(artifact_file).parent.as_posix()
    return None if parent in ("", ".") else parent


# ----------------------------------------------------------------------------------- reading


@dataclass
class RunRecord:
    """One MLflow run as plain data (what `debiaslab compare` and sweeps read back)."""

    run_id: str
    name: str
    status: str
    experiment: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]


SEARCH_PAGE = 1000


def find_runs(
    tracking_uri: str,
    *,
    experiments: Sequence[str] = (),
    tags: Mapping[str, str] | None = None,
    run_ids: Sequence[str] = (),
    statuses: Sequence[str] = ("FINISHED",),
) -> list[RunRecord]:
    """Runs of the named experiments (or the given run ids) whose tags match ``tags`` exactly
    and whose status is in ``statuses`` (empty: any), oldest first. Unknown experiments and run
    ids are :class:`DebiaslabError` s naming them."""
    from mlflow.exceptions import MlflowException

    client = make_client(tracking_uri)
    names: dict[str, str] = {}
    runs = []
    if run_ids:
        for run_id in run_ids:
            try:
                runs.append(client.get_run(run_id))
            except MlflowException:
                raise DebiaslabError(f"run {run_id!r} not found in {tracking_uri}") from None
    else:
        ids = []
        for name in experiments:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                known = sorted(e.name for e in client.search_experiments())
                raise DebiaslabError(f"experiment {name!r} not found in {tracking_uri}; "
                                     f"known: {', '.join(known) or 'none'}")
            ids.append(exp.experiment_id)
            names[exp.experiment_id] = name
        token = None
        while ids:
            page = client.search_runs(ids, max_results=SEARCH_PAGE, page_token=token,
                                      order_by=["attributes.start_time ASC"])
            runs.extend(page)
            token = page.token
            if not token:
                break
    records = []
    for run in runs:
        exp_id = run.info.experiment_id
        if exp_id not in names:
            names[exp_id] = client.get_experiment(exp_id).name
        record = RunRecord(run_id=run.info.run_id, name=run.info.run_name or "",
                           status=run.info.status, experiment=names[exp_id],
                           params=dict(run.data.params), metrics=dict(run.data.metrics),
                           tags=dict(run.data.tags))
        if statuses and record.status not in statuses:
            continue
        if any(record.tags.get(k) != v for k, v in (tags or {}).items()):
            continue
        records.append(record)
    return records


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED",
            tags: Mapping[str, str] | None = None, delete: bool = False) -> None:
    """Set tags on and terminate a run someone else opened (e.g. a trial killed by Tune);
    ``delete`` then soft-deletes it (restorable from MLflow's deleted runs)."""
    client = _import_mlflow().MlflowClient(tracking_uri=tracking_uri)
    for key, value in (tags or {}).items():
        _retry_locked(client.set_tag, run_id, key, value)
    _retry_locked(client.set_terminated, run_id, status=status)
    if delete:
        _retry_locked(client.delete_run, run_id)
