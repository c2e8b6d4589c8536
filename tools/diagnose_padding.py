"""Diagnostic: how much of a training forward is padding, and what a step would gain without it.

The 4-bit default run needs about 1.5x its steps to pass +15 points (docs/results.md, "More steps close
it"), and a CPU forward is compute bound: its time follows the tokens it computes, padding included.
This script reads the random order's training batches (``batch_indices`` without lengths: the steps of a
seed-0 ``--batch-order random`` run, the default when this was measured) and reports, for each batch size,
the share of computed positions that are real tokens, then times the model's forward, side by side, on those
batches and on the same number of batches formed from length-sorted groups (the same examples, grouped by
length). The timed ratio is the speed-up a length-grouped or unpadded step could reach; it does not say how
such batches train (docs/results.md measures that for ``--batch-order length``, now the default).

    python tools/diagnose_padding.py        # -> docs/results/diagnose_padding.json

tune's options that choose the model, task and data (``--model``, ``--task``, ``--bits``, ``--max-length``)
are accepted with tune's defaults. About two CPU minutes on the default model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from zoact_edge.cli.options import add_options
from zoact_edge.config import TuneConfig
from zoact_edge.data.datasets import batch_indices
from zoact_edge.data.tasks import hidden_states
from zoact_edge.recipes.harness import load_inputs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import locked_update  # noqa: E402  (the lock + atomic write every results file shares)

OUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "diagnose_padding.json"
TUNE_OPTIONS = {"model", "task", "bits", "max_length", "seed"}


def grouped(batches: list[list[int]], length: list[int]) -> list[list[int]]:
    """The same examples, sorted by length and cut into batches of the same sizes."""
    pool = sorted((i for b in batches for i in b), key=lambda i: length[i])
    out, at = [], 0
    for b in batches:
        out.append(pool[at:at + len(b)])
        at += len(b)
    return out


def useful(batches: list[list[int]], length: list[int]) -> float:
    """Real tokens over computed positions (each batch is padded to its longest example)."""
    return sum(length[i] for b in batches for i in b) / sum(max(length[i] for i in b) * len(b) for b in batches)


@torch.inference_mode()
def seconds(model, task, train, batches: list[list[int]]) -> float:
    t0 = time.perf_counter()
    for b in batches:
        hidden_states(model, task.collate([train[i] for i in b]))
    return time.perf_counter() - t0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", default="4,8,16", help="batch sizes whose padding is counted")
    p.add_argument("--steps", type=int, default=300, help="the run's steps whose batches are read (default: 300)")
    p.add_argument("--timed", type=int, default=24, help="batches of --time-batch-size timed each way (default: 24)")
    p.add_argument("--time-batch-size", type=int, default=8, help="batch size of the timed forwards (default: 8)")
    p.add_argument("--output", default=str(OUT))
    add_options(p, TuneConfig, only=TUNE_OPTIONS)
    args = p.parse_args(argv)
    cfg = replace(TuneConfig(), batch_order="length",
                  **{k: v for k, v in vars(args).items() if k in TUNE_OPTIONS and v is not None})
    inputs = load_inputs(cfg)
    task, train, length = inputs.task, inputs.splits.train, inputs.train_lengths
    sizes = {}
    for bs in sorted({int(b) for b in args.batch_sizes.split(",")}):
        run = [batch_indices(s, bs, len(train), cfg.seed) for s in range(args.steps)]
        sizes[str(bs)] = {"useful_random": useful(run, length), "useful_grouped": useful(grouped(run, length), length)}
        print(f"batch {bs}: real tokens {sizes[str(bs)]['useful_random']:.1%} of the computed positions "
              f"({sizes[str(bs)]['useful_grouped']:.1%} length-grouped)")
    bs = args.time_batch_size
    run = [batch_indices(s, bs, len(train), cfg.seed) for s in range(args.timed)]
    seconds(inputs.model, task, train, run[:2])  # warm-up
    times = {"random": [], "grouped": []}
    for _ in range(3):  # interleaved rounds, so a change of machine load falls on both
        times["random"].append(seconds(inputs.model, task, train, run))
        times["grouped"].append(seconds(inputs.model, task, train, grouped(run, length)))
    med = {k: statistics.median(v) for k, v in times.items()}
    record = {"model": cfg.model, "task": cfg.task, "bits": cfg.bits, "max_length": cfg.max_length,
              "train_examples": len(train), "mean_tokens": statistics.mean(length), "max_tokens": max(length),
              "steps_read": args.steps, "batch_sizes": sizes,
              "timed": {"batch_size": bs, "batches": args.timed, "rounds": 3, "seconds": times, "median": med,
                        "threads": torch.get_num_threads(), "speedup": med["random"] / med["grouped"]}}
    print(f"{args.timed} forwards of batch {bs}: {med['random']:.2f} s as sampled, {med['grouped']:.2f} s "
          f"length-grouped ({record['timed']['speedup']:.2f}x)")

    def change(data: dict) -> None:  # one record per (model, task, bits)
        key = (cfg.model, cfg.task, cfg.bits)
        data["records"] = [r for r in data["records"] if (r["model"], r["task"], r["bits"]) != key] + [record]

    locked_update(Path(args.output), change)


if __name__ == "__main__":
    main()
