"""Ablations of ZO-Act's knobs at the comparison's forward budget, on the validation split only.

Each run is one ``zoact-edge tune`` process started by ``tools/bench_convergence.py``'s own
``run_one`` (same model, batch stream, evaluation points), never with ``--test-eval``: ablations
choose settings, so they must not read the test split. A run is named by its settings; records
are appended to ``docs/results/ablations.json`` as each run finishes, and a run already in the
file (same name, task, seed, budget, batch and evaluation size) is skipped, so an interrupted
queue continues where it stopped.

    python tools/ablate.py --runs r1-lr1e-3,r1-lr3e-3 --task rotten-tomatoes
    python tools/ablate.py --list                       # the named runs and their settings
    python tools/ablate.py --table                      # the results as a markdown table

Several queues may run side by side (one thread each is faster in total on a 2-core CPU than
one queue on two threads): records are merged into the file under a lock, never overwritten.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convergence import RESULTS, run_one  # noqa: E402  (the harness' run, not a copy)
from results_format import curve_cell, settings_label  # noqa: E402
from results_io import locked_update, read_results  # noqa: E402

PATH = RESULTS / "ablations.json"

# name -> (method, tune options). Every run keeps eps 1e-3 unless it says otherwise; lr is always
# given, because each perturbation scale needs its own.
RUNS: dict[str, tuple[str, dict]] = {
    # the prior-only baseline: zero-shot plus a per-label bias fitted on 256 labelled training examples
    # (records named "calibrate-uniform" are the label-free variant, from before the fit existed)
    "calibrate-fit": ("calibrate", {"calib-samples": 256}),
    # rank, with today's plain N(0, I) perturbation and Adam
    "r16-lr1e-3": ("zoact", {"rank": 16, "lr": 1e-3, "eps": 1e-3}),
    "r4-lr1e-3": ("zoact", {"rank": 4, "lr": 1e-3, "eps": 1e-3}),
    "r2-lr1e-3": ("zoact", {"rank": 2, "lr": 1e-3, "eps": 1e-3}),
    "r1-lr1e-3": ("zoact", {"rank": 1, "lr": 1e-3, "eps": 1e-3}),
    "r1-lr3e-3": ("zoact", {"rank": 1, "lr": 3e-3, "eps": 1e-3}),
    "r1-lr1e-2": ("zoact", {"rank": 1, "lr": 1e-2, "eps": 1e-3}),
    "r4-lr3e-3": ("zoact", {"rank": 4, "lr": 3e-3, "eps": 1e-3}),
    # random subspace at rank 1 (is a rank-1 win the basis, or just fewer coordinates?)
    "sub-r1-lr3e-3": ("subspace", {"rank": 1, "lr": 3e-3, "eps": 1e-3}),
    "sub-r1-lr1e-2": ("subspace", {"rank": 1, "lr": 1e-2, "eps": 1e-3}),
    "sub-r1-lr1e-3": ("subspace", {"rank": 1, "lr": 1e-3, "eps": 1e-3}),
    # perturbation scaling (--perturb); each with its own lr
    # (Adam normalises each coordinate, so under Adam a scaling D acts as D, under SGD as D^2: see perturb.py)
    "r16-whiten-lr1e-4": ("zoact", {"rank": 16, "perturb": "whiten", "lr": 1e-4, "eps": 1e-3}),
    "r16-whiten-lr1e-3": ("zoact", {"rank": 16, "perturb": "whiten", "lr": 1e-3, "eps": 1e-3}),
    "r16-whiten-sgd-lr1e-5": ("zoact", {"rank": 16, "perturb": "whiten", "optimizer": "sgd", "lr": 1e-5, "eps": 1e-3}),
    "r16-whiten-sgd-lr3e-5": ("zoact", {"rank": 16, "perturb": "whiten", "optimizer": "sgd", "lr": 3e-5, "eps": 1e-3}),
    "r16-whiten-sgd-lr3e-6": ("zoact", {"rank": 16, "perturb": "whiten", "optimizer": "sgd", "lr": 3e-6, "eps": 1e-3}),
    "r16-whiten-sgd-lr1e-6": ("zoact", {"rank": 16, "perturb": "whiten", "optimizer": "sgd", "lr": 1e-6, "eps": 1e-3}),
    "r4-whiten-lr1e-3": ("zoact", {"rank": 4, "perturb": "whiten", "lr": 1e-3, "eps": 1e-3}),
    "r16-rank-lr1e-3": ("zoact", {"rank": 16, "perturb": "rank", "lr": 1e-3, "eps": 1e-3}),
    "r16-layer-norm-lr1e-3": ("zoact", {"rank": 16, "perturb": "layer-norm", "lr": 1e-3, "eps": 1e-3}),
    # queries at equal forwards (150 steps of 2 queries / 75 steps of 4)
    "r1-q4-lr3e-3": ("zoact", {"rank": 1, "queries": 4, "lr": 3e-3, "eps": 1e-3}),
    # targets
    "r1-attn-lr3e-3": ("zoact", {"rank": 1, "targets": "q_proj,k_proj,v_proj,o_proj", "lr": 3e-3, "eps": 1e-3}),
    "r1-mlp-lr3e-3": ("zoact", {"rank": 1, "targets": "gate_proj,up_proj,down_proj", "lr": 3e-3, "eps": 1e-3}),
    # the upper half of the blocks (15-29 of 30) with each example's input to block 15 cached: a
    # forward then costs about half, and half the coefficients are perturbed
    "r16-upper-cache-lr1e-3": ("zoact", {"rank": 16, "layers": "15-29", "cache-prefix": True, "lr": 1e-3, "eps": 1e-3}),
    # optimizer (median |projected gradient| at rank 1 is 7-9, so SGD at 3e-4 moves a coordinate
    # about as far per step as Adam at 3e-3; momentum 0.9 multiplies the step by ~10)
    "r1-sgd-lr3e-4": ("zoact", {"rank": 1, "optimizer": "sgd", "lr": 3e-4, "eps": 1e-3}),
    "r1-sgdm-lr3e-5": ("zoact", {"rank": 1, "optimizer": "sgd", "momentum": 0.9, "lr": 3e-5, "eps": 1e-3}),
    # learning-rate schedule: Adam under ZO takes steps of about lr in every coordinate whatever the
    # signal (its second moment tracks the squared projected gradient, which shrinks with the
    # gradient), so a constant lr ends on a random walk at the lr's scale; cosine decay to zero ends
    # it on an average instead
    "r16-cosine-lr1e-3": ("zoact", {"rank": 16, "schedule": "cosine", "lr": 1e-3, "eps": 1e-3}),
    "r16-cosine-lr2e-3": ("zoact", {"rank": 16, "schedule": "cosine", "lr": 2e-3, "eps": 1e-3}),
    # calibration tokens
    "r1-scored-lr3e-3": ("zoact", {"rank": 1, "calib-tokens": "scored", "lr": 3e-3, "eps": 1e-3}),
    "r16-scored-lr1e-3": ("zoact", {"rank": 16, "calib-tokens": "scored", "lr": 1e-3, "eps": 1e-3}),
}


def forwards_per_step(method: str, settings: dict) -> int:
    return 1 if method == "calibrate" else 2 * int(settings.get("queries", 1))


def _same(r: dict, name: str, task: str, seed: int, args) -> bool:
    return (r["name"], r["task"], r["seed"], r["budget"], r["batch_size"], r["eval_samples"],
            r.get("batch_order", "random")) == (
        name, task, seed, args.budget, args.batch_size, args.eval_samples, args.batch_order)


def ablate(args) -> None:
    path = Path(args.output)
    for name in args.runs.split(","):
        method, settings = RUNS[name]
        done = read_results(path)["records"]
        if any(_same(r, name, args.task, args.seed, args) for r in done):
            continue
        # run_one counts a step as FORWARDS_PER_STEP[method] forwards; with several queries the
        # budget is spent in fewer steps, so it is handed the step-equivalent budget.
        # run_one takes a step as 2 forwards (one query); with q queries a step is 2q, so it gets
        # the budget that yields budget / 2q steps. The record's forwards and curve come from the
        # run's own counts, which are right for any q (calibrate: the prior's batches).
        fps = forwards_per_step(method, settings)
        rec = run_one(method, args.task, args.seed, args.budget * 2 // fps, args.points, settings, args, test=False)
        rec.update(name=name, budget=args.budget)
        locked_update(path, lambda d: d["records"].append(rec))
        curve = " ".join(f"{a:.3f}" for _, a in rec["curve"])
        print(f"{args.task} {name}: val {rec['val_accuracy']:.3f} loss {rec['val_loss']:.3f} [{curve}] "
              f"({rec['wall_seconds']:.0f} s)", flush=True)


def ablation_table(data: dict) -> str:
    """One row per run, in the order they ran (docs/results.md and ``--table``)."""
    rows = ["| task | run | seed | method, settings | val acc. at forwards | final val loss |",
            "|---|---|---|---|---|---|"]
    for r in data.get("records", []):
        rows.append(f"| {r['task']} | {r.get('name', '')} | {r['seed']} | {r['method']}: "
                    f"{settings_label(r['settings'])} | {curve_cell(r['curve'])} | {r['val_loss']:.3f} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="", help="comma-separated run names (see --list)")
    p.add_argument("--task", default="rotten-tomatoes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=int, default=300, help="training forwards per run")
    p.add_argument("--points", type=int, default=3, help="validation evaluations per run (plus zero-shot and final)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batch-order", choices=["random", "length"], default="random",
                   help="every run's batch order (random: the order of every record before it was an option)")
    p.add_argument("--eval-samples", type=int, default=200)
    p.add_argument("--bits", type=int, default=0)
    p.add_argument("--model", default=None)
    p.add_argument("--extra", default="", help="more tune options for every run")
    p.add_argument("--output", default=str(PATH))
    p.add_argument("--list", action="store_true")
    p.add_argument("--table", action="store_true")
    args = p.parse_args(argv)
    if args.list:
        for name, (method, settings) in RUNS.items():
            print(f"{name}: {method} {settings}")
    elif args.table:
        print(ablation_table(json.loads(Path(args.output).read_text())))
    else:
        unknown = [n for n in args.runs.split(",") if n not in RUNS]
        if unknown:
            raise SystemExit(f"unknown run(s): {', '.join(unknown)} (see --list)")
        ablate(args)


if __name__ == "__main__":
    main()
