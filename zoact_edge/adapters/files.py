"""Saving and loading adapters: PEFT LoRA format for users, and full checkpoints for resume.

ZO-Act's update ``delta W = B P^T`` is exactly a LoRA pair with lora_A = P^T (r x d_in),
lora_B = B (d_out x r) and scaling 1 (lora_alpha = r). Writing it in PEFT's own format means
``PeftModel.from_pretrained(base, dir)`` loads it, ``merge_and_unload`` merges it, and any tool
that reads LoRA adapters can serve it.

Checkpoints keep what resume needs and nothing derivable: the bases (each shared basis once),
the coefficients, the optimizer state (tensors in safetensors, the rest as JSON: never a pickle)
and the step. Every write is atomic (see ``paths``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import UserError
from ..paths import atomic_dir, atomic_save_file, atomic_write
from .layer import ZOActLinear
from .targets import is_conv1d

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
CHECKPOINT = "checkpoint"
TENSOR_FILES = ("bases.safetensors", "coefficients.safetensors", "optimizer.safetensors")


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """Atomic safetensors write; its I/O failures (disk full, ...) surface as OSError, like any other write."""
    try:
        atomic_save_file(lambda p: save_file(tensors, p, metadata=metadata), path)
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


def non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first tensor holding NaN/inf, if any."""
    return next((k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)


def _refuse_non_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    bad = non_finite(tensors)
    if bad is not None:
        raise UserError(f"{bad} holds NaN/inf values: refusing to save {what}; lower --lr or --eps")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- PEFT LoRA


def peft_config(layers: dict[str, ZOActLinear], base_model: str, fan_in_fan_out: bool, rank: int | None = None) -> dict:
    rank = rank or next(iter(layers.values())).B.shape[1]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": rank,  # scaling = alpha / r = 1: the adapter adds exactly B P^T
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "target_modules": sorted(layers),  # full module names: no accidental extra matches
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_peft(out_dir: Path, layers: dict[str, ZOActLinear], base_model: str,
              folded: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] | None = None) -> None:
    """Write the adapters as one PEFT LoRA. ``folded`` holds earlier (P, B) pairs already merged
    into the in-memory weights (``--method subspace --resample-every``): they are stacked with the
    current pair, so the saved LoRA (rank r x pairs) is the whole update to the original weights."""
    fan_in_fan_out = any(is_conv1d(m.base) for m in layers.values())
    tensors, rank = {}, None
    for name, layer in layers.items():
        pairs = [*(folded or {}).get(name, []), (layer.P, layer.B.detach())]
        A = torch.cat([P.T.float().cpu() for P, _ in pairs], 0)
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.cat(
            [B.float().cpu() for _, B in pairs], 1
        ).contiguous()
        rank = A.shape[0]
    _refuse_non_finite(tensors, "the adapter")
    _save_tensors(tensors, out_dir / PEFT_WEIGHTS, {"format": "pt"})
    with atomic_write(out_dir / PEFT_CONFIG) as f:
        json.dump(peft_config(layers, base_model, fan_in_fan_out, rank), f, indent=2)


def load_peft(adapter_dir: Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Return (adapter_config, {module name: (P, B)}) from a PEFT LoRA folder."""
    adapter_dir = Path(adapter_dir)
    cfg_path, w_path = adapter_dir / PEFT_CONFIG, adapter_dir / PEFT_WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        raise UserError(f"{adapter_dir} is not an adapter folder (needs {PEFT_CONFIG} and {PEFT_WEIGHTS})")
    try:
        cfg = json.loads(cfg_path.read_text())
        tensors = load_file(str(w_path))
    except (json.JSONDecodeError, SafetensorError, OSError, ValueError) as e:
        raise UserError(f"corrupt adapter in {adapter_dir}: {type(e).__name__}: {str(e)[:200]}") from None
    scaling = cfg.get("lora_alpha", 0) / max(cfg.get("r", 1), 1)
    if cfg.get("peft_type") != "LORA" or cfg.get("use_rslora") or cfg.get("use_dora"):
        raise UserError(f"{adapter_dir}: only plain LoRA adapters are supported")
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    prefix = "base_model.model."
    for key, A in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[len(prefix): -len(".lora_A.weight")]
        B = tensors.get(f"{prefix}{name}.lora_B.weight")
        if B is None or A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise UserError(f"corrupt adapter in {adapter_dir}: bad or missing lora_B for {name}")
        pairs[name] = (A.T.contiguous(), (B * scaling).contiguous())
    if not pairs:
        raise UserError(f"corrupt adapter in {adapter_dir}: no LoRA tensors")
    return cfg, pairs


# --------------------------------------------------------------------------- checkpoints


def _optimizer_to_files(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, state_meta = {}, {}
    for pid, st in sd["state"].items():
        meta = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
                meta[k] = "tensor"
            else:
                meta[k] = v
        state_meta[str(pid)] = meta
    return tensors, {"state": state_meta, "param_groups": sd["param_groups"]}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {}
    for pid, entries in meta["state"].items():
        state[int(pid)] = {k: tensors[f"{pid}.{k}"] if v == "tensor" else v for k, v in entries.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir: Path, layers: dict[str, ZOActLinear], optimizer, state: dict) -> None:
    """Write ``run_dir/checkpoint`` atomically: bases, coefficients, optimizer, JSON state."""
    bases: dict[str, torch.Tensor] = {}
    basis_of: dict[str, str] = {}
    by_ptr: dict[int, str] = {}
    coeffs = {}
    for name, layer in layers.items():
        key = by_ptr.setdefault(layer.P.data_ptr(), name)  # shared bases are stored once
        basis_of[name] = key
        bases[key] = layer.P.detach().cpu().contiguous()
        coeffs[name] = layer.B.detach().cpu().contiguous()
    opt_tensors, opt_meta = _optimizer_to_files(optimizer)
    _refuse_non_finite({**coeffs, **opt_tensors}, f"the checkpoint of step {state['step']}")
    try:
        with atomic_dir(run_dir / CHECKPOINT) as tmp:
            for name, tensors in zip(TENSOR_FILES, (bases, coeffs, opt_tensors)):
                _save_tensors(tensors, tmp / name)
            sums = {name: _sha256(tmp / name) for name in TENSOR_FILES}  # what resume checks the files against
            with atomic_write(tmp / "state.json") as f:
                json.dump({**state, "basis_of": basis_of, "optimizer": opt_meta, "sha256": sums}, f, indent=1)
    except OSError as e:  # named by the checkpoint it was writing, not by a temp file that is gone
        raise OSError(e.errno, e.strerror, str(run_dir / CHECKPOINT)) from None


def find_checkpoint(run_dir: Path) -> Path | None:
    run_dir = Path(run_dir)
    for cand in (run_dir / CHECKPOINT, run_dir / f".{CHECKPOINT}.old"):  # .old: killed mid-swap
        if (cand / "state.json").is_file():
            return cand
    return None


def load_checkpoint(run_dir: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """Return (state, {name: P}, {name: B}, optimizer state_dict). Shared bases stay shared."""
    ckpt = find_checkpoint(run_dir)
    if ckpt is None:
        raise UserError(f"no checkpoint to resume in {run_dir}")
    try:
        state = json.loads((ckpt / "state.json").read_text())
        for name, expected in state.pop("sha256", {}).items():  # checkpoints of older versions have none
            if _sha256(ckpt / name) != expected:
                raise ValueError(f"{name} changed after it was saved (checksum mismatch)")
        bases, coeffs, opt_tensors = (load_file(str(ckpt / name)) for name in TENSOR_FILES)
        bad = non_finite({**bases, **coeffs, **opt_tensors})
        if bad is not None:
            raise ValueError(f"{bad} holds NaN/inf values")
        P = {name: bases[key] for name, key in state.pop("basis_of").items()}
        opt = _optimizer_from_files(opt_tensors, state.pop("optimizer"))
        int(state["step"])
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        why = str(e) if type(e) is ValueError else f"{type(e).__name__}: {e}"
        raise UserError(f"corrupt checkpoint in {ckpt}: {why[:200]}; it cannot be resumed") from None
    return state, P, coeffs, opt
