"""Target selection, schedules and data order."""

import pytest
from conftest import make_model

from zoact_edge.adapters.targets import find_targets
from zoact_edge.config import TuneConfig
from zoact_edge.data.datasets import batch_indices
from zoact_edge.errors import UserError
from zoact_edge.zo.schedule import lr_factor


def test_default_targets_are_all_block_linears(tokenizer):
    names = [t.name.split(".", 3)[-1] for t in find_targets(make_model("llama", len(tokenizer)))]
    assert len(names) == 14 and not any("lm_head" in n or "embed" in n for n in names)
    gpt2 = [t for t in find_targets(make_model("gpt2", len(tokenizer)))]
    assert len(gpt2) == 8 and {t.name.rsplit(".", 1)[-1] for t in gpt2} == {"c_attn", "c_proj", "c_fc"}
    c_attn = next(t for t in gpt2 if t.name.endswith("c_attn"))
    assert (c_attn.d_in, c_attn.d_out) == (64, 192)  # Conv1D stores its weight transposed


def test_patterns_and_layer_ranges(tokenizer):
    model = make_model("llama", len(tokenizer))
    sel = find_targets(model, "q_proj,v_proj", "1")
    assert [t.name for t in sel] == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert len(find_targets(model, "*_proj", "0-1")) == 14
    with pytest.raises(UserError, match="has blocks 0-1"):
        find_targets(model, None, "1-5")
    with pytest.raises(UserError, match="no linear layers match"):
        find_targets(model, "nonexistent")
    with pytest.raises(UserError):
        find_targets(model, None, "3-1")


def test_lr_schedules():
    cfg = TuneConfig(steps=10, warmup_steps=2, schedule="linear")
    assert [round(lr_factor(s, cfg), 3) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    cfg = TuneConfig(steps=10, warmup_steps=0, schedule="cosine")
    assert lr_factor(0, cfg) == 1.0 and abs(lr_factor(5, cfg) - 0.5) < 1e-9
    assert lr_factor(7, TuneConfig(steps=10)) == 1.0


def test_batches_cover_each_epoch_once_and_are_stateless():
    n, bs = 10, 4
    stream = [i for step in range(5) for i in batch_indices(step, bs, n, seed=3)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert batch_indices(3, bs, n, seed=3) == stream[12:16]  # any step, recomputed on demand
    assert batch_indices(0, bs, n, seed=4) != batch_indices(0, bs, n, seed=3)


def test_length_order_regroups_each_window_of_the_random_stream():
    """--batch-order length: per window of GROUP_BATCHES batches, the same examples as the random order,
    cut into batches of neighbouring lengths and visited in a seeded order."""
    from zoact_edge.data.datasets import GROUP_BATCHES

    n, bs, seed = 1000, 8, 5
    lengths = [(7 * i) % 61 + 3 for i in range(n)]
    for window in range(3):  # 3 windows = 1,200 examples: the third crosses into the second epoch
        steps = range(window * GROUP_BATCHES, (window + 1) * GROUP_BATCHES)
        plain = [i for s in steps for i in batch_indices(s, bs, n, seed)]
        grouped = [batch_indices(s, bs, n, seed, lengths) for s in steps]
        assert sorted(i for b in grouped for i in b) == sorted(plain)
        by_length = sorted(plain, key=lambda i: lengths[i])  # the window's examples, sorted (stable)
        chunks = {tuple(by_length[k:k + bs]) for k in range(0, len(by_length), bs)}
        assert {tuple(b) for b in grouped} == chunks  # each batch is one run of neighbouring lengths
        firsts = [lengths[b[0]] for b in grouped]
        assert firsts != sorted(firsts)  # not visited shortest first
    padded = lambda order: sum(max(lengths[i] for i in b) * len(b) for b in order)  # noqa: E731
    plain_batches = [batch_indices(s, bs, n, seed) for s in range(100)]
    grouped_batches = [batch_indices(s, bs, n, seed, lengths) for s in range(100)]
    assert padded(grouped_batches) < 0.7 * padded(plain_batches)
    assert batch_indices(77, bs, n, seed, lengths) == grouped_batches[77]  # any step, recomputed on demand
    assert batch_indices(0, bs, n, seed + 1, lengths) != grouped_batches[0]


def test_length_order_windows_shrink_to_a_small_training_split():
    """16 examples, batch 4: a window is the 4 batches of one epoch, so every epoch still reads each example once
    (a 50-batch window would hold each of them 12 times, in batches of copies)."""
    n, bs = 16, 4
    lengths = [5, 9, 7, 3, 8, 2, 6, 4, 9, 1, 3, 7, 2, 8, 5, 6]
    for epoch in range(3):
        batches = [batch_indices(s, bs, n, seed=1, lengths=lengths) for s in range(4 * epoch, 4 * epoch + 4)]
        assert sorted(i for b in batches for i in b) == list(range(n))
        assert all(max(lengths[i] for i in b) - min(lengths[i] for i in b) <= 2 for b in batches)
