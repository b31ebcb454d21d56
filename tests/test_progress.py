"""debiaslab.progress: tqdm on a terminal, a few plain lines (no carriage returns) elsewhere."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from debiaslab import progress as progress_mod
from debiaslab.progress import DEFAULT_INTERVAL_S, INTERVAL_ENV, LineProgress, progress

UPDATES = 5000


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TTYStream(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture()
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(progress_mod, "_clock", fake)
    monkeypatch.delenv(INTERVAL_ENV, raising=False)
    return fake


def test_redirected_stderr_gets_a_bounded_number_of_plain_lines(tmp_path: Path) -> None:
    """A real process whose stderr is a file: thousands of updates over ~1 s with a 0.2 s
    interval write at most elapsed/interval + 1 lines, none with a carriage return."""
    script = textwrap.dedent(f"""
        import time
        from debiaslab.progress import progress
        t0 = time.monotonic()
        with progress(total={UPDATES}, desc="work", unit="it") as bar:
            for i in range({UPDATES}):
                time.sleep(0.0002)
                bar.update(1)
                if i % 1000 == 0:
                    bar.set_postfix(loss=f"{{1.0 / (i + 1):.3f}}")
        for _ in progress(range({UPDATES}), desc="quick"):
            pass
        print(time.monotonic() - t0)
    """)
    err_path = tmp_path / "stderr.log"
    env = {**os.environ, INTERVAL_ENV: "0.2"}
    with err_path.open("w") as err:
        out = subprocess.run([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=err,
                             env=env, text=True, check=True, timeout=120).stdout
    elapsed = float(out.strip())
    text = err_path.read_text()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    work = [ln for ln in lines if ln.startswith("work:")]
    quick = [ln for ln in lines if ln.startswith("quick:")]
    assert len(lines) == len(work) + len(quick)
    assert 2 <= len(work) <= elapsed / 0.2 + 2  # periodic lines + the final one
    assert work[-1].startswith(f"work: 100% {UPDATES}/{UPDATES} it [") and "loss=" in work[-1]
    assert 1 <= len(quick) <= elapsed / 0.2 + 2
    assert quick[-1].startswith(f"quick: 100% {UPDATES}/{UPDATES} it")


def test_default_interval_writes_only_the_final_line(clock: FakeClock,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    bar = progress(total=UPDATES, desc="train", unit="step")  # captured stderr: not a TTY
    assert isinstance(bar, LineProgress) and bar.interval == DEFAULT_INTERVAL_S
    for _ in range(UPDATES):
        clock.now += 2.0**-8  # 19.5 s in all (exact binary steps): below the 30 s interval
        bar.update()
    bar.close()
    bar.close()  # idempotent
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\r" not in err
    assert err == f"train: 100% {UPDATES}/{UPDATES} step [00:19, 256 step/s]\n"


def test_lines_follow_the_interval(clock: FakeClock) -> None:
    out = io.StringIO()
    with progress(total=100, desc="x", file=out, initial=10) as bar:
        assert isinstance(bar, LineProgress)
        for _ in range(80):
            clock.now += 1.0  # a line every 30 updates
            bar.update()
    lines = out.getvalue().splitlines()
    assert lines == ["x:  40% 40/100 it [00:30, 1 it/s]", "x:  70% 70/100 it [01:00, 1 it/s]",
                     "x:  90% 90/100 it [01:20, 1 it/s]"]  # at 30 and 60 s, then the final line
    with progress(total=3, desc="y", file=out) as bar:
        for _ in range(3):
            clock.now += 30.0
            bar.update()
    assert out.getvalue().count("y: 100% 3/3") == 1  # no repeated final line


def test_transient_bars_stay_silent_and_disable_is_silent(clock: FakeClock) -> None:
    out = io.StringIO()
    for _ in progress(range(50), desc="steps", leave=False, file=out):
        pass
    assert out.getvalue() == ""  # leave=False and shorter than the interval: nothing
    assert list(progress(range(3), disable=True, file=out)) == [0, 1, 2]
    with progress(total=3, disable=True, file=out) as bar:
        bar.update(3)
    assert out.getvalue() == ""


def test_interval_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(INTERVAL_ENV, "2.5")
    assert progress_mod.progress_interval() == 2.5
    for bad in ("soon", "-1", ""):
        monkeypatch.setenv(INTERVAL_ENV, bad)
        assert progress_mod.progress_interval() == DEFAULT_INTERVAL_S


def test_a_tty_gets_tqdm() -> None:
    from tqdm import tqdm

    stream = TTYStream()
    bar = progress(total=10, desc="tty", file=stream, dynamic_ncols=True)
    assert isinstance(bar, tqdm)
    bar.update(10)
    bar.close()
    assert "tty" in stream.getvalue() and "\r" in stream.getvalue()
    assert isinstance(progress(total=10, file=io.StringIO(), dynamic_ncols=True), LineProgress)
