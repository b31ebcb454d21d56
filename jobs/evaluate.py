"""Evaluate a sample set (or a checkpoint's samples) against a reference set.

Usage: python jobs/evaluate.py --config configs/experiments/X.yaml --samples PATH [--set ...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import run_cli  # noqa: E402

if __name__ == "__main__":
    run_cli(["evaluate"])
