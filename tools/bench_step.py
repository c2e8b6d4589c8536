"""Benchmark: ZO-Act step time as a multiple of one inference forward; data-parallel traffic.

Measured side by side in one process, round robin (so drift on a shared machine hits every
variant alike), median over ``--repeats`` rounds:

* ``inference_forward``: the frozen base model (no adapters), one forward of the batch and loss;
* ``plain_step``: a ZO step with two separate forwards (+ and -) and the optimizer update;
* ``fused_step``: the same step as one forward of 2N rows;
* ``fused_prefix_step``: fused, with the blocks below the first adapted block run once (only for
  the ``--prefix-layers`` configuration, where adapters sit in the upper blocks only);
* ``fused_prefix_cache_step``: the same with ``--cache-prefix``, every row of the batch already
  cached (the warm-up filled it): the blocks below the first adapted one do not run at all.

The bases come from a short one-shot calibration (``--calib-samples``): step time does not
depend on their quality, only on their shapes and sharing. Writes JSON (``--output``) and prints it.

    ZOACT_CACHE=/tmp/zc python tools/bench_step.py --batch-size 16 --output bench_step.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from zoact_edge.adapters import targets as tgt
from zoact_edge.adapters.build import build_adapters
from zoact_edge.config import TuneConfig
from zoact_edge.data.datasets import batch_indices
from zoact_edge.data.tasks import build_task, hidden_states
from zoact_edge.models import load_model
from zoact_edge.paths import atomic_write
from zoact_edge.zo.distributed import payload_bytes
from zoact_edge.zo.estimator import apply_update, estimate_batches
from zoact_edge.zo.prefix import PrefixCache, adapted_blocks, make_loss_terms


def _forward_only(model, batch) -> None:
    with torch.inference_mode():
        hidden_states(model, batch)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def bench_config(model, task, batch, calib, device, layers: str | None, args) -> dict:
    tgt.unwrap_all(model)
    found = tgt.find_targets(model, None, layers)
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    adapters = build_adapters(model, calib, args.rank, found=found, dtype=dtype, device=device)
    order = list(adapters.values())
    optimizer = torch.optim.Adam([l.B for l in order], lr=1e-3)
    wrapped = {name: model.get_submodule(name) for name in adapters}

    def set_wrapped(on: bool):
        for name, layer in wrapped.items():
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, layer if on else layer.base)

    plain_terms = make_loss_terms(model, task)
    prefix_terms = make_loss_terms(model, task, adapted_blocks(model, adapters))
    step_no = [0]

    def step(terms, fused):
        seed = 1000 + step_no[0]
        step_no[0] += 1
        res = estimate_batches(order, terms, [batch], seed, 1e-3, args.queries, fused=fused, fuse_queries=fused)
        apply_update(order, res, optimizer, seed)

    def inference():
        set_wrapped(False)
        try:
            with torch.inference_mode():
                float(task.loss(model, batch))
        finally:
            set_wrapped(True)

    variants = {"inference_forward": inference,
                "plain_step": lambda: step(plain_terms, False),
                "fused_step": lambda: step(plain_terms, True)}
    cache = None
    if found[0].block > 0:
        variants["fused_prefix_step"] = lambda: step(prefix_terms, True)
        cache = PrefixCache(model, adapters, 1 << 40)  # no bound: after the warm-up every row is cached
        cache_terms = make_loss_terms(model, task, None, cache)
        variants["fused_prefix_cache_step"] = lambda: step(cache_terms, True)
    for fn in variants.values():  # warm-up: allocator, kernels, lazy inits
        fn()
    times = {k: [] for k in variants}
    for _ in range(args.repeats):
        for k, fn in variants.items():
            times[k].append(_timed(fn, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = med["inference_forward"]
    return {
        "layers": layers or "all",
        "first_adapted_block": found[0].block,
        "adapted_linears": len(order),
        "trainable_params": sum(l.B.numel() for l in order),
        "median_seconds": {k: round(v, 4) for k, v in med.items()},
        "all_seconds": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "step_over_inference_forward": {k: round(v / ref, 3) for k, v in med.items() if k != "inference_forward"},
        **({"prefix_cache": cache.stats()} if cache is not None else {}),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--bits", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--queries", type=int, default=1, help="directions per step (fused: all 2q in one forward)")
    ap.add_argument("--prefix-layers", default="15-29", help="block range for the prefix-sharing configuration")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--output", default="bench_step.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = TuneConfig(model=args.model, bits=args.bits, device=args.device)
    loaded = load_model(cfg.model, cfg.bits, cfg.quant_type, cfg.device)
    model, device = loaded.model, loaded.device
    task, splits = build_task(cfg, loaded.tokenizer)
    idx = batch_indices(0, args.batch_size, len(splits.train), cfg.seed)
    batch = task.collate([splits.train[i] for i in idx]).with_example_ids(idx).to(device)  # ids: the cache keys
    calib = [task.collate(splits.train[-args.calib_samples:]).to(device)]
    model_params = sum(p.numel() for p in model.parameters())

    configs = [bench_config(model, task, batch, calib, device, None, args)]
    if args.prefix_layers:
        configs.append(bench_config(model, task, batch, calib, device, args.prefix_layers, args))
    trainable_all = configs[0]["trainable_params"]
    result = {
        "model": args.model or "SmolLM2-135M-Instruct (embedded)",
        "bits": args.bits,
        "device": str(device) + ("" if device.type != "cuda" else f" ({torch.cuda.get_device_name()})"),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "tokens_per_row": int(batch.input_ids.shape[1]),
        "rank": args.rank,
        "queries": args.queries,
        "repeats": args.repeats,
        "configs": configs,
        "data_parallel": {
            # One all-reduce per step of 2 x queries (loss sum, count) pairs in fp64, for any model size.
            "allreduce_payload_bytes_per_step": payload_bytes(args.queries),
            "allreduce_calls_per_step": 1,
            # What a first-order data-parallel step would all-reduce instead: the gradients.
            "fp32_gradient_bytes_adapters": 4 * trainable_all,
            "fp32_gradient_bytes_full_model": 4 * model_params,
        },
    }
    with atomic_write(args.output) as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
