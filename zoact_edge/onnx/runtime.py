"""Running an exported model (``zoact-edge export``) with ONNX Runtime and numpy only.

The exported graph is one decoder step with an explicit KV cache (see :mod:`zoact_edge.onnx.export`);
this module owns the loop around it: left-padded prompts, greedy generation that feeds each
step's ``present`` back as the next ``past``, and task evaluation, so that the exported model
can be used and checked without PyTorch or transformers' generate().
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..errors import UserError
from .session import make_session

META = "zoact_onnx.json"
MODEL = "model.onnx"


def folder_bytes(folder: Path) -> int:
    """Size of the model itself (graph + external weights), not of tokenizer or config files."""
    return sum((Path(folder) / f).stat().st_size for f in (MODEL, MODEL + ".data") if (Path(folder) / f).is_file())


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


class OnnxDecoder:
    def __init__(self, folder: str | Path, providers=("CPUExecutionProvider",), threads: int | None = None):
        folder = Path(folder)
        if not (folder / MODEL).is_file() or not (folder / META).is_file():
            raise UserError(f"{folder} is not an exported model (needs {MODEL} and {META}; see zoact-edge export)")
        self.folder = folder
        self.meta = json.loads((folder / META).read_text())
        self.session = make_session(folder / MODEL, providers, threads)

    # ----------------------------------------------------------------- raw steps

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.meta["kv_heads"], 0, self.meta["head_dim"])
        return [np.zeros(shape, dtype=np.float32) for _ in self.meta["past_names"]]

    def run(self, ids, mask, pos, past) -> tuple[np.ndarray, list[np.ndarray]]:
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64),
                 "position_ids": pos.astype(np.int64), **dict(zip(self.meta["past_names"], past))}
        outs = self.session.run(None, feeds)
        return outs[0], outs[1:]

    @staticmethod
    def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Left padding with positions counted over real tokens only (as the tuner's batches)."""
        width = max(len(s) for s in seqs)
        ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(seqs), width), dtype=np.int64)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = s
            mask[i, width - len(s):] = 1
        pos = np.clip(mask.cumsum(-1) - 1, 0, None)
        return ids, mask, pos

    # ----------------------------------------------------------------- generation

    def greedy(self, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None = None) -> list[int]:
        """Greedy continuation of one prompt; stops after ``eos_id`` (which is included)."""
        ids = np.asarray([prompt_ids], dtype=np.int64)
        mask = np.ones_like(ids)
        pos = np.arange(ids.shape[1], dtype=np.int64)[None]
        logits, past = self.run(ids, mask, pos, self.empty_past(1))
        new: list[int] = []
        for _ in range(max_new_tokens):
            tok = int(logits[0, -1].argmax())
            new.append(tok)
            if eos_id is not None and tok == eos_id:
                break
            mask = np.ones((1, mask.shape[1] + 1), dtype=np.int64)
            step = np.asarray([[mask.shape[1] - 1]], dtype=np.int64)
            logits, past = self.run(np.asarray([[tok]], dtype=np.int64), mask, step, past)
        return new


def generate_text(folder: str, prompt: str, max_new_tokens: int = 32) -> str:
    """The greedy completion of ``prompt`` by the exported model in ``folder``."""
    from ..models import load_tokenizer

    decoder = OnnxDecoder(folder)
    tokenizer = load_tokenizer(str(decoder.folder))
    ids = tokenizer(prompt).input_ids
    if not ids:
        raise UserError("--prompt tokenizes to nothing")
    new = decoder.greedy(ids, max_new_tokens, decoder.meta.get("eos_token_id"))
    return tokenizer.decode(new, skip_special_tokens=True)


# --------------------------------------------------------------------------- evaluation


def evaluate_onnx(decoder: OnnxDecoder, task, examples: list, batch_size: int = 16) -> dict:
    """The metrics of :func:`zoact_edge.data.evaluate.evaluate`, computed by the exported graph."""
    from tqdm.auto import tqdm

    from ..data.tasks import ClassificationTask

    classification = isinstance(task, ClassificationTask)
    correct, loss_sum, nll, tokens = 0, 0.0, 0.0, 0
    for start in tqdm(range(0, len(examples), batch_size), desc="eval onnx", unit="batch", leave=False):
        chunk = examples[start:start + batch_size]
        batch = task.collate(chunk)
        ids, mask, pos = (batch.input_ids.numpy(), batch.attention_mask.numpy(), batch.position_ids.numpy())
        logits, _ = decoder.run(ids, mask, pos, decoder.empty_past(len(chunk)))
        if classification:
            scores = logits[:, -1][:, task.candidate_ids.numpy()]  # left padding: the prompt ends at -1
            labels = batch.labels.numpy()
            logp = _log_softmax(scores)
            loss_sum += float(-logp[np.arange(len(labels)), labels].sum())
            correct += int((scores.argmax(-1) == labels).sum())
        else:
            logp = _log_softmax(logits[:, :-1])
            targets = ids[:, 1:]
            select = batch.target_mask.numpy()[:, 1:]
            picked = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
            nll += float(-(picked * select).sum())
            tokens += int(select.sum())
    if classification:
        n = max(len(examples), 1)
        return {"accuracy": correct / n, "loss": loss_sum / n, "examples": len(examples)}
    loss = nll / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens, "examples": len(examples)}
