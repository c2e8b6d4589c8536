"""Record finished ``zoact-edge tune`` runs of the default command at other seeds, for docs/results.md.

The default runs (``docs/results/default-*.json``) are seed 0, the run a user gets. This file holds the
same commands at other seeds, so the tables can say how much of a default run's gain is that seed's luck:

    zoact-edge tune --bits 4 --seed 1 --output runs/bits4-s1       # (and --seed 2; fp32 likewise)
    python tools/record_runs.py runs/bits4-s1 runs/bits4-s2 --note "two at a time, one thread each"
    python tools/readme_results.py

Each record is the run's ``summary.json`` plus its seed, its command and the note. A run already in the
file (same seed and bits) is replaced.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablate import locked_update  # noqa: E402  (the lock + atomic write every results file shares)

PATH = Path(__file__).resolve().parents[1] / "docs" / "results" / "seeds-default.json"


def record(run: Path, note: str) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    config = json.loads((run / "run_config.json").read_text())
    command = "zoact-edge tune" + (f" --bits {config['bits']}" if config["bits"] != 32 else "")
    return {**summary, "seed": config["seed"], "command": f"{command} --seed {config['seed']}", "note": note}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="finished run folders (summary.json, run_config.json)")
    p.add_argument("--note", default="", help="how the runs were made (their wall times depend on it)")
    p.add_argument("--output", default=str(PATH))
    args = p.parse_args(argv)
    new = [record(Path(r), args.note) for r in args.runs]

    def change(data: dict) -> None:
        keys = {(r["seed"], r["bits"]) for r in new}
        data["records"] = [r for r in data["records"] if (r["seed"], r["bits"]) not in keys] + new

    locked_update(Path(args.output), change)
    for r in new:
        print(f"{r['command']}: {r['zero_shot']['accuracy']:.3f} -> {r['tuned']['accuracy']:.3f}")


if __name__ == "__main__":
    main()
