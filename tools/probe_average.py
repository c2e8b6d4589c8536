"""Probe: is ZO-Act's plateau the iterate's noise? Average the iterates and see (a diagnostic, not an option).

The default run's train loss stops falling by about step 120 while B keeps moving: every Adam step
moves each of the 2.5 M coefficients by about lr, so after 300 steps |B| is about the random walk's
lr * sqrt(steps * coefficients) (measured: |B| 25.7, the walk 27). If the plateau were the iterate
fluctuating around a minimum of the loss, the average of the iterates would sit lower (Polyak and
Ruppert's averaging). This runs ``zoact-edge tune`` itself, unchanged, in this process; after every
applied step it folds B into a uniform average over the steps from ``--tail-from`` on and into an
exponential average (decay ``--ema``), and after the run's own final evaluation evaluates the model
at each average on the same validation examples.

    python tools/probe_average.py -- --seed 0 --output runs/avg-fp32            # tune's own options after --
    python tools/probe_average.py -- --bits 4 --seed 0 --output runs/avg-bits4
    # -> docs/results/probe_average.json (one record per run: the last iterate, tail and EMA)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_run import add_tune_options, run_tune  # noqa: E402
from results_io import locked_update  # noqa: E402  (the lock + atomic write every results file shares)

from zoact_edge.zo.engine import TorchEngine  # noqa: E402

PATH = Path(__file__).resolve().parents[1] / "docs" / "results" / "probe_average.json"


class Averages:
    """Watches one TorchEngine: its coefficients after every applied step, and its last evaluation's examples."""

    def __init__(self, tail_from: int, decay: float):
        self.tail_from, self.decay = tail_from, decay
        self.engine, self.steps, self.tail_count, self.examples = None, 0, 0, None
        self.tail: list[torch.Tensor] = []
        self.ema: list[torch.Tensor] = []

    def install(self) -> None:
        step, evaluate, watch = TorchEngine.step, TorchEngine.evaluate, self

        def watched_step(engine, batches, step_seed, optimizer):
            res = step(engine, batches, step_seed, optimizer)
            watch.engine = engine
            if res.finite:
                watch.fold([l.B.detach() for l in engine.layers])
            return res

        def watched_evaluate(engine, examples, desc):
            watch.examples = examples
            return evaluate(engine, examples, desc)

        TorchEngine.step, TorchEngine.evaluate = watched_step, watched_evaluate

    def fold(self, coeffs: list[torch.Tensor]) -> None:
        if not self.ema:
            self.ema = [torch.zeros_like(b) for b in coeffs]
            self.tail = [torch.zeros_like(b) for b in coeffs]
        for e, b in zip(self.ema, coeffs):
            e.mul_(self.decay).add_(b, alpha=1 - self.decay)
        self.steps += 1
        if self.steps > self.tail_from:
            self.tail_count += 1
            for t, b in zip(self.tail, coeffs):
                t.add_(b - t, alpha=1 / self.tail_count)  # running mean

    @torch.no_grad()
    def evaluate_at(self, coeffs: list[torch.Tensor], desc: str) -> dict:
        layers = self.engine.layers
        last = [l.B.detach().clone() for l in layers]
        for l, b in zip(layers, coeffs):
            l.B.copy_(b)
        metrics = self.engine.evaluate(self.examples, desc)
        for l, b in zip(layers, last):
            l.B.copy_(b)
        return metrics


def average_table(data: dict) -> str:
    """One row per probed run: validation at the last iterate and at each average (docs/results.md)."""
    rows = ["| tune options | bits | seed | batches | applied steps | zero-shot acc. | last iterate: acc. / loss | "
            "tail average (steps after N): acc. / loss | EMA (decay): acc. / loss | ‖B‖ at the end |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    def cell(m: dict) -> str:
        return f"{m['accuracy']:.3f} / {m['loss']:.3f}"

    for r in data.get("records", []):
        order = r.get("batch_order", "random")  # the only order before --batch-order existed
        rows.append(f"| `{' '.join(r['options'])}` | {r['bits']} | {r['seed']} | {order} | {r['applied_steps']} | "
                    f"{r['zero_shot']['accuracy']:.3f} | {cell(r['last'])} | {cell(r['tail'])} "
                    f"(N = {r['tail_from']}) | {cell(r['ema'])} ({r['ema_decay']:g}) | {r['coefficient_norm']:.1f} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tail-from", type=int, default=150, help="average the iterates after this many applied steps")
    p.add_argument("--ema", type=float, default=0.98, help="decay of the exponential average")
    p.add_argument("--results", default=str(PATH))
    add_tune_options(p)
    args = p.parse_args(argv)
    watch = Averages(args.tail_from, args.ema)
    watch.install()
    options, out = run_tune(p, args)
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "run_config.json").read_text())
    record = {"options": options,
              "seed": config["seed"], "bits": config["bits"], "steps": config["steps"],
              "batch_order": config.get("batch_order", "random"),
              "applied_steps": watch.steps, "tail_from": args.tail_from, "tail_steps": watch.tail_count,
              "ema_decay": args.ema,
              "coefficient_norm": float(sum(l.B.norm() ** 2 for l in watch.engine.layers)) ** 0.5,
              "zero_shot": summary["zero_shot"], "last": summary["tuned"],
              "tail": watch.evaluate_at(watch.tail, "tail average"),
              "ema": watch.evaluate_at(watch.ema, "exponential average")}
    locked_update(Path(args.results), lambda d: d["records"].append(record))
    print(json.dumps({k: record[k] for k in ("options", "last", "tail", "ema")}))


if __name__ == "__main__":
    main()
