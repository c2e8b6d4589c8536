"""Which linear layers get a ZO-Act adapter, and wrapping / unwrapping them.

Default: every linear inside the repeated decoder blocks (attention and MLP: Llama q/k/v/o and
gate/up/down, GPT-2 c_attn/c_proj/c_fc, OPT q/k/v/out_proj and fc1/fc2), never the LM head or
embeddings. ``--targets`` narrows by name pattern, ``--layers`` by block range.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..config import parse_layers
from ..errors import UserError
from .layer import ZOActLinear

BLOCK_INDEX = re.compile(r"\.(\d+)\.")  # "model.layers.12.mlp" -> 12: the repeated-block index


QUANTIZED_LAYERS = ("Linear4bit", "Linear8bitLt")  # bitsandbytes' layers (subclasses of nn.Linear)
QUANTIZED_WEIGHTS = ("Params4bit", "Int8Params")  # and their weights


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D: a linear layer whose weight is stored transposed, (d_in, d_out)."""
    return type(module).__name__ == "Conv1D"


def is_quantized(weight: torch.Tensor) -> bool:
    """A bitsandbytes 4/8-bit weight (or any non-float one): it cannot be perturbed or updated in place."""
    return not weight.dtype.is_floating_point or type(weight).__name__ in QUANTIZED_WEIGHTS


def is_4bit(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit layer (its weight packed, dequantized at every forward)."""
    return type(module.weight).__name__ == "Params4bit"


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight as the layer computes with it, (d_out, d_in) in fp32: a bitsandbytes 4-bit weight
    dequantized by bitsandbytes itself, GPT-2's Conv1D transposed. (LLM.int8 weights are not read.)"""
    w = module.weight
    if is_4bit(module):
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(w.data, w.quant_state).float()
    if is_quantized(w):
        raise UserError(f"cannot read {type(module).__name__} weights as a dense matrix")
    return (w.T if is_conv1d(module) else w).detach().float()


def is_linear_like(module: nn.Module) -> bool:
    # bitsandbytes Linear4bit / Linear8bitLt subclass nn.Linear; GPT-2's Conv1D does not.
    return isinstance(module, nn.Linear) or is_conv1d(module)


def dims(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a linear-like module, quantized or not."""
    if is_conv1d(module):  # weight is stored transposed: (d_in, d_out)
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


@dataclass(frozen=True)
class Target:
    name: str
    block: int
    d_in: int
    d_out: int


def find_targets(model: nn.Module, patterns: str | None = None, layers: str | None = None) -> list[Target]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    pats = [p.strip() for p in patterns.split(",") if p.strip()] if patterns else None
    block_range = parse_layers(layers)
    found, n_blocks = [], 0
    for name, module in model.named_modules():
        if not is_linear_like(module) or module is head or isinstance(module, ZOActLinear):
            continue
        m = BLOCK_INDEX.search(name)
        if m is None:  # outside the repeated blocks (e.g. OPT's project_in/out)
            continue
        block = int(m.group(1))
        n_blocks = max(n_blocks, block + 1)
        if block_range and not (block_range[0] <= block <= block_range[1]):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if pats and not any(fnmatch.fnmatchcase(leaf, p) or fnmatch.fnmatchcase(name, p) for p in pats):
            continue
        found.append(Target(name, block, *dims(module)))
    if block_range and block_range[1] >= n_blocks:
        raise UserError(f"--layers {layers}: the model has blocks 0-{n_blocks - 1}")
    if not found:
        raise UserError(f"no linear layers match --targets {patterns!r} --layers {layers!r}")
    return found


def check_rank(targets: list[Target], rank: int) -> None:
    if rank < 1:
        raise UserError(f"--rank must be at least 1, got {rank}")
    too_small = [t for t in targets if rank > t.d_in]
    if too_small:
        t = too_small[0]
        raise UserError(f"--rank {rank} is larger than the input width {t.d_in} of {t.name}; use --rank <= {t.d_in}")


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, leaf = name.rpartition(".")
    return model.get_submodule(parent_name) if parent_name else model, leaf


def wrap(model: nn.Module, name: str, P, B, shared=None) -> ZOActLinear:
    parent, leaf = _parent(model, name)
    layer = ZOActLinear(getattr(parent, leaf), P, B, shared)
    setattr(parent, leaf, layer)
    return layer


def unwrap_all(model: nn.Module) -> None:
    """Put the original modules back (used by tests and by eval of the base model)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, ZOActLinear):
            parent, leaf = _parent(model, name)
            setattr(parent, leaf, module.base)


def adapters(model: nn.Module) -> dict[str, ZOActLinear]:
    """Adapters keyed by the *original* module name (what PEFT and checkpoints call them)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ZOActLinear)}
