"""Record finished ``zoact-edge tune`` runs beside the default ones, for docs/results.md.

The default runs (``docs/results/default-*.json``) are seed 0, the run a user gets. This file holds the
same commands at other seeds, so the tables can say how much of a default run's gain is that seed's luck,
and single probes of other settings of the same command:

    zoact-edge tune --bits 4 --seed 1 --output runs/bits4-s1       # (and --seed 2; fp32 likewise)
    python tools/record_runs.py runs/bits4-s1 runs/bits4-s2 --note "two at a time, one thread each"
    python tools/readme_results.py

Each record is the run's ``summary.json`` plus its seed, the options that differ from the defaults, the
command they make, the note and, for a run with ``--eval-every``, its validation curve. A run already in
the file (same command) is replaced.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablate import locked_update  # noqa: E402  (the lock + atomic write every results file shares)

from zoact_edge.config import TuneConfig  # noqa: E402

PATH = Path(__file__).resolve().parents[1] / "docs" / "results" / "seeds-default.json"
WHERE = ("output", "overwrite", "model_folder")  # where a run was written, not what it ran


def command(options: dict) -> str:
    """The ``zoact-edge tune`` command line of these options (each differing from its default)."""
    flags = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        shown = f"{value:g}" if isinstance(value, float) else value
        flags.append(flag if value is True else f"--no-{flag[2:]}" if value is False else f"{flag} {shown}")
    return " ".join(["zoact-edge tune", *flags])


def record(run: Path, note: str) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    config = json.loads((run / "run_config.json").read_text())
    options = options_of(config, summary)
    curve = eval_curve(run)
    if curve:  # the final eval closes the curve
        curve.append({"step": summary["steps"], "accuracy": summary["tuned"]["accuracy"],
                      "loss": summary["tuned"]["loss"]})
    return {**summary, "seed": config["seed"], "options": options, "command": command(options), "note": note,
            **({"eval_curve": curve} if curve else {})}


def eval_curve(run: Path) -> list[dict]:
    """The run's periodic validation evals (``--eval-every``; the last step has the final eval instead) from its
    metrics.jsonl: step, accuracy, loss."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{"step": r["step"], "accuracy": r["eval"]["accuracy"], "loss": r["eval"]["loss"]}
            for r in rows if r.get("eval")]


def compensated(summary: dict) -> bool:
    """Whether a run started at the 4-bit rounding's compensation, from its summary (runs before the summary's
    ``compensation`` entry recorded only ``compensated_layers``)."""
    return bool(summary.get("compensation") or summary.get("compensated_layers"))


def options_of(config: dict, summary: dict) -> dict:
    """The options of a run's config that differ from the defaults (lr: the method's own default). Whether the
    4-bit rounding was compensated is what the run was told, else what it did (runs from before --compensate
    existed did not), and is listed only where it differs from what the default (auto: on for --bits 4) does."""
    defaults = replace(TuneConfig(), method=config["method"]).resolved().to_dict()
    given = {k: config[k] for k in ("bits", "backend", "method") if k in config}
    told = config.get("compensate")
    did = told if told is not None else compensated(summary)
    config = {**config, "compensate": None if did == replace(TuneConfig(), **given).compensates else did}
    return {k: v for k, v in config.items() if k in defaults and k not in WHERE and v != defaults[k]}


def curve_table(data: dict) -> str:
    """One row per recorded run with a validation curve: accuracy / loss at each evaluated step (docs/results.md)."""
    recs = [r for r in data.get("records", []) if r.get("eval_curve")]
    steps = sorted({p["step"] for r in recs for p in r["eval_curve"]})
    rows = ["| command | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for r in sorted(recs, key=lambda r: (r["command"].replace(f" --seed {r['seed']}", ""), r["seed"])):
        at = {p["step"]: f"{p['accuracy']:.3f} / {p['loss']:.3f}" for p in r["eval_curve"]}
        rows.append(f"| `{r['command']}` | " + " | ".join(at.get(s, "") for s in steps) + " |")
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="finished run folders (summary.json, run_config.json)")
    p.add_argument("--note", default="", help="how the runs were made (their wall times depend on it)")
    p.add_argument("--output", default=str(PATH))
    args = p.parse_args(argv)
    new = [record(Path(r), args.note) for r in args.runs]

    def change(data: dict) -> None:
        commands = {r["command"] for r in new}
        data["records"] = [r for r in data["records"] if r["command"] not in commands] + new

    locked_update(Path(args.output), change)
    for r in new:
        print(f"{r['command']}: {r['zero_shot']['accuracy']:.3f} -> {r['tuned']['accuracy']:.3f}")


if __name__ == "__main__":
    main()
