"""One method of ``zoact-edge profile`` in this process: ``python -m zoact_edge.profiling.methods SPEC METHOD OUT``.

Load the model, build one batch of exactly ``batch x seq`` tokens, warm up, reset the peak, run the
method (inference, zoact, mezo, fo-lora, fo-full) and write its measurements and tensor sizes.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings

import torch
import transformers

from ..adapters import targets as tgt
from ..adapters.build import build_adapters
from ..config import ProfileSpec
from ..data.datasets import ClassificationExample, TextExample, load_rotten_tomatoes
from ..data.tasks import RT_TEMPLATE, RT_WORDS, ClassificationTask, LMTask
from ..errors import UserError
from ..memory import release_free_memory
from ..models import load_model
from ..paths import atomic_write
from ..zo.baselines import add_lora, backprop_step, full_params, mezo_params, mezo_step
from ..zo.engine import TorchEngine
from ..zo.estimator import derive_seed, fused_by_default
from .meter import Meter


def make_inputs(spec: ProfileSpec, tokenizer):
    """The task and one batch of exactly ``batch x seq`` real tokens (no padding), seeded.

    Rotten Tomatoes sentences are joined until each row is longer than ``seq`` and then cut
    (classification keeps the end, where the prompt asks for the label), so every method sees the
    same shapes and the same text.
    """
    train = load_rotten_tomatoes().train
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(spec.seed)).tolist()
    pos, examples = 0, []
    for _ in range(spec.batch):
        parts = []
        while True:
            ex = train[order[pos % len(order)]]
            pos += 1
            parts.append(ex.text)
            text = " ".join(parts)
            if len(tokenizer(text, add_special_tokens=False).input_ids) > spec.seq + 8 or len(parts) > 4 * spec.seq:
                break
        examples.append(ClassificationExample(text, ex.label) if spec.task == "classification" else TextExample(text))
    if spec.task == "classification":
        task = ClassificationTask(tokenizer, RT_TEMPLATE, list(RT_WORDS), spec.seq)
    else:
        task = LMTask(tokenizer, spec.seq)
    batch = task.collate(examples)
    if tuple(batch.input_ids.shape) != (spec.batch, spec.seq) or int(batch.attention_mask.min()) != 1:
        raise UserError(f"could not build a {spec.batch}x{spec.seq} batch without padding (the tokenizer is too "
                        f"coarse)")
    return task, batch


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (shared and tied tensors count once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        s = t.untyped_storage()
        if s.data_ptr() in seen:
            continue
        seen.add(s.data_ptr())
        total += s.nbytes()
    return total


def model_weight_tensors(model):
    """Frozen tensors of the base model, bitsandbytes quantization state included; no adapters."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "lora_" in name or name.endswith((".B", ".P")):
            continue
        yield t
        qs = getattr(t, "quant_state", None)
        if qs is not None:
            yield from (x for x in (qs.absmax, qs.code) if x is not None)
            if getattr(qs, "state2", None) is not None:
                yield from (x for x in (qs.state2.absmax, qs.state2.code) if x is not None)
        scb = getattr(t, "SCB", None)
        if scb is not None:
            yield scb


def optimizer_state_tensors(optimizer):
    """Per-parameter state tensors (Adam: exp_avg, exp_avg_sq); 0-d step counters are left out."""
    for state in optimizer.state.values():
        for v in state.values():
            if hasattr(v, "untyped_storage") and v.dim() > 0:
                yield v

def _loss_fn(task, model, batch):
    def loss():
        with torch.inference_mode():
            return float(task.loss(model, batch))

    return loss


def _run_method(spec: ProfileSpec, method: str) -> dict:
    """Load, warm up, reset the peak, run ``method``; return measurements and tensor sizes."""
    torch.manual_seed(spec.seed)
    t0 = time.time()
    loaded = load_model(spec.model, spec.bits, spec.quant_type, spec.device)
    model, device = loaded.model, loaded.device
    task, batch = make_inputs(spec, loaded.tokenizer)
    batch = batch.to(device)
    if method.startswith("fo-"):
        # Backprop runs in training mode. It must be set before any forward: in eval mode the first
        # inference call repacks bitsandbytes 4-bit weights (AVX512-BF16 CPUs) into an
        # inference-only layout that autograd cannot go through. (LoRA dropout is 0; the model's
        # own dropout, if it has any, is part of real training.)
        model.train()
    with torch.inference_mode():  # tiny warm-up: bitsandbytes repacks 4-bit weights on first use
        model(input_ids=batch.input_ids[:1, :8])
    found = tgt.find_targets(model, spec.targets, spec.layers)
    tgt.check_rank(found, spec.rank)
    weights = storage_bytes(model_weight_tensors(model))
    meter = Meter(device)
    meter.start()
    t1 = time.time()
    sizes = {"weights": weights, "adapters": 0, "optimizer_state": 0, "gradients": 0}
    info: dict = {}
    if method == "prepare":  # load_model above has quantized and cached the model: nothing to measure
        pass
    elif method == "inference":
        with torch.inference_mode():
            info["loss"] = float(task.loss(model, batch))
    elif method == "zoact":
        info.update(_zoact(spec, model, task, batch, found, device, sizes, meter))
    elif method == "mezo":

        params = mezo_params(model, [t.name for t in found])
        loss = _loss_fn(task, model, batch)
        for s in range(spec.steps):
            res = mezo_step(params, loss, derive_seed(spec.seed, s), spec.eps, spec.lr)
        info["loss"] = (res.loss_plus + res.loss_minus) / 2
        info["trainable_params"] = sum(p.numel() for p in params)
    elif method in ("fo-lora", "fo-full"):

        if method == "fo-lora":
            params = add_lora(model, [t.name for t in found], spec.rank)
            sizes["adapters"] = storage_bytes(params)
        else:
            params = full_params(model)
        opt = torch.optim.Adam(params, lr=spec.lr)

        def on_grads():
            sizes["gradients"] = storage_bytes(p.grad for p in params)

        for _ in range(spec.steps):
            info["loss"] = backprop_step(lambda: task.loss(model, batch), opt, on_grads)
        sizes["optimizer_state"] = storage_bytes(optimizer_state_tensors(opt))
        info["trainable_params"] = sum(p.numel() for p in params)
    else:
        raise UserError(f"unknown method {method!r}")
    measured = meter.stop("steps" if method == "zoact" else None)
    measured.update(sizes=sizes, setup_seconds=round(t1 - t0, 2), method_seconds=round(time.time() - t1, 2),
                    pid=os.getpid(), **info)
    return measured


def _zoact(spec, model, task, batch, found, device, sizes, meter) -> dict:
    """A real ZO-Act start: basis passes on the batch, adapters, Adam, ``steps`` ZO steps as tune takes them.

    The meter is split after the basis passes, so the report tells whether they or the steps
    (adapters, optimizer state, perturbed forwards) set the peak.
    """
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    adapters = build_adapters(model, [batch], spec.rank, found=found, seed=spec.seed, dtype=dtype, device=device)
    release_free_memory()  # as tune does between the basis passes and the steps
    meter.split("basis")  # after the trim: the steps' high-water mark starts from what is in use
    layers = list(adapters.values())
    opt = torch.optim.Adam([l.B for l in layers], lr=spec.lr)
    # The step tune takes by default on this device, the frozen prefix shared as tune shares it.
    fused = fused_by_default(device.type)
    engine = TorchEngine(model, task, adapters, spec.eps, fused=fused)
    for s in range(spec.steps):
        res = engine.step([batch], derive_seed(spec.seed, s), opt)
    sizes["adapters"] = storage_bytes([l.B for l in layers] + [l.P for l in layers])
    sizes["optimizer_state"] = storage_bytes(optimizer_state_tensors(opt))
    sizes["gradients"] = storage_bytes(l.B for l in layers)  # B.grad exists between estimate and step
    return {"loss": res.loss, "trainable_params": sum(l.B.numel() for l in layers), "fused": fused}


def child_main(argv: list[str]) -> int:
    """``python -m zoact_edge.profiling.methods SPEC_JSON METHOD OUT_JSON``: one method, one process."""
    spec_json, method, out_path = argv
    logging_quiet()
    result = _run_method(ProfileSpec(**json.loads(spec_json)), method)
    with atomic_write(out_path) as f:
        json.dump(result, f)
    return 0


def logging_quiet() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
