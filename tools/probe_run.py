"""What the in-process probes of ``zoact-edge tune`` share (``probe_average``, ``probe_streams``).

A probe takes tune's own options after ``--``, watches or reseeds something inside the run, and runs
``tune`` itself, unchanged, in its own process; then it reads the run's folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from zoact_edge.cli import main as zoact_main


def add_tune_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("tune", nargs=argparse.REMAINDER, help="-- then zoact-edge tune's options (--output required)")


def run_tune(p: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[list[str], Path]:
    """Run ``tune`` with the options after ``--``; returns them without ``--output``, and the run's folder."""
    tune_args = args.tune[1:] if args.tune[:1] == ["--"] else args.tune
    if "--output" not in tune_args:
        p.error("pass tune's --output after --")
    if zoact_main(["tune", *tune_args]) != 0:
        sys.exit(1)
    at = tune_args.index("--output")
    return tune_args[:at] + tune_args[at + 2:], Path(tune_args[at + 1])
