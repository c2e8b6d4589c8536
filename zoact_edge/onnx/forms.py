"""The deployed form of each frozen weight in an exported decoder graph (onnx + numpy only).

:mod:`zoact_edge.onnx.export` traces a float graph in which every frozen weight W^T is a named
initializer read by exactly one ``MatMul(x, W^T)``, and the adapter path ``(x @ P) @ B^T`` has
MatMuls of its own. This module rewrites only the frozen MatMuls:

* ``nf4`` / ``fp4``: ONNX Runtime's contrib op ``com.microsoft.MatMulBnb4`` with the run's own
  bitsandbytes data. Its layout is bitsandbytes' ``Linear4bit`` layout: W as (N, K) = (d_out, d_in)
  flattened row-major, two codes per byte with the first in the high nibble, one absmax per block
  (checked against bitsandbytes' dequantization on every layer of the default model).
* ``int4``: ``com.microsoft.MatMulNBits`` (symmetric, per block along K) through ONNX Runtime's
  own quantizer, restricted to the frozen nodes, so the adapter MatMuls stay float.

With ``int4``, the adapter path may also absorb the rounding error (``compensate``): with
E = W_int4 - W, the coefficients become ``C - P^T E`` (C = B^T, all in (K, N) orientation), so
``x W_int4 + (x P) C' = x W + (x P) C + x (I - P P^T) E``: only the part of x outside the layer's
activation subspace still sees the rounding. P holds the top eigenvectors of the calibration
tokens' uncentred second moment, so ``P^T E`` is also the least-squares correction of E over those
tokens. No weights are added; the measured effect on the default model is in
``docs/results/diagnose_int4.json``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

MS_DOMAIN = "com.microsoft"
INT4_BLOCK = 32  # tune --backend ort --bits 4: MatMulNBits block size along the input dimension (symmetric int4)
BNB4_QUANT_TYPE = {"fp4": 0, "nf4": 1}


def matmul_nbits_quantizer():
    """ORT's ``MatMulNBitsQuantizer`` class, without its import-time side effects on logging.

    Its module calls ``logging.basicConfig(level=INFO)`` on import and logs a line per node; the
    root logger is put back as it was and the quantizer's own logger limited to warnings.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    logging.getLogger(MatMulNBitsQuantizer.__module__).setLevel(logging.WARNING)
    return MatMulNBitsQuantizer


def frozen_matmuls(graph, weight_names: set[str]) -> dict[str, object]:
    """``{weight initializer name: the MatMul node reading it}``; an error unless each is found once."""
    found: dict[str, object] = {}
    for node in graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in weight_names:
            if node.input[1] in found:
                raise RuntimeError(f"frozen weight {node.input[1]} is read by more than one MatMul")
            found[node.input[1]] = node
    initializers = {i.name for i in graph.initializer}
    missing = sorted((weight_names - set(found)) | (weight_names - initializers))
    if missing or not all(n.name for n in found.values()):
        raise RuntimeError(f"exported graph: {len(missing)} of {len(weight_names)} frozen weights are not a named "
                           f"MatMul's initializer (first: {missing[:1]}); refusing to guess which MatMuls to rewrite")
    return found


def _ensure_ms_opset(model) -> None:
    import onnx

    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))


def write_bnb4(model, weights: dict[str, dict]) -> None:
    """Replace each frozen MatMul in ``weights`` by ``MatMulBnb4`` with the given 4-bit data.

    ``weights`` maps the float weight's initializer name to ``{"form": "nf4"|"fp4", "packed":
    uint8 array, "absmax": float32 array, "block_size": int, "K": d_in, "N": d_out}``.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    nodes = frozen_matmuls(graph, set(weights))
    index = {id(n): i for i, n in enumerate(graph.node)}
    for name, w in weights.items():
        K, N, block = w["K"], w["N"], w["block_size"]
        if w["packed"].size != (N * K + 1) // 2 or w["absmax"].size != -(-N * K // block):
            raise RuntimeError(f"{name}: 4-bit data does not fit a {K}x{N} weight in blocks of {block}")
        old = nodes[name]
        new = helper.make_node("MatMulBnb4", [old.input[0], f"{name}.{w['form']}", f"{name}.absmax"],
                               list(old.output), name=f"{old.name}_bnb4", domain=MS_DOMAIN, K=K, N=N,
                               block_size=block, quant_type=BNB4_QUANT_TYPE[w["form"]])
        graph.node[index[id(old)]].CopyFrom(new)
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.ascontiguousarray(w["packed"], np.uint8), f"{name}.{w['form']}"),
                numpy_helper.from_array(np.ascontiguousarray(w["absmax"], np.float32), f"{name}.absmax"),
            ]
        )
    _drop_initializers(graph, set(weights))
    _ensure_ms_opset(model)


def write_int4(model, weight_names: set[str], block_size: int):
    """The model with each frozen MatMul in ``weight_names`` as symmetric int4 ``MatMulNBits``."""
    frozen = {n.name for n in frozen_matmuls(model.graph, weight_names).values()}
    # nodes_to_include only adds to the op types quantized by default, so every other node is excluded
    others = [n.name for n in model.graph.node if n.name not in frozen]
    q = matmul_nbits_quantizer()(model, bits=4, block_size=block_size, is_symmetric=True, nodes_to_exclude=others)
    q.process()
    out = q.model.model
    left = [n.input[1] for n in out.graph.node if n.op_type == "MatMul" and n.input[1] in weight_names]
    count = sum(n.op_type == "MatMulNBits" for n in out.graph.node)
    if left or count != len(weight_names):
        raise RuntimeError(f"int4 quantization rewrote {count} of {len(weight_names)} frozen MatMuls")
    return out


def compensate_int4(model, layers: dict[str, tuple[str, np.ndarray, np.ndarray]]) -> None:
    """Fold each int4 weight's rounding error inside its activation subspace into its adapter path.

    ``layers`` maps a (now int4) frozen weight's name to ``(coefficient initializer name, P (K, r),
    the float weight W^T (K, N))``; the coefficient ``C`` (r, N) becomes ``C - P^T (W_int4^T - W^T)``
    with ``W_int4`` read back from the graph, i.e. what ``MatMulNBits`` really computes with.
    """
    from onnx import numpy_helper

    dense = int4_weights(model.graph)
    inits = {i.name: i for i in model.graph.initializer}
    for name, (coeff, P, W) in layers.items():
        if name not in dense or coeff not in inits:
            raise RuntimeError(f"cannot compensate {name}: no int4 weight or no coefficient {coeff} in the graph")
        C = numpy_helper.to_array(inits[coeff]).astype(np.float64)
        fix = P.astype(np.float64).T @ (dense[name].astype(np.float64) - W.astype(np.float64))
        if fix.shape != C.shape:
            raise RuntimeError(f"{coeff}: shape {C.shape} does not fit the correction {fix.shape}")
        inits[coeff].CopyFrom(numpy_helper.from_array((C - fix).astype(np.float32), coeff))


def _drop_initializers(graph, names: set[str]) -> None:
    keep = [i for i in graph.initializer if i.name not in names]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def save(model, path: Path) -> None:
    """``path`` plus its weights in ``path.data`` beside it (as the exporter writes them)."""
    import onnx

    path = Path(path)
    for f in (path, path.with_name(path.name + ".data")):
        f.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)


def rewrite(path: Path, bnb4: dict[str, dict] | None = None, int4: set[str] | None = None,
            block_size: int = 32, compensate: dict[str, tuple[str, np.ndarray, np.ndarray]] | None = None) -> None:
    """Rewrite the graph at ``path`` in place: ``bnb4`` weights to MatMulBnb4, ``int4`` to MatMulNBits
    (then, for the weights in ``compensate``, see :func:`compensate_int4`)."""
    import onnx

    model = onnx.load(str(path))
    if bnb4:
        write_bnb4(model, bnb4)
    if int4:
        model = write_int4(model, int4, block_size)
        if compensate:
            compensate_int4(model, compensate)
    save(model, path)


def dequantize_nbits(node, initializers: dict[str, np.ndarray]) -> np.ndarray:
    """The (K, N) float weight a symmetric 4-bit ``MatMulNBits`` node computes with.

    Layout: (N, blocks, block/2) bytes, low nibble first, zero point 8 unless given.
    """
    from onnx import helper

    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    K, N, block = a["K"], a["N"], a["block_size"]
    if a.get("bits", 4) != 4 or (len(node.input) > 3 and node.input[3]):
        raise ValueError(f"{node.name}: only symmetric 4-bit MatMulNBits without zero points is supported")
    packed = initializers[node.input[1]].reshape(N, -1)
    q = np.stack([packed & 0x0F, packed >> 4], -1).reshape(N, -1, block).astype(np.float32)
    scales = initializers[node.input[2]].reshape(N, -1, 1).astype(np.float32)
    return ((q - 8.0) * scales).reshape(N, -1)[:, :K].T.copy()


def int4_weights(graph) -> dict[str, np.ndarray]:
    """``{float weight name: (K, N) dequantized weight}`` for every ``MatMulNBits`` in ``graph``.

    ONNX Runtime's quantizer names a node's packed weight after the float initializer it replaced
    plus ``_Q4``; that is how each one is traced back to its layer.
    """
    from onnx import numpy_helper

    nodes = [n for n in graph.node if n.op_type == "MatMulNBits"]
    wanted = {x for n in nodes for x in n.input[1:3]}
    arrays = {i.name: numpy_helper.to_array(i) for i in graph.initializer if i.name in wanted}
    out = {}
    for node in nodes:
        if not node.input[1].endswith("_Q4"):
            raise ValueError(f"{node.name}: cannot tell which weight {node.input[1]} replaced")
        out[node.input[1][:-len("_Q4")]] = dequantize_nbits(node, arrays)
    return out
