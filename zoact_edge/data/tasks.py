"""Tasks turn examples into token batches and define the loss a ZO step minimises.

Three kinds:

* ``ClassificationTask``: prompt template + verbalizer words, scored the way the zeroth-order
  literature scores SST-2 (MeZO): the loss is the cross-entropy over the candidate label tokens at
  the position after the prompt. Only the last position's hidden state is projected, and only
  onto the candidate rows of the output embedding: a full 49k-vocabulary head over every position
  would cost more than several decoder layers of a small model.
* ``LMTask``: plain causal-LM text, next-token loss on every real token.
* ``CompletionTask``: prompt/completion pairs, loss on the completion tokens only.

All losses are computed in fp32 whatever the model's compute dtype, because the ZO estimate is a
difference of two nearly equal losses.
"""

from __future__ import annotations

import dataclasses
import string
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import UserError
from .datasets import ClassificationExample, CompletionExample, TextExample, sample_indices


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor | None = None  # classification: class index per row
    target_mask: torch.Tensor | None = None  # LM: which tokens are predicted (bool, same shape as ids)
    example_ids: tuple[int, ...] | None = None  # training-set index of each row: the --cache-prefix key

    def to(self, device) -> "Batch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(
            *(move(getattr(self, f)) for f in ("input_ids", "attention_mask", "position_ids", "labels", "target_mask")),
            example_ids=self.example_ids,
        )

    def with_example_ids(self, ids) -> "Batch":
        """This batch, its rows tagged with their training-set indices (see ``prefix.PrefixCache``)."""
        return dataclasses.replace(self, example_ids=tuple(int(i) for i in ids))

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    def repeat(self, groups: int) -> "Batch":
        """The batch stacked ``groups`` times along the rows (the fused +/- forward's input), untagged."""
        rep = lambda t: None if t is None else t.repeat(groups, *([1] * (t.dim() - 1)))  # noqa: E731
        return Batch(
            *(rep(getattr(self, f)) for f in ("input_ids", "attention_mask", "position_ids", "labels", "target_mask"))
        )


def _pad(seqs: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    # Real tokens get positions 0..n-1 whatever the padding side; models with absolute position
    # embeddings (GPT-2, OPT) would otherwise see left-padded prompts shifted.
    return (mask.cumsum(-1) - 1).clamp(min=0)


def scored_mask(batch: Batch) -> torch.Tensor:
    """1 at the positions whose output the loss reads: a classification prompt's last position
    (prompts are left-padded), or each position predicting an LM/completion target token."""
    if batch.target_mask is None:
        mask = torch.zeros_like(batch.attention_mask)
        mask[:, -1] = 1
        return mask
    mask = torch.zeros_like(batch.attention_mask)
    mask[:, :-1] = batch.target_mask[:, 1:].to(mask.dtype)
    return mask


def _wide(t: torch.Tensor) -> torch.Tensor:
    """fp32, or fp64 when the model already is (tests compare against autograd in fp64)."""
    return t if t.dtype == torch.float64 else t.float()


def hidden_states(model, batch: Batch) -> torch.Tensor:
    """Final hidden states (after the last norm) from the decoder stack, without the LM head."""
    out = model.base_model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    )
    return out.last_hidden_state


def label_logits(model, last: torch.Tensor, candidate_ids: torch.Tensor) -> torch.Tensor:
    """The candidate labels' logits from the scored position's final hidden states ``last`` (batch x hidden):
    the LM head's rows of the label tokens only (the ONNX loss graph traces this same function)."""
    head = model.get_output_embeddings()
    ids = candidate_ids.to(last.device)
    logits = last @ head.weight[ids].to(last.dtype).T
    bias = getattr(head, "bias", None)
    return logits if bias is None else logits + bias[ids].to(last.dtype)


def read_template(template: str) -> str:
    """A prompt template as typed: ``\\n``/``\\t`` become newline/tab, and ``{text}`` must be its only field."""
    template = template.replace("\\n", "\n").replace("\\t", "\t")
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise UserError(f"--template {template!r}: {e}; write literal braces as {{{{ and }}}}") from None
    other = next((f"{{{name}{'!' + conv if conv else ''}{':' + spec if spec else ''}}}"
                  for name, spec, conv in fields if (name, spec, conv) != ("text", "", None)), None)
    if other is not None:
        raise UserError(f"--template: {other} is not allowed: {{text}} is the only field (literal braces: {{{{ and "
                        f"}}}})")
    if not fields:
        raise UserError("--template must contain {text}")
    return template


class ClassificationTask:
    kind = "classification"

    def __init__(self, tokenizer, template: str, label_words: list[str], max_length: int):
        self.tokenizer = tokenizer
        self.template = read_template(template)
        self.label_words = list(label_words)
        self.max_length = max_length
        ids = []
        for word in self.label_words:
            toks = tokenizer(" " + word.strip(), add_special_tokens=False).input_ids
            if not toks:
                raise UserError(f"label word {word!r} tokenizes to nothing")
            ids.append(toks[0])  # multi-token words are scored by their first token
        if len(set(ids)) != len(ids):
            raise UserError(f"label words {self.label_words} share a first token; choose words that differ at the "
                            f"start")
        self.candidate_ids = torch.tensor(ids, dtype=torch.long)

    def collate(self, examples: list[ClassificationExample]) -> Batch:
        seqs = []
        for ex in examples:
            ids = self.tokenizer(self.template.format(text=ex.text), add_special_tokens=True).input_ids
            seqs.append(ids[-self.max_length:])  # keep the end: it holds the question being asked
        ids, mask = _pad(seqs, self.tokenizer.pad_token_id, left=True)
        labels = torch.tensor([ex.label for ex in examples], dtype=torch.long)
        return Batch(ids, mask, positions(mask), labels=labels)

    def logits(self, model, batch: Batch) -> torch.Tensor:
        """Candidate-label logits (batch x num_labels) in fp32, from the last position only."""
        last = _wide(hidden_states(model, batch)[:, -1])  # left padding: the prompt ends at -1
        return label_logits(model, last, self.candidate_ids)

    def loss(self, model, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(self.logits(model, batch), batch.labels)

    def loss_terms(
        self, model, batch: Batch, groups: int = 1, expand: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, example count) per row group, for a forward of ``groups`` copies of ``batch``.

        Sums and counts rather than means, so that micro-batches and data-parallel ranks combine
        into exactly the large-batch loss. ``expand=False``: the model repeats the rows itself
        (frozen-prefix sharing), the forward gets ``batch`` once.
        """
        if groups == 1 and expand:  # a plain forward: exactly the mean loss the unfused step always used
            n = torch.full((1,), float(batch.rows), dtype=torch.float64)
            return self.loss(model, batch).double().reshape(1).cpu() * n, n
        logits = self.logits(model, batch.repeat(groups) if expand else batch)
        per_row = F.cross_entropy(logits, batch.labels.repeat(groups), reduction="none")
        sums = per_row.view(groups, -1).sum(1)
        return sums, torch.full_like(sums, batch.rows)


class _TokenLossTask:
    """Shared next-token loss for LM and completion tasks."""

    chunk = 1024  # positions per LM-head call: bounds the vocab-sized logits tensor

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def _finish(self, seqs, targets) -> Batch:
        ids, mask = _pad(seqs, self.tokenizer.pad_token_id, left=False)
        tmask = torch.zeros_like(mask, dtype=torch.bool)
        for i, t in enumerate(targets):
            tmask[i, : len(t)] = torch.tensor(t, dtype=torch.bool)
        return Batch(ids, mask, positions(mask), target_mask=tmask)

    def token_nll(self, model, batch: Batch) -> tuple[torch.Tensor, int]:
        """Summed next-token NLL over target tokens (fp32) and how many there were."""
        hidden = hidden_states(model, batch)[:, :-1]
        select = batch.target_mask[:, 1:]
        h = hidden[select]
        targets = batch.input_ids[:, 1:][select]
        head = model.get_output_embeddings()
        total = torch.zeros((), dtype=_wide(h[:0]).dtype, device=h.device)
        for start in range(0, h.shape[0], self.chunk):
            logits = _wide(head(h[start:start + self.chunk]))
            total = total + F.cross_entropy(logits, targets[start:start + self.chunk], reduction="sum")
        return total, int(targets.numel())

    def loss(self, model, batch: Batch) -> torch.Tensor:
        total, n = self.token_nll(model, batch)
        return total / max(n, 1)

    def loss_terms(
        self, model, batch: Batch, groups: int = 1, expand: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed NLL, target-token count) per row group; see ``ClassificationTask.loss_terms``."""
        if groups == 1 and expand:  # a plain forward: the summed NLL the unfused step always used
            total, n = self.token_nll(model, batch)
            return total.double().reshape(1).cpu(), torch.full((1,), float(n), dtype=torch.float64)
        hidden = hidden_states(model, batch.repeat(groups) if expand else batch)[:, :-1]
        select = batch.target_mask[:, 1:].repeat(groups, 1)
        rows = select.nonzero()[:, 0] // batch.rows  # the group of every selected token
        h = hidden[select]
        targets = batch.input_ids[:, 1:].repeat(groups, 1)[select]
        head = model.get_output_embeddings()
        sums = torch.zeros(groups, dtype=_wide(h[:0]).dtype, device=h.device)
        for start in range(0, h.shape[0], self.chunk):
            logits = _wide(head(h[start:start + self.chunk]))
            nll = F.cross_entropy(logits, targets[start:start + self.chunk], reduction="none")
            sums.index_add_(0, rows[start:start + self.chunk], nll)
        count = int(batch.target_mask[:, 1:].sum())
        return sums, torch.full_like(sums, count)


class LMTask(_TokenLossTask):
    kind = "lm"

    def collate(self, examples: list[TextExample]) -> Batch:
        seqs, targets = [], []
        for ex in examples:
            ids = self.tokenizer(ex.text, add_special_tokens=True).input_ids
            if self.tokenizer.eos_token_id is not None:
                ids = ids + [self.tokenizer.eos_token_id]
            ids = ids[: self.max_length]
            seqs.append(ids)
            targets.append([True] * len(ids))
        return self._finish(seqs, targets)


class CompletionTask(_TokenLossTask):
    kind = "completion"

    def collate(self, examples: list[CompletionExample]) -> Batch:
        seqs, targets = [], []
        for ex in examples:
            p = self.tokenizer(ex.prompt, add_special_tokens=True).input_ids
            c = self.tokenizer(ex.completion, add_special_tokens=False).input_ids
            if self.tokenizer.eos_token_id is not None:
                c = c + [self.tokenizer.eos_token_id]
            # keep the whole completion if possible and cut the prompt from the left
            p = p[-max(self.max_length - len(c), 1):]
            ids = (p + c)[: self.max_length]
            seqs.append(ids)
            targets.append([False] * len(p) + [True] * (len(ids) - len(p)))
        return self._finish(seqs, targets)


# --------------------------------------------------------------------------- task selection

TASKS = ("rotten-tomatoes", "tweets", "classification", "lm", "completion")
RT_TEMPLATE = "Review: {text}\nSentiment: It was"
RT_WORDS = ("terrible", "great")  # label 0 = negative (rotten), 1 = positive (fresh)
TWEETS_TEMPLATE = "Tweet: {text}\nSentiment (negative, neutral or positive):"  # words = the label names


def sampled_batches(task, examples: list, count: int, batch_size: int, seed: int, tag: int, device) -> list[Batch]:
    """``count`` of ``examples`` (all, if fewer) drawn from the seeded stream ``tag``, as batches of ``batch_size``
    on ``device``: the examples of a calibration pass."""
    idx = sample_indices(len(examples), min(count, len(examples)), seed, tag)
    return [task.collate([examples[i] for i in idx[s:s + batch_size]]).to(device)
            for s in range(0, len(idx), batch_size)]


def parse_labels(spec: str) -> tuple[list[str], list[str]]:
    """'positive:great,negative:terrible' -> (['positive', 'negative'], ['great', 'terrible'])."""
    names, words = [], []
    for part in spec.split(","):
        if not part.strip():
            continue
        name, sep, word = part.partition(":")
        if not sep or not name.strip() or not word.strip():
            raise UserError(f"--labels {spec!r}: use LABEL:WORD pairs, e.g. positive:great,negative:terrible")
        names.append(name.strip())
        words.append(word.strip())
    if len(names) < 2 or len(set(names)) != len(names):
        raise UserError(f"--labels {spec!r}: need at least two distinct labels")
    return names, words


def check_prompts_differ(task: ClassificationTask, examples: list) -> None:
    """Refuse a template that leaves no room for the text: the prompt without it is the same prompt."""
    for ex in examples[:2]:
        with_text, without = (task.collate([e]).input_ids for e in (ex, dataclasses.replace(ex, text="")))
        if with_text.shape == without.shape and bool((with_text == without).all()):
            raise UserError(f"--template leaves no room for the text: its last --max-length {task.max_length} tokens "
                            "hold no part of it, so every prompt is the same; shorten the template or raise "
                            "--max-length")


def build_task(cfg, tokenizer):
    """Return (task, splits) for a TuneConfig-like object."""
    task, splits = _build_task(cfg, tokenizer)
    if isinstance(task, ClassificationTask):
        check_prompts_differ(task, splits.train)
    return task, splits


def _build_task(cfg, tokenizer):
    from . import datasets as data

    if cfg.task not in TASKS:
        raise UserError(f"unknown --task {cfg.task!r}; choose one of {', '.join(TASKS)}")
    if cfg.task == "rotten-tomatoes":
        task = ClassificationTask(tokenizer, cfg.template or RT_TEMPLATE, list(RT_WORDS), cfg.max_length)
        return task, data.load_rotten_tomatoes()
    if cfg.task == "tweets":
        task = ClassificationTask(tokenizer, cfg.template or TWEETS_TEMPLATE, list(data.TWEETS_LABELS), cfg.max_length)
        return task, data.load_tweets()
    if not cfg.data:
        raise UserError(f"--task {cfg.task} needs --data FILE (.csv or .jsonl)")
    if cfg.task == "classification":
        if not cfg.labels:
            raise UserError("--task classification needs --labels LABEL:WORD,... (the verbalizer)")
        names, words = parse_labels(cfg.labels)
        task = ClassificationTask(tokenizer, cfg.template or "{text}\nAnswer:", words, cfg.max_length)
        return task, data.load_classification_file(cfg.data, cfg.text_field, cfg.label_field, names)
    if cfg.task == "lm":
        return LMTask(tokenizer, cfg.max_length), data.load_text_file(cfg.data, cfg.text_field)
    return CompletionTask(tokenizer, cfg.max_length), data.load_completion_file(cfg.data)
