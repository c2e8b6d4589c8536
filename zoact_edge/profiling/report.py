"""The report of ``zoact-edge profile``: report.json, report.md (a table) and report.png (stacked bars)."""

from __future__ import annotations

import json
from pathlib import Path

from ..memory import fmt_bytes
from ..paths import atomic_save_file, atomic_write

BREAKDOWN = ("runtime", "weights", "adapters", "optimizer_state", "gradients", "activations_transients")


def _mib(n) -> str:
    return "" if n is None else f"{n / 2**20:,.0f}"


def report_markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"# Memory profile: {s['model'] or 'default model'}, {s['bits']}-bit, batch {s['batch']} x seq "
             f"{s['seq']}, "
             f"rank {s['rank']}", "",
             f"Device: {s['device']}. Task loss: {s['task']}. Training methods run {s['steps']} step(s). "
             f"{report['measurement']}. Allocator: {report['environment']['allocator']}.", ""]
    if report.get("budget_bytes"):
        lines += [f"Budget: {fmt_bytes(report['budget_bytes'])}"
                  + (f" (profile {report['profile']})" if report.get("profile") else ""), ""]
    head = ["method", "peak MiB", "ratio to inference", "runtime", "weights", "adapters", "optimizer", "gradients",
            "activations + transients"] + (["fits"] if report.get("budget_bytes") else [])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in report["methods"].items():
        if e.get("status") != "ok":
            row = [name, e["status"], "", "", "", "", "", "", e.get("reason") or e.get("error", "")]
            row += [""] if report.get("budget_bytes") else []
        else:
            b = e["breakdown"]
            ratio = "" if e.get("ratio_to_inference") is None else f"{e['ratio_to_inference']:.3f}"
            row = [name, _mib(e["peak_bytes"]), ratio] + [_mib(b[k]) for k in BREAKDOWN]
            row += (["yes" if e["fits"] else "no"] if report.get("budget_bytes") else [])
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Breakdown columns are MiB. runtime = resident RSS after loading minus the weights (interpreter, "
              "libraries, allocator); activations + transients = peak minus resident minus the adapter, optimizer "
              "and gradient tensors.", ""]
    lines += [line for name, e in report["methods"].items() if (line := _phases_line(name, e, s["device"]))]
    return "\n".join(lines)


def _phases_line(name: str, entry: dict, device_type: str) -> str | None:
    """'zoact: basis passes peak ... MiB, steps peak ... MiB': which part of a method sets its peak."""
    phases = entry.get("phase_peaks")
    if entry.get("status") != "ok" or not phases:
        return None
    key = "max_reserved_bytes" if device_type == "cuda" else "rss_peak_bytes"
    words = {"basis": "basis passes", "steps": "adapters, optimizer and steps"}
    parts = [f"{words.get(p, p)} {_mib(seg[key])} MiB (+{_mib(seg[key] - entry['resident_bytes'])} over resident)"
             for p, seg in phases.items()]
    return f"Peak by part, {name}: " + "; ".join(parts) + ".\n"


def report_png(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = {n: e for n, e in report["methods"].items() if e.get("status") == "ok"}
    fig, ax = plt.subplots(figsize=(1.6 * max(len(ok), 2) + 3, 4.5))
    names = list(ok)
    bottoms = [0.0] * len(names)
    for key in BREAKDOWN:
        vals = [ok[n]["breakdown"][key] / 2**20 for n in names]
        ax.bar(names, vals, bottom=bottoms, label=key.replace("_", " ").replace("activations ", "activations + "))
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    if "inference" in ok:
        ax.axhline(ok["inference"]["peak_bytes"] / 2**20, color="black", linestyle="--", linewidth=1,
                   label="inference peak")
    s = report["settings"]
    title = f"peak memory, {s['bits']}-bit, batch {s['batch']} x seq {s['seq']}, rank {s['rank']} ({s['device']})"
    budget = report.get("budget_bytes")
    if budget and budget <= 1.5 * max(bottoms, default=0) * 2**20:
        ax.axhline(budget / 2**20, color="red", linewidth=1, label="budget")
    elif budget:  # far above every bar: a line would flatten the chart, so say it in the title
        title += f"; budget {budget / 2**30:.1f} GiB"
    ax.set_ylabel("MiB")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    atomic_save_file(lambda p: fig.savefig(p, format="png", dpi=100), path)
    plt.close(fig)


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "report.json") as f:
        json.dump(report, f, indent=2)
    with atomic_write(out / "report.md") as f:
        f.write(report_markdown(report))
    report_png(report, out / "report.png")


def describe(report: dict) -> str:
    rows = []
    for name, e in report["methods"].items():
        if e.get("status") != "ok":
            rows.append(f"{name:10s} {e['status']}: {e.get('reason') or e.get('error', '')}")
            continue
        ratio = e.get("ratio_to_inference")
        fits = "" if e.get("fits") is None else ("  fits" if e["fits"] else "  DOES NOT FIT")
        rows.append(f"{name:10s} peak {fmt_bytes(e['peak_bytes']):>10s}"
                    + ("" if ratio is None else f"  {ratio:.3f}x inference") + fits)
    return "\n".join(rows)


