"""Probe: which of a run's random streams makes a seed land low? (a diagnostic, not an option)

``zoact-edge tune --seed S`` draws three independent streams from S: the calibration examples the
one-shot bases are computed from, the order of the training batches, and the ZO directions of every
step. At the default, two seeds in seven land 3 to 8 points below the others (docs/results.md,
"Length-grouped batches"). This runs ``tune`` itself, unchanged, in this process, with each stream's seed given on its
own (each defaults to tune's ``--seed``): swap one stream of a low seed for a high seed's and see
whether the run follows it. With all three equal to S the run is ``tune --seed S`` exactly (tested).

    python tools/probe_streams.py --calibration 3 -- --seed 0 --output runs/streams-c3   # tune's options after --
    python tools/probe_streams.py --batches 3 -- --seed 0 --output runs/streams-b3
    python tools/probe_streams.py --directions 3 -- --seed 0 --output runs/streams-d3
    # -> docs/results/probe_streams.json (one record per run: its three seeds, validation curve, final train loss)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_run import add_tune_options, run_tune  # noqa: E402
from record_runs import eval_curve, mean_eval_loss  # noqa: E402
from results_io import locked_update  # noqa: E402  (the lock + atomic write every results file shares)

from zoact_edge.recipes import harness  # noqa: E402  (the shared training loop: it draws the batch stream)
from zoact_edge.recipes import zoact as recipe  # noqa: E402

PATH = Path(__file__).resolve().parents[1] / "docs" / "results" / "probe_streams.json"
STREAMS = ("calibration", "batches", "directions")


def install(seeds: dict) -> None:
    """Reseed the recipe's three streams: each function the recipe passes the run's seed gets ``seeds``' own.

    ``None`` keeps the run's seed for that stream. The recipe reads the calibration and direction names
    from its module at call time, and the loop it runs (``harness.train_loop``) the batch stream's from
    its own, so replacing them there reaches the run and nothing else.
    """
    sampled, build, indices, derive = recipe.sampled_batches, recipe.build_adapters, harness.batch_indices, \
        recipe.derive_seed

    def calibration(task, split, count, batch_size, seed, tag, device):
        return sampled(task, split, count, batch_size, _pick(seeds["calibration"], seed), tag, device)

    def bases(*args, seed, **kwargs):  # the sketch estimator's test matrices, --method subspace's random bases
        return build(*args, seed=_pick(seeds["calibration"], seed), **kwargs)

    def batches(step, batch_size, n, seed, lengths=None):
        return indices(step, batch_size, n, _pick(seeds["batches"], seed), lengths)

    def directions(seed, *parts):  # the recipe's only derive_seed call: the step seed of the ZO directions
        if len(parts) != 1 or not isinstance(parts[0], int):  # another stream would be reseeded with this one
            raise SystemExit(f"probe_streams: recipes/zoact.py derives a seed from {parts!r}, not from a step alone; "
                             "give that stream its own entry in STREAMS before probing")
        return derive(_pick(seeds["directions"], seed), *parts)

    recipe.sampled_batches, recipe.build_adapters, recipe.derive_seed = calibration, bases, directions
    harness.batch_indices = batches


def _pick(own: int | None, run_seed: int) -> int:
    return run_seed if own is None else own


def final_train_loss(metrics: list[dict], last: int = 50) -> float:
    """Mean training loss over the last ``last`` applied steps (one step's loss is one batch's noise)."""
    losses = [r["loss"] for r in metrics if r["loss"] is not None][-last:]
    return sum(losses) / len(losses)


def streams_table(data: dict, plain=None) -> str:
    """One row per probed run: the seed of each stream, the evals and the final train loss (docs/results.md).

    ``plain(bits, seed)`` gives the recorded run of the unchanged command at that seed (a record of
    ``record_runs``): every seed the probes mix is shown first as it ran alone, all three streams its own.
    """
    rows = ["| tune options | bits | calibration seed | batch-order seed | direction seed | zero-shot acc. | "
            "evals: step acc. / loss | final acc. / loss (gain) | val. loss, mean of the evals and final | "
            "train loss, last 50 steps |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    records = data.get("records", [])
    mixed = sorted({(r["bits"], s) for r in records for s in r["seeds"].values()}, key=lambda b_s: (-b_s[0], b_s[1]))
    for bits, seed in mixed if plain else []:
        if (run := plain(bits, seed)) is None:
            continue
        steps = {p["step"] for r in records if r["bits"] == bits for p in r["eval_curve"]}
        curve = [p for p in run.get("eval_curve", []) if p["step"] in steps]
        rows.append(_row(f"{run['command']} (recorded)", bits, dict.fromkeys(STREAMS, seed), run["zero_shot"], curve,
                         run["tuned"], None))
    for r in sorted(records, key=lambda r: (-r["bits"], r["seed"], [r["seeds"][n] == r["seed"] for n in STREAMS])):
        rows.append(_row(" ".join(r["options"]), r["bits"], r["seeds"], r["zero_shot"], r["eval_curve"], r["tuned"],
                         r["final_train_loss"]))
    return "\n".join(rows)


def _row(options: str, bits: int, seeds: dict, zero_shot: dict, curve: list, tuned: dict, train_loss) -> str:
    zero = zero_shot["accuracy"]
    along = mean_eval_loss({"eval_curve": curve, "tuned": tuned}, [p["step"] for p in curve])
    shown = ", ".join(f"{p['step']}: {p['accuracy']:.3f} / {p['loss']:.3f}" for p in curve)
    return (f"| `{options}` | {bits} | {seeds['calibration']} | {seeds['batches']} | {seeds['directions']} | "
            f"{zero:.3f} | {shown} | {tuned['accuracy']:.3f} / {tuned['loss']:.3f} "
            f"({100 * (tuned['accuracy'] - zero):+.1f}) | {along:.3f} | "
            f"{'' if train_loss is None else f'{train_loss:.3f}'} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in STREAMS:
        p.add_argument(f"--{name}", type=int, default=None, help=f"seed of the {name} stream (default: tune's --seed)")
    p.add_argument("--results", default=str(PATH))
    add_tune_options(p)
    args = p.parse_args(argv)
    install({name: getattr(args, name) for name in STREAMS})
    options, out = run_tune(p, args)
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "run_config.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    record = {"options": options,
              "bits": config["bits"], "steps": config["steps"], "seed": config["seed"],
              "seeds": {name: _pick(getattr(args, name), config["seed"]) for name in STREAMS},
              "zero_shot": summary["zero_shot"], "tuned": summary["tuned"],
              "eval_curve": eval_curve(out),
              "final_train_loss": final_train_loss(metrics)}
    locked_update(Path(args.results), lambda d: d["records"].append(record))
    print(json.dumps({k: record[k] for k in ("options", "seeds", "tuned", "final_train_loss")}))


if __name__ == "__main__":
    main()
