"""Metric features of a dataset (Ray Data actor pool) as Parquet.

Usage: python jobs/extract.py --config configs/experiments/X.yaml [--dataset DIR] [--out DIR]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import run_cli  # noqa: E402

if __name__ == "__main__":
    run_cli(["extract"])
