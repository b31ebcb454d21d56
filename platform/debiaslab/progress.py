"""Progress reporting that suits both a terminal and a log file.

``log(msg)`` prints the project's status lines. ``progress(...)`` returns a tqdm bar when the
output stream is interactive (a TTY, or a Jupyter kernel's stream), and otherwise a
:class:`LineProgress`: the same minimal interface (iteration, ``update``, ``close``,
``set_postfix``, ``set_description``, context manager, ``n``/``total``) that writes at most one
plain line (no carriage returns) every ``DEBIASLAB_PROGRESS_INTERVAL`` seconds (default 30) plus a
final line. CI logs, ``ray job submit`` logs and redirected stderr therefore get a handful of
readable lines instead of thousands of ``\\r`` redraws.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable, Iterator, TextIO

INTERVAL_ENV = "DEBIASLAB_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 30.0

_clock = time.monotonic  # module-level so tests can substitute a fake clock


_label = ""  # set_process_label: this process's name in its lines (side-by-side work)


def set_process_label(label: str) -> None:
    """Name this process in every status and progress line it writes, and write plain lines
    even on a terminal: for work that runs side by side with other processes sharing the
    terminal (the quickstart's two experiments), where tqdm bars would overwrite each other."""
    global _label
    _label = label


def log(msg: str) -> None:
    """The one status line format of the project: ``[debiaslab] msg`` on stdout, flushed
    (``[debiaslab] label: msg`` in a labelled process)."""
    head = f"{_label}: " if _label else ""
    print(f"[debiaslab] {head}{msg}", flush=True)


def progress_interval() -> float:
    """Seconds between plain progress lines: ``$DEBIASLAB_PROGRESS_INTERVAL`` if it is a number
    >= 0 (0 = a line per update), else the 30 s default (a malformed value never stops a run)."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    try:
        value = float(raw)
    except ValueError:
        return DEFAULT_INTERVAL_S
    return value if value >= 0 else DEFAULT_INTERVAL_S


def is_interactive(stream: Any) -> bool:
    """True for a terminal or a Jupyter kernel stream (where tqdm.auto draws a widget)."""
    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False
    return type(stream).__module__.startswith("ipykernel")


def _format_seconds(seconds: float) -> str:
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{sec:02d}" if hours else f"{minutes:02d}:{sec:02d}"


class LineProgress:
    """A tqdm stand-in for non-interactive output: sparse, newline-terminated status lines.

    A line is written when at least ``interval`` seconds passed since the previous one (checked on
    ``update``), and a final line on ``close`` (also at the end of iteration) unless ``leave`` is
    False and no line was written yet (short, transient bars such as a sampler's steps stay
    silent) or the last line already shows the final count.
    """

    def __init__(self, iterable: Iterable[Any] | None = None, *, total: float | None = None,
                 desc: str = "", unit: str = "it", initial: float = 0, disable: bool = False,
                 leave: bool = True, file: TextIO | None = None,
                 interval: float | None = None) -> None:
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except (TypeError, AttributeError):
                total = None
        self.iterable = iterable
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = initial
        self.initial = initial
        self.disable = disable
        self.leave = leave
        self.file = file
        self.interval = progress_interval() if interval is None else float(interval)
        self.postfix = ""
        self.lines_written = 0
        self.written_n: float | None = None  # the count shown by the last line
        self.closed = False
        self.start_t = self.last_t = _clock()

    # -------------------------------------------------------------- tqdm interface
    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("LineProgress: nothing to iterate (pass an iterable)")
        try:
            for obj in self.iterable:
                yield obj
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total) if self.total is not None else len(self.iterable)  # type: ignore

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.disable or self.closed:
            return
        now = _clock()
        if now - self.last_t >= self.interval:
            self._write(now)

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True,
                    **kwargs: Any) -> None:
        items = dict(ordered_dict or {}, **kwargs)
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:  # tqdm API; lines are written on the interval only
        pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.disable or self.written_n == self.n:  # the last line already shows the end
            return
        if self.leave or self.lines_written:
            self._write(_clock())

    # -------------------------------------------------------------- output
    def format_line(self, now: float) -> str:
        elapsed = now - self.start_t
        done = self.n - self.initial
        speed = f"{done / elapsed:.3g}" if elapsed > 0 and done > 0 else "?"
        rate = f"{speed} {self.unit}/s"
        count = f"{self.n:g}/{self.total:g}" if self.total is not None else f"{self.n:g}"
        percent = f"{100.0 * self.n / self.total:3.0f}% " if self.total else ""
        label = _label if _label not in self.desc else ""  # "train NAME" names it already
        head = "".join(f"{part}: " for part in (label, self.desc) if part)
        tail = f", {self.postfix}" if self.postfix else ""
        return f"{head}{percent}{count} {self.unit} [{_format_seconds(elapsed)}, {rate}{tail}]"

    def _write(self, now: float) -> None:
        stream = self.file if self.file is not None else sys.stderr
        try:
            stream.write(self.format_line(now) + "\n")
            stream.flush()
        except (ValueError, OSError):  # closed or broken stream: progress is best effort
            pass
        self.lines_written += 1
        self.written_n = self.n
        self.last_t = now


def progress(iterable: Iterable[Any] | None = None, *, total: float | None = None,
             desc: str = "", unit: str = "it", initial: float = 0, disable: bool = False,
             leave: bool = True, file: TextIO | None = None, **tqdm_kwargs: Any) -> Any:
    """A tqdm bar on an interactive ``file`` (default stderr), else a :class:`LineProgress`.

    Extra keyword arguments (``dynamic_ncols``, ...) go to tqdm only.
    """
    stream = file if file is not None else sys.stderr
    if not disable and not _label and is_interactive(stream):
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave,
                    file=file, **tqdm_kwargs)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial,
                        disable=disable, leave=leave, file=file)
