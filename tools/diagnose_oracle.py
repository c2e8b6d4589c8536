"""Diagnostic: what the subspace can express vs what one two-point query finds in it (autograd allowed).

ZO-Act's layers are built exactly as ``tune`` builds them (same calibration batches, same basis),
then the coefficients B are trained on the comparison's batch stream and budget by one of:

- ``fo``: the whole gradient dL/dB by backprop, Adam. A backward counts as two forwards, so the
  300-forward budget is 100 steps, as for ``--method fo-lora`` (which also trains the down
  projection A and so is not confined to a fixed basis).
- ``zo-exact``: ZO-Act's update with the finite difference replaced by the exact directional
  derivative c = <dL/dB, Z> on the same batch (Z drawn by the layers' own ``direction``): the
  estimator of ``tune`` without its eps error. 150 steps, the same count as ``tune``. With
  ``queries`` q > 1 the step averages q such estimates, all from the one gradient: what q forward
  pairs per step would tell ZO-Act (exactly), at no extra forward here.
- ``zo-per-example`` (forward-only, no autograd): a lead, not the method. One forward of the
  batch stacked twice, each example under its own direction: example i's row reads B + eps Z_i in
  the first copy and B - eps Z_i in the second (the layers' grouped forward, the one the fused
  step uses), so a forward pair yields one directional derivative per example, N directions
  instead of one, at the forward cost of ``tune``'s fused step. The update averages c_i Z_i.
  Full-weight MeZO cannot do this without N copies of the weights; an adapter's low-rank path can.

With the plain ZO-Act run of the same seed, this splits the gap to backprop into its parts: the subspace
(``fo`` on the activation basis against ``fo-lora``), the finite difference (``zo-exact`` against
``tune``), and what is left, one scalar of information per step.

    python tools/diagnose_oracle.py --runs fo-act-r16-lr1e-4,zo-exact-act-r16-lr1e-3
    # -> docs/results/diagnose_oracle.json

Records are appended as runs finish; a run already in the file is skipped.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from zoact_edge.adapters.build import build_adapters
from zoact_edge.config import TuneConfig
from zoact_edge.data.datasets import batch_indices
from zoact_edge.data.evaluate import evaluate
from zoact_edge.data.tasks import sampled_batches
from zoact_edge.recipes.harness import load_inputs
from zoact_edge.recipes.zoact import CALIBRATION_TAG
from zoact_edge.seeds import derive_seed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import locked_update, read_results  # noqa: E402  (the lock + atomic write every results file shares)

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
PATH = RESULTS / "diagnose_oracle.json"
SEED_TAG = 0x0AC1E  # the directions of zo-exact, apart from tune's own perturbation stream

# name -> (mode, basis, rank, lr, queries). Backprop on B needs a far smaller lr than ZO-Act's 1e-3: Adam's
# first steps move every coefficient by about lr *coherently* (a ZO step's signs are random and
# mostly cancel in the output), and at 1e-3 two backprop steps took rank 1 from 0.75 to 0.25 on a
# 16-example smoke check.
RUNS = {
    "fo-act-r16-lr1e-4": ("fo", "auto", 16, 1e-4, 0),
    "fo-act-r16-lr1e-5": ("fo", "auto", 16, 1e-5, 0),
    "fo-random-r16-lr1e-4": ("fo", "random", 16, 1e-4, 0),
    "fo-act-r1-lr1e-4": ("fo", "auto", 1, 1e-4, 0),
    "zo-exact-act-r16-lr1e-3": ("zo-exact", "auto", 16, 1e-3, 1),
    "zo-exact-q16-act-r16-lr1e-3": ("zo-exact", "auto", 16, 1e-3, 16),
    "zo-exact-q128-act-r16-lr1e-3": ("zo-exact", "auto", 16, 1e-3, 128),
    "zo-per-example-act-r16-lr1e-3": ("zo-per-example", "auto", 16, 1e-3, 0),
    "zo-per-example-act-r16-lr2e-3": ("zo-per-example", "auto", 16, 2e-3, 0),
    "zo-per-example-act-r16-lr4e-3": ("zo-per-example", "auto", 16, 4e-3, 0),
}
EPS = 1e-3  # zo-per-example's perturbation size: tune's default


def per_example_estimate(model, task, batch, layers: list, seed: int, step: int):
    """(mean loss at B, estimate of dL/dB) from one forward of 2N rows: example i at B +/- EPS Z_i."""
    n = batch.input_ids.shape[0]
    seeds = [derive_seed(seed, SEED_TAG, step, i) for i in range(n)]
    for j, layer in enumerate(layers):  # each layer its own direction per example, as tune seeds its layers
        layer.set_noise_groups([(derive_seed(s, j), EPS) for s in seeds] + [(derive_seed(s, j), -EPS) for s in seeds])
    try:
        with torch.no_grad():
            rows = torch.nn.functional.cross_entropy(task.logits(model, batch.repeat(2)), batch.labels.repeat(2),
                                                     reduction="none").double()
    finally:
        for layer in layers:
            layer.set_noise_groups(None)
    c = (rows[:n] - rows[n:]) / (2 * EPS)  # one directional derivative per example
    grads = []
    for j, layer in enumerate(layers):
        g = torch.zeros_like(layer.B)
        for ci, s in zip(c.tolist(), seeds):
            g.add_(layer.direction(derive_seed(s, j)), alpha=ci / n)
        grads.append(g)
    return float(0.5 * (rows[:n] + rows[n:]).mean()), grads


def train(name: str, task_name: str, seed: int, budget: int, batch_size: int, eval_samples: int) -> dict:
    mode, basis, rank, lr, queries = RUNS[name]
    cfg = replace(TuneConfig(), task=task_name, seed=seed, rank=rank, batch_size=batch_size,
                  eval_samples=eval_samples)
    inputs = load_inputs(cfg)
    model, task, train_set, device = inputs.model, inputs.task, inputs.splits.train, inputs.device
    model.requires_grad_(False)
    calib = sampled_batches(task, train_set, cfg.calib_samples, cfg.batch_size, seed, CALIBRATION_TAG, device)
    layers = build_adapters(model, calib, rank, basis, seed=seed)  # the bases tune computes
    params = [layer.B for layer in layers.values()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    steps = budget // 3 if mode == "fo" else budget // 2
    with torch.no_grad():
        zero_shot = evaluate(model, task, inputs.eval_set, cfg.eval_batch_size, device, desc="zero-shot")
    t0 = time.time()
    losses = []
    for step in range(steps):
        batch = task.collate([train_set[i] for i in batch_indices(step, batch_size, len(train_set), seed)]).to(device)
        if mode == "zo-per-example":  # forward-only
            loss, grads = per_example_estimate(model, task, batch, list(layers.values()), seed, step)
        else:
            loss = task.loss(model, batch)
            grads = torch.autograd.grad(loss, params)
            loss = float(loss.detach())
        if mode == "zo-exact":
            estimate = [torch.zeros_like(g) for g in grads]
            for q in range(queries):  # query 0 is the one-query run's own draw
                dirs = [layer.direction(derive_seed(seed, SEED_TAG, step, i, *([q] if q else [])))
                        for i, layer in enumerate(layers.values())]
                c = sum(float((g * z).sum()) for g, z in zip(grads, dirs))
                for e, z in zip(estimate, dirs):
                    e.add_(z, alpha=c / queries)
            grads = estimate
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
        losses.append(loss)
        if (step + 1) % 25 == 0:
            print(f"{name} step {step + 1}/{steps} train loss (last 25) {sum(losses[-25:]) / 25:.4f}", flush=True)
    with torch.no_grad():
        tuned = evaluate(model, task, inputs.eval_set, cfg.eval_batch_size, device, desc="tuned")
    return {"name": name, "mode": mode, "basis": "activation" if basis == "auto" else basis, "rank": rank, "lr": lr,
            "queries": batch_size if mode == "zo-per-example" else queries,  # directions per step
            "task": task_name, "seed": seed, "forwards": budget, "steps": steps, "batch_size": batch_size,
            "eval_samples": eval_samples, "zero_shot_val_accuracy": zero_shot["accuracy"],
            "zero_shot_val_loss": zero_shot["loss"], "val_accuracy": tuned["accuracy"], "val_loss": tuned["loss"],
            "train_loss_first_25": sum(losses[:25]) / 25, "train_loss_last_25": sum(losses[-25:]) / 25,
            "seconds": round(time.time() - t0, 1)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of: {', '.join(RUNS)}")
    p.add_argument("--task", default="rotten-tomatoes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=int, default=300, help="training forwards (a backward counts as two)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-samples", type=int, default=200)
    p.add_argument("--output", default=str(PATH))
    args = p.parse_args(argv)
    unknown = [n for n in args.runs.split(",") if n not in RUNS]
    if unknown:
        sys.exit(f"unknown run(s): {', '.join(unknown)} (choose from {', '.join(RUNS)})")
    path = Path(args.output)
    for name in args.runs.split(","):
        key = (name, args.task, args.seed, args.budget, args.batch_size, args.eval_samples)
        done = read_results(path)["records"]
        if any((r["name"], r["task"], r["seed"], r["forwards"], r["batch_size"], r["eval_samples"]) == key
               for r in done):
            continue
        rec = train(name, args.task, args.seed, args.budget, args.batch_size, args.eval_samples)
        locked_update(path, lambda d: d["records"].append(rec))  # queues may run side by side
        print(f"{args.task} {name}: val {rec['val_accuracy']:.3f} loss {rec['val_loss']:.3f} "
              f"(zero-shot {rec['zero_shot_val_accuracy']:.3f}; {rec['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
