"""What each adapted linear becomes in an exported graph: frozen weights and the ZO-Act path apart.

A tuned linear computes ``y = W x + B (P^T x)``. The exporter traces stand-in modules
(:class:`ExportLinear`) that compute ``x @ W^T (+ bias) + (x @ P) @ B^T`` with W^T, P and B^T as
named float constants, so the graph keeps the adapter path in float next to the frozen weights.
Each frozen weight also has a *form* (:class:`FrozenWeight`): ``float`` (kept as traced),
``nf4`` / ``fp4`` (the run's own bitsandbytes 4-bit data, written into a ``MatMulBnb4`` node by
:mod:`zoact_edge.onnx.forms`) or ``int4`` (re-quantized to ``MatMulNBits`` there). For the 4-bit
forms the traced W^T is bitsandbytes' own dequantization, so the float graph and the rewritten one
compute the same function.

LLM.int8 (``--bits 8``) layers are refused: bitsandbytes quantizes every input row to int8 at run
time and sends outlier input columns (|x| >= its threshold, 6 by default) through the dequantized
weights, decided per batch; exporting the int8 weights behind a float input would be a different
model from the one that was tuned.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..adapters import targets as tgt
from ..errors import UserError

FROZEN = "frozen_t"  # buffer names: the exported initializers are found by them
BASIS = "basis"
COEFF = "coeff_t"
INT8_REFUSAL = ("export of --bits 8 runs is refused: LLM.int8 quantizes each input row at run time and routes "
                "outlier input columns (|x| >= 6) through float weights, which an int8-weight ONNX graph does not "
                "reproduce; tune with --bits 4 or 32 to export")


@dataclass
class FrozenWeight:
    """One frozen linear weight as it goes into the graph."""

    form: str  # float | nf4 | fp4 (int4 is decided when the graph is rewritten)
    weight_t: torch.Tensor  # (d_in, d_out) float32: what the graph is traced with
    packed: np.ndarray | None = None  # nf4/fp4: bitsandbytes' packed 4-bit pairs, (d_out * d_in + 1) // 2 bytes
    absmax: np.ndarray | None = None  # nf4/fp4: one float32 scale per block (de-nested)
    block_size: int | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight_t.shape)  # (K, N) = (d_in, d_out)


class ExportLinear(nn.Module):
    """``x @ W^T (+ bias) + (x @ P) @ B^T``: the traced stand-in for one (adapted) linear."""

    def __init__(self, weight_t: torch.Tensor, bias: torch.Tensor | None, basis: torch.Tensor | None = None,
                 coeff_t: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer(FROZEN, weight_t)
        self.register_buffer("bias", bias)
        self.register_buffer(BASIS, basis)
        self.register_buffer(COEFF, coeff_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.frozen_t
        if self.bias is not None:
            y = y + self.bias
        if self.basis is not None:
            y = y + (x @ self.basis) @ self.coeff_t
        return y


def _bnb_4bit(module) -> FrozenWeight:
    """The packed data and per-block absmax of a bitsandbytes ``Linear4bit``, de-nested."""
    import bitsandbytes.functional as bnbf

    weight = module.weight
    qs = weight.quant_state
    if getattr(weight, "packing_format_for_cpu", False):
        raise UserError("this 4-bit model was repacked for bitsandbytes' AVX512 kernel; reload it to export")
    absmax = qs.absmax
    if qs.nested:  # double quantization: the absmax are themselves 8-bit blockwise with an offset
        absmax = bnbf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    return FrozenWeight(form=qs.quant_type, weight_t=tgt.dense_weight(module).T.contiguous(),
                        packed=weight.data.view(torch.uint8).reshape(-1).cpu().numpy().copy(),
                        absmax=absmax.float().reshape(-1).cpu().numpy().copy(), block_size=int(qs.blocksize))


def frozen_weight(module: nn.Module) -> FrozenWeight:
    """The frozen weight of a linear-like module (nn.Linear, GPT-2 Conv1D, bitsandbytes 4-bit)."""
    kind = type(module).__name__
    if kind == "Linear8bitLt":
        raise UserError(INT8_REFUSAL)
    if kind == "Linear4bit":
        return _bnb_4bit(module)
    if not tgt.is_linear_like(module):
        raise UserError(f"cannot export {kind} layers")
    return FrozenWeight(form="float", weight_t=tgt.dense_weight(module).T.contiguous())


def _bias(module: nn.Module) -> torch.Tensor | None:
    b = getattr(module, "bias", None)
    return None if b is None else b.detach().float().clone()


def stand_ins(
    model: nn.Module, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], merge: bool = False
) -> tuple[dict[str, ExportLinear], dict[str, FrozenWeight]]:
    """An :class:`ExportLinear` for every linear in the decoder blocks (and every quantized one), and
    its frozen weight.

    ``model`` is the run's model without adapters (fp32 or bitsandbytes); ``pairs`` the adapter
    ``{name: (P, B)}``. With ``merge``, ``B P^T`` is added to the (float) weights and no adapter
    path is traced. Equal bases (q/k/v and gate/up share one) become one tensor, so the graph holds
    them once.
    """
    linears = {t.name: model.get_submodule(t.name) for t in tgt.find_targets(model)}
    # quantized linears outside the blocks too (e.g. OPT's project_in/out): the exporter cannot trace them
    linears.update({n: m for n, m in model.named_modules() if type(m).__name__ in tgt.QUANTIZED_LAYERS})
    missing = sorted(set(pairs) - set(linears))
    if missing:
        raise UserError(f"the adapter does not fit this model: no decoder linear {missing[0]}")
    bases: list[torch.Tensor] = []
    modules, weights = {}, {}
    for name, module in linears.items():
        fw = frozen_weight(module)
        basis = coeff_t = None
        if name in pairs:
            P, B = (t.detach().float() for t in pairs[name])
            if (P.shape[0], B.shape[0]) != fw.shape:
                raise UserError(f"the adapter does not fit this model: {name} is {fw.shape[0]}->{fw.shape[1]}")
            if merge:
                if fw.form != "float":
                    raise UserError(f"cannot merge into {name}: its weights are {fw.form}")
                fw.weight_t = (fw.weight_t.double() + P.double() @ B.double().T).float()
            else:
                basis = next((b for b in bases if b.shape == P.shape and torch.equal(b, P)), None)
                if basis is None:
                    basis = P.contiguous()
                    bases.append(basis)
                coeff_t = B.T.contiguous()
        modules[name] = ExportLinear(fw.weight_t, _bias(module), basis, coeff_t)
        weights[name] = fw
    return modules, weights


@contextlib.contextmanager
def swapped(model: nn.Module, replacements: dict[str, nn.Module]):
    """Put ``replacements`` in place of the named submodules for the duration of the block."""
    saved = {}
    try:
        for name, module in replacements.items():
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            saved[name] = (parent, leaf, getattr(parent, leaf))
            setattr(parent, leaf, module)
        yield model
    finally:
        for parent, leaf, original in saved.values():
            setattr(parent, leaf, original)
