"""Diagnostic: how wide a subspace must the 4-bit rounding be undone in to start where the float model is?

``--bits 4`` rounds every frozen weight W to W_q; the default ``--compensate`` undoes the rounding inside
each adapter's rank-16 activation basis, B0 = (W - W_q) P (zoact_edge/adapters/compensate.py). What it
leaves is the rounding outside span(P), which no trained B can touch (docs/results.md, "The 4-bit gap").
This script measures how that part shrinks with the width k of the subspace: for each k it attaches
adapters with the exact top-k activation basis (the default calibration, the same examples and seed as
``zoact-edge tune``), starts them at the compensation, and evaluates the untrained start on the default
validation sentences: accuracy and loss, and how close it computes to the float model, which the loss alone
does not say (rounding noise can lower a loss as well as raise it): the relative error of the last
position's final hidden state and the KL divergence of the label distribution from the fp32 model's. It
also reports what a frozen rank-k correction would hold in memory (fp32 P and B, a shared P counted once),
the price of carrying it beside a rank-16 trained adapter.

    python tools/diagnose_rounding.py --ranks 16,32,64,128,256    # -> docs/results/diagnose_rounding.json

tune's options that choose the model, the task, the calibration and the validation sentences (``--model``,
``--task``, ``--seed``, ``--calib-samples`` ...) are accepted with tune's defaults.

The fp32 model is loaded beside the 4-bit one for the reference. About six CPU minutes on the default
model (one pass over 500 sentences per width).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from zoact_edge.adapters import targets as tgt
from zoact_edge.adapters.build import build_adapters, inject_adapters
from zoact_edge.adapters.compensate import compensate_from
from zoact_edge.cli.options import add_options
from zoact_edge.config import TuneConfig
from zoact_edge.data.evaluate import length_sorted
from zoact_edge.data.tasks import hidden_states, label_logits, sampled_batches
from zoact_edge.models import load_model
from zoact_edge.recipes.harness import load_inputs
from zoact_edge.recipes.zoact import CALIBRATION_TAG

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import locked_update  # noqa: E402  (the lock + atomic write every results file shares)

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
OUT = RESULTS / "diagnose_rounding.json"
# tune's options that decide the model, the calibration examples and the validation sentences
TUNE_OPTIONS = {"model", "task", "seed", "targets", "layers", "calib_samples", "batch_size", "max_length",
                "eval_samples", "eval_batch_size", "quant_type"}


@torch.no_grad()
def last_states(model, task, batches: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The scored position's final hidden state (fp32) and the label logits of every example, in batch order."""
    hidden = torch.cat([hidden_states(model, b)[:, -1].float() for b in batches])
    return hidden, label_logits(model, hidden, task.candidate_ids)


def compare(hidden, logits, ref_hidden, ref_logits, labels) -> dict:
    """Accuracy and loss, and the distance from the fp32 model's hidden states and label distributions."""
    rel = (hidden - ref_hidden).norm(dim=-1) / ref_hidden.norm(dim=-1)
    kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(ref_logits, -1), log_target=True, reduction="batchmean")
    return {"accuracy": float((logits.argmax(-1) == labels).float().mean()),
            "loss": float(F.cross_entropy(logits, labels)),
            "hidden_rel_err": float(rel.mean()), "label_kl": float(kl),
            "agrees_with_fp32": float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean())}


def frozen_bytes(layers: dict) -> int:
    """Bytes of every adapter's P (a shared P once) and B, in fp32."""
    seen, total = set(), 0
    for layer in layers.values():
        if id(layer.P) not in seen:
            seen.add(id(layer.P))
            total += layer.P.numel() * 4
        total += layer.B.numel() * 4
    return total


def rounding_table(data: dict) -> str:
    """One row per width: the untrained compensated start against the fp32 model (docs/results.md)."""
    rows = ["| model, task | compensated in | P and B | accuracy | loss | hidden state: rel. error | label KL "
            "(x 1e-3) | KL left |", "|---|---|---|---|---|---|---|---|"]
    for rec in data.get("records", []):
        where = f"{rec['model'] or 'default'}, {rec['task']}"
        loaded = rec["rows"][0]["label_kl"]
        fp32 = rec["fp32"]
        rows.append(f"| {where} | fp32 model | — | {fp32['accuracy']:.3f} | {fp32['loss']:.3f} | 0 | 0 | — |")
        for r in rec["rows"]:
            label = "nothing (4-bit as loaded)" if r["rank"] == 0 else f"rank {r['rank']}"
            size = "—" if r["rank"] == 0 else f"{r['frozen_bytes'] / 2**20:.0f} MiB"
            rows.append(f"| {where} | {label} | {size} | {r['accuracy']:.3f} | {r['loss']:.3f} | "
                        f"{r['hidden_rel_err']:.3f} | {r['label_kl'] * 1e3:.2f} | {r['label_kl'] / loaded:.0%} |")
    return "\n".join(rows)


@torch.no_grad()
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="16,32,64,128,256", help="widths k of the compensated subspace")
    p.add_argument("--output", default=str(OUT))
    add_options(p, TuneConfig, only=TUNE_OPTIONS)  # the run whose start is measured: tune's defaults
    args = p.parse_args(argv)
    ranks = sorted({int(k) for k in args.ranks.split(",")})
    cfg = replace(TuneConfig(bits=4), **{k: v for k, v in vars(args).items() if k in TUNE_OPTIONS and v is not None})
    t0 = time.time()
    inputs = load_inputs(cfg)
    model, device = inputs.model, inputs.device
    found = tgt.find_targets(model, cfg.targets, cfg.layers)
    tgt.check_rank(found, max(ranks))
    batches = sampled_batches(inputs.task, inputs.splits.train, cfg.calib_samples, cfg.batch_size, cfg.seed,
                              CALIBRATION_TAG, device)

    evals = [inputs.task.collate(c) for c in length_sorted(inputs.task, inputs.eval_set, cfg.eval_batch_size)]
    labels = torch.cat([b.labels for b in evals])
    float_model = load_model(cfg.model, 32, device="cpu").model  # the reference: what compensation aims at
    ref = last_states(float_model, inputs.task, evals)
    del float_model
    fp32 = {**compare(*ref, *ref, labels), "examples": len(labels)}

    def measure(desc: str) -> dict:
        print(desc)
        return {**compare(*last_states(model, inputs.task, evals), *ref, labels), "examples": len(labels)}

    rows = [{"rank": 0, "compensated_layers": 0, "frozen_bytes": 0, **measure("4-bit as loaded")}]
    # exact (gram) top eigenvectors, so that the top k of the widest basis are the rank-k basis for every k; the
    # default run's auto method sketches layers wider than 256 inputs, a slightly different rank-16 basis
    widest = build_adapters(model, batches, max(ranks), "gram", found=found, seed=cfg.seed)
    clones: dict = {}  # one copy per shared P, so that group members (q/k/v, gate/up) keep sharing it
    full = {name: clones.setdefault(id(layer.P), layer.P.clone()) for name, layer in widest.items()}
    tgt.unwrap_all(model)
    for k in ranks:
        shared: dict = {}  # group members keep one P
        bases = {n: shared.setdefault(id(P), P[:, :k].contiguous()) for n, P in full.items()}
        layers = inject_adapters(model, found, bases, None, torch.float32, device)
        try:
            count = compensate_from(layers, inputs.loaded.folder, strict=True)
            rows.append({"rank": k, "compensated_layers": count, "frozen_bytes": frozen_bytes(layers),
                         **measure(f"compensated in rank {k}")})
        finally:
            tgt.unwrap_all(model)
    for r in rows:
        print(f"rank {r['rank']:>4}: acc {r['accuracy']:.3f}  loss {r['loss']:.4f}  hidden rel. err "
              f"{r['hidden_rel_err']:.4f}  label KL {r['label_kl']:.5f}  agrees {r['agrees_with_fp32']:.3f}  "
              f"{r['frozen_bytes'] / 2**20:.0f} MiB")
    record = {"task": cfg.task, "model": cfg.model, "basis": "gram", "eval_examples": len(inputs.eval_set),
              "fp32": fp32, "rows": rows, "seconds": round(time.time() - t0, 1)}

    def change(data: dict) -> None:  # one record per model and task; a rerun replaces it
        data["records"] = [r for r in data["records"] if (r["model"], r["task"]) != (cfg.model, cfg.task)] + [record]

    locked_update(Path(args.output), change)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
