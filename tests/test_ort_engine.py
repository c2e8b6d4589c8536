"""The ONNX Runtime loss engine: the torch directions, the torch trajectory, torch's evaluation, its refusals,
IO binding, and (skipped without one) the CUDA execution provider."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from conftest import make_model  # noqa: E402
from helpers import add_adapters, randomize_coefficients, rt_examples, rt_task  # noqa: E402

from zoact_edge.errors import UserError  # noqa: E402
from zoact_edge.onnx import loss_graph, ort_engine, session  # noqa: E402
from zoact_edge.zo.estimator import derive_seed, layer_seed, zo_step  # noqa: E402

TOL = 1e-4  # fp32 loss parity required by the issue


def test_perturbed_coefficients_are_the_torch_directions(llama_cls):
    """ORT is fed B + eps Z with the very Z the torch layer draws, so the losses agree."""
    task, model, layers, ort_loss = llama_cls
    order = list(layers.values())
    randomize_coefficients(layers, scale=0.02, seed=5)
    try:
        batch = task.collate(rt_examples(4, offset=300))
        qs = derive_seed(11, 0)
        for scale in (+0.05, -0.05):
            for i, layer in enumerate(order):
                layer.set_noise(layer_seed(qs, i), scale)
            with torch.inference_mode():
                ref = float(task.loss(model, batch))
            assert abs(ort_loss.loss(batch) - ref) <= TOL
            for layer in order:
                layer.set_noise(None, 0.0)
            # and the perturbation really reaches the graph: unperturbed differs
            assert abs(ort_loss.loss(batch) - ref) > 10 * TOL
    finally:
        for layer in order:
            layer.set_noise(None, 0.0)
        randomize_coefficients(layers, scale=0.0)


def test_zo_steps_follow_the_torch_trajectory(llama_cls):
    """Same seeds, same batches: the ORT loss drives Adam to the same coefficients as torch."""
    task, model, layers, ort_loss = llama_cls
    order = list(layers.values())
    batches = [task.collate(rt_examples(4, offset=500 + 4 * s)) for s in range(4)]

    def torch_loss(batch):
        with torch.inference_mode():
            return float(task.loss(model, batch))

    runs = {}
    for name, loss in (("torch", torch_loss), ("ort", ort_loss.loss)):
        randomize_coefficients(layers, scale=0.0)
        opt = torch.optim.Adam([l.B for l in order], lr=1e-2)
        losses = [zo_step(order, lambda b=b: loss(b), opt, derive_seed(0, step), 1e-2).loss_plus[0]
                  for step, b in enumerate(batches)]
        runs[name] = (losses, [l.B.detach().clone() for l in order])
    randomize_coefficients(layers, scale=0.0)
    np.testing.assert_allclose(runs["ort"][0], runs["torch"][0], atol=TOL, rtol=0)
    for a, b in zip(runs["torch"][1], runs["ort"][1]):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0)
    assert max(float(b.abs().max()) for b in runs["ort"][1]) > 1e-2  # the steps really moved B


def test_ort_backend_rejects_what_it_cannot_run(llama_cls):
    import onnxruntime as ort

    task, model, layers, _ = llama_cls
    example = task.collate(rt_examples(2))
    for bits in (8, 16):
        with pytest.raises(UserError, match="--bits 32 or 4"):
            ort_engine.build_ort_loss(model, task, layers, example, "m", torch.device("cpu"), bits)
    with pytest.raises(UserError, match="--device cpu or cuda"):
        ort_engine.build_ort_loss(model, task, layers, example, "m", torch.device("meta"), 32)
    if session.CUDA_EP not in ort.get_available_providers():  # the CPU package: say what to install
        with pytest.raises(UserError, match="onnxruntime-gpu"):
            ort_engine.build_ort_loss(model, task, layers, example, "m", torch.device("cuda"), 32)


def test_a_silent_fallback_to_cpu_is_an_error(llama_cls):
    """ORT falls back to the CPU provider with a mere warning when CUDA cannot start; we refuse."""
    import onnxruntime as ort

    if session.CUDA_EP in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.warns(UserWarning), pytest.raises(UserError, match="fell back to CPUExecutionProvider"):
        session.make_session(llama_cls[3].path, [session.CUDA_EP, session.CPU_EP])


def test_ort_evaluate_equals_torch_evaluate(llama_cls):
    """Evaluation on the ORT backend runs the graph; in fp32 it reports the torch metrics."""
    from zoact_edge.data.evaluate import evaluate

    task, model, layers, ort_loss = llama_cls
    randomize_coefficients(layers, scale=0.05, seed=8)
    try:
        examples = rt_examples(21, offset=1200)  # a last partial batch
        ref = evaluate(model, task, examples, 8)
        got = ort_loss.evaluate(task, examples, 8)
    finally:
        randomize_coefficients(layers, scale=0.0)
    assert got["examples"] == ref["examples"] == 21 and got["accuracy"] == ref["accuracy"]
    assert abs(got["loss"] - ref["loss"]) <= TOL


def test_ort_evaluate_aggregates_token_losses_like_evaluate(tokenizer):
    """Token tasks: the graph's per-batch mean NLL, weighted by target tokens, is evaluate's loss."""
    from zoact_edge.data.datasets import TextExample
    from zoact_edge.data.evaluate import evaluate
    from zoact_edge.data.tasks import LMTask

    model = make_model("gpt2", len(tokenizer))
    task = LMTask(tokenizer, 24)
    examples = [TextExample(ex.text) for ex in rt_examples(11, offset=40)]
    graph_like = ort_engine.OrtLoss.__new__(ort_engine.OrtLoss)  # run() stands in for the session
    graph_like.run = lambda batch: {"loss": np.float32(loss_graph.token_loss(model, batch))}
    with torch.inference_mode():
        got = graph_like.evaluate(task, examples, 4)
    ref = evaluate(model, task, examples, 4)
    assert got["tokens"] == ref["tokens"] and got["examples"] == ref["examples"] == 11
    assert abs(got["loss"] - ref["loss"]) <= 1e-5 and abs(got["perplexity"] - ref["perplexity"]) <= 1e-4


def test_io_binding_binds_coefficients_once_and_matches_plain_runs(llama_cls):
    """The CUDA path's IO binding, on the CPU provider: coefficient buffers bound once by pointer
    and perturbed in place, batches of changing shape bound per run, same results as session.run."""
    task, model, layers, ort_loss = llama_cls
    bound = ort_engine.BoundOrtLoss(ort_loss.session, ort_loss.layers, torch.device("cpu"))
    pointers = [b.data_ptr() for b in bound.coeffs]
    order = list(layers.values())
    randomize_coefficients(layers, scale=0.05, seed=9)
    try:
        for n, offset, scale in ((7, 100, 0.05), (3, 300, -0.05), (8, 700, 0.0)):
            for i, layer in enumerate(order):
                layer.set_noise(layer_seed(offset, i), scale)
            batch = task.collate(rt_examples(n, offset=offset))
            ref, got = ort_loss.run(batch), bound.run(batch)
            assert got["logits"].shape == (n, 2)
            np.testing.assert_allclose(got["logits"], ref["logits"], atol=1e-6, rtol=0)
            assert abs(float(got["loss"]) - float(ref["loss"])) <= 1e-6
            for layer, buf in zip(order, bound.coeffs):
                assert torch.equal(buf, ort_engine.perturbed(layer))  # bit-identical B + s Z
    finally:
        for layer in order:
            layer.set_noise(None, 0.0)
        randomize_coefficients(layers, scale=0.0)
    assert [b.data_ptr() for b in bound.coeffs] == pointers


def test_training_on_the_int4_graph_reduces_the_loss(llama_cls, llama_int4):
    """30 ZO steps on one batch (measured: int4 loss 0.941 -> 0.532, fp32 graph 0.919 -> 0.529)."""
    task, model, layers, fp32 = llama_cls
    order = list(layers.values())
    batch = task.collate(rt_examples(8, offset=900))
    opt = torch.optim.Adam([l.B for l in order], lr=1e-2)
    try:
        before, before_fp32 = llama_int4.loss(batch), fp32.loss(batch)
        for step in range(30):
            res = zo_step(order, lambda: llama_int4.loss(batch), opt, derive_seed(0, step), 1e-2)
            assert res.finite
        after, after_fp32 = llama_int4.loss(batch), fp32.loss(batch)
    finally:
        randomize_coefficients(layers, scale=0.0)
    assert after < 0.8 * before
    assert after_fp32 < before_fp32  # what was learned on int4 carries over to the fp32 model


def _cuda_ort() -> bool:
    if not torch.cuda.is_available():
        return False
    import onnxruntime as ort

    return session.CUDA_EP in ort.get_available_providers()


cuda_ort = pytest.mark.skipif(not _cuda_ort(), reason="needs a CUDA GPU and onnxruntime-gpu")


@pytest.fixture(scope="module")
def cuda_llama(tokenizer):
    """The tiny Llama on the GPU with fp32 adapters (bases calibrated on an identical CPU copy)."""
    from zoact_edge.adapters import targets as tgt
    from zoact_edge.adapters.build import inject_adapters

    task = rt_task(tokenizer, max_length=24)
    bases = {n: l.P for n, l in add_adapters(make_model("llama", len(tokenizer)), task, rank=4).items()}
    model = make_model("llama", len(tokenizer)).cuda()
    layers = inject_adapters(model, tgt.find_targets(model), bases, None, torch.float32, torch.device("cuda"))
    return task, model, layers


@cuda_ort
@pytest.mark.parametrize("bits", [32, 4])
def test_cuda_backend_binds_once_and_matches_cpu_and_torch(cuda_llama, bits):
    task, model, layers = cuda_llama
    ort_loss = ort_engine.build_ort_loss(model, task, layers, task.collate(rt_examples(2)), "tiny-llama-cuda",
                                           torch.device("cuda"), bits)
    assert isinstance(ort_loss, ort_engine.BoundOrtLoss)
    assert ort_loss.session.get_providers()[0] == session.CUDA_EP
    assert all(b.is_cuda for b in ort_loss.coeffs)
    pointers = [b.data_ptr() for b in ort_loss.coeffs]
    on_cpu = ort_engine.OrtLoss(session.make_session(ort_loss.path), ort_loss.layers)  # same graph, CPU EP
    order = list(layers.values())
    randomize_coefficients(layers, scale=0.05, seed=3)
    try:
        for n, offset, scale in ((7, 100, 0.05), (3, 300, -0.05), (8, 700, 0.0)):
            for i, layer in enumerate(order):
                layer.set_noise(layer_seed(offset, i), scale)
            batch = task.collate(rt_examples(n, offset=offset)).to("cuda")
            got = ort_loss.run(batch)
            assert got["logits"].shape == (n, 2)
            # int4: CUDA's MatMulNBits kernels may accumulate in another order than the CPU's
            assert abs(float(got["loss"]) - float(on_cpu.run(batch)["loss"])) <= (TOL if bits == 32 else 1e-3)
            if bits == 32:
                with torch.inference_mode():
                    ref = float(task.loss(model, batch))
                assert abs(float(got["loss"]) - ref) <= TOL
    finally:
        for layer in order:
            layer.set_noise(None, 0.0)
        randomize_coefficients(layers, scale=0.0)
    assert [b.data_ptr() for b in ort_loss.coeffs] == pointers  # bound once, perturbed in place
