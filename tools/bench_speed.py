"""Benchmark: training step time of each method as a multiple of one inference forward.

Each method runs in its own process (the methods change the model: adapters, LoRA layers,
perturbed weights). Inside a process the inference forward and the method's step are timed
alternately, round robin, on the same batch (so drift on a shared machine hits both alike);
the figure is median(step) / median(forward). Methods:

* ``zoact`` / ``subspace``: one ZO step (2 forwards + the Adam update on B), activation or random bases;
* ``mezo``: one MeZO step (perturb the full weights 3 times + 2 forwards + the SGD update);
* ``fo-lora``: one backprop step of a peft LoRA of the same rank with Adam.

With ``--memory`` it also runs ``zoact-edge profile`` on the same model, batch and length and
stores each method's peak / inference peak next to the times.

    ZOACT_CACHE=/tmp/zc python tools/bench_speed.py --output docs/results/speed.json --memory
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("zoact", "subspace", "mezo", "fo-lora")


def worker(spec: dict) -> dict:
    import torch

    from zoact_edge.adapters import targets as tgt
    from zoact_edge.adapters.build import build_adapters
    from zoact_edge.config import TuneConfig
    from zoact_edge.data.datasets import batch_indices
    from zoact_edge.data.tasks import build_task, hidden_states
    from zoact_edge.models import load_model
    from zoact_edge.zo.baselines import add_lora, backprop_step, mezo_params, mezo_step
    from zoact_edge.zo.estimator import derive_seed, zo_step

    torch.manual_seed(0)
    cfg = TuneConfig(
        model=spec["model"], bits=spec["bits"], batch_size=spec["batch_size"], max_length=spec["max_length"]
    )
    loaded = load_model(cfg.model, cfg.bits, cfg.quant_type, "cpu")
    model = loaded.model
    task, splits = build_task(cfg, loaded.tokenizer)
    batch = task.collate([splits.train[i] for i in batch_indices(0, cfg.batch_size, len(splits.train), 0)])
    found = tgt.find_targets(model)
    names = [t.name for t in found]
    method = spec["method"]

    def forward_loss():
        with torch.inference_mode():
            return float(task.loss(model, batch))

    def fwd_only(b):
        with torch.inference_mode():
            hidden_states(model, b)

    state = {"n": 0}
    if method in ("zoact", "subspace"):
        basis = "auto" if method == "zoact" else "random"
        layers = list(build_adapters(model, [batch], spec["rank"], basis, found=found, dtype=torch.float32,
                                     device=torch.device("cpu")).values())
        opt = torch.optim.Adam([l.B for l in layers], lr=1e-3)

        def step():
            state["n"] += 1
            zo_step(layers, forward_loss, opt, derive_seed(0, state["n"]), 1e-3)
    elif method == "mezo":
        params = mezo_params(model, names)

        def step():
            state["n"] += 1
            mezo_step(params, forward_loss, derive_seed(0, state["n"]), 1e-3, 1e-7)
    else:
        params = add_lora(model, names, spec["rank"])
        opt = torch.optim.Adam(params, lr=1e-5)

        def step():
            backprop_step(lambda: task.loss(model, batch), opt)

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    # The forward is timed on the model as the method holds it (with adapters / LoRA layers at
    # B = 0 or wherever training left them): what an inference forward costs during that run.
    step()
    forward_loss()  # warm-up: first-call allocations, bnb repacking
    fwd, stp = [], []
    for _ in range(spec["repeats"]):
        fwd.append(timed(forward_loss))
        stp.append(timed(step))
    return {"method": method, "forward_seconds": statistics.median(fwd), "step_seconds": statistics.median(stp),
            "step_over_forward": round(statistics.median(stp) / statistics.median(fwd), 3),
            "forward_samples": [round(x, 4) for x in fwd], "step_samples": [round(x, 4) for x in stp]}


def run_profiler(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "zoact_edge",
            "profile",
            "--batch",
            str(args.batch_size),
            "--seq",
            str(args.max_length),
            "--rank",
            str(args.rank),
            "--bits",
            str(args.bits),
            "--methods",
            "inference,zoact,mezo,fo-lora",
            "--out",
            tmp,
        ]
        if args.model:
            cmd += ["--model", args.model]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        report = json.loads((Path(tmp) / "report.json").read_text())
    return {m: {"peak_bytes": r.get("peak_bytes"), "ratio_to_inference": r.get("ratio_to_inference")}
            for m, r in report["methods"].items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--bits", type=int, default=32)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--memory", action="store_true", help="also run the memory profiler on the same settings")
    p.add_argument("--output", default="speed.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    results = {}
    for method in args.methods.split(","):
        spec = {"model": args.model, "bits": args.bits, "batch_size": args.batch_size, "max_length": args.max_length,
                "rank": args.rank, "repeats": args.repeats, "method": method}
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{method} failed:\n{proc.stderr[-2000:]}")
        results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{method}: step / forward = {results[method]['step_over_forward']}", flush=True)
    out = {"settings": {k: getattr(args, k) for k in ("model", "bits", "batch_size", "max_length", "rank", "repeats")},
           "machine": {"platform": platform.platform(), "python": platform.python_version()},
           "methods": results}
    if args.memory:
        out["memory"] = run_profiler(args)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=1))
    print(json.dumps({m: r["step_over_forward"] for m, r in results.items()}))


if __name__ == "__main__":
    main()
