"""Diagnostic: what re-quantizing the frozen weights to int4 costs a tuned 16/32-bit run, per scheme.

``export --int4`` keeps the tuned adapter path in float and rounds only the frozen weights to
ONNX Runtime's ``MatMulNBits``. Whether the tuning survives depends on how far the rounding moves
the base model. This script answers that without exporting a graph per scheme: every frozen
target weight is rounded with ONNX Runtime's own block quantizer (``quantize_matmul_4bits``, the
C++ kernel ``MatMulNBitsQuantizer`` calls) and dequantized exactly as the ``MatMulNBits`` kernel
does (checked here against ONNX Runtime running one real layer as a ``MatMulNBits`` node), then
the model runs in PyTorch with the run's adapter (the export's own ``ExportLinear`` stand-ins) on
the run's validation examples, with and without the adapter.

    python tools/diagnose_int4.py --run RUN_DIR [--eval-samples 500]

Writes ``docs/results/diagnose_int4.json``. Validation split only: it chooses the export's scheme.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from zoact_edge.config import ExportOptions  # noqa: E402
from zoact_edge.data.evaluate import evaluate  # noqa: E402
from zoact_edge.onnx.export import _validation_set, load_run  # noqa: E402
from zoact_edge.onnx.export_layers import stand_ins, swapped  # noqa: E402

# name -> (block size, symmetric, layers kept in float: name substrings, compensate)
# "compensate": the float adapter path also cancels the rounding error inside the activation
# subspace: with E = W_int4 - W, y = W_int4 x + (B - E P) P^T x = W x + B P^T x + E (I - P P^T) x.
# P holds the top eigenvectors of the calibration tokens' uncentred second moment X X^T, so E P is
# also the least-squares correction min_C ||E X - C P^T X|| over those tokens (X X^T P = P L).
SCHEMES = {
    "sym-b32": (32, True, (), False),  # export --int4 before compensation
    "asym-b32": (32, False, (), False),
    "sym-b16": (16, True, (), False),
    "asym-b16": (16, False, (), False),
    "asym-b32-float-down": (32, False, ("down_proj",), False),
    "sym-b32-comp": (32, True, (), True),
    "asym-b32-comp": (32, False, (), True),
}


def quantize(w_kn: np.ndarray, block: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ONNX Runtime's MatMulNBits packing of a (K, N) weight: packed nibbles, scales, zero points."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    K, N = w_kn.shape
    blocks = math.ceil(K / block)
    w = np.ascontiguousarray(np.pad(w_kn, ((0, blocks * block - K), (0, 0))), dtype=np.float32)
    packed = np.zeros((N, blocks, block // 2), np.uint8)
    scales = np.zeros((N, blocks), np.float32)
    zeros = np.zeros((N, (blocks + 1) // 2), np.uint8)
    quantize_matmul_4bits(packed, w, scales, zeros, block, N, K, symmetric)
    return packed, scales, zeros


def dequantize(packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray, K: int, symmetric: bool) -> np.ndarray:
    """The (K, N) float weight MatMulNBits computes with: (q - zero point) * scale per block."""
    N, blocks, half = packed.shape
    q = np.stack([packed & 0x0F, packed >> 4], -1).reshape(N, blocks, 2 * half).astype(np.float32)
    if symmetric:
        z = np.float32(8.0)
    else:
        z = np.stack([zeros & 0x0F, zeros >> 4], -1).reshape(N, -1)[:, :blocks, None].astype(np.float32)
    return ((q - z) * scales[:, :, None]).reshape(N, -1)[:, :K].T.copy()


def check_against_ort(w_kn: np.ndarray, block: int, symmetric: bool) -> float:
    """Largest |x @ dequantize(...) - MatMulNBits(x)| relative to max |output|, on random inputs."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    K, N = w_kn.shape
    packed, scales, zeros = quantize(w_kn, block, symmetric)
    inits = [numpy_helper.from_array(packed, "w"), numpy_helper.from_array(scales.reshape(-1), "s")]
    inputs = ["x", "w", "s"]
    if not symmetric:
        inits.append(numpy_helper.from_array(zeros.reshape(-1), "z"))
        inputs.append("z")
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=K, N=N, bits=4,
                            block_size=block, accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, N])], inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((4, K)).astype(np.float32)
    got = sess.run(None, {"x": x})[0]
    want = x.astype(np.float64) @ dequantize(packed, scales, zeros, K, symmetric).astype(np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a finished 16/32-bit tune folder")
    p.add_argument("--eval-samples", type=int, default=500)
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--output", default=str(ROOT / "docs" / "results" / "diagnose_int4.json"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    run = load_run(args.run, ExportOptions())
    task, examples = _validation_set(run, args.eval_samples)
    tuned, weights = stand_ins(run.model, run.pairs)
    plain, _ = stand_ins(run.model, {})
    # zero-shot with the correction alone: the run's bases with B = 0
    bare, _ = stand_ins(run.model, {n: (P, torch.zeros_like(B)) for n, (P, B) in run.pairs.items()})
    originals = {n: w.weight_t.clone() for n, w in weights.items()}
    coeffs = {n: m.coeff_t.clone() for n, m in tuned.items() if m.coeff_t is not None}
    out = {"run": str(args.run), "eval_samples": len(examples), "layers": len(originals),
           "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}, "schemes": {}}

    def measure(name: str, zero_shot_model: dict) -> dict:
        t0 = time.time()
        with torch.no_grad(), swapped(run.model, tuned):
            with_adapter = evaluate(run.model, task, examples, desc=f"{name} tuned")
        with torch.no_grad(), swapped(run.model, zero_shot_model):
            without = evaluate(run.model, task, examples, desc=f"{name} zero-shot")
        rec = {"tuned": with_adapter, "zero_shot": without, "seconds": round(time.time() - t0, 1)}
        print(f"{name}: tuned {with_adapter['accuracy']:.3f}  zero-shot {without['accuracy']:.3f}", flush=True)
        return rec

    out["schemes"]["float"] = measure("float", plain)
    first = next(iter(originals))
    for name in args.schemes.split(","):
        block, symmetric, keep, compensate = SCHEMES[name]
        rel_err = 0.0
        for layer, w in originals.items():
            if any(k in layer for k in keep):
                deq = w
            else:
                packed, scales, zeros = quantize(w.numpy(), block, symmetric)
                deq = torch.from_numpy(dequantize(packed, scales, zeros, w.shape[0], symmetric))
                rel_err = max(rel_err, float((deq - w).norm() / w.norm()))
            for stand_in in (tuned[layer], plain[layer], bare[layer]):
                stand_in.frozen_t.copy_(deq)
            if layer in coeffs:  # (K, N) orientation: coeff_t = B^T, so the correction is P^T E^T
                fix = tuned[layer].basis.T @ (deq - w) if compensate else torch.zeros_like(coeffs[layer])
                tuned[layer].coeff_t.copy_(coeffs[layer] - fix)
                bare[layer].coeff_t.copy_(-fix)
        rec = measure(name, bare if compensate else plain)
        rec.update(block_size=block, symmetric=symmetric, float_layers=list(keep), compensated=compensate,
                   max_relative_weight_error=rel_err,
                   matmulnbits_check=check_against_ort(originals[first].numpy(), block, symmetric))
        out["schemes"][name] = rec
    path = Path(args.output)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
