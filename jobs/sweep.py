"""Run (or resume) a Ray Tune + Optuna sweep.

Usage: python jobs/sweep.py --config configs/sweeps/X.yaml [--set key=value ...] [--dry-run]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import run_cli  # noqa: E402

if __name__ == "__main__":
    run_cli(['sweep'])
