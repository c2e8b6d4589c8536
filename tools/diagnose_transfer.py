"""Diagnostic: is the 4-bit gap in what the 4-bit model can reach, or in how the search gets there?

The default command gains +15.9 ± 0.7 points in fp32 and +12.5 ± 0.8 with ``--bits 4`` (compensated;
docs/results.md). This script carries each tuned adapter to the other precision's frozen weights and
evaluates it there, on the runs' own 500 validation sentences. An adapter is (P, B), with
y = W x + B Pᵀ x. Moved from the base it was tuned on (W_from) to another (W_to), it is evaluated

- ``as tuned``: B unchanged, as a LoRA adapter is loaded onto another base;
- ``re-anchored``: B + (W_from − W_to) P, which keeps every layer's output on span(P) what it was on
  the base it was tuned on (on the 4-bit weights this adds the rounding's compensation to the fp32 run's B;
  on the fp32 weights it takes it out of the 4-bit run's B).

If the fp32 run's adapter, re-anchored on the 4-bit weights, keeps about its fp32 accuracy, then a point that
good lies in a 4-bit ZO-Act search space (the fp32 run's basis) and the 4-bit gap is the search's, not the
model's; if it falls to the 4-bit run's accuracy, the rounding outside span(P), which no B can touch, caps it.
In between, both cost something; seeds 0-2 of the default runs read in between (docs/results.md).

    zoact-edge tune --output runs/fp32 && zoact-edge tune --bits 4 --output runs/bits4   # seed 0 defaults
    python tools/diagnose_transfer.py runs/fp32 runs/bits4     # -> docs/results/diagnose_transfer.json

Both runs must be of the same model, task and seed; the records of other seeds are kept. About five CPU
minutes on the default model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from zoact_edge.adapters import targets as tgt
from zoact_edge.adapters.build import inject_adapters
from zoact_edge.adapters.files import load_checkpoint
from zoact_edge.config import TuneConfig
from zoact_edge.data.evaluate import evaluate
from zoact_edge.models import load_model
from zoact_edge.recipes.harness import load_inputs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record_runs import compensated  # noqa: E402
from results_io import locked_update  # noqa: E402  (the lock + atomic write every results file shares)

OUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "diagnose_transfer.json"


def run_config(run: Path) -> TuneConfig:
    saved = json.loads((run / "run_config.json").read_text())
    names = {f for f in TuneConfig.__dataclass_fields__}
    return replace(TuneConfig(), **{k: v for k, v in saved.items() if k in names})


@torch.no_grad()
def evaluate_moved(model, weights: dict, run: Path, from_bits: int, to_bits: int, inputs, cfg) -> dict:
    """The run's adapter on ``model`` (frozen weights of ``to_bits``), as tuned and re-anchored, then removed."""
    _, P, B, _ = load_checkpoint(run)
    found = [tgt.Target(n, -1, p.shape[0], B[n].shape[0]) for n, p in P.items()]
    layers = inject_adapters(model, found, P, B, torch.float32, torch.device("cpu"))
    out = {}
    try:
        for form in ("as tuned", "re-anchored"):
            if form == "re-anchored" and from_bits != to_bits:
                for name, layer in layers.items():  # + (W_from - W_to) P, in float64
                    delta = (weights[from_bits][name].double() - weights[to_bits][name].double()) @ P[name].double()
                    layer.B.add_(delta.to(layer.B.dtype))
            elif form == "re-anchored":
                continue  # on its own base the two forms are one
            out[form] = evaluate(model, inputs.task, inputs.eval_set, cfg.eval_batch_size, torch.device("cpu"),
                                 desc=f"{run.name} on {to_bits}-bit, {form}")
    finally:
        tgt.unwrap_all(model)
    return out


def transfer_table(data: dict) -> str:
    """One row per (adapter, frozen weights, form): validation accuracy and loss (docs/results.md)."""
    rows = ["| adapter tuned on | evaluated on | form | accuracy by seed | mean ± sd | loss, mean |",
            "|---|---|---|---|---|---|"]
    cells: dict = {}
    for r in sorted(data.get("records", []), key=lambda r: r["seed"]):
        tuned = f"{r['tuned_on']}-bit" + (" (compensated)" if r["compensated"] else "")
        cells.setdefault((tuned, r["evaluated_on"], r["form"]), []).append(r)
    for (tuned, on, form), recs in cells.items():
        acc = [r["accuracy"] for r in recs]
        rows.append(f"| {tuned} | {on}-bit | {form} | {', '.join(f'{a:.3f}' for a in acc)} "
                    f"(seeds {', '.join(str(r['seed']) for r in recs)}) | {statistics.mean(acc):.3f} ± "
                    f"{statistics.pstdev(acc):.3f} | {statistics.mean(r['loss'] for r in recs):.3f} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("fp32_run", help="a finished fp32 zoact run (its checkpoint)")
    p.add_argument("bits4_run", help="a finished --bits 4 zoact run of the same model, task and seed")
    p.add_argument("--output", default=str(OUT))
    args = p.parse_args(argv)
    runs = {32: Path(args.fp32_run), 4: Path(args.bits4_run)}
    cfgs = {bits: run_config(run) for bits, run in runs.items()}
    for bits, cfg in cfgs.items():
        if cfg.bits != bits or cfg.method != "zoact":
            raise SystemExit(f"{runs[bits]}: expected a --bits {bits} zoact run, found --bits {cfg.bits} {cfg.method}")
    if {(c.model, c.task, c.seed) for c in cfgs.values()} != {(cfgs[32].model, cfgs[32].task, cfgs[32].seed)}:
        raise SystemExit("the two runs must be of the same model, task and seed")
    t0 = time.time()
    inputs = load_inputs(cfgs[32])  # the fp32 model, the task and the runs' validation sentences
    models = {32: inputs.loaded.model, 4: load_model(cfgs[4].model, 4, cfgs[4].quant_type, "cpu").model}
    names = set(load_checkpoint(runs[32])[1]) | set(load_checkpoint(runs[4])[1])
    weights = {bits: {n: tgt.dense_weight(m.get_submodule(n)) for n in names} for bits, m in models.items()}
    records = []
    for from_bits, run in runs.items():
        summary = json.loads((run / "summary.json").read_text())
        for to_bits in (32, 4):
            moved = evaluate_moved(models[to_bits], weights, run, from_bits, to_bits, inputs, cfgs[from_bits])
            for form, metrics in moved.items():
                records.append({"task": cfgs[32].task, "seed": cfgs[32].seed, "tuned_on": from_bits,
                                "evaluated_on": to_bits, "form": form, "run_tuned": summary["tuned"],
                                "compensated": compensated(summary), **metrics})
                print(f"{run.name} tuned on {from_bits}-bit, on {to_bits}-bit ({form}): "
                      f"{metrics['accuracy']:.3f} / loss {metrics['loss']:.4f}")
    for r in records:
        r.update(runs={str(bits): run.name for bits, run in runs.items()}, eval_examples=len(inputs.eval_set),
                 seconds=round(time.time() - t0, 1))

    def change(data: dict) -> None:  # a pair of runs of the same task and seed replaces its earlier records
        data.pop("meta", None)
        data["records"] = [r for r in data["records"] if (r["task"], r["seed"]) != (cfgs[32].task, cfgs[32].seed)]
        data["records"] += records

    locked_update(Path(args.output), change)


if __name__ == "__main__":
    main()
