"""Data-parallel ZO-Act under ``torchrun``: each rank its own micro-batches, one shared direction.

Every rank derives the step's direction from the same seed, evaluates the perturbed losses on
its share of the step's examples, and the ranks sum one tiny fp64 vector: (loss sum, example
count) for each of the 2 x queries perturbations. No parameter, gradient or activation ever
crosses the wire during training, so the traffic per step is 32 x queries bytes whatever the
model size, and every rank takes the identical optimizer step and ends with identical
coefficients.

Once at start-up rank 0 broadcasts the bases and coefficients, so that ranks whose basis
computations round differently (different GPUs, nondeterministic kernels) still start from the
exact same adapter.

Backends: gloo on CPU, NCCL on CUDA (one GPU per rank, ``LOCAL_RANK`` selects it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

import torch

from ..errors import UserError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only the main rank writes files (metrics, checkpoints, the adapter, the summary)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def payload_bytes(queries: int) -> int:
    """Bytes each rank contributes to the one all-reduce of a step: 2 x queries (sum, count) fp64 pairs."""
    return 2 * queries * 2 * 8


def init_from_env(device: str) -> Ranks:
    """Join the process group that ``torchrun`` describes in the environment (a no-op without one).

    ``device`` is the ``--device`` option; CUDA ranks are pinned to ``cuda:LOCAL_RANK`` before the
    model loads so that each rank's model lands on its own GPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices are visible")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Ranks(rank, world, local)


def shutdown(ranks: Ranks) -> None:
    if ranks.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def loss_reducer(ranks: Ranks, device: torch.device):
    """The ``all_reduce`` for :func:`zoact_edge.zo.estimator.estimate_batches`: a sum over ranks, or None."""
    if not ranks.active:
        return None
    import torch.distributed as dist

    def all_reduce(values: torch.Tensor) -> torch.Tensor:
        buf = values.to(device=device, dtype=torch.float64)  # NCCL reduces device tensors only
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.cpu()

    return all_reduce


@torch.no_grad()
def broadcast_adapters(ranks: Ranks, layers: Iterable) -> None:
    """Start every rank from rank 0's bases and coefficients (once, before the first step)."""
    if not ranks.active:
        return
    import torch.distributed as dist

    seen = set()
    for layer in layers:
        if id(layer.P) not in seen:  # a shared basis is one tensor: send it once
            seen.add(id(layer.P))
            dist.broadcast(layer.P, src=0)
        dist.broadcast(layer.B.data, src=0)
