"""ORT vs torch ZO step time, side by side in one process; optionally exported-model accuracy.

    python tools/bench_ort.py --out bench_ort.json                       # default model and task
    python tools/bench_ort.py --model tests-folder --steps 5 --out b.json
    python tools/bench_ort.py --adapter runs/rotten-tomatoes-... --out b.json   # + export accuracy

Step time: the same model, adapters (one-shot bases), batch and seeds; the two backends' steps
are interleaved (torch, ort, torch, ort, ...) so drift in machine load hits both alike. The
ratio ort/torch is the median ORT step over the median torch step. The loss graph export is
timed separately (it is cached across runs).

Accuracy (``--adapter``): the run's adapter in PyTorch vs the exported fp32 and int4 ONNX
models on the same validation examples, with model sizes and logit differences.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from zoact_edge.adapters import targets as tgt  # noqa: E402
from zoact_edge.adapters.build import build_adapters  # noqa: E402
from zoact_edge.config import TuneConfig  # noqa: E402
from zoact_edge.data.tasks import build_task  # noqa: E402
from zoact_edge.models import load_model  # noqa: E402
from zoact_edge.onnx.ort_engine import build_ort_loss  # noqa: E402
from zoact_edge.zo.estimator import derive_seed, zo_step  # noqa: E402
from zoact_edge.zo.schedule import make_optimizer  # noqa: E402


def step_times(args) -> dict:
    cfg = TuneConfig(
        model=args.model, device="cpu", batch_size=args.batch_size, rank=args.rank, max_length=args.max_length
    ).resolved()  # lr and eps: the defaults a run uses
    loaded = load_model(cfg.model, 32, device="cpu")
    model = loaded.model
    task, splits = build_task(cfg, loaded.tokenizer)
    found = tgt.find_targets(model, cfg.targets, cfg.layers)
    batch = task.collate(splits.train[: cfg.batch_size])

    layers = build_adapters(model, [batch], cfg.rank, found=found, dtype=torch.float32, device=torch.device("cpu"))
    order = list(layers.values())
    t0 = time.perf_counter()
    ort_loss = build_ort_loss(model, task, layers, task.collate(splits.train[:2]), loaded.folder,
                              torch.device("cpu"), 32)
    export_s = time.perf_counter() - t0

    def torch_loss():
        with torch.inference_mode():
            return float(task.loss(model, batch))

    fns = {"torch": torch_loss, "ort": lambda: ort_loss.loss(batch)}
    opt = make_optimizer([l.B for l in order], cfg)
    times = {"torch": [], "ort": []}
    for step in range(args.steps + 1):  # step 0 warms both up and is not counted
        for name, fn in fns.items():
            t = time.perf_counter()
            zo_step(order, fn, opt, derive_seed(0, step), cfg.eps)
            if step:
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": loaded.folder, "batch_size": cfg.batch_size, "max_length": cfg.max_length, "rank": cfg.rank,
        "adapted_layers": len(order), "steps_timed": args.steps, "threads": torch.get_num_threads(),
        "torch_step_s": round(med["torch"], 4), "ort_step_s": round(med["ort"], 4),
        "ort_over_torch": round(med["ort"] / med["torch"], 3),
        "loss_graph_export_or_cache_s": round(export_s, 2),
        "all_step_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
    }


def export_accuracy(args) -> dict:
    """One ``export --int4`` (it checks fp32 parity, then evaluates the fp32 and int4 ONNX
    models on the validation split) and the PyTorch adapter on the same examples."""
    from zoact_edge.cli import main

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        j = Path(tmp) / "torch.json"
        if main(["eval", "--adapter", args.adapter, "--eval-samples", str(args.eval_samples), "--json", str(j)]) != 0:
            raise SystemExit("eval --adapter failed")
        out["torch"] = json.loads(j.read_text())
        folder = Path(tmp) / "int4"
        t = time.perf_counter()
        if main(["export", "--adapter", args.adapter, "--out", str(folder), "--int4",
                 "--eval-samples", str(args.eval_samples)]) != 0:
            raise SystemExit("export failed")
        out["export_seconds"] = round(time.perf_counter() - t, 1)
        out["export_report"] = json.loads((folder / "zoact_onnx.json").read_text())["export"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model folder / hub id / .gguf (default: the embedded SmolLM2-135M)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="timed steps per backend (0: skip the step timing)")
    p.add_argument("--adapter", help="a tune run folder: also compare exported-model accuracy with PyTorch")
    p.add_argument("--eval-samples", type=int, default=500)
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args()
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}}
    if args.steps:
        result["step_time"] = step_times(args)
    if args.adapter:
        result["export_accuracy"] = export_accuracy(args)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2)[:3000])


if __name__ == "__main__":
    main()
