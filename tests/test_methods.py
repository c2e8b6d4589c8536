"""The baselines of ``tune --method``: MeZO, random subspace and LoRA + backprop, in the same harness."""

import importlib.metadata as md
import json
import platform

import pytest
import torch
from conftest import make_model
from helpers import autograd_grads, randomize_coefficients, rt_examples, rt_task
from peft import PeftModel

from zoact_edge.adapters import targets as tgt
from zoact_edge.adapters.build import inject_adapters
from zoact_edge.adapters.files import save_peft
from zoact_edge.adapters.layer import noise_like
from zoact_edge.adapters.subspace import fold_and_resample, input_groups, random_bases, random_basis
from zoact_edge.cli import main
from zoact_edge.data.tasks import ClassificationTask, hidden_states
from zoact_edge.environment import PACKAGES, package_versions
from zoact_edge.zo.baselines import add_lora, backprop_step, mezo_params, mezo_step
from zoact_edge.zo.estimator import derive_seed, estimate, layer_seed

FAST = ["--batch-size", "4", "--calib-samples", "8", "--rank", "4", "--eval-samples", "16", "--max-length", "24"]


def _loss_fn(model, task, batch):
    def fn():
        with torch.inference_mode():
            return float(task.loss(model, batch))
    return fn


def _subspace_model(tokenizer, arch="llama", rank=4, dtype=torch.float32):
    model = make_model(arch, len(tokenizer)).to(dtype)
    task = rt_task(tokenizer)
    found = tgt.find_targets(model)
    first = task.collate(rt_examples(4))

    def run():
        with torch.inference_mode():
            hidden_states(model, first)

    groups = input_groups({t.name: model.get_submodule(t.name) for t in found}, run)
    bases = random_bases(groups, {t.name: t.d_in for t in found}, rank, seed=7)
    layers = inject_adapters(model, found, bases, None, dtype, torch.device("cpu"))
    return model, task, layers, groups


def test_random_basis_is_orthonormal_seeded_and_shared_per_group(tokenizer):
    P = random_basis(64, 8, seed=3)
    assert torch.allclose(P.T @ P, torch.eye(8), atol=1e-5)
    assert torch.equal(P, random_basis(64, 8, seed=3)) and not torch.equal(P, random_basis(64, 8, seed=4))
    _, _, layers, groups = _subspace_model(tokenizer)
    qkv = [n for n in layers if n.startswith("model.layers.0.self_attn.") and n[-6:] in ("q_proj", "k_proj", "v_proj")]
    assert any(set(qkv) <= set(g) for g in groups)
    assert len({id(layers[n].P) for n in qkv}) == 1  # one tensor, so x @ P is computed once


def test_subspace_estimate_is_the_directional_derivative(tokenizer):
    """The subspace method reuses ZO-Act's estimator: (L+ - L-)/2eps = <dL/dB, Z> (fp64, GPT-2)."""
    model, task, layers, _ = _subspace_model(tokenizer, arch="gpt2", dtype=torch.float64)
    randomize_coefficients(layers)
    order = list(layers.values())
    batch = task.collate(rt_examples(8))
    grads = autograd_grads(model, task, batch, order)
    grad = torch.cat([g.flatten() for g in grads])
    res = estimate(order, _loss_fn(model, task, batch), step_seed=5, eps=1e-4)
    z = torch.cat([noise_like(l.B, layer_seed(derive_seed(5, 0), i)).flatten() for i, l in enumerate(order)])
    expected = float(grad @ z)
    assert abs(res.projected[0] - expected) <= 2e-5 * max(1.0, abs(expected))


def test_mezo_estimate_is_the_directional_derivative_and_restores_weights(tokenizer):
    model = make_model("gpt2", len(tokenizer)).double()
    task = rt_task(tokenizer)
    batch = task.collate(rt_examples(8))
    names = [t.name for t in tgt.find_targets(model)]
    params = mezo_params(model, names)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.requires_grad_(True)
    grads = torch.autograd.grad(task.loss(model, batch), params)
    for p in params:
        p.requires_grad_(False)
    seed = 11
    res = mezo_step(params, _loss_fn(model, task, batch), seed, eps=1e-4, lr=0.0)
    expected = sum(
        float((g * noise_like(p, derive_seed(seed, i))).sum()) for i, (g, p) in enumerate(zip(grads, params))
    )
    assert abs(res.projected - expected) <= 1e-4 * max(1.0, abs(expected))
    assert all(torch.allclose(p, b, atol=1e-12, rtol=0) for p, b in zip(params, before))
    # With lr > 0 the update is exactly -lr * projected * z.
    res = mezo_step(params, _loss_fn(model, task, batch), seed, eps=1e-4, lr=1e-3)
    for i, (p, b) in enumerate(zip(params, before)):
        assert torch.allclose(p, b - 1e-3 * res.projected * noise_like(p, derive_seed(seed, i)), atol=1e-10)


def test_mezo_momentum_matches_the_plain_step_on_its_first_update(tokenizer):
    model = make_model("llama", len(tokenizer))
    task = rt_task(tokenizer)
    batch = task.collate(rt_examples(8))
    params = mezo_params(model, [t.name for t in tgt.find_targets(model)])
    before = [p.detach().clone() for p in params]
    buffers: list = []
    res = mezo_step(params, _loss_fn(model, task, batch), 3, eps=1e-3, lr=1e-3, momentum=0.9, buffers=buffers)
    assert len(buffers) == len(params)
    for i, (p, b) in enumerate(zip(params, before)):
        assert torch.allclose(p, b - 1e-3 * res.projected * noise_like(p, derive_seed(3, i)), atol=1e-6)


def test_resampling_folds_the_update_exactly_and_the_saved_lora_reproduces_it(tokenizer, tmp_path):
    model, task, layers, groups = _subspace_model(tokenizer)
    randomize_coefficients(layers, scale=0.5)
    batch = task.collate(rt_examples(6))
    kw = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    with torch.inference_mode():
        before = model(**kw).logits
    history: dict = {}
    old_P = {n: l.P.clone() for n, l in layers.items()}
    fold_and_resample(layers, groups, rank=4, seed=7, draw=1, history=history)
    assert all(torch.count_nonzero(l.B) == 0 for l in layers.values())
    assert all(not torch.equal(l.P, old_P[n]) for n, l in layers.items())
    with torch.inference_mode():
        after = model(**kw).logits
    assert (after - before).abs().max() <= 1e-5  # folding B P^T into W changes nothing
    randomize_coefficients(layers, scale=0.5, seed=2)  # a second basis learns something too
    with torch.inference_mode():
        ours = model(**kw).logits
    save_peft(tmp_path, layers, "tiny", history)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 8
    with torch.inference_mode():
        theirs = PeftModel.from_pretrained(make_model("llama", len(tokenizer)), str(tmp_path))(**kw).logits
    assert (ours - theirs).abs().max() <= 1e-5


def _run(args):
    return main([str(a) for a in args])


def _records(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method,per_step,loss_calls_per_step", [
    ("zoact", 2, 2), ("subspace", 2, 2), ("mezo", 2, 2), ("fo-lora", 3, 1)])
def test_forward_accounting(model_dirs, tmp_path, monkeypatch, method, per_step, loss_calls_per_step):
    """The reported forwards match the training forwards really run (a backward counts as two)."""
    calls = []
    original = ClassificationTask.loss

    def spy(self, model, batch):
        calls.append(batch.rows)
        return original(self, model, batch)

    monkeypatch.setattr(ClassificationTask, "loss", spy)
    out = tmp_path / method
    extra = ["--lr", "1e-6"] if method == "mezo" else []
    assert _run(["tune", "--model", model_dirs["llama"], "--method", method, "--steps", 4, "--output", out,
                 *FAST, *extra]) == 0
    records = _records(out)
    assert [r["forwards"] for r in records] == [per_step * s for s in range(1, 5)]
    assert len(calls) == 4 * loss_calls_per_step and set(calls) == {4}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["forwards"] == 4 * per_step


@pytest.mark.parametrize("method", ["zoact", "mezo", "calibrate"])
def test_summary_records_the_thread_count_and_package_versions(model_dirs, tmp_path, method):
    """Every method's summary.json says what its numbers depend on: the CPU kernels, torch's thread count as
    the run set it and the installed versions (read here from the package metadata); a package that is not
    installed reads null."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path / method
        assert _run(["tune", "--model", model_dirs["llama"], "--method", method, "--steps", 2, "--output", out,
                     *FAST]) == 0
    finally:
        torch.set_num_threads(before)
    env = json.loads((out / "summary.json").read_text())["environment"]
    assert env["torch_threads"] == 1 and env["python"] == platform.python_version()
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["packages"]["torch"] == md.version("torch") == torch.__version__
    for name in ("transformers", "peft", "numpy"):
        assert env["packages"][name] == md.version(name)
    assert set(env["packages"]) == set(PACKAGES)
    assert package_versions(("zoact-edge-no-such-package",)) == {"zoact-edge-no-such-package": None}


def test_fo_lora_fits_a_toy_task(tokenizer):
    model = make_model("llama", len(tokenizer))
    task = rt_task(tokenizer)
    batch = task.collate(rt_examples(8))  # a toy task: fit eight fixed labels
    params = add_lora(model, [t.name for t in tgt.find_targets(model)], rank=4)
    opt = torch.optim.Adam(params, lr=1e-2)
    with torch.no_grad():
        first = float(task.loss(model, batch))
    for _ in range(30):
        backprop_step(lambda: task.loss(model, batch), opt)
    with torch.no_grad():
        assert float(task.loss(model, batch)) < 0.6 * first


def test_fo_lora_run_saves_a_peft_adapter_that_eval_reproduces(model_dirs, tmp_path):
    out = tmp_path / "fo"
    assert _run(["tune", "--model", model_dirs["llama"], "--method", "fo-lora", "--steps", 6, "--lr", 1e-2,
                 "--output", out, "--test-eval", *FAST]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tuned"]["loss"] != summary["zero_shot"]["loss"] and 0 <= summary["test"]["accuracy"] <= 1
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["peft_type"] == "LORA"
    # no leftovers of the staged save: the only hidden files are the run's marker and lock
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".zoact-run.json", ".zoact-run.lock"]
    # Our own eval opens the adapter peft wrote and gets the loss the run reported.
    assert _run(["eval", "--adapter", out, "--eval-samples", 16, "--json", tmp_path / "m.json"]) == 0
    again = json.loads((tmp_path / "m.json").read_text())
    assert abs(again["loss"] - summary["tuned"]["loss"]) <= 1e-5


def test_subspace_with_resampling_runs_and_saves_the_stacked_lora(model_dirs, tmp_path):
    out = tmp_path / "sub"
    assert _run(["tune", "--model", model_dirs["llama"], "--method", "subspace", "--resample-every", 3,
                 "--steps", 7, "--lr", 1e-2, "--eps", 1e-2, "--output", out, *FAST]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4 * 3  # draws at steps 0, 3, 6


def test_method_refusals(model_dirs, tmp_path, capsys):
    base = ["tune", "--model", model_dirs["llama"], "--steps", 2, *FAST]
    assert _run([*base, "--method", "mezo", "--bits", 4, "--output", tmp_path / "a"]) == 2
    assert "16/32-bit" in capsys.readouterr().err
    assert _run([*base, "--method", "zoact", "--resample-every", 3, "--output", tmp_path / "b"]) == 2
    assert "--method subspace" in capsys.readouterr().err
    assert _run([*base, "--method", "fo-lora", "--queries", 2, "--output", tmp_path / "c"]) == 2
    assert "--queries" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_lr_default_depends_on_the_method():
    from zoact_edge.config import DEFAULT_LR, TuneConfig
    from zoact_edge.zo.schedule import make_optimizer

    p = [torch.nn.Parameter(torch.zeros(2))]
    assert make_optimizer(p, TuneConfig()).param_groups[0]["lr"] == DEFAULT_LR["zoact"] == 1e-3
    assert make_optimizer(p, TuneConfig(method="fo-lora")).param_groups[0]["lr"] == DEFAULT_LR["fo-lora"]
    assert make_optimizer(p, TuneConfig(lr=5e-4)).param_groups[0]["lr"] == 5e-4
    assert TuneConfig(method="mezo").resolved().lr == 1e-6


@pytest.mark.parametrize("method", ["zoact", "mezo"])
def test_step_time_leaves_out_the_evaluations_inside_the_loop(model_dirs, tmp_path, monkeypatch, method):
    """--eval-every evaluations run inside the loop, but s/step is a step's cost: on the loop's clock each of the
    three in-loop evaluations is made to take 1000 s more, and the loop's time must not carry them, though they
    pass between its first and last metrics records. (A clock, not a sleep: the check must not depend on how
    long a tiny step takes on a loaded machine.)"""
    import time
    import types

    from zoact_edge.recipes import baselines, harness
    from zoact_edge.zo import engine

    offset, real = [0.0], time.time
    monkeypatch.setattr(harness, "time", types.SimpleNamespace(time=lambda: real() + offset[0]))

    def slow(evaluate):
        def wrapped(*args, desc=None, **kwargs):
            if desc and desc.startswith("eval @"):
                offset[0] += 1000.0
            return evaluate(*args, desc=desc, **kwargs)
        return wrapped

    monkeypatch.setattr(engine, "evaluate", slow(engine.evaluate))
    monkeypatch.setattr(baselines, "evaluate", slow(baselines.evaluate))
    out = tmp_path / method
    assert _run(["tune", "--model", model_dirs["llama"], "--method", method, "--steps", 4, "--eval-every", 1,
                 "--lr", 1e-6 if method == "mezo" else 1e-2, "--save-every", 0, "--output", out, *FAST]) == 0
    records = _records(out)
    assert [("eval" in r) for r in records] == [True, True, True, False]  # the last step's is the final eval
    span = records[-1]["time"] - records[0]["time"]  # steps 2-4 and the three slowed evaluations
    assert span >= 3000.0
    summary = json.loads((out / "summary.json").read_text())
    # steps 1-4 alone: with even one evaluation counted this would be over 1000 s
    assert summary["train_seconds_this_run"] < 100.0
    assert summary["seconds_per_step"] == pytest.approx(summary["train_seconds_this_run"] / 4, abs=5e-3)


def test_mezo_skips_a_non_finite_step_and_fo_lora_stops_at_it(model_dirs, tmp_path, monkeypatch, capsys):
    """The shared loop's non-finite rule: MeZO's step restores the weights on a NaN loss, so one bad step is
    skipped and recorded; a backprop step has already applied its NaN gradient, so fo-lora stops at once."""
    original = ClassificationTask.loss
    calls = []

    def nan_at_third_step(self, model, batch):
        calls.append(1)
        loss = original(self, model, batch)
        return loss * float("nan") if third(len(calls)) else loss

    monkeypatch.setattr(ClassificationTask, "loss", nan_at_third_step)
    third = lambda n: n in (5, 6)  # noqa: E731  (MeZO: two losses a step, both of step 3)
    out = tmp_path / "mezo"
    assert _run(["tune", "--model", model_dirs["llama"], "--method", "mezo", "--steps", 5, "--lr", 1e-6,
                 "--save-every", 0, "--output", out, *FAST]) == 0
    records = _records(out)
    assert [r["skipped"] for r in records] == [False, False, True, False, False]
    assert records[2]["loss"] is None and all(r["loss"] is not None for r in records if not r["skipped"])
    assert records[2]["projected_grad"] == [None]  # NaN written as null: metrics.jsonl is strict JSON
    json.loads((out / "metrics.jsonl").read_text().splitlines()[2], parse_constant=lambda c: pytest.fail(c))
    calls.clear()
    third = lambda n: n == 3  # noqa: E731  (fo-lora: one loss a step)
    out = tmp_path / "fo"
    assert _run(["tune", "--model", model_dirs["llama"], "--method", "fo-lora", "--steps", 5, "--lr", 1e-2,
                 "--save-every", 0, "--output", out, *FAST]) == 2  # a user error
    assert "zoact-edge: error: step 3: the loss was NaN/inf; lower --lr\n" in capsys.readouterr().err
    assert not out.exists()
