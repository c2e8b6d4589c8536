"""The ZO-Act estimator against autograd, and the exactness of perturb / restore."""

import torch
from conftest import make_model
from helpers import add_adapters, randomize_coefficients, rt_examples, rt_task

from zoact_edge.adapters.layer import noise_like
from zoact_edge.zo.estimator import derive_seed, estimate, layer_seed, write_gradients, zo_step


def _setup(tokenizer, patterns=None, rank=4, dtype=torch.float32, layers=None, n=8, arch="llama"):
    model = make_model(arch, len(tokenizer)).to(dtype)
    task = rt_task(tokenizer)
    layers = add_adapters(model, task, rank=rank, patterns=patterns, dtype=dtype, layers=layers)
    randomize_coefficients(layers)
    batch = task.collate(rt_examples(n))
    return model, task, layers, batch


def _autograd_grads(model, task, layers, batch):
    for l in layers.values():
        l.B.requires_grad_(True)
    loss = task.loss(model, batch)
    grads = torch.autograd.grad(loss, [l.B for l in layers.values()])
    for l in layers.values():
        l.B.requires_grad_(False)
    return torch.cat([g.flatten() for g in grads])


def _loss_fn(model, task, batch):
    def fn():
        with torch.inference_mode():
            return float(task.loss(model, batch))
    return fn


def test_projected_difference_is_the_directional_derivative(tokenizer):
    """In fp64, (L+ - L-)/(2 eps) must equal <dL/dB, Z> for the very Z the layers drew.

    GPT-2 because it is fp64 end to end (Llama's rotary tables are computed in fp32)."""
    model, task, layers, batch = _setup(tokenizer, dtype=torch.float64, arch="gpt2")
    order = list(layers.values())
    grad = _autograd_grads(model, task, layers, batch)
    for seed in (1, 2, 3):
        res = estimate(order, _loss_fn(model, task, batch), seed, eps=1e-4)
        qs = derive_seed(seed, 0)
        z = torch.cat([noise_like(l.B, layer_seed(qs, i)).flatten() for i, l in enumerate(order)])
        expected = float(grad @ z)
        assert abs(res.projected[0] - expected) <= 2e-5 * max(1.0, abs(expected))


def test_estimate_is_unbiased_for_the_subspace_gradient(tokenizer):
    """Averaged over many directions, the estimate converges to autograd's dL/dB."""
    # One v_proj, rank 2: 64 coefficients. The cosine of an average of N independent estimates
    # with the truth is about sqrt(N / (N + d)): 0.97 for N = 1000, d = 64.
    model, task, layers, batch = _setup(tokenizer, patterns="v_proj", rank=2, layers="1", n=4)
    order = list(layers.values())
    true = _autograd_grads(model, task, layers, batch)
    assert true.numel() == 64
    res = estimate(order, _loss_fn(model, task, batch), step_seed=123, eps=1e-3, queries=1000)
    write_gradients(order, res, step_seed=123)
    est = torch.cat([l.B.grad.flatten() for l in order])
    cos = float(torch.nn.functional.cosine_similarity(est, true, dim=0))
    assert cos >= 0.95, f"cosine {cos:.3f} with {true.numel()} coefficients"
    # and a single direction is a noisy but positively correlated estimate on average
    assert float(est @ true) > 0


def test_perturb_restore_is_bit_exact_and_leaves_no_noise(tokenizer):
    model, task, layers, batch = _setup(tokenizer)
    order = list(layers.values())
    before = [l.B.detach().clone() for l in order]
    estimate(order, _loss_fn(model, task, batch), step_seed=7, eps=1e-2, queries=3)
    for b, l in zip(before, order):
        assert torch.equal(b, l.B), "B changed by perturbation"
        assert l.noise_seed is None and l.noise_scale == 0.0
    with torch.inference_mode():
        base_after = float(task.loss(model, batch))
        assert base_after == _loss_fn(model, task, batch)()


def test_gradient_is_regenerated_from_the_seed(tokenizer):
    model, task, layers, batch = _setup(tokenizer)
    order = list(layers.values())
    res = estimate(order, _loss_fn(model, task, batch), step_seed=11, eps=1e-3, queries=2)
    write_gradients(order, res, step_seed=11)
    for i, l in enumerate(order):
        z0 = noise_like(l.B, layer_seed(derive_seed(11, 0), i))
        z1 = noise_like(l.B, layer_seed(derive_seed(11, 1), i))
        expected = (res.projected[0] * z0 + res.projected[1] * z1) / 2
        torch.testing.assert_close(l.B.grad, expected, rtol=1e-6, atol=1e-7)


def test_non_finite_loss_skips_the_update(tokenizer):
    model, task, layers, batch = _setup(tokenizer)
    order = list(layers.values())
    before = [l.B.detach().clone() for l in order]
    opt = torch.optim.Adam([l.B for l in order], lr=1e-1)
    res = zo_step(order, lambda: float("nan"), opt, step_seed=3, eps=1e-3)
    assert not res.finite
    assert all(torch.equal(b, l.B) for b, l in zip(before, order))
    assert not opt.state  # the optimizer never stepped


def test_shared_projection_keeps_no_activation_after_the_forward(tokenizer):
    model, task, layers, batch = _setup(tokenizer)
    shared = {id(l.shared): l.shared for l in layers.values() if l.shared is not None}
    assert any(s.members == 3 for s in shared.values())  # q/k/v share one x @ P
    _loss_fn(model, task, batch)()
    assert all(s.x is None and s.h is None for s in shared.values())
