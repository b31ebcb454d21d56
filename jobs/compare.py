"""Compare finished runs in MLflow: methods x metrics with confidence intervals over seeds.

Usage: python jobs/compare.py --experiment NAME [--tag k=v] [--metrics ...] [--output-dir DIR]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import run_cli  # noqa: E402

if __name__ == "__main__":
    run_cli(['compare'])
