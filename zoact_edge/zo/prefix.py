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

With ``--cache-prefix`` (:class:`PrefixCache`) the input of block k is also kept per training
example across steps and epochs, and the blocks below k are skipped when the example comes back.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterable

import torch
from torch import nn

from ..adapters.targets import BLOCK_INDEX
from ..data.tasks import Batch, hidden_states
from ..errors import UserError

log = logging.getLogger(__name__)


def block_stack(model: nn.Module, adapter_names: Iterable[str]) -> tuple[list[nn.Module], int]:
    """(all blocks of the stack holding the adapters, index of the first adapted one); ([], 0) if none."""
    found = []
    for name in adapter_names:
        m = BLOCK_INDEX.search(name)
        if m is not None:
            found.append((name[: m.start()], int(m.group(1))))
    if not found:
        return [], 0
    stacks = {stack for stack, _ in found}
    if len(stacks) != 1:  # adapters in two different stacks (encoder + decoder): not supported
        return [], 0
    return list(model.get_submodule(stacks.pop())), min(block for _, block in found)


def adapted_blocks(model: nn.Module, adapter_names: Iterable[str]) -> list[nn.Module]:
    """The blocks from the first adapted one to the end of its stack (empty if none is found)."""
    stack, first = block_stack(model, adapter_names)
    return stack[first:]


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


def make_loss_terms(model: nn.Module, task, blocks: list[nn.Module] | None = None, cache: "PrefixCache | None" = None):
    """``loss_terms(batch, groups)`` for :func:`zoact_edge.zo.estimator.estimate_batches`, under inference mode.

    With ``blocks`` (see :func:`adapted_blocks`), a fused forward shares the frozen prefix below
    ``blocks[0]``; without, it runs the repeated batch through the whole model. With ``cache``,
    batches that carry ``example_ids`` (training batches) take the prefix from the cache, which
    implies sharing it: the rows are repeated at the first adapted block.
    """

    def loss_terms(batch, groups: int):
        with torch.inference_mode():
            if cache is not None and batch.example_ids is not None:
                with cache.serving(batch):
                    if groups == 1:
                        return task.loss_terms(model, batch)
                    with expand_rows_at(cache.blocks, batch.rows, groups):
                        return task.loss_terms(model, batch, groups, expand=False)
            if groups > 1 and blocks:
                with expand_rows_at(blocks, batch.rows, groups):
                    return task.loss_terms(model, batch, groups, expand=False)
            return task.loss_terms(model, batch, groups)

    return loss_terms


# --------------------------------------------------------------------------- --cache-prefix

# Model types whose decoder blocks depend on nothing but their hidden-state input and the masks /
# position tables the model builds before the loop (checked against transformers' code; llama,
# gpt2 and opt are also covered by tests). Others are refused rather than silently miscomputed:
# some share keys/values or residuals across blocks, which skipping the lower blocks would break.
CACHEABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2", "opt")


class _PrefixDone(Exception):
    """Raised by a hook at the first adapted block to end a forward that only computes the prefix."""


def _hidden_arg(args: tuple, kwargs: dict):
    return args[0] if args else kwargs.get("hidden_states")


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})


def _pass_through(hidden_states=None, *args, **kwargs):
    """A skipped block: its output is overwritten at the first adapted block anyway."""
    return hidden_states


class PrefixCache:
    """Each training example's input to the first adapted block k, kept across steps and epochs.

    Blocks 0..k-1 hold no adapter, so what they compute for an example never changes while
    training. An entry holds only the example's real tokens (its row of the padded batch without
    the padding), so it serves the example in any later batch whatever its padding companions:
    the input of block k is rebuilt from the entries, with zeros at padded positions, which the
    attention mask hides from every real token (positions come from the batch, as always).

    A forward through the cache: the rows without an entry run through blocks 0..k-1 alone (a
    forward of just those rows, stopped at block k) and are stored while ``max_bytes`` allows;
    then the model runs the whole batch with blocks 0..k-1 replaced by pass-throughs and block
    k's input replaced by the rebuilt state. The model still builds its masks and position tables
    (rotary, ...) itself: only the blocks are skipped. So a fully cached batch costs no prefix
    compute, a partly cached one the prefix of its new rows only.

    When full, the cache stops inserting (no eviction): epochs visit the examples in fresh
    random orders, where a fixed set of C entries out of n serves C/n of the rows, while LRU
    serves only the rows that come back within C visits (about (C/n)^2 / 2 of them).
    Entries live on the device of the model's hidden states; ``bytes`` counts their tensor data.
    """

    def __init__(self, model: nn.Module, adapter_names: Iterable[str], max_bytes: int):
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in CACHEABLE_MODEL_TYPES:
            raise UserError(f"--cache-prefix supports {', '.join(CACHEABLE_MODEL_TYPES)} models, not {model_type!r}; "
                            "run without it")
        stack, first = block_stack(model, adapter_names)
        if not stack or first == 0:
            raise UserError("--cache-prefix needs adapters in blocks k..L with k >= 1 of one block stack (see "
                            "--layers)")
        self.model, self.prefix, self.blocks = model, stack[:first], stack[first:]
        self.max_bytes, self.bytes = int(max_bytes), 0
        self.entries: dict[int, torch.Tensor] = {}
        self.hit_rows = self.miss_rows = 0
        self.full = False

    def stats(self) -> dict:
        return {"examples": len(self.entries), "bytes": self.bytes, "max_bytes": self.max_bytes,
                "hit_rows": self.hit_rows, "miss_rows": self.miss_rows}

    @contextmanager
    def serving(self, batch: Batch):
        """Within: a forward of ``batch`` (N rows) skips blocks 0..k-1 and feeds block k from the cache."""
        hidden = self._rebuild(batch, self._states(batch))

        def replace(module, args, kwargs):
            incoming = _hidden_arg(args, kwargs)
            if not isinstance(incoming, torch.Tensor) or incoming.shape != hidden.shape:
                raise UserError(f"--cache-prefix: {type(self.model).__name__} does not pass its blocks one "
                                f"hidden-state "
                                "tensor per row; run without --cache-prefix")
            return _with_hidden(args, kwargs, hidden.to(incoming.device))

        saved = [block.__dict__.get("forward") for block in self.prefix]  # e.g. accelerate's device hooks
        handle = self.blocks[0].register_forward_pre_hook(replace, with_kwargs=True, prepend=True)
        try:
            for block in self.prefix:
                block.forward = _pass_through
            yield
        finally:
            handle.remove()
            for block, forward in zip(self.prefix, saved):
                if forward is None:
                    del block.forward
                else:
                    block.forward = forward

    def _states(self, batch: Batch) -> list[torch.Tensor]:
        """Block k's input for every row's real tokens (n_i x d): from the cache, or computed now."""
        ids = batch.example_ids
        if len(ids) != batch.rows:
            raise ValueError(f"batch has {batch.rows} rows but {len(ids)} example ids")
        missing = [i for i, key in enumerate(ids) if key not in self.entries]
        fresh = dict(zip(missing, self._run_prefix(batch, missing))) if missing else {}
        for i in missing:
            self._store(ids[i], fresh[i])
        self.hit_rows += batch.rows - len(missing)
        self.miss_rows += len(missing)
        return [fresh[i] if i in fresh else self.entries[key] for i, key in enumerate(ids)]

    def _store(self, key: int, state: torch.Tensor) -> None:
        if key in self.entries:  # the same example twice in one batch (an epoch boundary)
            return
        size = state.numel() * state.element_size()
        if self.bytes + size > self.max_bytes:
            if not self.full:
                log.warning("--cache-prefix: the cache is full (%d examples, %.1f MiB); other examples recompute the "
                            "frozen prefix at every visit (raise --cache-prefix-mb to cache more)",
                            len(self.entries), self.bytes / 2**20)
                self.full = True
            return
        self.entries[key] = state
        self.bytes += size

    def _run_prefix(self, batch: Batch, rows: list[int]) -> list[torch.Tensor]:
        """Blocks 0..k-1 on ``rows`` only (trimmed to their own width); their real tokens' states."""
        sel = torch.tensor(rows, device=batch.input_ids.device)
        mask = batch.attention_mask[sel]
        cols = mask.bool().any(0)
        sub = Batch(batch.input_ids[sel][:, cols], mask[:, cols], batch.position_ids[sel][:, cols])
        captured = []

        def stop(module, args, kwargs):
            captured.append(_hidden_arg(args, kwargs))
            raise _PrefixDone

        handle = self.blocks[0].register_forward_pre_hook(stop, with_kwargs=True, prepend=True)
        try:
            hidden_states(self.model, sub)
        except _PrefixDone:
            pass
        finally:
            handle.remove()
        if not captured or not isinstance(captured[0], torch.Tensor):
            raise UserError(f"--cache-prefix: {type(self.model).__name__} did not call its first adapted block with "
                            "a hidden-state tensor; run without --cache-prefix")
        h = captured[0]
        real = sub.attention_mask.bool().to(h.device)
        return [h[i][real[i]] for i in range(len(rows))]  # boolean indexing copies: no view of h is kept

    @staticmethod
    def _rebuild(batch: Batch, states: list[torch.Tensor]) -> torch.Tensor:
        """The padded N x T x d input of block k: each row's real tokens in place, zeros elsewhere."""
        real = batch.attention_mask.bool()
        hidden = states[0].new_zeros(*real.shape, states[0].shape[-1])
        hidden[real.to(hidden.device)] = torch.cat(states)  # row-major order: row 0's tokens, then row 1's, ...
        return hidden
