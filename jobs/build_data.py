"""Build the configured dataset as Parquet shards.

Usage: python jobs/build_data.py --config configs/experiments/X.yaml [--set key=value ...]
       [--dry-run]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import run_cli  # noqa: E402

if __name__ == "__main__":
    run_cli(['data', 'build'])
