"""``tune --method calibrate``: the prior-only baseline. No weight changes, no labels read.

A zero-shot classifier often leans towards one label word whatever the input (the default model
answers Rotten Tomatoes at the majority-class rate). Part of any tuned gain may be nothing more
than undoing that lean. This baseline measures how much: it runs the zero-shot model on
``--calib-samples`` training examples (texts only), takes the mean predicted label distribution
p̄, and from then on classifies with ``logits - log p̄``, so that on the training inputs every
label is, on average, predicted equally often. This is contextual calibration (Zhao et al.,
2021) with the content-free input replaced by real unlabelled inputs, as in domain-conditional
calibration (Fei et al., 2023).

It writes what a training run writes (``run_config.json``, an empty ``metrics.jsonl``,
``summary.json`` with ``zero_shot`` and ``tuned`` metrics, the calibration forwards as
``forwards``), plus ``calibration.json`` with the bias, so benchmark harnesses treat it like any
other method.
"""

from __future__ import annotations

import math
import shutil
import time

import torch

from .config import TuneConfig
from .errors import UserError
from .evaluate import evaluate
from .models import load_model
from .paths import atomic_write
from .profiler import Meter, inference_peak, padded_to, tune_peak_summary
from .tasks import ClassificationTask, build_task
from .zo import derive_seed

CALIBRATE_TAG = 0xCA1B  # the examples' draw, apart from every other seeded stream of the run


@torch.inference_mode()
def label_bias(model, task: ClassificationTask, examples: list, batch_size: int, device) -> torch.Tensor:
    """``-log`` of the mean predicted label distribution over ``examples`` (fp64, one per label)."""
    total = torch.zeros(len(task.label_words), dtype=torch.float64)
    for s in range(0, len(examples), batch_size):
        batch = task.collate(examples[s:s + batch_size]).to(device)
        total += torch.softmax(task.logits(model, batch).double(), -1).sum(0).cpu()
    return -(total / len(examples)).log()


def tune_calibrate(cfg: TuneConfig) -> dict:
    from .train import _write_json, prepare_output, run_costs

    t_start = time.time()
    out, existed = prepare_output(cfg)
    loaded = load_model(cfg.model, cfg.bits, cfg.quant_type, cfg.device, cfg.trust_remote_code)
    model, device = loaded.model, loaded.device
    task, splits = build_task(cfg, loaded.tokenizer)
    if not isinstance(task, ClassificationTask):
        raise UserError(f"--method calibrate is for classification tasks, not --task {cfg.task}")
    eval_set = splits.validation[: cfg.eval_samples or None]
    probe = padded_to(task, task.collate(splits.train[: cfg.batch_size]).to(device), cfg.max_length)
    yardstick = inference_peak(model, task, probe, device)
    meter = Meter(device)
    meter.start()

    def run_eval(desc, examples=eval_set, bias=None):
        return evaluate(model, task, examples, cfg.eval_batch_size, device, desc=desc, logit_bias=bias)

    zero_shot = run_eval("zero-shot eval")
    n = min(cfg.calib_samples, len(splits.train))
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, CALIBRATE_TAG))
    idx = torch.randperm(len(splits.train), generator=gen)[:n].tolist()
    t_loop = time.time()
    bias = label_bias(model, task, [splits.train[i] for i in idx], cfg.batch_size, device)
    loop_seconds = time.time() - t_loop
    tuned = run_eval("calibrated eval", bias=bias)
    test = run_eval("test eval", splits.test, bias) if cfg.test_eval else None
    if cfg.overwrite and existed:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "run_config.json", {**cfg.to_dict(), "model_folder": loaded.folder})
    with atomic_write(out / "metrics.jsonl"):  # no steps: an empty log
        pass
    _write_json(out / "calibration.json", {"label_words": task.label_words, "logit_bias": bias.tolist(),
                                           "examples": n, "example_indices": idx})
    batches = math.ceil(n / cfg.batch_size)
    summary = {
        "method": "calibrate",
        "zero_shot": zero_shot,
        "tuned": tuned,
        **({"test": test} if test is not None else {}),
        "forwards": batches,  # batch-sized forwards spent estimating the prior (no training steps)
        "steps": batches, "calibration_examples": n, "bits": cfg.bits, "device": str(device),
        **run_costs(loop_seconds, batches, t_start),
        **tune_peak_summary(meter.stop(), yardstick, probe.input_ids.shape),
    }
    _write_json(out / "summary.json", summary)
    summary["output"] = str(out)
    return summary
