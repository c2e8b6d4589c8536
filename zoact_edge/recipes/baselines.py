"""The baseline recipes behind ``tune --method mezo`` and ``tune --method fo-lora``.

They exist to compare ZO-Act with what users would otherwise run, in the same harness: the same
model loading, task, template, batches (the same ``batch_indices`` stream), evaluation,
``metrics.jsonl`` records (with a ``forwards`` count) and ``summary.json``. Only the step
differs:

* ``mezo``: MeZO's two-point ZO-SGD on the full weights of the targeted linears, perturbed in
  place with the seed trick (see :func:`zoact_edge.zo.baselines.mezo_step`). 2 forwards per step.
* ``fo-lora``: a peft LoRA adapter of the same rank on the same layers, trained by backprop with
  Adam. 1 forward + 1 backward per step, counted as 3 forwards (a backward costs about two).

Outputs: ``fo-lora`` writes a PEFT adapter (``save_pretrained``); ``mezo`` writes the tuned
weights of the targeted layers to ``mezo_weights.safetensors`` (load them over the base model
with ``model.load_state_dict(safetensors.torch.load_file(path), strict=False)``). Neither is
resumable and neither runs under torchrun or on the ORT backend: they are reference points.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from .. import rundir
from ..adapters import targets as tgt
from ..config import TuneConfig
from ..data.evaluate import evaluate
from ..memory import release_free_memory
from ..paths import atomic_save_file, file_mode
from ..profiling.fit import check_batch_fits
from ..profiling.meter import Yardstick
from ..seeds import derive_seed
from ..zo.baselines import add_lora_model, backprop_step, mezo_params, mezo_step
from ..zo.schedule import make_optimizer, set_lr
from . import harness

FORWARDS_PER_STEP = {"mezo": 2, "fo-lora": 3}  # a backward counts as two forwards


def tune_baseline(cfg: TuneConfig, inputs: harness.Inputs, run: rundir.RunDir, t_start: float) -> dict:
    """The run on ``inputs`` in ``run``'s folder; returns the summary (``tune`` writes it)."""
    # ---- setup
    model, device, task, splits = inputs.model, inputs.device, inputs.task, inputs.splits
    found = tgt.find_targets(model, cfg.targets, cfg.layers)
    names = [t.name for t in found]
    if cfg.method == "fo-lora":  # refused before any forward, like every other setting that cannot run
        tgt.check_rank(found, cfg.rank)
    check_batch_fits(model.config, found, cfg, device)
    yardstick = Yardstick.measure(model, task, splits.train[:cfg.batch_size], cfg.max_length, device)

    def run_eval(desc, examples=inputs.eval_set):
        model.eval()
        metrics = evaluate(model, task, examples, cfg.eval_batch_size, device, desc=desc)
        release_free_memory()
        return metrics

    if cfg.method == "mezo":
        params = mezo_params(model, names)  # refuses 4/8-bit weights with a clear message
        buffers: list[torch.Tensor] = []
    else:
        peft_model = add_lora_model(model, names, cfg.rank)
        params = [p for n, p in model.named_parameters() if "lora_" in n]
        optimizer = make_optimizer(params, cfg)
    trainable = sum(p.numel() for p in params)
    model.eval()  # no dropout: the comparison is about the optimizer, not regularisation
    zero_shot = run_eval("zero-shot eval")
    out = run.path

    # ---- loop
    def baseline_step(step: int, idx: list, lr: float):
        batch = task.collate([splits.train[i] for i in idx]).to(device)
        if cfg.method == "mezo":
            def loss_fn():
                with torch.inference_mode():
                    return float(task.loss(model, batch))
            res = mezo_step(params, loss_fn, derive_seed(cfg.seed, step), cfg.eps, lr,
                            cfg.momentum, buffers if cfg.momentum else None, cfg.weight_decay)
            return (0.5 * (res.loss_plus + res.loss_minus) if res.finite else None), {"projected_grad": [res.projected]}
        set_lr(optimizer, lr)
        return backprop_step(lambda: task.loss(model, batch), optimizer), {}

    per_step = FORWARDS_PER_STEP[cfg.method]
    loop_seconds = harness.train_loop(
        cfg, inputs, baseline_step, run_eval, metrics_path=out / "metrics.jsonl", desc=cfg.method,
        examples_per_step=cfg.batch_size, forwards_per_step=per_step, t_start=t_start,
        skips_bad_steps=cfg.method == "mezo")  # a non-finite MeZO step restores the weights; backprop's has stepped

    # ---- finish
    final = run_eval("final eval")
    test = evaluate(model, task, splits.test, cfg.eval_batch_size, device, desc="test eval") if cfg.test_eval else None
    if cfg.method == "mezo":
        tensors = {f"{n}.weight": p.detach().float().cpu().contiguous() for n, p in zip(names, params)}
        atomic_save_file(lambda p: save_file(tensors, p, metadata={"format": "pt"}), out / "mezo_weights.safetensors")
    else:
        _save_lora(peft_model, inputs.loaded.folder, out)
    summary = harness.run_summary(
        cfg, zero_shot, final, test, forwards_per_step=per_step, trainable_params=trainable, adapted_layers=len(names),
        basis_seconds=0.0, costs=harness.run_costs(loop_seconds, cfg.steps, t_start), device=device, fused=False,
        examples_per_step=cfg.batch_size, peaks=yardstick.summary())
    return summary


def _save_lora(peft_model, base_folder: str, out) -> None:
    """peft's own adapter files, moved into place complete: never a half-written adapter."""
    peft_model.peft_config["default"].base_model_name_or_path = base_folder
    staging = out / ".adapter.partial"
    peft_model.save_pretrained(str(staging))
    for f in staging.iterdir():
        os.chmod(f, file_mode())  # safetensors writes 0600 whatever the umask
        f.replace(out / f.name)
    staging.rmdir()
