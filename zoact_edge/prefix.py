"""Frozen-prefix sharing for the fused +/- forward.

When adapters sit only in blocks k..L, every block below k computes the same thing for the +
and the - perturbation. So the fused forward feeds the model the batch once (N rows) and
repeats the rows G times only where they start to differ: at the input of block k. From there on
each block also receives the per-row tensors the model computed once for N rows (attention
mask, position ids / rotary tables), repeated the same way.

This is done with forward pre-hooks on the blocks k..L, not by re-implementing any model's
forward, so it works for every decoder stack whose blocks are called with per-row tensors
(Llama, GPT-2, OPT, ...). A per-row tensor is recognised by its leading dimension N and at
least two dimensions (a 1-D ``cache_position`` of length T == N is left alone).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable

import torch
from torch import nn

from .targets import BLOCK_INDEX



def adapted_blocks(model: nn.Module, adapter_names: Iterable[str]) -> list[nn.Module]:
    """The blocks from the first adapted one to the end of its stack (empty if none is found)."""
    found = []
    for name in adapter_names:
        m = BLOCK_INDEX.search(name)
        if m is not None:
            found.append((name[: m.start()], int(m.group(1))))
    if not found:
        return []
    stacks = {stack for stack, _ in found}
    if len(stacks) != 1:  # adapters in two different stacks (encoder + decoder): not supported
        return []
    stack = model.get_submodule(stacks.pop())
    first = min(block for _, block in found)
    return list(stack)[first:]


def _repeat_rows(obj, rows: int, groups: int):
    if isinstance(obj, torch.Tensor):
        if obj.dim() >= 2 and obj.shape[0] == rows:
            return obj.repeat(groups, *([1] * (obj.dim() - 1)))
        return obj
    if isinstance(obj, tuple):
        return tuple(_repeat_rows(o, rows, groups) for o in obj)
    if isinstance(obj, list):
        return [_repeat_rows(o, rows, groups) for o in obj]
    return obj


@contextmanager
def expand_rows_at(blocks: list[nn.Module], rows: int, groups: int):
    """Within the block, the model's N-row batch becomes ``groups`` stacked copies from ``blocks[0]`` on."""
    if groups == 1 or not blocks:
        yield
        return

    def hook(module, args, kwargs):
        return _repeat_rows(args, rows, groups), {k: _repeat_rows(v, rows, groups) for k, v in kwargs.items()}

    handles = [b.register_forward_pre_hook(hook, with_kwargs=True) for b in blocks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def make_loss_terms(model: nn.Module, task, blocks: list[nn.Module] | None = None):
    """``loss_terms(batch, groups)`` for :func:`zoact_edge.zo.estimate_batches`, under inference mode.

    With ``blocks`` (see :func:`adapted_blocks`), a fused forward shares the frozen prefix below
    ``blocks[0]``; without, it runs the repeated batch through the whole model.
    """

    def loss_terms(batch, groups: int):
        with torch.inference_mode():
            if groups > 1 and blocks:
                with expand_rows_at(blocks, batch.rows, groups):
                    return task.loss_terms(model, batch, groups, expand=False)
            return task.loss_terms(model, batch, groups)

    return loss_terms
