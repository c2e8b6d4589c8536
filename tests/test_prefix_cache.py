"""``--cache-prefix``: per-example inputs of the first adapted block, reused across steps and epochs."""

import json

import pytest
import torch
from conftest import make_model
from helpers import add_adapters, randomize_coefficients, rt_examples, rt_task
from safetensors.torch import load_file

from zoact_edge.cli import main
from zoact_edge.config import TuneConfig, build_config
from zoact_edge.data.datasets import TextExample
from zoact_edge.data.tasks import LMTask
from zoact_edge.errors import UserError
from zoact_edge.zo import prefix
from zoact_edge.zo.estimator import estimate, estimate_batches
from zoact_edge.zo.prefix import PrefixCache, adapted_blocks, make_loss_terms

EPS = 1e-2  # + and - losses differ visibly, so a sign mix-up cannot pass
FIRST = list(range(8))  # a batch 32 tokens wide
# Four of FIRST again (2, 4, 5, 7: now with other padding, the batch is 24 wide) and four new examples.
SECOND = [2, 4, 5, 7, 9, 12, 18, 22]


pytestmark = pytest.mark.usefixtures("one_thread")


_MODELS = {}


def _setup(tokenizer, arch="llama"):
    """A tiny 2-block model with adapters (random coefficients) in block 1 only: block 0 is the prefix."""
    if arch not in _MODELS:
        model = make_model(arch, len(tokenizer))
        task = rt_task(tokenizer)
        adapters = add_adapters(model, task, layers="1")
        randomize_coefficients(adapters)
        _MODELS[arch] = model, task, adapters
    return _MODELS[arch]


def _batch(task, ids):
    examples = rt_examples(30)
    return task.collate([examples[i] for i in ids]).with_example_ids(ids)


def _reference(model, task, order, batch, seed):
    """One plain forward per perturbation, no cache, no sharing."""
    def loss_fn():
        with torch.inference_mode():
            return float(task.loss(model, batch))
    return estimate(order, loss_fn, seed, EPS, queries=2)


def _max_diff(res, ref) -> float:
    return max(abs(a - b) for a, b in zip(res.loss_plus + res.loss_minus, ref.loss_plus + ref.loss_minus))


class _PrefixRows:
    """Rows that really went through the prefix block: its linears record their input's batch size."""

    def __init__(self, block):
        self.rows = []
        linears = [m for m in block.modules() if m is not block and hasattr(m, "weight") and m.weight.dim() == 2]
        self.handles = [m.register_forward_hook(self._hook) for m in linears[:1]]

    def _hook(self, module, args, output):
        self.rows.append(args[0].shape[0])

    def take(self):
        rows, self.rows = self.rows, []
        return rows

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_cached_losses_equal_the_plain_path_with_other_padding_companions(tokenizer, arch, fused):
    model, task, adapters = _setup(tokenizer, arch)
    order = list(adapters.values())
    stack, first = prefix.block_stack(model, adapters)
    assert first == 1
    cache = PrefixCache(model, adapters, 1 << 30)
    terms = make_loss_terms(model, task, adapted_blocks(model, adapters), cache)
    spy = _PrefixRows(stack[0])
    a, b = _batch(task, FIRST), _batch(task, SECOND)
    assert a.input_ids.shape[1] == 32 and b.input_ids.shape[1] == 24  # the cached rows come back with other padding
    try:
        for batch, prefix_rows in ((a, [8]), (b, [4]), (b, [])):
            spy.take()
            ref = _reference(model, task, order, batch, seed=7)
            assert min(abs(p - m) for p, m in zip(ref.loss_plus, ref.loss_minus)) > 1e-4
            spy.take()
            res = estimate_batches(order, terms, [batch], 7, EPS, queries=2, fused=fused)
            # only the rows not yet cached ran through block 0, once for all four perturbations
            assert spy.take() == prefix_rows
            assert _max_diff(res, ref) <= 1e-5, (res, ref)
    finally:
        spy.remove()
    assert sorted(cache.entries) == sorted(set(FIRST + SECOND))
    assert cache.stats()["miss_rows"] == 12
    # nothing is left behind: the prefix block computes again, block 1 has no hooks
    assert "forward" not in stack[0].__dict__ and not stack[1]._forward_pre_hooks


def test_lm_task_right_padding(tokenizer):
    model, _, adapters = _setup(tokenizer)
    order = list(adapters.values())
    task = LMTask(tokenizer, max_length=24)
    texts = [ex.text for ex in rt_examples(6, offset=40)]
    examples = [TextExample(t[: 20 + 9 * i]) for i, t in enumerate(texts)]
    cache = PrefixCache(model, adapters, 1 << 30)
    terms = make_loss_terms(model, task, None, cache)
    for ids in ([0, 1, 2, 3], [5, 3, 1], [1, 3]):  # the last batch is fully cached and narrower
        batch = task.collate([examples[i] for i in ids]).with_example_ids(ids)
        ref = _reference(model, task, order, batch, seed=4)
        for fused in (False, True):
            assert _max_diff(estimate_batches(order, terms, [batch], 4, EPS, queries=2, fused=fused), ref) <= 1e-5


def test_memory_bound_is_respected(tokenizer):
    model, task, adapters = _setup(tokenizer)
    order = list(adapters.values())
    a = _batch(task, FIRST)
    tokens = a.attention_mask.sum(1).tolist()
    row_bytes = [n * model.config.hidden_size * 4 for n in tokens]  # fp32 states of the real tokens only
    # Room for rows 0..2 and not one byte more than the smallest row after them needs.
    bound = sum(row_bytes[:3]) + min(row_bytes[3:]) - 1
    cache = PrefixCache(model, adapters, bound)
    terms = make_loss_terms(model, task, None, cache)
    spy = _PrefixRows(prefix.block_stack(model, adapters)[0][0])
    try:
        ref = _reference(model, task, order, a, seed=2)
        spy.take()
        for _ in range(2):
            res = estimate_batches(order, terms, [a], 2, EPS, queries=2)
            assert _max_diff(res, ref) <= 1e-5
        # rows 0..2 computed once; the five that did not fit at each of the 2 x 4 forwards
        assert spy.take() == [8] + [5] * 7
    finally:
        spy.remove()
    assert sorted(cache.entries) == [0, 1, 2]
    assert cache.bytes == sum(row_bytes[:3]) <= bound and cache.full
    assert sum(t.numel() * t.element_size() for t in cache.entries.values()) == cache.bytes
    empty = PrefixCache(model, adapters, 0)  # caches nothing, computes the same losses
    assert (
        _max_diff(estimate_batches(order, make_loss_terms(model, task, None, empty), [a], 2, EPS, queries=2), ref)
        <= 1e-5
    )
    assert not empty.entries and empty.bytes == 0


def test_batches_without_example_ids_take_the_plain_path(tokenizer):
    model, task, adapters = _setup(tokenizer)
    order = list(adapters.values())
    cache = PrefixCache(model, adapters, 1 << 30)
    batch = task.collate(rt_examples(4))  # no example_ids: e.g. an evaluation batch
    estimate_batches(order, make_loss_terms(model, task, None, cache), [batch], 1, EPS, fused=True)
    assert not cache.entries and cache.stats()["hit_rows"] == cache.stats()["miss_rows"] == 0


def test_refusals(tokenizer, monkeypatch):
    with pytest.raises(UserError, match="--layers k-L with k >= 1"):
        build_config(TuneConfig, {}, {"cache_prefix": True})
    with pytest.raises(UserError, match="--layers k-L with k >= 1"):
        build_config(TuneConfig, {}, {"cache_prefix": True, "layers": "0-1"})
    with pytest.raises(UserError, match="--backend torch"):
        build_config(TuneConfig, {}, {"cache_prefix": True, "layers": "1", "backend": "ort"})
    with pytest.raises(UserError, match="--cache-prefix-mb"):
        build_config(TuneConfig, {}, {"cache_prefix_mb": -1})
    model, task, adapters = _setup(tokenizer)
    monkeypatch.setattr(model.config, "model_type", "gemma3n")  # shares keys/values across blocks
    with pytest.raises(UserError, match="not 'gemma3n'"):
        PrefixCache(model, adapters, 1 << 20)


def test_two_epochs_with_and_without_the_cache_give_the_same_adapter(model_dirs, tmp_path, monkeypatch):
    data = tmp_path / "d.csv"
    data.write_text("sentence,y\n" + "".join(f"{w} movie {i} was {w},{'p' if i % 2 else 'n'}\n"
                                            for i, w in enumerate(["a fun", "a dull", "the best", "the worst"] * 5)))
    computed = []
    original = PrefixCache._run_prefix

    def counting(self, batch, rows):
        computed.extend(batch.example_ids[i] for i in rows)
        return original(self, batch, rows)

    monkeypatch.setattr(PrefixCache, "_run_prefix", counting)
    common = ["tune", "--model", model_dirs["llama"], "--task", "classification", "--data", data, "--text-field",
              "sentence", "--label-field", "y", "--labels", "p:good,n:bad", "--layers", "1", "--rank", "4",
              "--batch-size", "4", "--steps", "8", "--calib-samples", "8", "--eval-samples", "4",
              "--lr", "1e-2", "--eps", "1e-2", "--save-every", "0"]
    assert main([str(a) for a in [*common, "--output", tmp_path / "plain"]]) == 0
    assert main([str(a) for a in [*common, "--cache-prefix", "--output", tmp_path / "cached"]]) == 0
    # 16 training examples, 2 epochs of 4 steps: each example went through the prefix once
    assert sorted(computed) == list(range(16))
    plain, cached = (load_file(tmp_path / r / "adapter_model.safetensors") for r in ("plain", "cached"))
    assert plain.keys() == cached.keys() and len(plain) == 14
    moved = max(float(t.abs().max()) for k, t in plain.items() if "lora_B" in k)
    assert moved > 1e-3  # training did move the coefficients
    for k in plain:
        torch.testing.assert_close(cached[k], plain[k], rtol=0, atol=1e-6)
    config = json.loads((tmp_path / "cached" / "run_config.json").read_text())
    assert config["cache_prefix"] is True and config["cache_prefix_mb"] == 512
