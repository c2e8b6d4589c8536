"""The ONNX Runtime loss engine of ``tune --backend ort``: the task loss of the adapted model, evaluated
by the cached loss graph (:mod:`~zoact_edge.onnx.loss_graph`) at the layers' B +/- eps Z.

The perturbed coefficients fed to ORT are computed with exactly the expression the torch layer uses,
``B + scale * layer.direction(seed)``, from the layer's own noise state, so this engine sees
bit-identical B +/- eps Z and follows the torch engine's trajectory. On CUDA the session runs on the
``CUDAExecutionProvider`` with IO binding (:class:`BoundOrtLoss`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..adapters.layer import ZOActLinear
from ..config import ORT_BITS
from ..data.evaluate import length_sorted
from ..data.tasks import Batch, ClassificationTask
from ..errors import UserError
from ..zo.estimator import ZOResult, zo_step
from .loss_graph import BATCH_INPUTS, batch_arrays, cached_loss_graph
from .session import CPU_EP, cuda_index, cuda_providers, make_session, require_onnxruntime


def perturbed(layer: ZOActLinear) -> torch.Tensor:
    """The coefficients the torch layer would use now: ``B + scale * Z`` with the same Z."""
    _check_ungrouped(layer)
    coeff = layer.B.detach()
    if layer.noise_seed is not None and layer.noise_scale != 0.0:
        coeff = coeff + layer.noise_scale * layer.direction(layer.noise_seed)
    return coeff


def perturb_into(layer: ZOActLinear, out: torch.Tensor) -> None:
    """``out <- B + scale * Z``, in place and bit-identical to :func:`perturbed`."""
    _check_ungrouped(layer)
    if layer.noise_seed is None or layer.noise_scale == 0.0:
        out.copy_(layer.B.detach())
        return
    torch.mul(layer.direction(layer.noise_seed), layer.noise_scale, out=out)
    out.add_(layer.B.detach())  # fl(s*Z) + B == B + fl(s*Z): the torch layer's value exactly


def _check_ungrouped(layer: ZOActLinear) -> None:
    if layer.noise_groups is not None:
        raise RuntimeError("the ORT loss graph takes one set of coefficients per run, not fused +/- groups")


class OrtLoss:
    """Evaluates the task loss of the adapted model in ONNX Runtime (CPU execution provider)."""

    def __init__(self, session, layers: list[ZOActLinear], path: Path | None = None):
        self.session = session
        self.layers = layers
        self.path = path  # the graph file (for reports and tests)
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

    def evaluate(self, task, examples: list, batch_size: int = 32, desc: str = "eval") -> dict:
        """The metrics of :func:`zoact_edge.data.evaluate.evaluate`, computed by this graph.

        Same length-sorted batches; classification from the graph's candidate logits, token tasks
        from its mean NLL times the batch's target-token count.
        """
        classification = isinstance(task, ClassificationTask)
        correct, loss_sum, n, nll, tokens = 0, 0.0, 0, 0.0, 0
        bar = tqdm(length_sorted(task, examples, batch_size), total=-(-len(examples) // batch_size),
                   desc=desc, leave=False, unit="batch")
        for chunk in bar:
            batch = task.collate(chunk)
            out = self.run(batch)
            if classification:
                logits = torch.from_numpy(out["logits"]).float()
                loss_sum += float(F.cross_entropy(logits, batch.labels, reduction="sum"))
                correct += int((logits.argmax(-1) == batch.labels).sum())
                n += len(chunk)
            else:
                count = int(batch.target_mask[:, 1:].sum())
                nll += float(out["loss"]) * count
                tokens += count
        if classification:
            return {"accuracy": correct / max(n, 1), "loss": loss_sum / max(n, 1), "examples": n}
        loss = nll / max(tokens, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens, "examples": len(examples)}


NUMPY_OF = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(bool)": np.bool_}
TORCH_OF = {"tensor(float)": torch.float32, "tensor(int64)": torch.int64, "tensor(bool)": torch.bool}


class BoundOrtLoss(OrtLoss):
    """The loss with IO binding: per run nothing is copied but the batch and the scalar loss.

    This is the CUDA path (``build_ort_loss`` uses it for ``--device cuda``); it works the same on
    the CPU provider, which is how its binding logic is tested on machines without a GPU.
    Each coefficient input is a buffer on the device, bound once by pointer; a run writes
    ``B +/- eps Z`` into it in place (torch, on the device) and ORT reads it where it is. Batch
    inputs are bound per run; outputs are allocated by ORT on the device, anew each run because
    their shapes follow the batch. torch and ORT use different CUDA streams, so torch's work is
    synchronized before ORT reads, and ORT's outputs before they are read.
    """

    def __init__(self, session, layers: list[ZOActLinear], device: torch.device, path: Path | None = None):
        super().__init__(session, layers, path)
        self.device = torch.device("cuda", cuda_index(device)) if device.type == "cuda" else torch.device("cpu")
        self.device_id = self.device.index or 0
        self.types = {i.name: i.type for i in session.get_inputs()}
        self.binding = session.io_binding()
        self.coeffs = [torch.zeros(l.B.shape, dtype=torch.float32, device=self.device) for l in layers]
        for i, buf in enumerate(self.coeffs):
            self._bind(f"B{i}", buf)

    def _bind(self, name: str, t: torch.Tensor) -> None:
        self.binding.bind_input(name, self.device.type, self.device_id, NUMPY_OF[self.types[name]],
                                list(t.shape), t.data_ptr())

    def run(self, batch: Batch, coefficients: list[torch.Tensor] | None = None) -> dict[str, np.ndarray]:
        with torch.no_grad():
            for i, (layer, buf) in enumerate(zip(self.layers, self.coeffs)):
                if coefficients is None:
                    perturb_into(layer, buf)
                else:
                    buf.copy_(coefficients[i])
        target = batch.labels if batch.labels is not None else batch.target_mask
        held = []  # the bound batch tensors must outlive the run
        for name, t in zip(BATCH_INPUTS, (batch.input_ids, batch.attention_mask, batch.position_ids, target)):
            t = t.to(device=self.device, dtype=TORCH_OF[self.types[name]]).contiguous()
            held.append(t)
            self._bind(name, t)
        self.binding.clear_binding_outputs()
        for name in self.names:
            self.binding.bind_output(name, self.device.type, self.device_id)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # coefficients and batch are written before ORT reads them
        self.binding.synchronize_inputs()
        self.session.run_with_iobinding(self.binding)
        self.binding.synchronize_outputs()
        outs = self.binding.copy_outputs_to_cpu()
        del held
        return dict(zip(self.names, outs))


def build_ort_loss(model, task, layers: dict[str, ZOActLinear], example: Batch, model_id: str,
                   device: torch.device, bits: int) -> OrtLoss:
    """The ORT loss for ``tune --backend ort`` (exported or taken from the cache).

    ``model`` is the fp32 model (the graph is exported from it; ``--bits 4`` quantizes the graph,
    not the torch model). Everything that can be refused is checked before exporting.
    """
    require_onnxruntime()
    if bits not in ORT_BITS:
        raise UserError("--backend ort runs the frozen model in fp32 or, with --bits 4, as int4 MatMulNBits; "
                        "use --bits 32 or 4 (or --backend torch)")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--backend ort runs on the CPU or CUDA execution provider, not {device.type}; "
                        "use --device cpu or cuda")
    if next(iter(layers.values())).P.dtype != torch.float32:  # B is fp32 always; P has the adapter dtype
        raise UserError("--backend ort needs fp32 adapters; use --adapter-dtype fp32")
    providers = cuda_providers(device) if device.type == "cuda" else [CPU_EP]
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    path = cached_loss_graph(model, task, layers, example.to(device), model_id, bits)
    session = make_session(path, providers)
    if device.type == "cuda":
        return BoundOrtLoss(session, list(layers.values()), device, path)
    return OrtLoss(session, list(layers.values()), path)


class OrtEngine:
    """A :class:`~zoact_edge.zo.engine.LossEngine` on an :class:`OrtLoss`: one batch per step (no
    micro-batches, ranks or fused forwards: the graph takes one set of coefficients per run)."""

    def __init__(self, loss: OrtLoss, task, eps: float, queries: int = 1, eval_batch_size: int = 16):
        self.loss, self.task = loss, task
        self.eps, self.queries, self.eval_batch_size = eps, queries, eval_batch_size

    def step(self, batches: list, step_seed: int, optimizer: torch.optim.Optimizer) -> ZOResult:
        (batch,) = batches
        return zo_step(self.loss.layers, lambda: self.loss.loss(batch), optimizer, step_seed, self.eps, self.queries)

    def evaluate(self, examples: list, desc: str) -> dict:
        return self.loss.evaluate(self.task, examples, self.eval_batch_size, desc=desc)
