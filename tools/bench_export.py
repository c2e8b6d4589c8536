"""Exported models of real runs: accuracy, logit agreement, size and greedy tokens, per form.

    python tools/bench_export.py --run4 runs/rt-4bit --run32 runs/rt-fp32 --work /tmp/exports \\
        --out docs/results/export.json                 # every stage
    python tools/bench_export.py --run4 ... --stages nf4 --out docs/results/export.json   # one stage

Stages (each adds its entry to ``--out``, so stages can be run one at a time as runs finish):

* ``bnb4-layers``: every ``Linear4bit`` of a ``--bits 4`` run's model through the export's own
  ``frozen_weight`` + ``write_bnb4`` path on a one-MatMul graph, against bitsandbytes'
  dequantization and forward (no export needed; a minute or two).
* ``nf4``: ``export`` of a ``tune --bits 4`` run (its own bitsandbytes weights as MatMulBnb4, the
  adapter path float), then ``eval --onnx`` on the validation split, against the accuracy ``tune``
  reported; the export's logit difference against PyTorch running the same bitsandbytes model
  with the adapter, relative to the largest |logit|; file size.
* ``fp32``: ``export`` of a default fp32 run (adapter unmerged): size (the reference for size
  ratios), logit difference, ``eval --onnx``.
* ``int4``: ``export --int4`` of the fp32 run (MatMulNBits frozen weights, float adapter path),
  ``eval --onnx`` against the PyTorch tuned accuracy.
* ``merged-int4``: ``export --merge --int4``, the same with ``B P^T`` rounded into the weights:
  what merging costs.

Every stage also compares greedy tokens of the exported model with PyTorch running the same
weights (bitsandbytes for nf4; the dequantized int4 weights for the int4 forms) for
``--new-tokens`` tokens after each of three prompts.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from zoact_edge.adapters import targets as tgt
from zoact_edge.cli import main as cli  # noqa: E402
from zoact_edge.onnx import forms as onnx_forms  # noqa: E402
from zoact_edge.onnx.export import ExportOptions, export, load_run  # noqa: E402
from zoact_edge.onnx.runtime import OnnxDecoder  # noqa: E402
from zoact_edge.paths import atomic_write  # noqa: E402

PROMPTS = ["Review: a joyless, plodding film\nSentiment: It was",
           "Review: one of the warmest, funniest movies of the year\nSentiment: It was",
           "The capital of France is"]
STAGES = {"bnb4-layers": ("run4", None), "nf4": ("run4", {}), "fp32": ("run32", {}), "int4": ("run32", {"int4": True}),
          "merged-int4": ("run32", {"int4": True, "merge": True})}


def torch_reference(run_dir: str, folder: Path, opts: ExportOptions):
    """PyTorch running the exported weights: the run's model, int4 weights read back from the graph
    where the export rounded them, and the adapter unless it was merged."""
    run = load_run(run_dir, ExportOptions())
    error: dict[str, torch.Tensor] = {}  # W_int4 - W as (d_out, d_in), for the compensated coefficients
    if opts.int4:
        import onnx

        dense = onnx_forms.int4_weights(onnx.load(str(folder / "model.onnx")).graph)
        for name, module in run.model.named_modules():
            key = f"model.{name}.frozen_t"
            if key in dense:
                W = torch.from_numpy(dense.pop(key))  # (d_in, d_out); merged: B P^T is already in it
                conv1d = type(module).__name__ == "Conv1D"  # GPT-2 stores (d_in, d_out) already
                with torch.no_grad():
                    error[name] = (W.double() - module.weight.double().to(W.device)).T if conv1d else (
                        W.T.double() - module.weight.double())
                    module.weight.copy_(W if conv1d else W.T)
        if dense:
            raise RuntimeError(f"int4 weights without a torch module: {sorted(dense)[:3]}")
    if not opts.merge:
        for name, (P, B) in run.pairs.items():
            if opts.int4 and opts.compensate:  # computed here, not read from the graph: B - (W_int4 - W) P
                B = (B.double() - error[name] @ P.double()).float()
            tgt.wrap(run.model, name, P.float(), B.float())
    return run.model, run.tokenizer


def greedy_match(folder: Path, model, tokenizer, new_tokens: int) -> list[dict]:
    decoder = OnnxDecoder(folder)
    rows = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        seq = list(ids)
        with torch.no_grad():  # a full forward per token: no KV cache on this side
            for _ in range(new_tokens):
                seq.append(int(model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
        ref = seq[len(ids):]
        got = decoder.greedy(ids, new_tokens)  # no stop token: both sides produce exactly new_tokens
        rows.append({"prompt": prompt, "onnx": tokenizer.decode(got), "torch": tokenizer.decode(ref),
                     "same_tokens": got == ref})
    return rows


@functools.cache
def bnb4_layer_stage(run_dir: str) -> dict:
    """Every ``Linear4bit`` of a --bits 4 run's model through the export's own path
    (``frozen_weight`` then ``write_bnb4`` on a one-MatMul graph) vs bitsandbytes' dequantization
    and forward, on a random batch of 4 rows: the packing order on real layers, without an export."""
    import bitsandbytes.functional as bnbf
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from zoact_edge.onnx.export_layers import frozen_weight

    model = load_run(run_dir, ExportOptions()).model
    gen = torch.Generator().manual_seed(0)
    worst_dense, worst_forward, identical, n, forms = 0.0, 0.0, 0, 0, set()
    for module in (m for m in model.modules() if type(m).__name__ == "Linear4bit"):
        fw = frozen_weight(module)
        K, N = fw.shape
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "one",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, N])],
                                  [numpy_helper.from_array(np.zeros((K, N), np.float32), "W")])
        one = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        onnx_forms.write_bnb4(one, {"W": {"form": fw.form, "packed": fw.packed, "absmax": fw.absmax,
                                          "block_size": fw.block_size, "K": K, "N": N}})
        x = torch.randn(4, K, generator=gen)
        y = ort.InferenceSession(one.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"x": x.numpy()}
        )[0]
        dense = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
        with torch.no_grad():
            ref, forward = (x @ dense.T).numpy(), module(x).numpy()
        scale = float(np.abs(ref).max())
        worst_dense = max(worst_dense, float(np.abs(y - ref).max()) / scale)
        worst_forward = max(worst_forward, float(np.abs(y - forward).max()) / scale)
        identical += bool(np.array_equal(fw.packed, module.weight.data.view(torch.uint8).reshape(-1).numpy())
                          and torch.equal(fw.weight_t, dense.T))
        n, forms = n + 1, forms | {f"{fw.form}/block {fw.block_size}"}
    return {"run": run_dir, "layers": n, "forms": sorted(forms), "data_identical_to_bnb": identical,
            "max_rel_diff_vs_x_at_bnb_dequantize": worst_dense, "max_rel_diff_vs_bnb_forward": worst_forward}


def pytorch_accuracy(run_dir: str) -> dict:
    """The tuned validation metrics ``tune`` reported (summary.json), else ``eval --adapter``'s."""
    summary = Path(run_dir) / "summary.json"
    if summary.is_file():
        return {"source": "tune summary.json", **json.loads(summary.read_text())["tuned"]}
    with tempfile.TemporaryDirectory() as tmp:
        if cli(["eval", "--adapter", run_dir, "--json", f"{tmp}/torch.json"]) != 0:
            raise SystemExit(f"eval --adapter {run_dir} failed")
        return {"source": "eval --adapter", **json.loads(Path(f"{tmp}/torch.json").read_text())}


def run_stage(stage: str, run_dir: str, work: Path, args) -> dict:
    opts = ExportOptions(eval_samples=args.export_eval_samples, overwrite=True, **STAGES[stage][1])
    folder = work / stage
    t = time.perf_counter()
    report = export(run_dir, str(folder), opts)
    note = Path(run_dir) / "snapshot.json"  # a run folder made from an unfinished run's checkpoint
    result = {"run": run_dir, **({"snapshot_of": json.loads(note.read_text())} if note.is_file() else {}),
              "options": {k: v for k, v in vars(opts).items() if k in ("int4", "merge", "block_size")},
              "export_seconds": round(time.perf_counter() - t, 1), "report": report}
    graph_key = "int4" if opts.int4 else next(k for k in ("nf4", "fp4", "fp32") if k in report)
    measured = report[graph_key]
    result["bytes"] = measured["bytes"]
    result["max_abs_logit_diff"] = measured["max_abs_logit_diff"]
    result["relative_logit_diff"] = measured["max_abs_logit_diff"] / max(1.0, measured["max_abs_logit"])
    with tempfile.TemporaryDirectory() as tmp:
        if cli(["eval", "--onnx", str(folder), "--json", f"{tmp}/eval.json"]) != 0:
            raise SystemExit(f"eval --onnx {folder} failed")
        result["eval_onnx"] = json.loads(Path(f"{tmp}/eval.json").read_text())
    result["pytorch"] = pytorch_accuracy(run_dir)
    result["accuracy_points_vs_pytorch"] = round(100 * (result["eval_onnx"]["accuracy"]
                                                        - result["pytorch"]["accuracy"]), 2)
    model, tokenizer = torch_reference(run_dir, folder, opts)
    result["greedy"] = greedy_match(folder, model, tokenizer, args.new_tokens)
    result["greedy_all_same"] = all(r["same_tokens"] for r in result["greedy"])
    return result


def fp32_export_bytes(results: dict) -> int | None:
    """The fp32 export's size: the fp32 stage's, or the float graph an int4 export measured first."""
    if "fp32" in results:
        return results["fp32"]["bytes"]
    for stage in ("int4", "merged-int4"):
        if stage in results and not results[stage]["options"].get("merge"):
            return results[stage]["report"]["fp32"]["bytes"]
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run4", help="a `tune --bits 4` run folder")
    p.add_argument("--run32", help="a default (fp32) `tune` run folder")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {', '.join(STAGES)}")
    p.add_argument("--work", required=True, help="folder for the exported models (large)")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--export-eval-samples", type=int, default=200,
                   help="validation examples in the export report (eval --onnx always uses the run's own count)")
    p.add_argument("--out", required=True, help="JSON file; stages already in it are kept")
    args = p.parse_args()
    out = Path(args.out)
    for stage in args.stages.split(","):
        run_dir = getattr(args, STAGES[stage][0])
        if not run_dir:
            raise SystemExit(f"stage {stage} needs --{STAGES[stage][0]}")
        if STAGES[stage][1] is None:
            entry = bnb4_layer_stage(run_dir)
        else:
            entry = run_stage(stage, run_dir, Path(args.work), args)
        results = json.loads(out.read_text()) if out.is_file() else {}  # read late: stages may run side by side
        results[stage] = entry
        fp32_bytes = fp32_export_bytes(results)
        if fp32_bytes:  # sizes relative to the fp32 export of the same model
            for measured in results.values():
                if isinstance(measured, dict) and "bytes" in measured:
                    measured["size_vs_fp32_export"] = round(measured["bytes"] / fp32_bytes, 4)
        results["machine"] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
        with atomic_write(out) as f:
            json.dump(results, f, indent=2)
        print(json.dumps({k: v for k, v in entry.items() if k not in ("report", "greedy")}, indent=2))


if __name__ == "__main__":
    main()
