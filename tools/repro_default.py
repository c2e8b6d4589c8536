"""Does ``zoact-edge tune`` reproduce, and what moves its last digits? The same command at several thread counts.

A ZO step's size is ``(L+ - L-) / 2 eps``: a difference of two nearly equal losses, so the last digits of the
forward feed every step, and they depend on the kernels torch and MKL pick for the CPU (AVX2, AVX-512), on how
many threads split a matrix product and on the package versions. This runs the same command (the default run
unless told otherwise) in fresh processes with torch limited to each ``--threads`` count, and records what each
run read, with the commit and the environment from its ``summary.json``. Read the table in docs/results.md
("Reproducibility"): identical losses to the last digit mean a bit-identical run.

    python tools/repro_default.py --threads 2 --repeats 2      # the numbers depend on the thread count,
    python tools/repro_default.py --threads 1                  # not on the load: two may share the machine
    python tools/repro_default.py -- --bits 4                  # another command: tune's options after --
    python tools/readme_results.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import locked_update  # noqa: E402  (the lock + atomic write every results file shares)

ROOT = Path(__file__).resolve().parents[1]
PATH = ROOT / "docs" / "results" / "reproducibility.json"
DEFAULT_RUN = ROOT / "docs" / "results" / "default-fp32.json"


def commit() -> str:
    """The checkout's commit, ``+dirty`` when the package's files differ from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode:
        return "unknown"
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "zoact_edge"], cwd=ROOT).returncode
    return head.stdout.strip() + ("+dirty" if dirty else "")


def run_once(tune_args: list[str], threads: int) -> dict:
    """One ``zoact-edge tune`` in a fresh process with ``threads`` torch threads: its metrics and environment."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory(prefix="zoact-repro-") as tmp:
        out = Path(tmp) / "run"
        proc = subprocess.run([sys.executable, "-m", "zoact_edge", "tune", *tune_args, "--output", str(out)],
                              env=env, stdout=subprocess.PIPE, text=True)
        if proc.returncode:
            raise SystemExit(f"tune failed (exit {proc.returncode}) with {threads} thread(s)")
        summary = json.loads((out / "summary.json").read_text())
    if summary["environment"]["torch_threads"] != threads:
        raise SystemExit(f"the run used {summary['environment']['torch_threads']} torch threads, not {threads}")
    return {"threads": threads, "zero_shot": summary["zero_shot"], "tuned": summary["tuned"],
            "seconds_per_step": summary["seconds_per_step"], "environment": summary["environment"]}


def repro_table(data: dict, default_run: dict | None = None) -> str:
    """One row per run (the committed default run first, when given), its losses to every stored digit."""
    rows = ["| commit | command | CPU kernels | torch threads | torch / transformers | zero-shot loss | tuned acc. "
            "| tuned loss |", "|---|---|---|---|---|---|---|---|"]
    if default_run is not None:
        rows.append(f"| README's default run (machine and packages not recorded) | `{default_run['command']}` | — | 2 "
                    f"| — | {default_run['zero_shot']['loss']!r} | {default_run['tuned']['accuracy']:.3f} "
                    f"| {default_run['tuned']['loss']!r} |")
    for r in data.get("records", []):
        env, pkgs = r["environment"], r["environment"]["packages"]
        rows.append(f"| {r['commit']} | `{r['command']}` | {env['cpu_capability']} | {r['threads']} "
                    f"| {pkgs['torch']} / {pkgs['transformers']} | {r['zero_shot']['loss']!r} "
                    f"| {r['tuned']['accuracy']:.3f} | {r['tuned']['loss']!r} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[2], help="torch thread counts, one run each (default 2)")
    p.add_argument("--repeats", type=int, default=1, help="runs per thread count (default 1)")
    p.add_argument("tune", nargs=argparse.REMAINDER, help="-- then zoact-edge tune's options (default: none)")
    args = p.parse_args(argv)
    tune_args = args.tune[1:] if args.tune[:1] == ["--"] else args.tune
    if "--output" in tune_args:
        p.error("leave --output out: each run writes to a temporary folder")
    command, code = " ".join(["zoact-edge tune", *tune_args]), commit()
    for threads in args.threads:
        for i in range(args.repeats):
            print(f"{command} with {threads} thread(s), run {i + 1}", flush=True)
            rec = {"command": command, "commit": code, **run_once(tune_args, threads)}
            locked_update(PATH, lambda data: data["records"].append(rec))
            print(f"  tuned accuracy {rec['tuned']['accuracy']:.3f}, loss {rec['tuned']['loss']!r}", flush=True)
    print(repro_table(json.loads(PATH.read_text()), json.loads(DEFAULT_RUN.read_text())))


if __name__ == "__main__":
    main()
