"""Shared argument handling for the thin job entry points
(`ray job submit ... python jobs/X.py`)."""

from __future__ import annotations

import sys


def run_cli(argv_prefix: list[str]) -> None:
    """Forward ``--config/--set/--dry-run`` style arguments to the `debiaslab` CLI subcommand."""
    from debiaslab.cli import main

    sys.exit(main(argv_prefix + sys.argv[1:]))
