"""ONNX Runtime backend for the ZO forward pairs: ``zoact-edge tune --backend ort``.

The edge story of ZO-Act is that an inference engine is enough to fine-tune: the frozen model
never changes, so it is exported once as an ONNX *loss graph* and every ZO step only changes the
small coefficient matrices. The graph therefore takes each adapter's B as a graph **input**,
keeps the bases P (and the frozen weights) as constants, and returns the task loss (plus the
candidate-label logits for classification, which evaluation needs; a token task's vocabulary-wide
logits are not worth returning), with dynamic batch and sequence axes.

The torch side keeps doing everything that is not a forward: the optimizer, the seeds and the
directions. The perturbed coefficients fed to ORT are computed with exactly the expression the
torch layer uses, ``B + scale * noise_like(B, seed)``, from the layer's own noise state, so the
ORT backend sees bit-identical B +/- eps Z and follows the torch backend's trajectory.

Exporting takes seconds to minutes, so graphs are cached (``$ZOACT_CACHE/onnx``) under a key of
the model, the task's loss, the target layers, the rank and a hash of the bases.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .layer import ZOActLinear, noise_like
from .paths import atomic_dir, cache_dir
from .tasks import Batch, ClassificationTask, hidden_states, output_rows

log = logging.getLogger(__name__)

GRAPH_VERSION = 1  # bump when the graph's inputs, outputs or loss change
OPSET = 18
BATCH_INPUTS = ("input_ids", "attention_mask", "position_ids", "target")


def require_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise UserError("--backend ort needs ONNX Runtime: pip install 'zoact-edge[onnx]'") from None
    return onnxruntime


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
        if self.classification:
            self.register_buffer("candidates", task.candidate_ids.clone(), persistent=False)

    def forward(self, input_ids, attention_mask, position_ids, target):
        if self.classification:
            batch = Batch(input_ids, attention_mask, position_ids, labels=target)
            last = hidden_states(self.model, batch)[:, -1].float()  # left padding: the prompt ends at -1
            weight, bias = output_rows(self.model, self.candidates)
            logits = last @ weight.float().T
            if bias is not None:
                logits = logits + bias.float()
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
            torch.onnx.export(graph, args, str(path), dynamo=True, external_data=True, opset_version=OPSET, verbose=False,
                              input_names=[*BATCH_INPUTS, *[f"B{i}" for i in range(len(layers))]],
                              output_names=output_names(task), dynamic_shapes=dynamic)
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


def cached_loss_graph(model, task, layers: dict[str, ZOActLinear], example: Batch, model_id: str) -> Path:
    """Path of the loss graph for these adapters, exporting it once if it is not cached."""
    order = list(layers.values())
    folder = cache_dir() / "onnx" / f"loss-{graph_key(model_id, task, list(layers), order)}"
    path = folder / "loss.onnx"
    if path.is_file():
        return path
    log.info("exporting the loss graph to ONNX (once; cached in %s)", folder)
    with atomic_dir(folder) as tmp:
        export_loss_graph(model, task, order, example, tmp / "loss.onnx")
    return path


# --------------------------------------------------------------------------- the session


def cpu_threads() -> int:
    """Threads for ORT: the ones torch uses (which already respect OMP_NUM_THREADS / cores)."""
    return max(1, torch.get_num_threads())


def make_session(path: Path, providers=("CPUExecutionProvider",), threads: int | None = None):
    ort = require_onnxruntime()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or cpu_threads()
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # torch shares this process: spinning ORT threads would steal its cores between runs.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), so, providers=list(providers))
    if sess.get_providers()[0] != providers[0]:
        raise UserError(f"ONNX Runtime fell back to {sess.get_providers()[0]} instead of {providers[0]}")
    return sess


def perturbed(layer: ZOActLinear) -> torch.Tensor:
    """The coefficients the torch layer would use now: ``B + scale * Z`` with the same Z."""
    if layer.noise_groups is not None:
        raise RuntimeError("the ORT loss graph takes one set of coefficients per run, not fused +/- groups")
    coeff = layer.B.detach()
    if layer.noise_seed is not None and layer.noise_scale != 0.0:
        coeff = coeff + layer.noise_scale * noise_like(layer.B, layer.noise_seed)
    return coeff


class OrtLoss:
    """Evaluates the task loss of the adapted model in ONNX Runtime (CPU execution provider)."""

    def __init__(self, session, layers: list[ZOActLinear]):
        self.session = session
        self.layers = layers
        self.names = [o.name for o in session.get_outputs()]

    def run(self, batch: Batch, coefficients: list[torch.Tensor] | None = None) -> dict[str, np.ndarray]:
        with torch.no_grad():
            coeffs = coefficients if coefficients is not None else [perturbed(l) for l in self.layers]
        feeds = batch_arrays(batch)
        for i, c in enumerate(coeffs):
            feeds[f"B{i}"] = np.ascontiguousarray(c.detach().cpu().float().numpy())
        return dict(zip(self.names, self.session.run(None, feeds)))

    def loss(self, batch: Batch) -> float:
        return float(self.run(batch)["loss"])


def build_ort_loss(model, task, layers: dict[str, ZOActLinear], example: Batch, model_id: str,
                   device: torch.device, bits: int) -> OrtLoss:
    """The ORT loss for ``tune --backend ort`` (exported or taken from the cache)."""
    require_onnxruntime()
    if bits != 32:
        raise UserError("--backend ort runs the frozen model in fp32; use --bits 32 (or --backend torch)")
    if device.type != "cpu":
        raise UserError("--backend ort runs on the CPU execution provider; use --device cpu")
    if next(iter(layers.values())).B.dtype != torch.float32:
        raise UserError("--backend ort needs fp32 coefficients; use --adapter-dtype fp32")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    path = cached_loss_graph(model, task, layers, example.to("cpu"), model_id)
    return OrtLoss(make_session(path), list(layers.values()))
