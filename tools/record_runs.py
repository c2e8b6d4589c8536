"""Record finished ``zoact-edge tune`` runs beside the default ones, for docs/results.md.

The default runs (``docs/results/default-*.json``) are seed 0, the run a user gets. This file holds the
same commands at other seeds, so the tables can say how much of a default run's gain is that seed's luck,
and single probes of other settings of the same command:

    zoact-edge tune --bits 4 --seed 1 --output runs/bits4-s1       # (and --seed 2; fp32 likewise)
    python tools/record_runs.py runs/bits4-s1 runs/bits4-s2 --note "two at a time, one thread each"
    python tools/readme_results.py

Each record is the run's ``summary.json`` plus its seed, its whole config, the options that differ from the
defaults, the command they make, the note and, for a run with ``--eval-every``, its validation curve. A run
already in the file (same command) is replaced. The options and commands are re-derived from the configs
against today's defaults (:func:`current`) at every write and by ``readme_results.py``, so a record made
before a default changed names the option it ran with. The tables these runs make (the default-run table, the
old-against-new-default comparison and the validation curves of docs/results.md, the Quick start output of
README.md) are drawn here too, for ``readme_results.py`` to write.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_format import tune_flags  # noqa: E402
from results_io import locked_update  # noqa: E402  (the lock + atomic write every results file shares)

from zoact_edge.config import TuneConfig  # noqa: E402
from zoact_edge.memory import fmt_bytes  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
PATH = RESULTS / "seeds-default.json"
WHERE = ("output", "overwrite", "model_folder")  # where a run was written, not what it ran


def command(options: dict) -> str:
    """The ``zoact-edge tune`` command line of these options (each differing from its default)."""
    return " ".join(["zoact-edge tune", tune_flags(options)]).strip()


def record(run: Path, note: str) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    config = json.loads((run / "run_config.json").read_text())
    curve = eval_curve(run)
    if curve:  # the final eval closes the curve
        curve.append({"step": summary["steps"], "accuracy": summary["tuned"]["accuracy"],
                      "loss": summary["tuned"]["loss"]})
    return current({**summary, "seed": config["seed"], "note": note, **({"eval_curve": curve} if curve else {}),
                    "config": {k: v for k, v in config.items() if k not in WHERE}})


def current(rec: dict) -> dict:
    """``rec`` with its options and command re-derived from its config against today's defaults (a record
    without a config, none in the committed files, is returned as it is)."""
    if "config" not in rec:
        return rec
    options = options_of(rec["config"], rec)
    return {**rec, "options": options, "command": command(options)}


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
    """The options of a run's config that differ from the defaults (lr and eps: those its --method and --step-scale
    give). Whether the 4-bit rounding was compensated is what the run was told, else what it did (runs from before
    --compensate existed did not), and is listed only where it differs from what the default (auto: on for --bits 4)
    does."""
    step_scale = config.get("step_scale", "absolute")  # runs from before --step-scale existed ran absolute
    defaults = {**replace(TuneConfig(), method=config["method"], step_scale=step_scale).resolved().to_dict(),
                "step_scale": TuneConfig.step_scale}
    given = {k: config[k] for k in ("bits", "backend", "method") if k in config}
    told = config.get("compensate")
    did = told if told is not None else compensated(summary)
    config = {**config, "compensate": None if did == replace(TuneConfig(), **given).compensates else did}
    return {k: v for k, v in config.items() if k in defaults and k not in WHERE and v != defaults[k]}


def curve_table(data: dict) -> str:
    """One row per recorded run with a validation curve: accuracy / loss at each evaluated step (docs/results.md)."""
    recs = [current(r) for r in data.get("records", []) if r.get("eval_curve")]
    steps = sorted({p["step"] for r in recs for p in r["eval_curve"]})
    rows = ["| command | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for r in sorted(recs, key=lambda r: (r["command"].replace(f" --seed {r['seed']}", ""), r["seed"])):
        at = {p["step"]: f"{p['accuracy']:.3f} / {p['loss']:.3f}" for p in r["eval_curve"]}
        rows.append(f"| `{r['command']}` | " + " | ".join(at.get(s, "") for s in steps) + " |")
    return "\n".join(rows)


# --------------------------------------------------------------------------- docs/results.md and README.md


def _mib(n):
    return f"{n / 2**20:,.0f} MiB" if n else "n/a"


# --eval-every only reads the validation split (no draw of the run's changes): a run with it is the run without
SAME_RUN = {"seed", "eval_every"}


def _defaults() -> list[dict]:
    return [current(json.loads(p.read_text())) for p in sorted(RESULTS.glob("default-*.json"))]


def _records() -> list[dict]:
    return [current(r) for r in json.loads(PATH.read_text())["records"]] if PATH.exists() else []


def _runs_of(runs: list[dict], bits: int, **options) -> list[dict]:
    """Every run of one command (the defaults plus ``options``, seed and --eval-every aside) at ``bits``, by seed;
    the default runs come before the records of their seed when ``runs`` lists them first."""
    return sorted((r for r in runs if r["bits"] == bits
                   and {k: v for k, v in r["options"].items() if k not in {"bits", *SAME_RUN}} == options),
                  key=lambda r: r.get("seed", 0))


def _default_runs(bits: int, defaults: list[dict], seeds: list[dict]) -> list[dict]:
    """The default command at ``bits``, once per seed: the default run (seed 0), then the records by seed."""
    return _once_per_seed(_runs_of(defaults + seeds, bits))


def default_run(bits: int, seed: int, runs: list[dict] | None = None, **base) -> dict | None:
    """The default command's recorded run at ``bits`` and ``seed`` (among ``runs``, else the committed ones), one
    with a validation curve where there is one (``--eval-every`` changes no result: :data:`SAME_RUN`); with ``base``
    options (``task="tweets"``), that command's."""
    runs = [r for r in _runs_of(_defaults() + _records() if runs is None else runs, bits, **base)
            if r.get("seed", 0) == seed]
    return next((r for r in runs if r.get("eval_curve")), runs[0] if runs else None)


def _once_per_seed(runs: list[dict]) -> list[dict]:
    return list({s.get("seed", 0): s for s in reversed(runs)}.values())[::-1]  # a seed once: its first run


def _pm(values: list[float], digits: int = 1) -> str:
    """Mean ± population sd (every table here), signed: "+16.0 ± 2.4"."""
    return f"{statistics.mean(values):+.{digits}f} ± {statistics.pstdev(values):.{digits}f}"


def _gains(runs: list[dict]) -> list[float]:
    return [100 * (s["tuned"]["accuracy"] - s["zero_shot"]["accuracy"]) for s in runs]


def _note(s: dict) -> str:
    """A run's note, after the start it tuned from where the 4-bit rounding was compensated (--compensate)."""
    start = s.get("compensation", {}).get("start")
    shown = f"compensated start {start['accuracy']:.3f} / loss {start['loss']:.3f}; " if start else ""
    return shown + s.get("note", "")


def runs_table() -> str:
    rows = [
        "| command | frozen weights | zero-shot acc. | tuned acc. | Δ points | steps | s/step | wall time | peak RSS "
        "| code, notes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    defaults = _defaults()
    for s in defaults:
        z, t = s["zero_shot"]["accuracy"], s["tuned"]["accuracy"]
        rows.append(
            f"| `{s['command']}` | {s['bits']}-bit | {z:.3f} | {t:.3f} | {100 * (t - z):+.1f} | {s['steps']} "
            f"| {s['seconds_per_step']:.2f} | {s['wall_seconds_this_run'] / 60:.1f} min "
            f"| {_mib(s.get('peak_rss_bytes'))} "
            f"| {s.get('code', '')} {_note(s)} |"
        )
    seeds = _records()
    for s in sorted(seeds, key=lambda r: (-r["bits"], r["seed"])):
        z, t = s["zero_shot"]["accuracy"], s["tuned"]["accuracy"]
        rows.append(f"| `{s['command']}` | {s['bits']}-bit | {z:.3f} | {t:.3f} | {100 * (t - z):+.1f} | {s['steps']} "
                    f"| — | — | {_mib(s.get('peak_rss_bytes'))} | {_note(s)} |")
    rows.append("")

    def spread(label: str, runs: list) -> str:
        runs = _once_per_seed(runs)
        gains = _gains(runs)
        return (f"{label} over {_seeds(runs)}: "
                f"{_pm(gains)} points "
                f"({', '.join(f'{g:+.1f}' for g in gains)}).")

    for bits in sorted({s["bits"] for s in seeds}, reverse=True):  # the default commands only
        rows.append(spread(f"{bits}-bit (seed 0 is the default run)", _default_runs(bits, defaults, seeds)))
    probes: dict = {}  # other commands run at several seeds: grouped by their options but the seed
    for s in seeds:
        probes.setdefault(command({k: v for k, v in s["options"].items() if k not in SAME_RUN}), []).append(s)
    for line, runs in probes.items():
        if len({r["seed"] for r in runs}) > 1 and not set(runs[0]["options"]) <= {"bits", *SAME_RUN}:
            rows.append(spread(f"`{line}`", sorted(runs, key=lambda r: r["seed"])))
    return "\n".join(rows).rstrip()


def order_table() -> str:
    """The old default (random batches, 300 steps) against today's (length-grouped, 450 steps), per task and
    precision: each run's validation accuracy, at step 300 of today's runs too where they were evaluated there,
    and the gains over zero-shot (mean ± sd over seeds; docs/results.md)."""
    runs = _defaults() + _records()
    old_default = {"steps": 300, "batch_order": "random"}

    def cell(rs: list[dict], bold: bool = False) -> str:
        rs = _once_per_seed(rs)
        if not rs:
            return ""
        gains = _gains(rs)
        mean = _pm(gains) if len(rs) > 1 else f"{gains[0]:+.1f}"
        return (", ".join(f"{r['tuned']['accuracy']:.3f}" for r in rs) + f" ({_seeds(rs)}): "
                + (f"**{mean}**" if bold else mean))

    rows = ["| | random batches, 300 steps (the old default) | length-grouped, step 300 "
            "| length-grouped, 450 steps (the default) |", "|---|---|---|---|"]
    for task, name in (({}, "Rotten Tomatoes"), ({"task": "tweets"}, "tweets")):  # rotten-tomatoes: the default
        for bits in (4, 32):
            new = _runs_of(runs, bits, **task)
            at_300 = _once_per_seed([{**p, "seed": r.get("seed", 0)} for r in new for p in r.get("eval_curve", [])
                                     if p["step"] == 300])
            mid = ", ".join(f"{p['accuracy']:.3f}" for p in at_300) + f" ({_seeds(at_300)})" if at_300 else ""
            old = _runs_of(runs, bits, **task, **old_default)
            rows.append(f"| {name}, {'fp32' if bits == 32 else f'{bits}-bit'} | {cell(old)} | {mid} "
                        f"| {cell(new, bold=True)} |")
    return "\n".join(rows)


def mean_eval_loss(run: dict, steps=(150, 300)) -> float | None:
    """Validation loss averaged over the run's evals at ``steps`` and its final one (one end point is a noisy
    reading of a run); None where the run was not evaluated at every one of ``steps``."""
    at = {p["step"]: p["loss"] for p in run.get("eval_curve", [])}
    if not all(s in at for s in steps):
        return None
    along = [at[s] for s in steps] + [run["tuned"]["loss"]]
    return sum(along) / len(along)


def _shown(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def paired_table(bits: int, base: dict | None = None, **options) -> str:
    """The default command (with ``base`` options, e.g. ``{"task": "tweets"}``) against the same command with
    ``options``, seed by seed where both ran: final accuracy (gain over zero-shot) and validation loss over the evals
    at steps 150 and 300 and the final one; then the means and the paired differences (docs/results.md)."""
    runs, base = _defaults() + _records(), base or {}
    pairs = {s: (plain, run) for run in _once_per_seed(_runs_of(runs, bits, **base, **options))
             if (plain := default_run(bits, s := run.get("seed", 0), runs, **base)) is not None}
    bits_flag = {"bits": bits} if bits != TuneConfig.bits else {}
    rows = [f"| seed | `{command({**bits_flag, **base})}`: final acc. (gain) | val. loss, evals and final "
            f"| `{command({**bits_flag, **base, **options})}`: final acc. (gain) | val. loss, evals and final "
            "| difference: gain / loss |", "|---|---|---|---|---|---|"]
    read = {s: [(_gains([r])[0], mean_eval_loss(r)) for r in pair] for s, pair in sorted(pairs.items())}
    for s, ((ga, la), (gb, lb)) in read.items():
        a, b = pairs[s]
        dl = None if la is None or lb is None else lb - la
        rows.append(f"| {s} | {a['tuned']['accuracy']:.3f} ({ga:+.1f}) | {_shown(la)} | {b['tuned']['accuracy']:.3f} "
                    f"({gb:+.1f}) | {_shown(lb)} | {gb - ga:+.1f} / {'—' if dl is None else f'{dl:+.3f}'} |")
    if len(read) > 1:
        ga, gb = [g[0][0] for g in read.values()], [g[1][0] for g in read.values()]  # gains: default, other
        la, lb = [g[0][1] for g in read.values()], [g[1][1] for g in read.values()]  # losses: default, other
        dl = None if None in la + lb else [y - x for x, y in zip(la, lb)]
        mean_loss = (lambda ls: "—" if None in ls else f"{statistics.mean(ls):.3f}")
        rows.append(f"| mean ± sd | {_pm(ga)} | {mean_loss(la)} | {_pm(gb)} | {mean_loss(lb)} "
                    f"| {_pm([y - x for x, y in zip(ga, gb)])} / {'—' if dl is None else _pm(dl, 3)} |")
    return "\n".join(rows)


def _seeds(rs: list[dict]) -> str:
    """"seed 0", "seeds 1, 2", "seeds 0–4"."""
    seeds = [r.get("seed", 0) for r in rs]
    if len(seeds) == 1:
        return f"seed {seeds[0]}"
    run = len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1))
    return f"seeds {seeds[0]}–{seeds[-1]}" if run else "seeds " + ", ".join(map(str, seeds))


def quickstart() -> str:
    """What ``zoact-edge tune`` prints at the end (``train.describe``), for the committed fp32 default run,
    then one line per other default run."""
    defaults = _defaults()
    runs = {s["bits"]: s for s in defaults}
    s = runs[32]
    z, t = s["zero_shot"], s["tuned"]
    out = ["```text",
           "output: runs/rotten-tomatoes-<date>-<time>",
           f"validation accuracy: zero-shot {z['accuracy']:.4f} -> tuned {t['accuracy']:.4f} "
           f"({100 * (t['accuracy'] - z['accuracy']):+.1f} points, {t['examples']} examples)",
           f"validation loss: zero-shot {z['loss']:.4f} -> tuned {t['loss']:.4f}",
           f"steps: {s['steps']}  ({s['seconds_per_step']:.2f} s/step)  "
           f"wall time this run: {s['wall_seconds_this_run']:.0f} s",
           f"peak memory: RSS {fmt_bytes(s['peak_rss_bytes'])}",
           "```", ""]
    for bits, o in sorted(runs.items()):
        if bits == 32:
            continue
        out.append(f"`{o['command']}` on the same machine: {o['zero_shot']['accuracy']:.3f} -> "
                   f"{o['tuned']['accuracy']:.3f} in {o['wall_seconds_this_run'] / 60:.1f} min, "
                   f"peak RSS {_mib(o['peak_rss_bytes'])}\n(the fp32 run above: "
                   f"{s['wall_seconds_this_run'] / 60:.1f} min, {_mib(s['peak_rss_bytes'])}).")
    seeds = _records()
    spreads = {bits: _default_runs(bits, defaults, seeds) for bits in sorted(runs, reverse=True)}
    if all(len(r) > 1 for r in spreads.values()):  # what one seed's end point is worth
        out.append("The gain over zero-shot, mean ± sd over seeds: " + ";\n".join(
            f"{'fp32' if bits == 32 else f'`--bits {bits}`'} {_pm(_gains(rs))} points ({_seeds(rs)})"
            for bits, rs in spreads.items()) + " ([docs/results.md](docs/results.md)).")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="finished run folders (summary.json, run_config.json)")
    p.add_argument("--note", default="", help="how the runs were made (their wall times depend on it)")
    p.add_argument("--output", default=str(PATH))
    args = p.parse_args(argv)
    new = [record(Path(r), args.note) for r in args.runs]

    def change(data: dict) -> None:
        commands = {r["command"] for r in new}
        kept = [current(r) for r in data["records"]]
        data["records"] = [r for r in kept if r["command"] not in commands] + new

    locked_update(Path(args.output), change)
    for r in new:
        print(f"{r['command']}: {r['zero_shot']['accuracy']:.3f} -> {r['tuned']['accuracy']:.3f}")


if __name__ == "__main__":
    main()
