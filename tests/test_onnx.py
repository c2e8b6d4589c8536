"""ONNX Runtime backend and ONNX export, on tiny models, on CPU.

Every ORT result is compared with the PyTorch computation of the same thing: the task loss and
logits at the same coefficients, the same perturbed directions, the same training trajectory.
Exported graphs are shared per module because exporting is the slow part.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from conftest import make_model  # noqa: E402
from helpers import add_adapters, randomize_coefficients, rt_examples, rt_task  # noqa: E402
from zoact_edge import onnx_backend  # noqa: E402
from zoact_edge.cli import main  # noqa: E402
from zoact_edge.errors import UserError  # noqa: E402
from zoact_edge.zo import derive_seed, layer_seed, zo_step  # noqa: E402

TOL = 1e-4  # fp32 loss parity required by the issue
FAST = ["--steps", "5", "--batch-size", "4", "--calib-samples", "8", "--rank", "4", "--eval-samples", "16",
        "--max-length", "24", "--lr", "1e-2", "--eps", "1e-2", "--device", "cpu", "--eval-batch-size", "8"]


@pytest.fixture(scope="module")
def ort_runs(model_dirs, tmp_path_factory):
    """``tune`` with each backend, same options and seed (exports the loss graph once)."""
    runs = {}
    with pytest.MonkeyPatch.context() as mp:  # the session's temp cache (conftest's is per test)
        mp.setenv("ZOACT_CACHE", str(tmp_path_factory.getbasetemp() / "zoact-cache"))
        for backend in ("torch", "ort"):
            out = tmp_path_factory.mktemp(f"run-{backend}")
            assert main(["tune", "--model", str(model_dirs["llama"]), "--output", str(out), "--backend", backend,
                         "--overwrite", *FAST]) == 0
            runs[backend] = out
    return runs


@pytest.fixture(scope="module")
def llama_cls(ort_runs, model_dirs, tokenizer, tmp_path_factory):
    """The ORT run's model and adapters rebuilt from its checkpoint, with its (cached) loss graph."""
    from zoact_edge import targets as tgt
    from zoact_edge.adapter_io import load_checkpoint
    from zoact_edge.train import inject_adapters

    task = rt_task(tokenizer, max_length=24)
    model = make_model("llama", len(tokenizer))
    _, P, B, _ = load_checkpoint(ort_runs["ort"])
    found = [t for t in tgt.find_targets(model) if t.name in P]
    layers = inject_adapters(model, found, P, None, torch.float32, torch.device("cpu"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZOACT_CACHE", str(tmp_path_factory.getbasetemp() / "zoact-cache"))
        mp.setattr(onnx_backend, "export_loss_graph", _no_export)  # same model, targets, bases: cached
        ort_loss = onnx_backend.build_ort_loss(model, task, layers, task.collate(rt_examples(2)),
                                               str(model_dirs["llama"]), torch.device("cpu"), 32)
    return task, model, layers, ort_loss


def _no_export(*a, **k):
    raise AssertionError("exported again although the graph is cached")


def _records(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def test_tune_backend_ort_follows_the_torch_run(ort_runs):
    from safetensors.torch import load_file

    ref, got = _records(ort_runs["torch"]), _records(ort_runs["ort"])
    assert len(ref) == len(got) == 5
    for a, b in zip(ref, got):
        assert abs(a["loss"] - b["loss"]) <= TOL
    a = load_file(str(ort_runs["torch"] / "adapter_model.safetensors"))
    b = load_file(str(ort_runs["ort"] / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=0)
    assert max(float(a[k].abs().max()) for k in a if "lora_B" in k) > 1e-2  # training moved B
    sa = json.loads((ort_runs["torch"] / "summary.json").read_text())
    sb = json.loads((ort_runs["ort"] / "summary.json").read_text())
    assert abs(sa["tuned"]["loss"] - sb["tuned"]["loss"]) <= TOL
    assert json.loads((ort_runs["ort"] / "run_config.json").read_text())["backend"] == "ort"


def test_classification_loss_and_logits_match_torch(llama_cls):
    task, model, layers, ort_loss = llama_cls
    randomize_coefficients(layers, scale=0.05, seed=3)
    try:
        # a batch shape different from the export example: dynamic batch and sequence, left padding
        batch = task.collate(rt_examples(7, offset=100))
        with torch.inference_mode():
            ref_logits = task.logits(model, batch)
            ref_loss = float(task.loss(model, batch))
        out = ort_loss.run(batch)
        assert abs(float(out["loss"]) - ref_loss) <= TOL
        np.testing.assert_allclose(out["logits"], ref_logits.numpy(), atol=TOL, rtol=0)
    finally:
        randomize_coefficients(layers, scale=0.0)


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


def test_exportable_token_loss_equals_the_task_loss(tokenizer):
    """The LM graph's loss (mask-weighted, static shapes) is the task's boolean-indexed loss."""
    from zoact_edge.data import CompletionExample, TextExample
    from zoact_edge.tasks import CompletionTask, LMTask

    model = make_model("gpt2", len(tokenizer))
    texts = rt_examples(5, offset=200)
    cases = [(LMTask(tokenizer, 24), [TextExample(ex.text) for ex in texts]),
             (CompletionTask(tokenizer, 24), [CompletionExample(ex.text, " it was great") for ex in texts])]
    for task, examples in cases:
        batch = task.collate(examples)  # right padding, masked targets
        with torch.inference_mode():
            assert abs(float(onnx_backend.token_loss(model, batch)) - float(task.loss(model, batch))) <= 1e-5


def test_ort_backend_rejects_what_it_cannot_run(llama_cls):
    task, model, layers, _ = llama_cls
    example = task.collate(rt_examples(2))
    with pytest.raises(UserError, match="--bits 32"):
        onnx_backend.build_ort_loss(model, task, layers, example, "m", torch.device("cpu"), 8)
    with pytest.raises(UserError, match="--device cpu"):
        onnx_backend.build_ort_loss(model, task, layers, example, "m", torch.device("cuda"), 32)


# --------------------------------------------------------------------------- export -> generate


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory, tokenizer, model_dirs):
    """A run folder as tune writes it (PEFT adapter + run config), with non-zero coefficients."""
    from zoact_edge.adapter_io import save_peft

    task = rt_task(tokenizer)
    model = make_model("llama", len(tokenizer))
    layers = add_adapters(model, task, rank=4)
    randomize_coefficients(layers, scale=0.2, seed=7)
    run = tmp_path_factory.mktemp("run")
    save_peft(run, layers, str(model_dirs["llama"]))
    (run / "run_config.json").write_text(json.dumps({"model": str(model_dirs["llama"]), "bits": 32,
                                                      "task": "rotten-tomatoes", "max_length": 32}))
    return run, model  # model: the unmerged adapted torch model (ZOActLinear layers)


@pytest.fixture(scope="module")
def exported(tuned_run, tmp_path_factory):
    from zoact_edge.export import export

    out = tmp_path_factory.mktemp("onnx") / "fp32"
    report = export(str(tuned_run[0]), str(out))
    return out, report


def test_export_writes_a_checked_model_with_tokenizer_and_config(exported):
    out, report = exported
    for f in ("model.onnx", "config.json", "tokenizer.json", "zoact_onnx.json", "run_config.json"):
        assert (out / f).is_file(), f
    assert 0 <= report["fp32"]["max_abs_logit_diff"] <= 1e-4 * max(1.0, report["fp32"]["max_abs_logit"])
    meta = json.loads((out / "zoact_onnx.json").read_text())
    assert meta["num_layers"] == 2 and meta["export"]["fp32"]["bytes"] > 0


def test_exported_greedy_generation_equals_pytorch(exported, tuned_run, tokenizer):
    from zoact_edge.onnx_runtime import OnnxDecoder

    _, model = tuned_run  # adapters unmerged: an independent path to the same function
    decoder = OnnxDecoder(exported[0])
    for prompt in ("review : the film was", "it was great and"):
        ids = tokenizer(prompt).input_ids
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=12, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
        assert decoder.greedy(ids, 12, tokenizer.eos_token_id) == ref


def test_generate_and_eval_onnx_commands(exported, tuned_run, capsys, tmp_path):
    out = str(exported[0])
    assert main(["generate", "--onnx", out, "--prompt", "the movie was", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["eval", "--onnx", out, "--eval-samples", "24", "--json", str(tmp_path / "o.json")]) == 0
    capsys.readouterr()
    assert main(["eval", "--adapter", str(tuned_run[0]), "--eval-samples", "24", "--json",
                 str(tmp_path / "t.json")]) == 0
    onnx_m, torch_m = (json.loads((tmp_path / f).read_text()) for f in ("o.json", "t.json"))
    assert onnx_m["accuracy"] == torch_m["accuracy"] and onnx_m["examples"] == 24
    assert abs(onnx_m["loss"] - torch_m["loss"]) <= TOL


def _reuse_export(folder):
    """An ``export_decoder`` that copies an already exported graph (exporting is the slow part)."""
    import shutil

    def fake(model, path):
        for f in folder.iterdir():
            if f.name.startswith("model.onnx"):
                shutil.copy(f, path.parent / f.name)
        meta = json.loads((folder / "zoact_onnx.json").read_text())
        return {k: meta[k] for k in ("num_layers", "kv_heads", "head_dim", "past_names", "present_names")}

    return fake


def test_export_parity_failure_is_an_error(exported, tuned_run, tokenizer, tmp_path, monkeypatch):
    """A graph that does not compute the PyTorch model (here: tuned graph vs base model) is refused."""
    from zoact_edge import export as export_mod

    base = make_model("llama", len(tokenizer))  # the run's base model without its adapter
    monkeypatch.setattr(export_mod, "export_decoder", _reuse_export(exported[0]))
    monkeypatch.setattr(export_mod, "load_merged", lambda adapter, trc=False: (base, tokenizer, {}))
    with pytest.raises(UserError, match="disagrees with PyTorch"):
        export_mod.export(str(tuned_run[0]), str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()


def test_export_int4_reports_size_and_accuracy(tuned_run, exported, tmp_path, monkeypatch):
    import onnx

    from zoact_edge import export as export_mod

    monkeypatch.setattr(export_mod, "export_decoder", _reuse_export(exported[0]))
    report = export_mod.export(str(tuned_run[0]), str(tmp_path / "int4"), int4=True, eval_samples=24)
    graph = onnx.load(str(tmp_path / "int4" / "model.onnx"), load_external_data=False).graph
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) >= 14  # 7 linears x 2 blocks
    assert not any(n.op_type == "MatMul" and n.input[1] in {i.name for i in graph.initializer} for n in graph.node)
    info = report["int4"]
    assert info["bytes"] < exported[1]["fp32"]["bytes"]
    assert info["validation_fp32"]["examples"] == info["validation_int4"]["examples"] == 24
    # int4 really changed the weights; random tiny weights quantize badly (~9% error per MatMul,
    # see below), so only the logits' scale bounds the difference here
    with torch.no_grad():
        scale = float(tuned_run[1](torch.tensor([[5, 9, 14, 7, 30]])).logits.abs().max())
    assert 1e-3 < info["max_abs_logit_diff_vs_torch"] < scale
    from zoact_edge.onnx_runtime import OnnxDecoder

    ids = [5, 9, 14, 7]
    assert len(OnnxDecoder(tmp_path / "int4").greedy(ids, 4)) == 4  # the int4 model generates


def test_int4_matmul_error_is_that_of_4_bit_blocks(tmp_path):
    """One MatMul through the quantizer vs numpy: the int4 error of Gaussian weights, block 32."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from zoact_edge.export import quantize_int4

    rng = np.random.default_rng(0)
    W = rng.normal(0, 0.1, (64, 128)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 128])],
                              [numpy_helper.from_array(W, "W")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "a.onnx")
    quantize_int4(tmp_path / "a.onnx", tmp_path / "b.onnx", 32)
    assert [n.op_type for n in onnx.load(str(tmp_path / "b.onnx")).graph.node] == ["MatMulNBits"]
    x = rng.normal(size=(8, 64)).astype(np.float32)
    y = ort.InferenceSession(str(tmp_path / "b.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    rel = np.linalg.norm(y - x @ W) / np.linalg.norm(x @ W)
    assert 0.01 < rel < 0.15  # symmetric 4-bit: 15 levels per block of 32
