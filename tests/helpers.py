"""Shared test helpers: wrap a model with ZO-Act adapters and build tiny batches."""

from __future__ import annotations

import torch

from zoact_edge import targets as tgt
from zoact_edge.basis import BasisConfig, compute_bases
from zoact_edge.data import load_rotten_tomatoes
from zoact_edge.tasks import RT_TEMPLATE, RT_WORDS, ClassificationTask, hidden_states
from zoact_edge.train import inject_adapters


def rt_task(tokenizer, max_length: int = 32):
    return ClassificationTask(tokenizer, RT_TEMPLATE, list(RT_WORDS), max_length)


def rt_examples(n: int, offset: int = 0):
    return load_rotten_tomatoes().train[offset:offset + n]


def forward(model, batch):
    with torch.inference_mode():
        hidden_states(model, batch)


def add_adapters(model, task, rank=4, patterns=None, calib=16, method="gram", dtype=torch.float32, passes=3,
                 layers=None):
    found = tgt.find_targets(model, patterns, layers)
    batches = [task.collate(rt_examples(calib, offset=500))]
    bases = compute_bases({t.name: model.get_submodule(t.name) for t in found}, {t.name: t.d_in for t in found},
                          batches, lambda b: forward(model, b), BasisConfig(rank=rank, method=method, passes=passes))
    return inject_adapters(model, found, bases, None, dtype, torch.device("cpu"))


def randomize_coefficients(layers, scale=0.05, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for layer in layers.values():
        layer.B.data.copy_(torch.randn(layer.B.shape, generator=gen, dtype=layer.B.dtype) * scale)
