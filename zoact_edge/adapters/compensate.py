"""Starting a 4-bit model's adapters where the float model is (``--compensate``, on by default with ``--bits 4``).

``--bits 4`` rounds each frozen weight W to W_q: on the default model the zero-shot loss rises from
1.23 to 1.38. Inside an adapter's subspace that error can be undone exactly. With

    B0 = (W - W_q) P        the layer computes   W_q x + (W - W_q) P P^T x,

which is W x for every input in span(P), the span that holds most of the calibration activations'
energy. Tuning then starts from the float model's outputs on those inputs instead of the rounded
model's, and the trained B carries the correction with it. The adapter belongs to the 4-bit base it
was trained on (as a QLoRA adapter does); merged into the float weights it would correct twice.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from ..errors import UserError
from ..models import float_tensors
from .layer import ZOActLinear
from .targets import dense_weight, is_4bit

log = logging.getLogger(__name__)


def _oriented(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``w`` as ``like``'s (d_out, d_in): a Conv1D checkpoint stores it transposed. A square weight
    takes the orientation nearer ``like`` (the right one is off by the rounding, ~10%; the wrong one
    by about its whole norm)."""
    if w.shape != like.shape:
        return w.T
    if w.T.shape == like.shape and (w.T - like).norm() < (w - like).norm():
        return w.T
    return w


def _checkpoint_weight(read: Callable[[str], torch.Tensor | None], name: str) -> torch.Tensor | None:
    """The module's weight by its name, or by the name without leading parts (a checkpoint saved
    from the inner model: ``model.layers.0...`` may be stored as ``layers.0...``), never cut past the
    block index (which would name another block's layer)."""
    parts = name.split(".")
    block = next((i for i, p in enumerate(parts) if p.isdigit()), len(parts) - 1)
    for k in range(block + 1):
        w = read(".".join(parts[k:] + ["weight"]))
        if w is not None:
            return w
    return None


@torch.no_grad()
def compensate_rounding(layers: dict[str, ZOActLinear], read: Callable[[str], torch.Tensor | None],
                        strict: bool = True) -> tuple[int, list[str]]:
    """B += (W - W_q) P for every adapter on a bitsandbytes 4-bit layer, W read by ``read``
    (:func:`zoact_edge.models.float_tensors`). Returns how many layers were compensated and the
    names of the 4-bit layers that were not because the checkpoint has no float weight of their
    shape (a checkpoint saved already quantized); ``strict`` (an explicit ``--compensate``) refuses those."""
    count, missing = 0, []
    for name, layer in layers.items():
        if not is_4bit(layer.base):
            continue
        q = dense_weight(layer.base)
        w = _checkpoint_weight(read, name)
        if w is not None:
            w = _oriented(w.to(device=q.device, dtype=torch.float32), q)
        if w is None or w.shape != q.shape:
            if strict:
                found = "no float weight" if w is None else f"a {tuple(w.shape)} weight"
                raise UserError(f"--compensate: the model's checkpoint has {found} for {name} "
                                f"{tuple(q.shape)}; pass --no-compensate")
            missing.append(name)
            continue
        layer.B.add_(((w - q) @ layer.P.float()).to(layer.B.dtype))
        count += 1
    return count, missing


def compensate_from(layers: dict[str, ZOActLinear], source: str, strict: bool) -> int:
    """:func:`compensate_rounding` with W read from ``source``'s own safetensors (the folder or cached hub id the
    model was loaded from); returns how many layers were compensated. Not ``strict`` (the default, no explicit
    --compensate): a model whose float weights cannot be read, or a layer the checkpoint lacks, stays as rounded,
    with a warning."""
    try:
        read = float_tensors(source)
    except UserError as e:
        if strict:
            raise
        log.warning("tuning the 4-bit model as rounded (no compensation): %s", e)
        return 0
    count, missing = compensate_rounding(layers, read, strict)
    if missing:
        log.warning("%d of %d 4-bit layers keep their rounding error: the checkpoint has no float weight of their "
                    "shape (e.g. %s)", len(missing), count + len(missing), missing[0])
    return count
