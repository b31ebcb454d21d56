"""User-facing errors: each renders as one line naming the file, field or value at fault."""

import re


class DebiaslabError(Exception):
    """Base class for errors that the CLI prints as a single line (no traceback)."""


class ConfigError(DebiaslabError):
    """A config key or value is unknown or invalid."""


class DataError(DebiaslabError):
    """An input dataset file is missing, malformed or inconsistent."""


class CheckpointError(DebiaslabError):
    """A checkpoint is missing, corrupt or incompatible."""


class TrainingDiverged(DebiaslabError):
    """The training loss became NaN or infinite."""


class TrackingError(DebiaslabError):
    """The MLflow tracking store is unreachable, malformed or refuses a request."""


class RunLocked(DebiaslabError):
    """Another live process is writing the same run folder."""


ANSI_CODES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # terminal colour codes in library messages


def describe_error(exc: BaseException, limit: int = 300, lines: int = 1) -> str:
    """The first ``lines`` lines of an exception's message joined by '; ', without terminal
    colour codes, shortened to ``limit`` characters."""
    text = ANSI_CODES.sub("", str(exc)).strip()
    found = [ln.strip() for ln in text.splitlines() if ln.strip()]
    first = "; ".join(found[:lines]) if found else type(exc).__name__
    return first[:limit]


# --------------------------------------------------------------------------------------------
# one line for the CLI

_OS_ADVICE = {
    "ENOSPC": "no space left on {path}; free some space or choose another output_dir",
    "EDQUOT": "disk quota exceeded on {path}; free some space or choose another output_dir",
    "EROFS": "{path}: read-only file system; choose a writable output_dir",
    "EACCES": "{path}: permission denied; choose a folder you can write to",
    "EPERM": "{path}: operation not permitted; choose a folder you can write to",
    "ENOTDIR": "{path}: a part of this path is a file, not a folder; choose another path",
    "EEXIST": "{path}: exists and is not a folder; choose another path",
    "EISDIR": "{path}: is a folder where a file was expected",
    "ENOENT": "{path}: no such file or folder",
    "EMFILE": "too many open files ({path}); raise the limit with ulimit -n",
}
_LIBRARY_MODULES = ("mlflow", "sqlalchemy", "alembic", "yaml", "pyarrow")


def _chain(exc: BaseException):
    """The exception, its explicit causes and the errors Ray wraps (``.cause``); implicit
    contexts are not followed, so a bug raised while handling an OSError stays a bug."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        current = stack.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack.extend([getattr(current, "cause", None), current.__cause__])


def os_error_message(exc: OSError) -> str:
    import errno

    path = exc.filename if exc.filename is not None else "(unknown path)"
    if exc.filename2 is not None:
        path = f"{exc.filename} -> {exc.filename2}"
    name = errno.errorcode.get(exc.errno or -1, "")
    template = _OS_ADVICE.get(name)
    if template is None:
        return f"{path}: {exc.strerror or describe_error(exc)}"
    return template.format(path=path)


def user_error_message(exc: BaseException) -> str | None:
    """One line for an error a user or the environment can cause, None for a bug.

    DebiaslabErrors print as they are; OSErrors name the path and what to do; refusals of the
    libraries users configure (MLflow stores, YAML, Parquet) are shortened to their first line.
    Errors wrapped by Ray (a worker's error inside TrainingFailedError) are unwrapped."""
    chain = list(_chain(exc))
    for e in chain:
        if isinstance(e, DebiaslabError):
            return describe_error(e, 1000)
    for e in chain:
        if isinstance(e, OSError) and e.errno is not None:
            return os_error_message(e)
    for e in chain:
        if isinstance(e, MemoryError):
            return "out of memory; lower the batch sizes (train.batch_size, sample.batch_size)"
        module = type(e).__module__.split(".", 1)[0]
        if module in _LIBRARY_MODULES:
            return f"{module}: {describe_error(e)}"
    return None
