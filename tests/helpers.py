"""Shared test helpers: wrap a model with ZO-Act adapters, build tiny batches, fingerprint frozen weights."""

from __future__ import annotations

import hashlib

import torch

from zoact_edge.adapters.build import build_adapters
from zoact_edge.data.datasets import load_rotten_tomatoes
from zoact_edge.data.tasks import RT_TEMPLATE, RT_WORDS, ClassificationTask, hidden_states


def rt_task(tokenizer, max_length: int = 32):
    return ClassificationTask(tokenizer, RT_TEMPLATE, list(RT_WORDS), max_length)


def rt_examples(n: int, offset: int = 0):
    return load_rotten_tomatoes().train[offset:offset + n]


def forward(model, batch):
    with torch.inference_mode():
        hidden_states(model, batch)


def add_adapters(model, task, rank=4, patterns=None, calib=16, method="gram", dtype=torch.float32, passes=3,
                 layers=None):
    return build_adapters(model, [task.collate(rt_examples(calib, offset=500))], rank, method, targets=patterns,
                          layers=layers, passes=passes, dtype=dtype, device=torch.device("cpu"))


def randomize_coefficients(layers, scale=0.05, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for layer in layers.values():
        layer.B.data.copy_(torch.randn(layer.B.shape, generator=gen, dtype=layer.B.dtype) * scale)


def autograd_grads(model, task, batch, layers) -> list[torch.Tensor]:
    """dL/dB for every layer in ``layers`` (a list), by autograd; B's requires_grad is restored."""
    for l in layers:
        l.B.requires_grad_(True)
    try:
        return list(torch.autograd.grad(task.loss(model, batch), [l.B for l in layers]))
    finally:
        for l in layers:
            l.B.requires_grad_(False)


def fingerprint(model) -> dict:
    """Hash of every frozen tensor as it sits in memory, bitsandbytes quantization state included.

    Read the tensors directly: ``state_dict()`` is not a neutral view for bnb 4-bit on CPU (it
    undoes the kernel's weight repacking, see test_quant's ``_warm_up``).
    """
    def h(t):
        return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()

    out = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith(".B") or name.endswith(".P"):  # the adapter's own tensors
            continue
        key = name.replace(".base.", ".")
        out[key] = h(t)
        qs = getattr(t, "quant_state", None)
        if qs is not None:
            out[key + ".absmax"] = h(qs.absmax)
            out[key + ".code"] = h(qs.code)
        if getattr(t, "SCB", None) is not None:  # LLM.int8 row scales
            out[key + ".SCB"] = h(t.SCB)
    return out
