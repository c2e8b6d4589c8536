"""Regenerate the result tables of docs/results.md (and two short blocks of README.md) from the committed JSON.

Usage: python tools/readme_results.py            # rewrites the blocks between the markers

* ``docs/results/default-*.json`` (each the ``summary.json`` and config of a default run) and
  ``docs/results/seeds-default.json`` (the default commands at other seeds, and probes): the default-run
  table, the old-against-new-default comparison, the 4-bit default beside ``--calib-samples 256`` by seed, the
  validation curves of docs/results.md and the Quick start output of README.md, drawn by ``tools/record_runs.py``;
* ``docs/results/convergence.json``: the method comparison of ``tools/bench_convergence.py``, and
  README.md's one line on where ZO-Act stands;
* ``docs/results/sweep.json``: its learning-rate sweep (validation split only);
* ``docs/results/ablations.json``: the runs of ``tools/ablate.py``;
* ``docs/results/budget.json``: the 1,500-forward runs of ``bench_convergence.py run``, per run and pooled
  over seeds (``budget_tables.py``), and README's sentence on them once ZO-Act has three seeds;
* ``docs/results/diagnose_oracle.json``: ``tools/diagnose_oracle.py`` (B trained by backprop, or by
  exact one-query ZO), beside the comparison's runs of the same task and seed;
* ``docs/results/diagnose_curvature.json``: ``tools/diagnose_curvature.py`` (gradient energy and
  curvature per searched space);
* ``docs/results/diagnose_scaling.json``: ``tools/diagnose_scaling.py`` (what each ``--perturb`` column
  scaling leaves of an Adam step's descent);
* ``docs/results/probe_average.json``: ``tools/probe_average.py`` (the iterates averaged);
* ``docs/results/probe_streams.json``: ``tools/probe_streams.py`` (a seed's three random streams swapped one at
  a time), beside the default runs of the seeds it mixes;
* ``docs/results/diagnose_transfer.json``: ``tools/diagnose_transfer.py`` (each precision's tuned adapter
  on the other's frozen weights);
* ``docs/results/diagnose_rounding.json``: ``tools/diagnose_rounding.py`` (the 4-bit rounding undone in
  subspaces of growing width);
* ``docs/results/reproducibility.json``: ``tools/repro_default.py`` (the default command again, at each torch
  thread count), beside the default run.

So neither page carries a result typed by hand. A second run changes nothing.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from ablate import ablation_table  # noqa: E402
from bench_convergence import LR_STAGE_EPS, METHODS, best_settings, mean_curve  # noqa: E402
from budget_tables import budget_means_table, budget_table, longer_budget  # noqa: E402
from diagnose_curvature import curvature_table, per_curvature  # noqa: E402
from diagnose_rounding import rounding_table  # noqa: E402
from diagnose_scaling import scaling_table  # noqa: E402
from diagnose_transfer import transfer_table  # noqa: E402
from probe_average import average_table  # noqa: E402
from probe_step_scale import step_scale_table  # noqa: E402
from probe_streams import streams_table  # noqa: E402
from record_runs import curve_table, default_run, order_table, paired_table, quickstart, runs_table  # noqa: E402
from repro_default import repro_table  # noqa: E402
from results_format import LABELS, REFERENCE, inside, mean_sd, pm, settings_label, stats  # noqa: E402

RESULTS = ROOT / "docs" / "results"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
CBEGIN, CEND = "<!-- convergence:begin -->", "<!-- convergence:end -->"
SBEGIN, SEND = "<!-- sweep:begin -->", "<!-- sweep:end -->"
ABEGIN, AEND = "<!-- ablations:begin -->", "<!-- ablations:end -->"
BBEGIN, BEND = "<!-- budget:begin -->", "<!-- budget:end -->"
YBEGIN, YEND = "<!-- budget-means:begin -->", "<!-- budget-means:end -->"
QBEGIN, QEND = "<!-- quickstart:begin -->", "<!-- quickstart:end -->"
PBEGIN, PEND = "<!-- standing:begin -->", "<!-- standing:end -->"
OBEGIN, OEND = "<!-- oracle:begin -->", "<!-- oracle:end -->"
KBEGIN, KEND = "<!-- curvature:begin -->", "<!-- curvature:end -->"
VBEGIN, VEND = "<!-- average:begin -->", "<!-- average:end -->"
TBEGIN, TEND = "<!-- transfer:begin -->", "<!-- transfer:end -->"
RBEGIN, REND = "<!-- rounding:begin -->", "<!-- rounding:end -->"
LBEGIN, LEND = "<!-- curves:begin -->", "<!-- curves:end -->"
GBEGIN, GEND = "<!-- order:begin -->", "<!-- order:end -->"
XBEGIN, XEND = "<!-- streams:begin -->", "<!-- streams:end -->"
MBEGIN, MEND = "<!-- calib:begin -->", "<!-- calib:end -->"
ZBEGIN, ZEND = "<!-- scaling:begin -->", "<!-- scaling:end -->"
HBEGIN, HEND = "<!-- repro:begin -->", "<!-- repro:end -->"
WBEGIN, WEND = "<!-- step-scale:begin -->", "<!-- step-scale:end -->"
UBEGIN, UEND = "<!-- step-scale-pairs:begin -->", "<!-- step-scale-pairs:end -->"


def step_scale_pairs() -> str:
    """`--step-scale weight` beside the default command, seed by seed, in both precisions and on tweets."""
    tables = [("Rotten Tomatoes, fp32", paired_table(32, step_scale="weight")),
              ("Rotten Tomatoes, 4-bit", paired_table(4, step_scale="weight")),
              ("tweets, fp32", paired_table(32, base={"task": "tweets"}, step_scale="weight"))]
    return "\n\n".join(f"{name}:\n\n{table}" for name, table in tables)


def _methods(recs: list[dict]) -> list[str]:
    """Every method in the records: the benchmark's own order first, then any other (e.g. calibrate)."""
    present = {r["method"] for r in recs}
    return [m for m in METHODS if m in present] + sorted(present - set(METHODS))


def forwards_to_reach(records: list[dict], target: float) -> int | None:
    """First evaluated budget where the seed-mean validation accuracy reaches ``target``."""
    for forwards, mean, _ in mean_curve(records):
        if mean >= target - 1e-12:
            return forwards
    return None


def convergence_table(data: dict) -> str:
    rows = ["| task | method | seeds | forwards | test acc. (%) | val acc. (%) | forwards to MeZO's final val acc. "
            f"| wall time / run | s/step | settings | test vs {REFERENCE} (points) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    recs = data.get("records", [])
    for task in sorted({r["task"] for r in recs}):
        mezo = [r for r in recs if r["task"] == task and r["method"] == "mezo"]
        target = statistics.mean(r["val_accuracy"] for r in mezo) if mezo else None
        ref = stats(r["test_accuracy"] for r in recs if r["task"] == task and r["method"] == REFERENCE)
        for method in _methods(recs):
            rs = [r for r in recs if r["task"] == task and r["method"] == method]
            if not rs:
                continue
            if len({json.dumps(r["settings"], sort_keys=True) for r in rs}) > 1:
                raise SystemExit(f"convergence.json holds {task}/{method} runs at more than one setting; "
                                 "keep only the runs at the sweep's choice")
            reach = forwards_to_reach(rs, target) if target is not None else None
            reach_txt = "n/a" if target is None else (f"{reach}" if reach is not None else f"> {rs[0]['forwards']}")
            settings = settings_label(rs[0]["settings"])
            mine = stats(r["test_accuracy"] for r in rs)
            if method == REFERENCE or mine is None or ref is None:
                delta = "—"
            else:
                delta = f"{100 * (mine[0] - ref[0]):+.1f}" + (" (inside the spread)" if inside(mine, ref) else "")
            rows.append(
                f"| {task} | {LABELS.get(method, method)} | {len(rs)} | {rs[0]['forwards']} "
                f"| {mean_sd([r['test_accuracy'] for r in rs])} "
                f"| {mean_sd([r['val_accuracy'] for r in rs])} | {reach_txt} "
                f"| {statistics.mean(r['wall_seconds'] for r in rs) / 60:.1f} min "
                f"| {statistics.mean(r['seconds_per_step'] for r in rs):.2f} | {settings} | {delta} |"
            )
    return "\n".join(rows)


def _why(recs: list[dict], oracle: dict | None, basis: dict | None, curv: dict | None = None) -> str:
    """The diagnostics' reading, when they are committed: the basis holds the gradient and backprop on
    ZO-Act's own coefficients learns the task, but the basis holds the curvature as well, so one query
    gains about as much in it as in MeZO's or a random subspace's."""
    fo = [r for r in (oracle or {}).get("records", []) if r["mode"] == "fo" and r["basis"] == "activation"
          and r["rank"] == 16]
    if not fo or not basis:
        return ""
    held = basis["captured"]["all"]["16"].values()
    best = max(fo, key=lambda r: r["val_accuracy"])
    same = [r for r in recs if r["method"] == REFERENCE and (r["task"], r["seed"], r["eval_samples"], r["forwards"])
            == (best["task"], best["seed"], best["eval_samples"], best["forwards"])]
    zo = f"; ZO-Act {100 * same[0]['val_accuracy']:.1f}%" if same else ""
    text = (f" Why: the rank-16 activation basis holds {100 * min(held):.0f}–{100 * max(held):.0f}% of each layer's "
            f"gradient, and backprop on ZO-Act's own coefficients (P frozen) reaches {100 * best['val_accuracy']:.1f}% "
            f"on {best['task']} validation (seed {best['seed']}, {best['forwards']} forwards{zo}): the subspace is "
            f"right.")
    ratios = {s: per_curvature(curv, s) for s in ("zoact-r16", "mezo", "subspace-r16")}
    if None in ratios.values():
        return text + (" But one two-point query per step carries too little of the gradient to get much past the "
                       "label prior at this budget.")
    return text + (f" But it holds the curvature too: the gradient energy per unit of curvature a random direction "
                   f"meets is {ratios['zoact-r16']:.3f} in it, {ratios['mezo']:.3f} over MeZO's full weights and "
                   f"{ratios['subspace-r16']:.3f} in a random rank-16 subspace (tuned point, rotten-tomatoes). The "
                   f"directions ZO-Act leaves out are flat and carry little of the gradient, so they cost MeZO little, "
                   f"and one two-point query gains about as much in any of the three spaces.")


def standing(data: dict, oracle: dict | None = None, basis: dict | None = None, curv: dict | None = None,
             long_runs: dict | None = None) -> str:
    """README's one line: ZO-Act's test accuracy against MeZO and backprop LoRA, per task, and a verdict
    that follows from the numbers (a difference inside the mean ± sd spread is not a win); then, from
    ``long_runs`` (budget.json), a sentence per longer budget where ZO-Act has three seeds."""
    recs = data.get("records", [])
    parts, beats, lora_gap = [], [], []
    for task in sorted({r["task"] for r in recs}):
        st = {m: stats(r["test_accuracy"] for r in recs if r["task"] == task and r["method"] == m)
              for m in (REFERENCE, "mezo", "fo-lora", "calibrate")}
        z, mz, fo, cal = st[REFERENCE], st["mezo"], st["fo-lora"], st["calibrate"]
        if z is None or mz is None:
            continue
        text = f"{task}: ZO-Act {pm(z)}%, MeZO {pm(mz)}%"
        if inside(z, mz):
            text += " (inside the spread)"
        beats.append(z[0] > mz[0] and not inside(z, mz))
        if fo is not None:
            text += f", backprop LoRA {pm(fo)}%"
            lora_gap.append(100 * (fo[0] - z[0]))
        if cal is not None:
            text += f", prior-only calibrate {pm(cal)}%"
        parts.append(text)
    if not parts:
        return "No method comparison is committed yet ([docs/results.md](docs/results.md))."
    budget = "/".join(str(f) for f in sorted({r["forwards"] for r in recs if r["method"] == REFERENCE}))
    seeds = sorted({len({(r["seed"]) for r in recs if r["task"] == t and r["method"] == REFERENCE})
                    for t in {r["task"] for r in recs}})
    verdict = "beats MeZO" if all(beats) else ("beats MeZO on some tasks only" if any(beats) else "does not beat MeZO")
    line = (f"**Where it stands, honestly:** at an equal budget of {budget} forward passes, ZO-Act {verdict} "
            f"(test accuracy, mean ± sd over {'/'.join(map(str, seeds))} seeds): " + "; ".join(parts) + ".")
    if lora_gap:
        line += f" Backprop LoRA is ahead by {' and '.join(f'{g:.1f}' for g in lora_gap)} points."
    line += longer_budget(long_runs)
    line += _why(recs, oracle, basis, curv)
    line += " Details: [docs/results.md](docs/results.md)."
    # "76.3 ± 0.9%" stays on one line: the wrap sees the spaces around ± as part of the word
    glued = textwrap.wrap(line.replace(" ± ", "\0±\0"), 110, break_on_hyphens=False)
    return "\n".join(row.replace("\0", " ") for row in glued)


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
        for method in _methods(recs):
            rs = [r for r in recs if r["task"] == task and r["method"] == method]
            if not rs:
                continue
            if any("lr" not in r["settings"] for r in rs):  # no learning rate (calibrate): one cell per run
                cells = "; ".join(cell(r, settings_label(r["settings"]) or "default") for r in rs)
                rows.append(f"| {task} | {LABELS.get(method, method)} | {rs[0]['forwards']} | {cells} | — |")
                continue
            lr_stage = sorted((r for r in rs if r["settings"].get("eps", LR_STAGE_EPS) == LR_STAGE_EPS),
                              key=lambda r: r["settings"]["lr"])
            eps_lrs = {r["settings"]["lr"] for r in rs if r not in lr_stage}
            eps_stage = sorted((r for r in rs if "eps" in r["settings"] and r["settings"]["lr"] in eps_lrs),
                               key=lambda r: (r["settings"]["lr"], r["settings"]["eps"]))
            lr_cells = "; ".join(cell(r, "lr %g" % r["settings"]["lr"]) for r in lr_stage)
            eps_cells = "; ".join(cell(r, settings_label(r["settings"])) for r in eps_stage)
            rows.append(f"| {task} | {LABELS.get(method, method)} | {rs[0]['forwards']} | {lr_cells} "
                        f"| {eps_cells or '—'} |")
    return "\n".join(rows)


def oracle_table(oracle: dict, conv: dict | None) -> str:
    """The oracle runs, then the comparison's runs of the same task, seed and validation examples for
    reference, each with its validation loss against the prior-only baseline's (negative: lower)."""
    recs = oracle.get("records", [])
    rows = ["| task | seed | run | forwards | val acc. | val loss | val loss − prior only's |",
            "|---|---|---|---|---|---|---|"]
    for task, seed in sorted({(r["task"], r["seed"]) for r in recs}):
        zs = next(r for r in recs if (r["task"], r["seed"]) == (task, seed))
        z_loss = zs["zero_shot_val_loss"]
        same = [r for r in (conv or {}).get("records", [])
                if (r["task"], r["seed"], r["eval_samples"]) == (task, seed, zs["eval_samples"])]
        prior = next((r["val_loss"] for r in same if r["method"] == "calibrate"), None)

        def vs_prior(loss: float) -> str:
            return "—" if prior is None else f"{loss - prior:+.3f}"

        rows.append(f"| {task} | {seed} | zero-shot | 0 | {zs['zero_shot_val_accuracy']:.3f} | {z_loss:.3f} | — |")
        for r in [r for r in recs if (r["task"], r["seed"]) == (task, seed)]:
            q = r.get("queries", 1)
            how = {"fo": "backprop on B",
                   "zo-exact": f"exact ZO on B, {q} quer{'y' if q == 1 else 'ies'}/step",
                   "zo-per-example": f"per-example ZO directions (forward-only, {q} per forward pair)"}[r["mode"]]
            how += f", {r['basis']} basis r={r['rank']}, Adam lr {r['lr']:g}"
            rows.append(f"| {task} | {seed} | {how} | {r['forwards']} | {r['val_accuracy']:.3f} | "
                        f"{r['val_loss']:.3f} | {vs_prior(r['val_loss'])} |")
        for r in sorted(same, key=lambda r: METHODS.index(r["method"]) if r["method"] in METHODS else 99):
            rows.append(f"| {task} | {seed} | `tune --method {r['method']}` ({settings_label(r['settings'])}) | "
                        f"{r['forwards']} | {r['val_accuracy']:.3f} | {r['val_loss']:.3f} | "
                        f"{vs_prior(r['val_loss'])} |")
    return "\n".join(rows)


def _replace(text: str, begin: str, end: str, body: str, where: str) -> str:
    if begin not in text or end not in text:
        raise SystemExit(f"{where} lacks the markers {begin} ... {end}")
    block = f"{begin}\n{body}\n{end}"
    return re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def main() -> None:
    conv, sweep, abl = _load("convergence.json"), _load("sweep.json"), _load("ablations.json")
    budget, oracle, curv = _load("budget.json"), _load("diagnose_oracle.json"), _load("diagnose_curvature.json")
    blocks = {
        ROOT / "docs" / "results.md": [(BEGIN, END, runs_table()), (GBEGIN, GEND, order_table()),
                                       (MBEGIN, MEND, paired_table(4, calib_samples=256)),
                                       (UBEGIN, UEND, step_scale_pairs())]
        + ([(CBEGIN, CEND, convergence_table(conv))] if conv else [])
        + ([(SBEGIN, SEND, sweep_table(sweep))] if sweep else [])
        + ([(ABEGIN, AEND, ablation_table(abl))] if abl else [])
        + ([(BBEGIN, BEND, budget_table(budget)), (YBEGIN, YEND, budget_means_table(budget))] if budget else [])
        + ([(OBEGIN, OEND, oracle_table(oracle, conv))] if oracle else [])
        + ([(KBEGIN, KEND, curvature_table(curv))] if curv else [])
        + ([(ZBEGIN, ZEND, scaling_table(scl))] if (scl := _load("diagnose_scaling.json")) else [])
        + ([(VBEGIN, VEND, average_table(avg))] if (avg := _load("probe_average.json")) else [])
        + ([(XBEGIN, XEND, streams_table(mix, default_run))] if (mix := _load("probe_streams.json")) else [])
        + ([(TBEGIN, TEND, transfer_table(moved))] if (moved := _load("diagnose_transfer.json")) else [])
        + ([(RBEGIN, REND, rounding_table(rnd))] if (rnd := _load("diagnose_rounding.json")) else [])
        + ([(LBEGIN, LEND, curve_table(seeds))] if (seeds := _load("seeds-default.json")) else [])
        + ([(HBEGIN, HEND, repro_table(rep, _load("default-fp32.json")))] if (rep := _load("reproducibility.json"))
           else [])
        + ([(WBEGIN, WEND, step_scale_table(units))] if (units := _load("step_scale.json")) else []),
        ROOT / "README.md": [(QBEGIN, QEND, quickstart())]
        + ([(PBEGIN, PEND, standing(conv, oracle, _load("diagnose_basis.json"), curv, budget))] if conv else []),
    }
    for path, parts in blocks.items():
        old = path.read_text()
        text = old
        for begin, end, body in parts:
            text = _replace(text, begin, end, body, path.relative_to(ROOT).as_posix())
        if text != old:
            path.write_text(text)
            print(f"updated {path.relative_to(ROOT).as_posix()}")


if __name__ == "__main__":
    main()
