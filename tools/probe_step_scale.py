"""Do ZO-Act's lr and eps depend on the scale a model keeps its weights at? (``--step-scale``)

A Llama block computes the same function when a norm's weight is multiplied by a and the linears reading
it divided by a (q/k/v after ``input_layernorm``, gate/up after ``post_attention_layernorm``), or when v_proj
(up_proj) is multiplied by b and o_proj (down_proj), which reads it linearly, divided by b. With powers of two
the rescaled model is the same model to the last bit: same zero-shot loss, same gradient with respect to
every layer's output. Models differ in such scales, for no reason the task cares about.

``tune --step-scale absolute`` (lr and eps in B's own units) sees another model: an adapter on an input a
times larger moves its output a times as much per unit of B, so each layer's effective lr changes by its
own factor. ``--step-scale weight`` trains B relative to each layer's weight RMS, which the rescaling
moves by the same factor, so its run on the rescaled model is the original run.

    python tools/probe_step_scale.py rescale --output /tmp/smollm2-rescaled     # the rescaled copy
    python tools/probe_step_scale.py run --rescaled /tmp/smollm2-rescaled --runs abs,weight-lr5e-3

``run`` trains each named setting on the default model and on its rescaled copy (``--models`` picks one; the
ablations' protocol: batch 8, 300 forwards, the first 200 validation sentences, no test split; ``--seed``,
``--task``) and appends each curve to ``docs/results/step_scale.json``; a record already there (same setting,
model, task, seed and budget) is skipped. The records in that file ran as, two queues at a time, one thread each:

    run --runs abs,weight-lr5e-3 --models rescaled      (and --models default, with lr 2e-3, 1e-2, 2e-2)
    run --runs abs,weight-lr5e-3 --models default --seed 1    (and --seed 2; and --task tweets at seed 0)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convergence import RESULTS, run_one  # noqa: E402  (the harness' run, not a copy)
from results_format import curve_cell, mean_sd, stats  # noqa: E402
from results_io import locked_update, read_results  # noqa: E402

PATH = RESULTS / "step_scale.json"
# Per block: (a: input_layernorm -> q/k/v, m: post_attention_layernorm -> gate/up, b: v -> o, u: up -> down).
# Powers of two (exact in floating point), different per layer type and alternating by depth, so no
# single lr factor could undo them.
FACTORS = ((4.0, 0.25, 0.5, 2.0), (0.5, 4.0, 2.0, 0.25))
# name -> tune options for both models (rank 16, all linears, Adam, as the default)
RUNS = {
    "abs": {"step-scale": "absolute", "lr": 1e-3, "eps": 1e-3},
    "weight-lr2e-3": {"step-scale": "weight", "lr": 2e-3, "eps": 5e-3},
    "weight-lr5e-3": {"step-scale": "weight", "lr": 5e-3, "eps": 5e-3},
    "weight-lr1e-2": {"step-scale": "weight", "lr": 1e-2, "eps": 5e-3},
    "weight-lr2e-2": {"step-scale": "weight", "lr": 2e-2, "eps": 5e-3},
}


@torch.no_grad()
def rescale_llama(model, factors=FACTORS) -> None:
    """Rescale a Llama-family model's weights in place without changing what it computes (module docstring);
    block i takes ``factors[i % len(factors)]``."""
    for i, block in enumerate(model.model.layers):
        a, m, b, u = factors[i % len(factors)]
        attn, mlp = block.self_attn, block.mlp
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if any(lin.bias is not None for lin in linears):
            raise SystemExit("rescale_llama: a linear with a bias would need its bias rescaled too")
        block.input_layernorm.weight.mul_(a)
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
            lin.weight.div_(a)
        block.post_attention_layernorm.weight.mul_(m)
        for lin in (mlp.gate_proj, mlp.up_proj):
            lin.weight.div_(m)
        attn.v_proj.weight.mul_(b)
        attn.o_proj.weight.div_(b)
        mlp.up_proj.weight.mul_(u)
        mlp.down_proj.weight.div_(u)


def rescale(args) -> None:
    from zoact_edge.models import load_model

    loaded = load_model(args.model, bits=32, device="cpu")  # None: the embedded default model
    rescale_llama(loaded.model)
    out = Path(args.output)
    loaded.model.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    print(f"rescaled copy of {args.model or 'the default model'} in {out}")


def run(args) -> None:
    paths = {"default": args.model, "rescaled": args.rescaled}
    models = {which: paths[which] for which in args.models.split(",")}
    for name in args.runs.split(","):
        for which, model in models.items():
            key = (name, which, args.task, args.seed, args.budget)
            done = read_results(PATH)["records"]
            if any((r["name"], r["model"], r["task"], r["seed"], r["budget"]) == key for r in done):
                continue
            on = argparse.Namespace(**{**vars(args), "model": model})  # run_one reads the model from its args
            rec = run_one("zoact", args.task, args.seed, args.budget, args.points, RUNS[name], on, test=False)
            rec.update(name=name, model=which, budget=args.budget, factors=FACTORS if which == "rescaled" else None)
            locked_update(PATH, lambda d: d["records"].append(rec))
            print(f"{name} on {which}: {curve_cell(rec['curve'])}, loss {rec['val_loss']:.4f}", flush=True)


def step_scale_table(data: dict) -> str:
    """One row per run, grouped by setting and model, with each group's mean over its seeds (docs/results.md)."""
    groups: dict = {}
    for r in data.get("records", []):
        groups.setdefault((r["task"], r["name"], r["model"]), []).append(r)
    rows = ["| task | setting | model | seed | val acc. at forwards | final val loss |", "|---|---|---|---|---|---|"]
    for (task, _, which), recs in sorted(groups.items(), key=lambda kv: kv[0][0] != "rotten-tomatoes"):
        s = recs[0]["settings"]
        label = f"`--step-scale {s['step-scale']} --lr {s['lr']:g} --eps {s['eps']:g}`"
        head = f"| {task} | {label} | {which} |"
        for r in sorted(recs, key=lambda r: r["seed"]):
            rows.append(f"{head} {r['seed']} | {curve_cell(r['curve'])} | {r['val_loss']:.4f} |")
        if len(recs) > 1:
            loss = stats(r["val_loss"] for r in recs)
            rows.append(f"{head} mean ± sd of {len(recs)} | final {mean_sd(r['val_accuracy'] for r in recs)}% | "
                        f"{loss[0]:.4f} ± {loss[1]:.4f} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("rescale", help="save the function-preserving rescaled copy of a model")
    r.add_argument("--model", default=None, help="a Llama-family model (default: the embedded SmolLM2)")
    r.add_argument("--output", required=True)
    q = sub.add_parser("run", help="train each setting on the model and on its rescaled copy")
    q.add_argument("--rescaled", required=True, help="the folder `rescale` wrote")
    q.add_argument("--model", default=None, help="the model the copy was made from (default: the embedded one)")
    q.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, from {', '.join(RUNS)}")
    q.add_argument("--models", default="default,rescaled", help="which of the two to train on (comma-separated)")
    q.add_argument("--task", default="rotten-tomatoes")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--budget", type=int, default=300, help="training forwards per run")
    q.add_argument("--points", type=int, default=3)
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--batch-order", choices=["random", "length"], default="random")
    q.add_argument("--eval-samples", type=int, default=200)
    q.add_argument("--extra", default="", help="more tune options for every run")
    q.set_defaults(bits=0)  # run_one's --bits: the models as saved (fp32)
    sub.add_parser("table", help="print the results as a markdown table")
    args = p.parse_args(argv)
    if args.cmd == "rescale":
        rescale(args)
    elif args.cmd == "run":
        unknown = [n for n in args.runs.split(",") if n not in RUNS]
        unknown += [m for m in args.models.split(",") if m not in ("default", "rescaled")]
        if unknown:
            raise SystemExit(f"unknown run(s): {', '.join(unknown)}")
        run(args)
    else:
        print(step_scale_table(read_results(PATH)))


if __name__ == "__main__":
    main()
