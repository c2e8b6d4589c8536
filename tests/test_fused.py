"""Fused +/- forwards, frozen-prefix sharing and gradient accumulation against separate forwards."""

import pytest
import torch
from conftest import make_model
from helpers import add_adapters, randomize_coefficients, rt_examples, rt_task

from zoact_edge.cli.app import build_parser
from zoact_edge.config import TuneConfig, build_config
from zoact_edge.data.datasets import TextExample
from zoact_edge.data.tasks import LMTask
from zoact_edge.errors import UserError
from zoact_edge.zo.estimator import derive_seed, estimate, estimate_batches, forward_plan, layer_seed, write_gradients
from zoact_edge.zo.prefix import adapted_blocks, make_loss_terms

EPS = 1e-2  # large enough that + and - losses differ visibly, so a sign mix-up cannot pass


pytestmark = pytest.mark.usefixtures("one_thread")


_MODELS = {}


def _setup(tokenizer, arch="llama", layers=None, n=8):
    """A tiny model with adapters and random coefficients, built once per (arch, layers) for this file.

    Sharing is safe: nothing here writes B (the tests check that) or leaves hooks or noise behind."""
    key = (arch, layers)
    if key not in _MODELS:
        model = make_model(arch, len(tokenizer))
        task = rt_task(tokenizer)
        adapters = add_adapters(model, task, layers=layers)
        randomize_coefficients(adapters)
        _MODELS[key] = model, task, adapters
    model, task, adapters = _MODELS[key]
    return model, task, adapters, task.collate(rt_examples(n))


def _separate(model, task, order, batch, seed, queries):
    """Reference: the original estimator, one forward per perturbation, mean loss per forward."""
    def loss_fn():
        with torch.inference_mode():
            return float(task.loss(model, batch))
    return estimate(order, loss_fn, seed, EPS, queries)


def _close(res, ref, tol=1e-5):
    for a, b in ((res.loss_plus, ref.loss_plus), (res.loss_minus, ref.loss_minus)):
        assert len(a) == len(b)
        assert max(abs(x - y) for x, y in zip(a, b)) <= tol, (a, b)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_fused_pair_equals_two_separate_forwards(tokenizer, arch):
    model, task, adapters, batch = _setup(tokenizer, arch)
    order = list(adapters.values())
    before = [l.B.clone() for l in order]
    ref = _separate(model, task, order, batch, seed=5, queries=1)
    assert abs(ref.loss_plus[0] - ref.loss_minus[0]) > 1e-4  # the two signs really differ
    fused = estimate_batches(order, make_loss_terms(model, task), [batch], 5, EPS, fused=True)
    _close(fused, ref)
    assert all(torch.equal(b, l.B) for b, l in zip(before, order))  # B only read
    assert all(l.noise_groups is None and l.noise_seed is None for l in order)  # nothing left set


def test_fused_queries_batch_all_perturbations_in_one_forward(tokenizer):
    model, task, adapters, batch = _setup(tokenizer)
    order = list(adapters.values())
    rows = []
    handle = model.model.layers[0].register_forward_pre_hook(
        lambda m, a, k: rows.append(k.get("hidden_states", a[0] if a else None).shape[0]), with_kwargs=True
    )
    ref = _separate(model, task, order, batch, seed=9, queries=3)
    rows.clear()
    res = estimate_batches(
        order, make_loss_terms(model, task), [batch], 9, EPS, queries=3, fused=True, fuse_queries=True
    )
    handle.remove()
    assert rows == [6 * batch.rows]  # one forward of 2q x N rows
    _close(res, ref)


def test_forward_plan():
    assert forward_plan(2, False, False) == [[(0, 1)], [(0, -1)], [(1, 1)], [(1, -1)]]
    assert forward_plan(2, True, False) == [[(0, 1), (0, -1)], [(1, 1), (1, -1)]]
    assert forward_plan(2, True, True) == [[(0, 1), (0, -1), (1, 1), (1, -1)]]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_prefix_sharing_equals_separate_forwards_and_runs_the_prefix_once(tokenizer, arch):
    model, task, adapters, batch = _setup(tokenizer, arch, layers="1")  # adapters in the last block only
    order = list(adapters.values())
    blocks = adapted_blocks(model, adapters)
    stack = blocks[0].__class__
    all_blocks = [m for m in model.modules() if isinstance(m, stack)]
    assert len(all_blocks) == 2 and blocks == all_blocks[1:]
    seen = {}

    def record(i):
        def hook(module, args, kwargs, output):
            seen.setdefault(i, (output[0] if isinstance(output, tuple) else output).shape[0])
        return hook

    hooks = [b.register_forward_hook(record(i), with_kwargs=True) for i, b in enumerate(all_blocks)]
    ref = _separate(model, task, order, batch, seed=3, queries=2)
    seen.clear()
    res = estimate_batches(order, make_loss_terms(model, task, blocks), [batch], 3, EPS, queries=2, fused=True)
    for h in hooks:
        h.remove()
    assert seen == {0: batch.rows, 1: 2 * batch.rows}  # block 0 once for both signs, block 1 per sign
    _close(res, ref)
    # after the step the hooks are gone: a plain forward is the unperturbed model again
    assert all(not b._forward_pre_hooks for b in all_blocks)


def _lm_batch(tokenizer):
    task = LMTask(tokenizer, max_length=24)
    texts = [ex.text for ex in rt_examples(6, offset=40)]
    return task, task.collate([TextExample(t[: 20 + 9 * i]) for i, t in enumerate(texts)])  # ragged: padding matters


def test_lm_task_fused_and_prefix_equal_separate_forwards(tokenizer):
    model, _, adapters, _ = _setup(tokenizer, "llama", layers="1")
    task, batch = _lm_batch(tokenizer)
    order = list(adapters.values())
    ref = _separate(model, task, order, batch, seed=4, queries=1)
    for blocks in (None, adapted_blocks(model, adapters)):
        res = estimate_batches(order, make_loss_terms(model, task, blocks), [batch], 4, EPS, fused=True)
        _close(res, ref)


@pytest.mark.parametrize("kind", ["classification", "lm"])
@pytest.mark.parametrize("fused", [False, True])
def test_accumulation_equals_the_large_batch_estimate(tokenizer, kind, fused):
    """Micro-batches on one seed give the loss (and gradient) of the whole batch.

    Classification: 2+4+2 rows vs 8. LM: 2+2+2 ragged rows vs 6; the micro-batches hold
    different numbers of target tokens, so a mean of micro-batch means would be wrong: the
    terms must be token-weighted sums."""
    model, cls_task, adapters, cls_batch = _setup(tokenizer)
    task, batch = (cls_task, cls_batch) if kind == "classification" else _lm_batch(tokenizer)
    order = list(adapters.values())
    ex = rt_examples(8) if kind == "classification" else None
    if kind == "classification":
        micro = [task.collate(ex[a:b]) for a, b in ((0, 2), (2, 6), (6, 8))]
    else:
        micro = [batch_slice(batch, a, b) for a, b in ((0, 2), (2, 4), (4, 6))]
    terms = make_loss_terms(model, task)
    big = _separate(model, task, order, batch, seed=21, queries=2)
    acc = estimate_batches(order, terms, micro, 21, EPS, queries=2, fused=fused)
    tol = 2e-6
    _close(acc, big, tol=tol)
    # The gradient is mean_q c_q Z_q with c_q = (L+ - L-) / 2 eps: losses within tol put each c_q within
    # tol / eps, and the two gradients within that times the largest |Z| (fp32 rounding of the losses is all
    # that may differ: its last digits depend on the CPU's kernels).
    dc = max(abs(a - b) for a, b in zip(acc.projected, big.projected))
    assert dc <= tol / EPS
    write_gradients(order, big, 21)
    g_big = [l.B.grad for l in order]
    write_gradients(order, acc, 21)
    for i, (a, l) in enumerate(zip(g_big, order)):
        zmax = max(float(l.direction(layer_seed(derive_seed(21, q), i)).abs().max()) for q in range(2))
        torch.testing.assert_close(l.B.grad, a, rtol=0, atol=dc * zmax + 1e-6)
        l.B.grad = None


def batch_slice(batch, a, b):
    """Rows a..b-1 of a right-padded LM batch, trimmed to their own width like a fresh collate."""
    from zoact_edge.data.tasks import Batch

    width = int(batch.attention_mask[a:b].sum(1).max())
    return Batch(batch.input_ids[a:b, :width], batch.attention_mask[a:b, :width], batch.position_ids[a:b, :width],
                 target_mask=batch.target_mask[a:b, :width])


def test_data_parallel_sends_only_the_loss_terms(tokenizer):
    """Two ranks with identical shares must give the single-rank estimate; the payload is 4q scalars."""
    model, task, adapters, batch = _setup(tokenizer)
    order = list(adapters.values())
    sent = []

    def two_identical_ranks(values):
        sent.append(values.clone())
        return values * 2

    one = estimate_batches(order, make_loss_terms(model, task), [batch], 8, EPS, queries=3, fused=True)
    two = estimate_batches(order, make_loss_terms(model, task), [batch], 8, EPS, queries=3, fused=True,
                           all_reduce=two_identical_ranks)
    assert len(sent) == 1 and sent[0].shape == (4 * 3,) and sent[0].dtype == torch.float64
    assert one.loss_plus == two.loss_plus and one.loss_minus == two.loss_minus


def test_fused_option_is_a_switch_whose_unset_value_means_auto():
    parser = build_parser()
    assert "fused" not in vars(parser.parse_args(["tune"]))
    assert vars(parser.parse_args(["tune", "--no-fused"]))["fused"] is False
    cfg = build_config(TuneConfig, {}, {"fused": True, "accum_steps": 4})
    assert cfg.fused is True and cfg.accum_steps == 4
    assert build_config(TuneConfig, {}, {}).fused is None
    with pytest.raises(UserError, match="fused"):
        build_config(TuneConfig, {"fused": "yes"}, {})
    with pytest.raises(UserError, match="accum-steps"):
        build_config(TuneConfig, {}, {"accum_steps": 0})


def test_adapters_follow_their_base_layers_device_when_asked(tokenizer):
    """``device=None`` (a model sharded with device_map="auto") keeps shared bases shared per device."""
    from zoact_edge.adapters import targets as tgt
    from zoact_edge.adapters.build import inject_adapters

    model = make_model("llama", len(tokenizer))
    found = tgt.find_targets(model, "q_proj,k_proj,v_proj")
    by_block = {b: torch.linalg.qr(torch.randn(64, 4))[0] for b in (0, 1)}
    adapters = inject_adapters(model, found, {t.name: by_block[t.block] for t in found}, None, torch.float32, None)
    assert len(adapters) == 6
    for layer in adapters.values():
        assert layer.P.device == layer.base.weight.device == layer.B.device
        assert layer.shared.members == 3
    assert len({id(l.P) for l in adapters.values()}) == 2
