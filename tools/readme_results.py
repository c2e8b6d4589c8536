"""Regenerate the README "Results" tables from the committed JSON results.

Usage: python tools/readme_results.py            # rewrites the blocks between the markers

* ``docs/results/default-*.json``: each a ``summary.json`` written by ``zoact-edge tune`` (plus the
  command that produced it);
* ``docs/results/convergence.json``: the method comparison of ``tools/bench_convergence.py``;
* ``docs/results/sweep.json``: its learning-rate sweep (validation split only).

So the README never carries a number typed by hand.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from bench_convergence import LR_STAGE_EPS, METHODS, best_settings, mean_curve  # noqa: E402

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
CBEGIN, CEND = "<!-- convergence:begin -->", "<!-- convergence:end -->"
SBEGIN, SEND = "<!-- sweep:begin -->", "<!-- sweep:end -->"


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


def _ms(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    sd = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * sd:.1f}"


def forwards_to_reach(records: list[dict], target: float) -> int | None:
    """First evaluated budget where the seed-mean validation accuracy reaches ``target``."""
    for forwards, mean, _ in mean_curve(records):
        if mean >= target - 1e-12:
            return forwards
    return None


def convergence_table(data: dict) -> str:
    rows = ["| task | method | seeds | forwards | test acc. (%) | val acc. (%) | forwards to MeZO's final val acc. "
            "| wall time / run | s/step | settings |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    recs = data.get("records", [])
    for task in sorted({r["task"] for r in recs}):
        mezo = [r for r in recs if r["task"] == task and r["method"] == "mezo"]
        target = statistics.mean(r["val_accuracy"] for r in mezo) if mezo else None
        for method in METHODS:
            rs = [r for r in recs if r["task"] == task and r["method"] == method]
            if not rs:
                continue
            if len({json.dumps(r["settings"], sort_keys=True) for r in rs}) > 1:
                raise SystemExit(f"convergence.json holds {task}/{method} runs at more than one setting; "
                                 "keep only the runs at the sweep's choice")
            reach = forwards_to_reach(rs, target) if target is not None else None
            reach_txt = "n/a" if target is None else (f"{reach}" if reach is not None else f"> {rs[0]['forwards']}")
            settings = _label(rs[0]["settings"])
            rows.append(
                f"| {task} | {method} | {len(rs)} | {rs[0]['forwards']} | {_ms([r['test_accuracy'] for r in rs])} "
                f"| {_ms([r['val_accuracy'] for r in rs])} | {reach_txt} "
                f"| {statistics.mean(r['wall_seconds'] for r in rs) / 60:.1f} min "
                f"| {statistics.mean(r['seconds_per_step'] for r in rs):.2f} | {settings} |"
            )
    return "\n".join(rows)


def _label(settings: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in settings.items())


def sweep_table(data: dict) -> str:
    """One row per (task, method): the lr stage's points, then the eps stage's; the chosen one in bold.

    The two stages get a column each because they are read differently: the lr column holds every
    run at ``LR_STAGE_EPS`` (or without an eps), the eps column every eps tried at the lr that won.
    A run belongs to one stage by its own settings, so one off every grid still gets its cell.
    """
    rows = ["| task | method | forwards | validation accuracy per lr (ZO methods: eps 1e-3) "
            "| per eps, at the best lr (chosen in bold) |", "| --- | --- | --- | --- | --- |"]
    recs = data.get("records", [])
    best = best_settings(recs)

    def cell(r: dict, label: str) -> str:
        text = f"{label}: {r['val_accuracy']:.3f}"
        return f"**{text}**" if best.get(f"{r['task']}/{r['method']}") == r["settings"] else text

    for task in sorted({r["task"] for r in recs}):
        for method in METHODS:
            rs = [r for r in recs if r["task"] == task and r["method"] == method]
            if not rs:
                continue
            lr_stage = sorted((r for r in rs if r["settings"].get("eps", LR_STAGE_EPS) == LR_STAGE_EPS),
                              key=lambda r: r["settings"]["lr"])
            eps_lrs = {r["settings"]["lr"] for r in rs if r not in lr_stage}
            eps_stage = sorted((r for r in rs if "eps" in r["settings"] and r["settings"]["lr"] in eps_lrs),
                               key=lambda r: (r["settings"]["lr"], r["settings"]["eps"]))
            lr_cells = "; ".join(cell(r, "lr %g" % r["settings"]["lr"]) for r in lr_stage)
            eps_cells = "; ".join(cell(r, _label(r["settings"])) for r in eps_stage)
            rows.append(f"| {task} | {method} | {rs[0]['forwards']} | {lr_cells} | {eps_cells or '—'} |")
    return "\n".join(rows)


def _replace(text: str, begin: str, end: str, body: str) -> str:
    block = f"{begin}\n{body}\n{end}"
    return re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)


def main() -> None:
    readme = ROOT / "README.md"
    text = _replace(readme.read_text(), BEGIN, END, table())
    conv = ROOT / "docs" / "results" / "convergence.json"
    if conv.exists() and CBEGIN in text:
        text = _replace(text, CBEGIN, CEND, convergence_table(json.loads(conv.read_text())))
    sweep = ROOT / "docs" / "results" / "sweep.json"
    if sweep.exists() and SBEGIN in text:
        text = _replace(text, SBEGIN, SEND, sweep_table(json.loads(sweep.read_text())))
    readme.write_text(text)


if __name__ == "__main__":
    main()
