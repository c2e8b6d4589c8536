"""Which training examples a run reads: the step's batch from a stateless, seeded stream of epochs,
and seeded samples of the training split (calibration passes), collated into batches."""

from __future__ import annotations

import functools

import torch

from ..seeds import derive_seed


@functools.lru_cache(maxsize=2)
def _epoch_order(seed: int, n: int, epoch: int) -> tuple[int, ...]:
    gen = torch.Generator().manual_seed(derive_seed(seed, 0xDA7A, epoch))
    return tuple(torch.randperm(n, generator=gen).tolist())


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Examples for ``step``: epochs of seeded permutations, read as one long stream."""
    positions = range(step * batch_size, (step + 1) * batch_size)
    return [_epoch_order(seed, n, pos // n)[pos % n] for pos in positions]


def sample_indices(n: int, count: int, seed: int, tag: int) -> list[int]:
    """``count`` (at most ``n``) distinct indices below ``n``, drawn from the seeded stream ``tag``."""
    gen = torch.Generator().manual_seed(derive_seed(seed, tag))
    return torch.randperm(n, generator=gen)[:count].tolist()


def collated(task, examples: list, batch_size: int, device) -> list:
    """``examples`` in order, as batches of ``batch_size`` on ``device``."""
    return [task.collate(examples[s:s + batch_size]).to(device) for s in range(0, len(examples), batch_size)]
