"""The methods ZO-Act is compared against, one training step each: MeZO, LoRA + Adam, full Adam.

They exist so that the memory profiler measures every method in the same harness, on the same
model, batch and loss, and so that a later ``tune --method`` can reuse the same steps.

* :func:`mezo_step` is MeZO (Malladi et al., 2023): a two-point zeroth-order SGD step on the
  full frozen weights of the targeted linears. Perturbations are written into the weights in
  place and ``z`` is regenerated from a seed every time it is needed, so the only extra memory
  is one weight-sized noise tensor at a time. Quantized (4/8-bit) weights cannot be perturbed
  this way, so it refuses them.
* :func:`add_lora` / :func:`backprop_step` are first-order baselines: a peft LoRA adapter of the
  same rank trained by backprop with Adam (QLoRA on a 4-bit base), or every weight trained
  with Adam (full fine-tuning).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ..adapters.layer import noise_like
from ..adapters.targets import is_quantized
from ..errors import UserError
from ..seeds import derive_seed

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class MezoResult:
    loss_plus: float
    loss_minus: float
    projected: float  # (L+ - L-) / (2 eps)
    finite: bool


def mezo_params(model: nn.Module, names: Sequence[str]) -> list[torch.Tensor]:
    """The weight tensors of the named linears; refuses quantized layers (cannot be perturbed)."""
    params = []
    for name in names:
        w = model.get_submodule(name).weight
        if w.dtype not in FLOAT_DTYPES or is_quantized(w):
            raise UserError(f"MeZO needs 16/32-bit weights; {name} is quantized ({type(w).__name__}, {w.dtype})")
        params.append(w)
    return params


@torch.no_grad()
def _perturb(params: Sequence[torch.Tensor], seed: int, scale: float) -> None:
    for i, p in enumerate(params):
        p.add_(noise_like(p, derive_seed(seed, i)), alpha=scale)


@torch.no_grad()
def mezo_step(params: Sequence[torch.Tensor], loss_fn: Callable[[], float], seed: int, eps: float,
              lr: float, momentum: float = 0.0, buffers: list[torch.Tensor] | None = None,
              weight_decay: float = 0.0) -> MezoResult:
    """theta += eps z; L+; theta -= 2 eps z; L-; theta += eps z; theta -= lr * g * z.

    The restore is exact only up to floating-point rounding (as in MeZO); a non-finite loss
    restores the weights and skips the update. ``momentum`` > 0 (MeZO's optional ZO-SGD with
    momentum) keeps one weight-sized buffer per tensor in ``buffers`` (created on first use);
    it is off by default because it doubles the memory MeZO exists to save.
    """
    offset = 0.0  # how far the weights currently sit from theta, in units of z
    try:
        _perturb(params, seed, +eps)
        offset = eps
        plus = float(loss_fn())
        _perturb(params, seed, -2.0 * eps)
        offset = -eps
        minus = float(loss_fn())
    finally:
        _perturb(params, seed, -offset)  # back to theta, also when a forward raised
    finite = math.isfinite(plus) and math.isfinite(minus)
    projected = (plus - minus) / (2.0 * eps) if finite else float("nan")
    if finite and momentum == 0.0 and weight_decay == 0.0:
        _perturb(params, seed, -lr * projected)  # plain ZO-SGD: no tensor besides z
    elif finite:
        if buffers is not None and not buffers:
            buffers.extend(torch.zeros_like(p) for p in params)
        for i, p in enumerate(params):
            g = noise_like(p, derive_seed(seed, i)).mul_(projected)
            if weight_decay:
                g.add_(p, alpha=weight_decay)
            if momentum:
                g = buffers[i].mul_(momentum).add_(g)
            p.add_(g, alpha=-lr)
    return MezoResult(plus, minus, projected, finite)


def add_lora_model(model: nn.Module, names: Sequence[str], rank: int, alpha: float | None = None):
    """Like :func:`add_lora`, but return the ``PeftModel`` wrapper (for ``save_pretrained``)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=0.0, bias="none",
                     target_modules=list(names))
    peft_model = get_peft_model(model, cfg)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)
    return peft_model


def add_lora(model: nn.Module, names: Sequence[str], rank: int, alpha: float | None = None) -> list[nn.Parameter]:
    """Inject a peft LoRA adapter (rank ``rank``, no dropout) into the named linears, in place.

    The HF model object keeps working as before (peft swaps the layers inside it), so task losses
    that call ``model.base_model`` still apply. On a bitsandbytes 4-bit base this is QLoRA.
    Returns the trainable LoRA parameters.
    """
    add_lora_model(model, names, rank, alpha)
    return [p for n, p in model.named_parameters() if "lora_" in n]


def full_params(model: nn.Module) -> list[nn.Parameter]:
    """Every weight, made trainable (full fine-tuning); refuses quantized models."""
    params = list(model.parameters())
    quantized = [p for p in params if p.dtype not in FLOAT_DTYPES]
    if quantized:
        raise UserError("full fine-tuning needs 16/32-bit weights; this model is quantized")
    for p in params:
        p.requires_grad_(True)
    return params


def backprop_step(loss_fn: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer,
                  on_grads: Callable[[], None] | None = None) -> float:
    """One first-order step: forward with autograd, backward, optimizer step.

    ``on_grads`` runs while the gradients are alive (the profiler reads their size there).
    """
    with torch.enable_grad():
        loss = loss_fn()
        loss.backward()
    if on_grads is not None:
        on_grads()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())
