"""The recipe's classifier stage alone: a noise-conditional classifier (cfg.classifier) on Ray
Train, in its own run `<name>.classifier` (the dataset is built first if needed; up-to-date stages
are skipped).

Usage: python jobs/classifier.py -c configs/experiments/X.yaml [--set key=value ...] [--dry-run]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import run_cli  # noqa: E402

if __name__ == "__main__":
    run_cli(["run", "--stage", "data", "--stage", "classifier"])
