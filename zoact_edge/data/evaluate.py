"""Validation / test metrics: accuracy for classification, loss and perplexity for LM tasks."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .tasks import ClassificationTask


def example_lengths(task, examples: list) -> list[int]:
    """Each example's token count as the task feeds it to the model (prompt cut to --max-length)."""
    return [len(task.collate([ex]).input_ids[0]) for ex in examples]


def length_sorted(task, examples: list, batch_size: int):
    # Sorting by length cuts padding (a large share of eval time for short sentences).
    lengths = example_lengths(task, examples) if len(examples) > batch_size else None
    order = sorted(range(len(examples)), key=lambda i: lengths[i]) if lengths else list(range(len(examples)))
    for start in range(0, len(order), batch_size):
        yield [examples[i] for i in order[start:start + batch_size]]


@torch.inference_mode()
def evaluate(model, task, examples: list, batch_size: int = 32, device=None, desc: str = "eval",
             logit_bias: torch.Tensor | None = None) -> dict:
    """Metrics of ``model`` on ``examples``; ``logit_bias`` (classification) is added to every row's label logits."""
    device = device or next(model.parameters()).device
    n_batches = math.ceil(len(examples) / batch_size)
    bar = tqdm(length_sorted(task, examples, batch_size), total=n_batches, desc=desc, leave=False, unit="batch")
    if isinstance(task, ClassificationTask):
        correct, loss_sum, n = 0, 0.0, 0
        for chunk in bar:
            batch = task.collate(chunk).to(device)
            logits = task.logits(model, batch)
            if logit_bias is not None:
                logits = logits + logit_bias.to(logits)
            loss_sum += float(torch.nn.functional.cross_entropy(logits, batch.labels, reduction="sum"))
            correct += int((logits.argmax(-1) == batch.labels).sum())
            n += len(chunk)
        return {"accuracy": correct / max(n, 1), "loss": loss_sum / max(n, 1), "examples": n}
    nll, tokens = 0.0, 0
    for chunk in bar:
        total, count = task.token_nll(model, task.collate(chunk).to(device))
        nll += float(total)
        tokens += count
    loss = nll / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens, "examples": len(examples)}
