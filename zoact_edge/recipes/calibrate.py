"""``tune --method calibrate``: the prior-only baseline. No weight changes.

A zero-shot classifier often leans towards one label word whatever the input (the default model
answers Rotten Tomatoes at the majority-class rate). Part of any tuned gain may be nothing more
than undoing that lean. This baseline measures how much. It runs the zero-shot model once on
``--calib-samples`` training examples and keeps their label logits, then classifies with
``logits + b`` for a per-label bias b, fitted two ways:

* ``fitted`` (the run's ``tuned`` metrics): b minimises the cross-entropy of ``logits + b`` on
  those labelled examples: the best a pure prior shift can do (a convex fit of one number per
  label; it also learns the labels' frequencies);
* ``uniform`` (``summary["calibrated_uniform"]``, reads no labels): ``b = -log p̄``, p̄ the mean
  predicted label distribution on those examples, so every label is predicted equally often on
  average: contextual calibration (Zhao et al., 2021) with real unlabelled inputs in place of a
  content-free one. It assumes balanced labels.

It writes what a training run writes (``run_config.json``, an empty ``metrics.jsonl``,
``summary.json`` with ``zero_shot`` and ``tuned`` metrics, the calibration forwards as
``forwards``), plus ``calibration.json`` with both biases, so benchmark harnesses treat it like
any other method.
"""

from __future__ import annotations

import math
import time

import torch

from .. import rundir
from ..config import TuneConfig
from ..data.datasets import sample_indices
from ..data.evaluate import evaluate
from ..data.tasks import ClassificationTask
from ..errors import UserError
from ..paths import atomic_write
from ..profiling.meter import Yardstick
from .harness import Inputs, run_costs

CALIBRATE_TAG = 0xCA1B  # the examples' draw, apart from every other seeded stream of the run


@torch.inference_mode()
def zero_shot_logits(model, task: ClassificationTask, examples: list, batch_size: int, device) -> torch.Tensor:
    """The zero-shot label logits of ``examples`` (examples x labels, fp64, CPU)."""
    return torch.cat([task.logits(model, task.collate(examples[s:s + batch_size]).to(device)).double().cpu()
                      for s in range(0, len(examples), batch_size)])


def uniform_bias(logits: torch.Tensor) -> torch.Tensor:
    """``-log`` of the mean predicted label distribution (no labels read)."""
    return -torch.softmax(logits, -1).mean(0).log()


def fitted_bias(logits: torch.Tensor, labels: torch.Tensor, iters: int = 100) -> torch.Tensor:
    """The bias minimising the mean cross-entropy of ``logits + b`` (convex; L-BFGS; sum(b) = 0)."""
    b = torch.zeros(logits.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits + b, labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return (b - b.mean()).detach()


def tune_calibrate(cfg: TuneConfig, inputs: Inputs, run: rundir.RunDir, t_start: float) -> dict:
    """The run on ``inputs`` in ``run``'s folder; returns the summary (``tune`` writes it)."""
    model, device, task, splits, eval_set = inputs.model, inputs.device, inputs.task, inputs.splits, inputs.eval_set
    if not isinstance(task, ClassificationTask):
        raise UserError(f"--method calibrate is for classification tasks, not --task {cfg.task}")
    yardstick = Yardstick.measure(model, task, splits.train[:cfg.batch_size], cfg.max_length, device)

    def run_eval(desc, examples=eval_set, bias=None):
        return evaluate(model, task, examples, cfg.eval_batch_size, device, desc=desc, logit_bias=bias)

    zero_shot = run_eval("zero-shot eval")
    n = min(cfg.calib_samples, len(splits.train))
    idx = sample_indices(len(splits.train), n, cfg.seed, CALIBRATE_TAG)
    t_loop = time.time()
    chosen = [splits.train[i] for i in idx]
    logits = zero_shot_logits(model, task, chosen, cfg.batch_size, device)
    bias = fitted_bias(logits, torch.tensor([ex.label for ex in chosen]))
    uniform = uniform_bias(logits)
    loop_seconds = time.time() - t_loop
    tuned = run_eval("calibrated eval", bias=bias)
    uniform_metrics = run_eval("uniform-prior eval", bias=uniform)
    test = run_eval("test eval", splits.test, bias) if cfg.test_eval else None
    with atomic_write(run.path / "metrics.jsonl"):  # no steps: an empty log
        pass
    run.write_json(
        "calibration.json",
        {
            "label_words": task.label_words,
            "logit_bias": bias.tolist(),
            "uniform_logit_bias": uniform.tolist(),
            "examples": n,
            "example_indices": idx,
        },
    )
    batches = math.ceil(n / cfg.batch_size)
    summary = {
        "method": "calibrate",
        "zero_shot": zero_shot,
        "tuned": tuned,
        "calibrated_uniform": uniform_metrics,
        **({"test": test} if test is not None else {}),
        "forwards": batches,  # batch-sized forwards spent estimating the prior (no training steps)
        "steps": batches, "calibration_examples": n, "bits": cfg.bits, "device": str(device),
        **run_costs(loop_seconds, batches, t_start),
        **yardstick.summary(),
    }
    return summary
