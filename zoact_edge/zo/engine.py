"""Loss engines: what runs the forwards of a ZO step and of an evaluation.

The recipe asks an engine for one step (the perturbed losses, the estimate and the optimizer's
update) and for validation metrics, and never asks which engine it holds:

* :class:`TorchEngine`: the model in PyTorch. Micro-batches, ranks and fused +/- forwards through
  :func:`~zoact_edge.zo.estimator.estimate_batches`, the frozen prefix shared or cached
  (:mod:`~zoact_edge.zo.prefix`).
* :class:`~zoact_edge.onnx.ort_engine.OrtEngine`: the same loss evaluated by ONNX Runtime at the
  layers' B +/- eps Z (``tune --backend ort``).
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from ..adapters.layer import ZOActLinear
from ..data.evaluate import evaluate
from .estimator import ZOResult, apply_update, estimate_batches
from .prefix import PrefixCache, adapted_blocks, make_loss_terms


class LossEngine(Protocol):
    def step(self, batches: list, step_seed: int, optimizer: torch.optim.Optimizer) -> ZOResult:
        """One ZO update from this process's micro-batches; a non-finite result skips the update."""

    def evaluate(self, examples: list, desc: str) -> dict:
        """The validation metrics of the adapted model (see :func:`zoact_edge.data.evaluate.evaluate`)."""


class TorchEngine:
    def __init__(self, model, task, layers: dict[str, ZOActLinear], eps: float, queries: int = 1, fused: bool = False,
                 fuse_queries: bool = False, share_prefix: bool = True, cache: PrefixCache | None = None,
                 all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, eval_batch_size: int = 16,
                 device: torch.device | None = None):
        self.model, self.task, self.layers = model, task, list(layers.values())
        self.eps, self.queries, self.fused, self.fuse_queries = eps, queries, fused, fuse_queries
        self.all_reduce, self.eval_batch_size, self.device = all_reduce, eval_batch_size, device
        self.loss_terms = make_loss_terms(model, task, adapted_blocks(model, layers) if share_prefix else None, cache)

    def step(self, batches: list, step_seed: int, optimizer: torch.optim.Optimizer) -> ZOResult:
        res = estimate_batches(self.layers, self.loss_terms, batches, step_seed, self.eps, self.queries,
                               self.fused, self.fuse_queries, self.all_reduce)
        apply_update(self.layers, res, optimizer, step_seed)
        return res

    def evaluate(self, examples: list, desc: str) -> dict:
        return evaluate(self.model, self.task, examples, self.eval_batch_size, self.device, desc=desc)
