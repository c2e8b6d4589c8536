"""Regenerate the README "Results" table from the committed run summaries.

Usage: python tools/readme_results.py            # rewrites the block between the markers

Each ``docs/results/default-*.json`` is a ``summary.json`` written by ``zoact-edge tune`` (plus the
command that produced it), so the README never carries a number typed by hand.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _mib(n):
    return f"{n / 2**20:,.0f} MiB" if n else "n/a"


def table() -> str:
    rows = [
        "| command | frozen weights | zero-shot acc. | tuned acc. | Δ points | steps | s/step | wall time | peak RSS | code, notes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for path in sorted((ROOT / "docs" / "results").glob("default-*.json")):
        s = json.loads(path.read_text())
        z, t = s["zero_shot"]["accuracy"], s["tuned"]["accuracy"]
        rows.append(
            f"| `{s['command']}` | {s['bits']}-bit | {z:.3f} | {t:.3f} | {100 * (t - z):+.1f} | {s['steps']} "
            f"| {s['seconds_per_step']:.2f} | {s['wall_seconds_this_run'] / 60:.1f} min | {_mib(s.get('peak_rss_bytes'))} "
            f"| {s.get('code', '')} {s.get('note', '')} |"
        )
    return "\n".join(rows)


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    block = f"{BEGIN}\n{table()}\n{END}"
    new = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    readme.write_text(new)


if __name__ == "__main__":
    main()
