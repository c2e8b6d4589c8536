"""The loss graph of ``zoact-edge tune --backend ort`` (its engine: :mod:`zoact_edge.onnx.ort_engine`).

The edge story of ZO-Act is that an inference engine is enough to fine-tune: the frozen model
never changes, so it is exported once as an ONNX *loss graph* and every ZO step only changes the
small coefficient matrices. The graph therefore takes each adapter's B as a graph **input**,
keeps the bases P (and the frozen weights) as constants, and returns the task loss (plus the
candidate-label logits for classification, which evaluation needs; a token task's vocabulary-wide
logits are not worth returning), with dynamic batch and sequence axes.

The torch side keeps doing everything that is not a forward: the optimizer, the seeds and the
directions (see the engine).

Exporting takes seconds to minutes, so graphs are cached (``$ZOACT_CACHE/onnx``) under a key of
the model, the task's loss, the target layers, the rank and a hash of the bases.

``--bits 4`` quantizes the cached fp32 graph's frozen MatMuls to ORT's int4 ``MatMulNBits``
(cached beside it, under the same key plus the bits); the ``x @ P`` and coefficient MatMuls stay
float, so the adapter path is exactly the fp32 one. Evaluation on this backend also runs the
graph: with ``--bits 4`` the model that is tuned is the int4 graph, and that is the model whose
accuracy a run reports.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.layer import ZOActLinear
from ..data.tasks import Batch, ClassificationTask, hidden_states, label_logits
from ..paths import atomic_dir, cache_dir
from .forms import INT4_BLOCK

log = logging.getLogger(__name__)

GRAPH_VERSION = 1  # bump when the graph's inputs, outputs or loss change
OPSET = 18
BATCH_INPUTS = ("input_ids", "attention_mask", "position_ids", "target")

# --------------------------------------------------------------------------- the loss graph


def token_loss(model, batch: Batch) -> torch.Tensor:
    """Mean next-token NLL over target tokens as a mask-weighted sum (no data-dependent shapes).

    ``tasks._TokenLossTask.loss`` selects target positions by boolean indexing, whose output size
    depends on the data and does not export; weighting every position by the mask computes the
    same loss with static shapes.
    """
    hidden = hidden_states(model, batch)[:, :-1]
    logits = model.get_output_embeddings()(hidden).float()
    targets = batch.input_ids[:, 1:]
    weight = batch.target_mask[:, 1:].to(logits.dtype)
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return (nll * weight).sum() / weight.sum().clamp(min=1.0)


class _Loss(nn.Module):
    """The task loss as a module of the model (so ``functional_call`` can swap the B's in)."""

    def __init__(self, model, task):
        super().__init__()
        self.model = model
        self.classification = isinstance(task, ClassificationTask)
        if self.classification:  # on the model's device, so a CUDA model traces without a device mix
            device = next(model.parameters()).device
            self.register_buffer("candidates", task.candidate_ids.clone().to(device), persistent=False)

    def forward(self, input_ids, attention_mask, position_ids, target):
        if self.classification:
            batch = Batch(input_ids, attention_mask, position_ids, labels=target)
            last = hidden_states(self.model, batch)[:, -1].float()  # left padding: the prompt ends at -1
            logits = label_logits(self.model, last, self.candidates)  # the torch engine's own function
            return F.cross_entropy(logits, target), logits
        batch = Batch(input_ids, attention_mask, position_ids, target_mask=target)
        return (token_loss(self.model, batch),)


class LossGraph(nn.Module):
    """``forward(input_ids, attention_mask, position_ids, target, *Bs)``: the B's are inputs."""

    def __init__(self, model, task, layers: list[ZOActLinear]):
        super().__init__()
        self.inner = _Loss(model, task)
        by_id = {id(p): n for n, p in self.inner.named_parameters(remove_duplicate=False)}
        self.b_names = [by_id[id(l.B)] for l in layers]
        # Every name a basis P is reachable under: the exporter names a shared P's initializer
        # after one of its aliases (q/k/v and gate/up share one P).
        bases = {id(l.P) for l in layers}
        self.p_names = {n for n, b in self.named_buffers(remove_duplicate=False) if id(b) in bases}

    def forward(self, input_ids, attention_mask, position_ids, target, *Bs):
        return torch.func.functional_call(self.inner, dict(zip(self.b_names, Bs)),
                                          (input_ids, attention_mask, position_ids, target), strict=False)


def output_names(task) -> list[str]:
    return ["loss", "logits"] if isinstance(task, ClassificationTask) else ["loss"]


def batch_arrays(batch: Batch) -> dict[str, np.ndarray]:
    target = batch.labels if batch.labels is not None else batch.target_mask
    tensors = (batch.input_ids, batch.attention_mask, batch.position_ids, target)
    return {n: t.detach().cpu().numpy() for n, t in zip(BATCH_INPUTS, tensors)}


def export_loss_graph(model, task, layers: list[ZOActLinear], example: Batch, path: Path) -> None:
    """Export the loss graph to ``path`` (with its weights in ``path.data`` beside it)."""
    graph = LossGraph(model, task, layers).eval()
    target = example.labels if example.labels is not None else example.target_mask
    args = (example.input_ids, example.attention_mask, example.position_ids, target,
            *[l.B.detach() for l in layers])
    bs = {0: "batch", 1: "seq"}
    dynamic = {"input_ids": bs, "attention_mask": bs, "position_ids": bs,
               "target": {0: "batch"} if example.labels is not None else bs,
               "Bs": tuple({} for _ in layers)}
    # Each layer's noise must be off while tracing: the perturbation is applied to the inputs.
    saved = [(l.noise_seed, l.noise_scale) for l in layers]
    for l in layers:
        l.set_noise(None, 0.0)
    try:
        with torch.no_grad():
            torch.onnx.export(
                graph,
                args,
                str(path),
                dynamo=True,
                external_data=True,
                opset_version=OPSET,
                verbose=False,
                input_names=[*BATCH_INPUTS, *[f"B{i}" for i in range(len(layers))]],
                output_names=output_names(task),
                dynamic_shapes=dynamic,
            )
    finally:
        for l, (seed, scale) in zip(layers, saved):
            l.set_noise(seed, scale)


def _model_identity(model_id: str) -> list:
    cfg = Path(model_id) / "config.json"
    if cfg.is_file():
        st = cfg.stat()
        return [str(cfg.resolve()), st.st_size, st.st_mtime_ns]
    return [model_id]


def graph_key(model_id: str, task, layer_names: list[str], layers: list[ZOActLinear]) -> str:
    """Cache key: model, loss, targets, rank and the bases' bytes (P is baked into the graph)."""
    h = hashlib.sha256()
    loss_id = (["classification", task.candidate_ids.tolist()] if isinstance(task, ClassificationTask)
               else ["token"])
    meta = [GRAPH_VERSION, torch.__version__, _model_identity(model_id), loss_id, layer_names,
            [list(l.B.shape) for l in layers], str(layers[0].P.dtype)]
    h.update(json.dumps(meta).encode())
    seen = set()
    for l in layers:
        if l.P.data_ptr() in seen:
            continue
        seen.add(l.P.data_ptr())
        h.update(l.P.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def cached_loss_graph(model, task, layers: dict[str, ZOActLinear], example: Batch, model_id: str,
                      bits: int = 32) -> Path:
    """Path of the loss graph for these adapters, exporting (and quantizing) it once if not cached.

    The int4 graph is derived from the fp32 one, so both are cached side by side under one key:
    ``loss-<key>/`` (fp32) and ``loss-<key>-int4-b<block>/``.
    """
    order = list(layers.values())
    key = graph_key(model_id, task, list(layers), order)
    folder = cache_dir() / "onnx" / f"loss-{key}"
    path = folder / "loss.onnx"
    if not path.is_file():
        log.info("exporting the loss graph to ONNX (once; cached in %s)", folder)
        with atomic_dir(folder) as tmp:
            export_loss_graph(model, task, order, example, tmp / "loss.onnx")
    if bits == 32:
        return path
    q_folder = folder.with_name(f"{folder.name}-int{bits}-b{INT4_BLOCK}")
    q_path = q_folder / "loss.onnx"
    if not q_path.is_file():
        log.info("quantizing the loss graph's frozen MatMuls to int%d (once; cached in %s)", bits, q_folder)
        p_names = LossGraph(model, task, order).p_names
        with atomic_dir(q_folder) as tmp:
            quantize_loss_graph(path, tmp / "loss.onnx", p_names, len({id(l.P) for l in order}))
    return q_path


# --------------------------------------------------------------------------- int4


def basis_matmuls(graph, p_names: set[str]) -> list:
    """The ``x @ P`` MatMul nodes: those whose weight is a basis initializer."""
    return [n for n in graph.node if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in p_names]


def quantize_loss_graph(src: Path, dst: Path, p_names: set[str], n_bases: int, block_size: int = INT4_BLOCK) -> None:
    """Write ``src`` with every frozen-weight MatMul as an int4 ``MatMulNBits`` to ``dst``.

    The MatMuls whose weight is a graph input (the coefficients) are not constant, so the
    quantizer leaves them alone; the ``x @ P`` MatMuls are excluded by name. If the bases cannot
    all be found (the exporter named them differently), quantizing would silently round P too, so
    that is an error rather than a guess.
    """
    import onnx

    from .forms import matmul_nbits_quantizer

    MatMulNBitsQuantizer = matmul_nbits_quantizer()
    model = onnx.load(str(src))
    found = {i.name for i in model.graph.initializer} & p_names
    keep = basis_matmuls(model.graph, p_names)
    if len(found) != n_bases or {n.input[1] for n in keep} != found or not all(n.name for n in keep):
        raise RuntimeError(f"{src}: found {len(found)} of the {n_bases} bases P as named MatMul weights; "
                           "refusing to quantize a graph whose x @ P MatMuls cannot be told apart")
    q = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=True,
                             nodes_to_exclude=[n.name for n in keep])
    q.process()
    out = q.model.model
    kept = basis_matmuls(out.graph, p_names)
    if len(kept) != len(keep) or not any(n.op_type == "MatMulNBits" for n in out.graph.node):
        raise RuntimeError(f"int4 quantization of {src} did not keep the x @ P MatMuls float")
    q.model.save_model_to_file(str(dst), use_external_data_format=True)


