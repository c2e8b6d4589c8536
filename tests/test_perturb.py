"""#13's knobs: perturbation scaling, scored-token calibration and the prior-only baseline."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_model
from helpers import autograd_grads, forward, randomize_coefficients, rt_examples, rt_task
from safetensors.torch import load_file

from zoact_edge.adapters import targets as tgt
from zoact_edge.adapters.basis import BasisConfig, compute_bases
from zoact_edge.adapters.build import inject_adapters
from zoact_edge.adapters.layer import noise_like
from zoact_edge.cli import main
from zoact_edge.data.tasks import scored_mask
from zoact_edge.recipes.calibrate import fitted_bias, uniform_bias, zero_shot_logits
from zoact_edge.zo import perturb
from zoact_edge.zo.estimator import derive_seed, estimate, layer_seed, write_gradients

FAST = ["--batch-size", "4", "--calib-samples", "8", "--rank", "4", "--eval-samples", "16", "--max-length", "24"]


def _bases(model, task, rank=4, token_mask=None, patterns=None, arch_inputs=None):
    found = tgt.find_targets(model, patterns)
    batches = [task.collate(rt_examples(16, offset=500))]
    energies: dict = {}
    bases = compute_bases({t.name: model.get_submodule(t.name) for t in found}, {t.name: t.d_in for t in found},
                          batches, lambda b: forward(model, b), BasisConfig(rank=rank, method="gram"),
                          token_mask=token_mask, energies=energies)
    return found, bases, energies, batches[0]


def _inputs(model, name, batch):
    """The layer's inputs on ``batch`` as (batch, seq, d_in), captured independently by a hook."""
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    forward(model, batch)
    handle.remove()
    return seen[0]


def test_energies_are_each_columns_mean_squared_projection(tokenizer):
    model = make_model("llama", len(tokenizer))
    task = rt_task(tokenizer)
    found, bases, energies, batch = _bases(model, task, patterns="v_proj,down_proj")
    for t in found:
        X = _inputs(model, t.name, batch)[batch.attention_mask.bool()].double()  # real tokens only
        expected = ((X @ bases[t.name].double()) ** 2).mean(0)
        torch.testing.assert_close(energies[t.name].double(), expected, rtol=1e-4, atol=1e-9)
        assert bool((energies[t.name][:-1] >= energies[t.name][1:] - 1e-6).all())  # descending, as the columns


def test_scored_calibration_uses_only_the_last_position(tokenizer):
    model = make_model("llama", len(tokenizer))
    task = rt_task(tokenizer)
    found, bases, energies, batch = _bases(model, task, rank=3, token_mask=scored_mask, patterns="q_proj")
    mask = scored_mask(batch)
    assert int(mask.sum()) == batch.rows and bool(mask[:, -1].all())
    for t in found:
        X = _inputs(model, t.name, batch)[:, -1].double()  # left padding: the scored token is the last
        A = X.T @ X
        vals = torch.linalg.eigvalsh(A)
        # Ky Fan: P captures the top-3 eigenvalues' sum iff it spans a top-3 eigenspace (the
        # scored token is the same word in every prompt, so deeper eigenvalues may be degenerate)
        P = bases[t.name].double()
        torch.testing.assert_close(torch.trace(P.T @ A @ P), vals[-3:].sum(), rtol=1e-6, atol=1e-9)
        top = vals[-3:].flip(-1) / X.shape[0]
        torch.testing.assert_close(energies[t.name].double(), top, rtol=1e-4, atol=1e-5 * float(top[0]))


def test_column_scales(tokenizer):
    model = make_model("llama", len(tokenizer))
    task = rt_task(tokenizer)
    found, bases, energies, _ = _bases(model, task)
    layers = inject_adapters(model, found, bases, None, torch.float32, torch.device("cpu"))
    name, layer = next(iter(layers.items()))
    assert perturb.column_scales("plain", layers)[name] is None
    torch.testing.assert_close(perturb.column_scales("rank", layers)[name], torch.full((4,), 0.5))
    torch.testing.assert_close(perturb.column_scales("layer-norm", layers)[name],
                               torch.full((4,), math.sqrt(layer.in_features / 4)))
    white = perturb.column_scales("whiten", layers, energies)[name]
    torch.testing.assert_close(white, (energies[name][0] / energies[name]).sqrt())
    assert float(white[0]) == 1.0
    # whitened: every column of Z D P^T moves the layer's output by the same energy on calibration tokens
    torch.testing.assert_close(energies[name] * white ** 2, energies[name][:1].expand(4), rtol=1e-5, atol=0)
    # layer-norm: ||Z D P^T||_F^2 averages d_out * d_in, a full-weight N(0, I) perturbation's
    D = perturb.column_scales("layer-norm", layers)[name]
    norms = [float(((noise_like(layer.B, s) * D) @ layer.P.T).pow(2).sum()) for s in range(200)]
    assert abs(sum(norms) / 200 / (layer.out_features * layer.in_features) - 1) < 0.05


def test_scaled_estimate_is_the_directional_derivative_along_the_scaled_direction(tokenizer):
    """In fp64, (L+ - L-)/(2 eps) = <dL/dB, Z D>, and the update regenerates exactly Z D."""
    model = make_model("gpt2", len(tokenizer)).double()
    task = rt_task(tokenizer)
    found, bases, energies, _ = _bases(model, task)
    layers = inject_adapters(model, found, bases, None, torch.float64, torch.device("cpu"))
    randomize_coefficients(layers)
    perturb.apply(layers, perturb.column_scales("whiten", layers, energies))
    order = list(layers.values())
    batch = task.collate(rt_examples(8))
    grads = autograd_grads(model, task, batch, order)

    def loss_fn():
        with torch.inference_mode():
            return float(task.loss(model, batch))

    res = estimate(order, loss_fn, step_seed=5, eps=1e-5)
    dirs = [noise_like(l.B, layer_seed(derive_seed(5, 0), i)) * l.z_scale for i, l in enumerate(order)]
    expected = sum(float((g * d).sum()) for g, d in zip(grads, dirs))
    assert abs(res.projected[0] - expected) <= 2e-5 * max(1.0, abs(expected))
    write_gradients(order, res, step_seed=5)
    for l, d in zip(order, dirs):
        torch.testing.assert_close(l.B.grad, res.projected[0] * d, rtol=1e-12, atol=0)


def test_calibration_biases(tokenizer):
    model = make_model("llama", len(tokenizer))
    task = rt_task(tokenizer)
    examples = rt_examples(10)
    logits = zero_shot_logits(model, task, examples, 4, torch.device("cpu"))
    with torch.inference_mode():
        one_by_one = torch.cat([task.logits(model, task.collate([ex])).double() for ex in examples])
    torch.testing.assert_close(logits, one_by_one, rtol=1e-5, atol=1e-6)
    # uniform: minus log of the mean predicted distribution, after which that mean is uniform
    u = uniform_bias(logits)
    torch.testing.assert_close(u, -torch.softmax(one_by_one, -1).mean(0).log(), rtol=1e-5, atol=1e-7)
    assert float((torch.softmax(logits + u, -1).mean(0) - 0.5).abs().max()) < 0.1
    # fitted: a stationary point of the cross-entropy in b (its gradient: mean(p) - label frequency)
    labels = torch.tensor([ex.label for ex in examples])
    b = fitted_bias(logits, labels)
    freq = torch.bincount(labels, minlength=2).double() / len(labels)
    torch.testing.assert_close(torch.softmax(logits + b, -1).mean(0), freq, rtol=0, atol=1e-6)
    assert abs(float(b.sum())) < 1e-9


def test_calibrate_and_whiten_runs(model_dirs, tmp_path):
    out = tmp_path / "cal"
    assert main(["tune", "--model", str(model_dirs["llama"]), "--method", "calibrate", "--output", str(out),
                 "--test-eval", *FAST]) == 0
    summary = json.loads((out / "summary.json").read_text())
    cal = json.loads((out / "calibration.json").read_text())
    assert summary["method"] == "calibrate" and summary["forwards"] == 2 and cal["examples"] == 8
    assert 0 <= summary["test"]["accuracy"] <= 1
    assert summary["zero_shot"]["examples"] == summary["tuned"]["examples"] == 16
    assert main(["tune", "--model", str(model_dirs["llama"]), "--method", "mezo", "--perturb", "rank",
                 "--output", str(tmp_path / "bad"), *FAST]) == 2


def test_whitened_scored_run_resumes_bit_identically(model_dirs, tmp_path):
    """The checkpoint keeps the column scales: a resumed run draws the same directions."""
    args = ["tune", "--model", model_dirs["llama"], *FAST, "--perturb", "whiten", "--calib-tokens", "scored",
            "--steps", "6", "--save-every", "3", "--lr", "1e-2", "--eps", "1e-2"]
    ref = _cli([*args, "--output", tmp_path / "ref"])
    assert ref.returncode == 0, ref.stderr
    assert _cli([*args, "--output", tmp_path / "run"], env={"ZOACT_KILL_AT_STEP": "5"}).returncode == -9
    state = json.loads((tmp_path / "run/checkpoint/state.json").read_text())
    assert state["step"] == 3 and len(state["z_scales"]) == 14 and all(len(v) == 4 for v in state["z_scales"].values())
    resumed = _cli(["tune", "--resume", tmp_path / "run"])
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(tmp_path / "ref/adapter_model.safetensors"))
    b = load_file(str(tmp_path / "run/adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _cli(args, env=None):
    return subprocess.run([sys.executable, "-m", "zoact_edge", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_adam_takes_a_column_scale_out_of_the_step():
    """The premise of tools/diagnose_scaling.py: gradients scaled by D per column give Adam (as ``tune`` builds
    it) the same trajectory as unscaled ones, where SGD's differs: under Adam, --perturb acts only through p."""
    from zoact_edge.config import TuneConfig
    from zoact_edge.zo.schedule import make_optimizer

    gen = torch.Generator().manual_seed(0)
    D = torch.tensor([1.0, 8.0, 60.0, 900.0])
    for optimizer, same in (("adam", True), ("sgd", False)):
        plain, scaled = torch.zeros(3, 4, requires_grad=True), torch.zeros(3, 4, requires_grad=True)
        cfg = TuneConfig(optimizer=optimizer, lr=1e-2)
        opt_plain, opt_scaled = make_optimizer([plain], cfg), make_optimizer([scaled], cfg)
        for _ in range(20):
            g = torch.randn(3, 4, generator=gen)
            plain.grad, scaled.grad = g.clone(), g * D
            opt_plain.step()
            opt_scaled.step()
        assert torch.allclose(plain, scaled, rtol=1e-4, atol=1e-7) == same, optimizer


def test_adam_efficiency_is_the_descent_of_a_normalised_zo_step():
    """eta(D) against a Monte Carlo of the Adam-form step p Z / rms(p), p = <g, Z D>: its mean descent <g, .>
    with D over the same with D = 1; <= 1, and 1 for a constant D."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
    from diagnose_scaling import adam_efficiency

    gen = torch.Generator().manual_seed(1)
    g = {"a": torch.randn(3, 4, generator=gen, dtype=torch.float64),
         "b": torch.randn(5, 4, generator=gen, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.3, 0.1])}
    scales = {"a": torch.tensor([1.0, 2.0, 5.0, 9.0]), "b": None}
    energies = {n: v.pow(2).sum(0) for n, v in g.items()}

    def descent(D: dict) -> float:
        Z = {n: torch.randn(200_000, *v.shape, generator=gen, dtype=torch.float64) for n, v in g.items()}
        p = sum((Z[n] * v * (1 if D.get(n) is None else D[n].double())).sum((1, 2)) for n, v in g.items())
        along = sum((Z[n] * v).sum((1, 2)) for n, v in g.items())  # <Z, g>: the step p Z / rms(p) along g
        return float((p * along).mean() / p.pow(2).mean().sqrt())

    eta = adam_efficiency(energies, scales)
    assert eta == pytest.approx(descent(scales) / descent({}), rel=0.02)
    assert 0.5 < eta < 0.99
    assert adam_efficiency(energies, {"a": torch.full((4,), 7.0), "b": torch.full((4,), 7.0)}) == pytest.approx(1.0)


def test_top_column_share_is_column_zeros_part_of_a_querys_mean_square():
    """E[p^2] = sum_j D_j^2 ||g_j||^2 for p = <g, Z D>; the share of it from each layer's column 0, checked by
    Monte Carlo of p with only column 0 of g kept against p with all of g."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
    from diagnose_scaling import top_column_share

    gen = torch.Generator().manual_seed(2)
    g = {"a": torch.randn(3, 4, generator=gen, dtype=torch.float64),
         "b": torch.randn(5, 4, generator=gen, dtype=torch.float64)}
    scales = {"a": torch.tensor([0.5, 2.0, 5.0, 9.0], dtype=torch.float64), "b": None}
    energies = {n: v.pow(2).sum(0) for n, v in g.items()}
    Z = {n: torch.randn(200_000, *v.shape, generator=gen, dtype=torch.float64) for n, v in g.items()}

    def mean_square(keep_top: bool) -> float:
        p = 0
        for n, v in g.items():
            d = torch.ones(4, dtype=torch.float64) if scales[n] is None else scales[n]
            v = v * d
            p = p + (Z[n] * (v * (torch.arange(4) == 0) if keep_top else v)).sum((1, 2))
        return float(p.pow(2).mean())

    assert top_column_share(energies, scales) == pytest.approx(mean_square(True) / mean_square(False), rel=0.03)


def _rescaled_copy(src, dst):
    """The tiny Llama rescaled by tools/probe_step_scale.py: the same function, other weight scales."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
    from probe_step_scale import rescale_llama

    model = AutoModelForCausalLM.from_pretrained(src)
    rescale_llama(model)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def test_weight_step_scale_trains_a_rescaled_model_as_the_original(model_dirs, tmp_path):
    """--step-scale weight: a function-preserving rescaling of the weights (powers of two, exact) leaves every
    logged loss as it was; --step-scale absolute does not (its effective lr per layer moves with the rescaling)."""
    rescaled = _rescaled_copy(model_dirs["llama"], tmp_path / "rescaled")
    args = ["tune", *FAST, "--steps", "6", "--lr", "2e-2", "--eps", "1e-2", "--eval-every", "3"]
    runs = {}
    for units in ("weight", "absolute"):
        for name, model in (("orig", model_dirs["llama"]), ("rescaled", rescaled)):
            out = tmp_path / f"{units}-{name}"
            assert main([*args, "--model", str(model), "--step-scale", units, "--output", str(out)]) == 0
            records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
            summary = json.loads((out / "summary.json").read_text())
            runs[units, name] = [summary["zero_shot"]["loss"], summary["tuned"]["loss"]] + [
                v for r in records for v in (r["loss"], r.get("eval", {}).get("loss")) if v is not None]

    assert len(runs["weight", "orig"]) == 2 + 6 + 1  # zero-shot, tuned, 6 steps, the evaluation at step 3
    assert runs["absolute", "orig"][0] == pytest.approx(runs["absolute", "rescaled"][0], rel=1e-6)  # one model
    assert runs["weight", "orig"] == pytest.approx(runs["weight", "rescaled"], rel=1e-6)
    assert runs["absolute", "orig"] != pytest.approx(runs["absolute", "rescaled"], rel=1e-3)


def test_weight_step_scale_is_training_b_relative_to_the_weight(tokenizer):
    """The independent computation: B = c B~ with B~ trained by plain ZO steps at lr and eps is a layer whose
    basis is c P. Three estimator steps with --step-scale weight's directions and optimizer must move B as
    those steps move c B~ (Adam: lr times c per layer; SGD: the run's lr), in fp64."""
    from zoact_edge.config import TuneConfig
    from zoact_edge.zo.schedule import make_optimizer

    task = rt_task(tokenizer)
    batch = task.collate(rt_examples(8))
    for optimizer in ("adam", "sgd"):
        finals = []
        for relative in (True, False):
            model = make_model("llama", len(tokenizer)).double()
            found, bases, _, _ = _bases(model, task)
            c = {t.name: float(tgt.dense_weight(model.get_submodule(t.name)).square().mean().sqrt()) for t in found}
            if not relative:  # the explicit reparametrisation: basis c P, plain directions, the run's lr
                bases = {n: P.double() * c[n] for n, P in bases.items()}
            layers = inject_adapters(model, found, bases, None, torch.float64, torch.device("cpu"))
            order = list(layers.values())
            if relative:
                perturb.apply(layers, perturb.times({}, perturb.weight_rms(layers), layers))
            cfg = TuneConfig(optimizer=optimizer, lr=1e-2, eps=1e-4)
            opt = make_optimizer([l.B for l in order], cfg, [c[n] for n in layers] if relative else None)
            for group in opt.param_groups:  # Adam's eps (1e-8) is the one term not rescaled: off for the check
                if "eps" in group:
                    group["eps"] = 1e-30

            def loss_fn():
                with torch.inference_mode():
                    return float(task.loss(model, batch))

            for step in range(3):
                res = estimate(order, loss_fn, step_seed=step, eps=cfg.eps)
                write_gradients(order, res, step_seed=step)
                opt.step()
            finals.append({n: l.B.clone() * (1.0 if relative else c[n]) for n, l in layers.items()})
        assert any(float(b.abs().max()) > 1e-4 for b in finals[0].values())  # the steps moved B
        for n in finals[0]:
            torch.testing.assert_close(finals[0][n], finals[1][n], rtol=1e-6, atol=1e-10, msg=f"{optimizer} {n}")


def test_weight_step_scale_refuses_what_it_cannot_scale():
    from zoact_edge.config import TuneConfig
    from zoact_edge.errors import UserError

    TuneConfig(step_scale="weight", bits=4).validate()
    TuneConfig(step_scale="weight", method="subspace").validate()
    for bad, match in (({"method": "mezo"}, "is for --method zoact or subspace"),
                       ({"bits": 8}, "LLM.int8 weights cannot be read"),
                       ({"step_scale": "relative"}, "choose one of absolute, weight")):
        with pytest.raises(UserError, match=match):
            TuneConfig(**{"step_scale": "weight", **bad}).validate()


def test_weight_step_scale_brings_its_own_lr_and_eps(model_dirs, tmp_path):
    """`--step-scale weight` alone runs at the lr and eps chosen for it (5e-3, 5e-3): the same losses as a run
    that spells them out, saved in run_config.json; a given --lr or --eps wins; absolute keeps 1e-3 and 1e-3."""
    from zoact_edge.config import TuneConfig

    args = ["tune", "--model", str(model_dirs["llama"]), *FAST, "--steps", "3", "--step-scale", "weight"]
    losses = {}
    for name, extra in (("implied", []), ("spelled", ["--lr", "5e-3", "--eps", "5e-3"])):
        assert main([*args, *extra, "--output", str(tmp_path / name)]) == 0
        losses[name] = [json.loads(l)["loss"] for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    saved = json.loads((tmp_path / "implied" / "run_config.json").read_text())
    assert (saved["lr"], saved["eps"]) == (5e-3, 5e-3) and losses["implied"] == losses["spelled"]
    assert (TuneConfig(step_scale="weight", lr=1e-2).resolved().lr, TuneConfig(step_scale="weight", eps=1e-2)
            .resolved().eps) == (1e-2, 1e-2)
    assert (TuneConfig().resolved().lr, TuneConfig().resolved().eps) == (1e-3, 1e-3)
    assert (TuneConfig(method="mezo").resolved().lr, TuneConfig(method="mezo").resolved().eps) == (1e-6, 1e-3)


def test_weight_step_scale_run_resumes_bit_identically(model_dirs, tmp_path):
    """The checkpoint keeps each layer's lr multiple and scaled directions: a resumed run is the uninterrupted one."""
    args = ["tune", "--model", model_dirs["llama"], *FAST, "--step-scale", "weight", "--steps", "6",
            "--save-every", "3", "--lr", "2e-2", "--eps", "1e-2"]
    ref = _cli([*args, "--output", tmp_path / "ref"])
    assert ref.returncode == 0, ref.stderr
    assert _cli([*args, "--output", tmp_path / "run"], env={"ZOACT_KILL_AT_STEP": "5"}).returncode == -9
    state = json.loads((tmp_path / "run/checkpoint/state.json").read_text())
    assert state["step"] == 3 and len(state["lr_scales"]) == len(state["z_scales"]) == 14
    assert all(v == [c] * 4 for v, c in zip(state["z_scales"].values(), state["lr_scales"]))
    assert _cli(["tune", "--resume", tmp_path / "run"]).returncode == 0
    a = load_file(str(tmp_path / "ref/adapter_model.safetensors"))
    b = load_file(str(tmp_path / "run/adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
