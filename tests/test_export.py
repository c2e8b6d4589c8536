"""``zoact-edge export`` on tiny models: every form of the frozen weights against an independent
computation (PyTorch's forward and generate, bitsandbytes' own dequantization).

Forms: fp32 with the adapter path unmerged, merged, int4 (MatMulNBits) under a float adapter
path, the run's own nf4 / fp4 bitsandbytes data (MatMulBnb4), and the refusal of --bits 8.
Exported graphs are shared per module because exporting is the slow part.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from conftest import make_model  # noqa: E402
from helpers import add_adapters, randomize_coefficients, rt_task  # noqa: E402

from zoact_edge.adapters import targets as tgt
from zoact_edge.adapters.files import save_peft  # noqa: E402
from zoact_edge.cli import main  # noqa: E402
from zoact_edge.errors import UserError  # noqa: E402
from zoact_edge.onnx import export as export_mod  # noqa: E402
from zoact_edge.onnx import forms as onnx_forms
from zoact_edge.onnx.export import ExportOptions, export  # noqa: E402
from zoact_edge.onnx.export_layers import frozen_weight  # noqa: E402
from zoact_edge.onnx.runtime import OnnxDecoder  # noqa: E402

TOL = 1e-4
PROMPTS = ("review : the film was", "it was great and")
N_LINEARS = {"llama": 14, "gpt2": 8}  # decoder linears of the 2-block tiny models


def _graph(folder):
    import onnx

    return onnx.load(str(folder / "model.onnx"))


def _write_run(root, model_dir, layers, **cfg) -> str:
    save_peft(root, layers, str(model_dir))
    (root / "run_config.json").write_text(json.dumps({"model": str(model_dir), "bits": 32, "task": "rotten-tomatoes",
                                                      "max_length": 32, **cfg}))
    return str(root)


def _adapted(arch, tokenizer, seed=7):
    model = make_model(arch, len(tokenizer))
    layers = add_adapters(model, rt_task(tokenizer), rank=4)
    randomize_coefficients(layers, scale=0.2, seed=seed)
    return model, layers


def _greedy_torch(model, tokenizer, ids, n=12):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    return out[0, len(ids):].tolist()


def _assert_same_greedy(folder, model, tokenizer):
    decoder = OnnxDecoder(folder)
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        assert decoder.greedy(ids, 12, tokenizer.eos_token_id) == _greedy_torch(model, tokenizer, ids)


def _reuse_export(folder):
    """An ``export_decoder`` that copies an already exported graph (exporting is the slow part)."""

    def fake(model, path):
        for f in folder.iterdir():
            if f.name.startswith("model.onnx"):
                shutil.copy(f, path.parent / f.name)
        meta = json.loads((folder / "zoact_onnx.json").read_text())
        return {k: meta[k] for k in ("num_layers", "kv_heads", "head_dim", "past_names", "present_names")}

    return fake


# --------------------------------------------------------------------------- fp32, adapter unmerged


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory, tokenizer, model_dirs):
    """A run folder as tune writes it (PEFT adapter + run config), with non-zero coefficients."""
    model, layers = _adapted("llama", tokenizer)
    return _write_run(tmp_path_factory.mktemp("run"), model_dirs["llama"], layers), model  # model: unmerged


@pytest.fixture(scope="module")
def exported(tuned_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "fp32"
    return out, export(tuned_run[0], str(out), ExportOptions(eval_samples=24))


def test_export_keeps_the_adapter_path_and_writes_a_checked_model(exported):
    out, report = exported
    for f in ("model.onnx", "config.json", "tokenizer.json", "zoact_onnx.json", "run_config.json"):
        assert (out / f).is_file(), f
    assert 0 <= report["fp32"]["max_abs_logit_diff"] <= TOL * max(1.0, report["fp32"]["max_abs_logit"])
    assert report["fp32"]["validation"]["examples"] == 24 and report["fp32"]["bytes"] > 0
    meta = json.loads((out / "zoact_onnx.json").read_text())
    assert meta["num_layers"] == 2 and meta["export"]["merged"] is False
    assert len(meta["layers"]) == 14 and all(v == {"form": "float", "adapter": True} for v in meta["layers"].values())
    graph = _graph(out).graph
    weights = {i.name for i in graph.initializer}
    readers = {n.input[1] for n in graph.node if n.op_type == "MatMul"}
    for suffix in ("frozen_t", "coeff_t"):  # one frozen weight and one coefficient matrix per linear
        assert sum(w.endswith(suffix) and w in readers for w in weights) == 14
    assert 1 <= sum(w.endswith(".basis") and w in readers for w in weights) < 14  # shared bases held once


def test_exported_greedy_generation_equals_pytorch(exported, tuned_run, tokenizer):
    _assert_same_greedy(exported[0], tuned_run[1], tokenizer)  # PyTorch with ZOActLinear layers


def test_generate_and_eval_onnx_commands(exported, tuned_run, capsys, tmp_path):
    out = str(exported[0])
    assert main(["generate", "--onnx", out, "--prompt", "the movie was", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["eval", "--onnx", out, "--eval-samples", "24", "--json", str(tmp_path / "o.json")]) == 0
    capsys.readouterr()
    assert main(["eval", "--adapter", tuned_run[0], "--eval-samples", "24", "--json", str(tmp_path / "t.json")]) == 0
    onnx_m, torch_m = (json.loads((tmp_path / f).read_text()) for f in ("o.json", "t.json"))
    assert onnx_m["accuracy"] == torch_m["accuracy"] and onnx_m["examples"] == 24
    assert abs(onnx_m["loss"] - torch_m["loss"]) <= TOL


def test_export_parity_failure_is_an_error(exported, tuned_run, tmp_path, monkeypatch):
    """A graph that does not compute the PyTorch model (here: the tuned graph vs the base model) is refused."""
    load = export_mod.load_run

    def without_adapter(adapter, opts):
        run = load(adapter, opts)
        run.pairs = {n: (P, torch.zeros_like(B)) for n, (P, B) in run.pairs.items()}
        return run

    monkeypatch.setattr(export_mod, "export_decoder", _reuse_export(exported[0]))
    monkeypatch.setattr(export_mod, "load_run", without_adapter)
    with pytest.raises(UserError, match="disagrees with PyTorch"):
        export(tuned_run[0], str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()


# --------------------------------------------------------------------------- int4 and merge


def _int4_twin(model, folder, compensated: bool = False):
    """A copy of the unmerged torch model whose frozen linears hold the int4 graph's dequantized weights
    (and, ``compensated``, whose coefficients are B - (W_int4 - W) P, computed here in float64)."""
    import copy

    graph = _graph(folder).graph
    dense = onnx_forms.int4_weights(graph)
    twin = copy.deepcopy(model)
    for name in tgt.adapters(twin):
        layer = twin.get_submodule(name)
        with torch.no_grad():
            w_int4 = torch.from_numpy(dense[f"model.{name}.frozen_t"]).T
            if compensated:
                error = w_int4.double() - layer.base.weight.double()
                layer.B.copy_((layer.B.double() - error @ layer.P.double()).to(layer.B.dtype))
            layer.base.weight.copy_(w_int4)
    assert len(dense) == 14
    return twin


@pytest.mark.parametrize("compensate", [True, False])
def test_int4_keeps_the_adapter_float_and_computes_the_dequantized_model(exported, tuned_run, tokenizer, tmp_path,
                                                                         monkeypatch, compensate):
    monkeypatch.setattr(export_mod, "export_decoder", _reuse_export(exported[0]))
    report = export(tuned_run[0], str(tmp_path / "int4"),
                    ExportOptions(int4=True, eval_samples=24, compensate=compensate))
    folder = tmp_path / "int4"
    graph = _graph(folder).graph
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == 14  # 7 linears x 2 blocks
    weights = {i.name for i in graph.initializer}
    assert not any(w.endswith("frozen_t") for w in weights)
    assert sum(n.op_type == "MatMul" and n.input[1].endswith("coeff_t") for n in graph.node) == 14
    meta = json.loads((folder / "zoact_onnx.json").read_text())
    want = {"form": "int4", "adapter": True, **({"compensated": True} if compensate else {})}
    assert all(v == want for v in meta["layers"].values())
    info = report["int4"]
    assert info["compensated"] == (14 if compensate else 0)
    assert info["bytes"] < report["fp32"]["bytes"] and info["validation"]["examples"] == 24
    assert info["max_abs_logit_diff"] > 1e-3  # int4 really changed the frozen weights
    # against PyTorch running the dequantized int4 weights with the float adapter: fp32 rounding only
    twin = _int4_twin(tuned_run[1], folder, compensated=compensate)
    diff, scale = export_mod.parity(twin, OnnxDecoder(folder), tokenizer)
    assert diff <= TOL * max(1.0, scale)
    _assert_same_greedy(folder, twin, tokenizer)


def test_merge_int4_rounds_the_update_with_the_weights(tuned_run, tmp_path):
    report = export(tuned_run[0], str(tmp_path / "m"), ExportOptions(merge=True, int4=True, eval_samples=24))
    assert report["merged"] and report["fp32"]["max_abs_logit_diff"] <= TOL * max(1.0, report["fp32"]["max_abs_logit"])
    graph = _graph(tmp_path / "m").graph
    assert not any(i.name.endswith((".basis", "coeff_t")) for i in graph.initializer)
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == 14
    meta = json.loads((tmp_path / "m" / "zoact_onnx.json").read_text())
    assert all(v == {"form": "int4", "adapter": False} for v in meta["layers"].values())


def test_ort_int4_run_exports_the_int4_graph_it_tuned(exported, tuned_run, tmp_path, monkeypatch):
    """``tune --backend ort --bits 4`` tuned MatMulNBits (block 32) of the fp32 weights: that is what ships."""
    run = tmp_path / "run"
    shutil.copytree(tuned_run[0], run)
    cfg = json.loads((run / "run_config.json").read_text())
    (run / "run_config.json").write_text(json.dumps({**cfg, "bits": 4, "backend": "ort"}))
    monkeypatch.setattr(export_mod, "export_decoder", _reuse_export(exported[0]))
    report = export(str(run), str(tmp_path / "out"), ExportOptions(eval_samples=8, block_size=64))
    assert report["int4"]["block_size"] == 32
    assert sum(n.op_type == "MatMulNBits" for n in _graph(tmp_path / "out").graph.node) == 14


def test_int4_matmul_error_is_that_of_4_bit_blocks():
    """One MatMul through write_int4 vs numpy: the int4 error of Gaussian weights, block 32."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    W = rng.normal(0, 0.1, (64, 128)).astype(np.float32)
    model = _one_matmul(W)
    model = onnx_forms.write_int4(model, {"W"}, 32)
    assert [n.op_type for n in model.graph.node] == ["MatMulNBits"]
    x = rng.normal(size=(8, 64)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    rel = np.linalg.norm(y - x @ W) / np.linalg.norm(x @ W)
    assert 0.01 < rel < 0.15  # symmetric 4-bit: 15 levels per block of 32
    dense = onnx_forms.int4_weights(model.graph)["W"]
    assert np.abs(y - x @ dense).max() <= 1e-5 * np.abs(y).max()  # the read-back weights are what it computes


def test_int4_compensation_cancels_the_rounding_inside_the_subspace():
    """x W + (x P) C as MatMul nodes; after int4 with compensation, inputs in span(P) get x W + (x P) C back
    (float rounding only), inputs orthogonal to P get x W_int4 + (x P) C, and without compensation neither."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    K, N, r = 64, 96, 4
    W = rng.normal(0, 0.1, (K, N)).astype(np.float32)
    P = np.linalg.qr(rng.normal(size=(K, r)))[0].astype(np.float32)  # orthonormal columns, as the bases are
    C = rng.normal(0, 0.01, (r, N)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"], name="frozen"),
             helper.make_node("MatMul", ["x", "P"], ["xp"], name="down"),
             helper.make_node("MatMul", ["xp", "C"], ["xpc"], name="up"),
             helper.make_node("Add", ["xw", "xpc"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, N])],
                              [numpy_helper.from_array(a, n) for a, n in ((W, "W"), (P, "P"), (C, "C"))])
    base = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])

    def run(compensate: bool, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import copy

        model = onnx_forms.write_int4(copy.deepcopy(base), {"W"}, 32)
        if compensate:
            onnx_forms.compensate_int4(model, {"W": ("C", P, W)})
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, {"x": x})[0], onnx_forms.int4_weights(model.graph)["W"]

    inside = (rng.normal(size=(8, r)) @ P.T).astype(np.float32)
    outside = rng.normal(size=(8, K)).astype(np.float32)
    outside = (outside - outside @ P @ P.T).astype(np.float32)
    exact = inside.astype(np.float64) @ W + inside.astype(np.float64) @ P @ C
    y_comp, dense = run(True, inside)
    y_plain, _ = run(False, inside)
    assert np.abs(y_comp - exact).max() <= 1e-5 * np.abs(exact).max()
    assert np.abs(y_plain - exact).max() > 1e-2 * np.abs(exact).max()  # the rounding is really there
    y_out, _ = run(True, outside)
    assert np.allclose(y_out, outside @ dense + outside @ P @ C, atol=1e-5)  # outside span(P): uncorrected


def _one_matmul(W: np.ndarray):
    from onnx import TensorProto, helper, numpy_helper

    K, N = W.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, N])],
                              [numpy_helper.from_array(W, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


# --------------------------------------------------------------------------- bitsandbytes 4-bit runs


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_bnb4_node_computes_bitsandbytes_own_weights(quant_type, nested):
    """MatMulBnb4 fed a Linear4bit's data vs bitsandbytes' dequantization and forward (double quant de-nested)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    import onnxruntime as ort

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(192, 96, bias=False, compute_dtype=torch.float32, compress_statistics=nested,
                              quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(torch.randn(96, 192) * 0.1, requires_grad=False, compress_statistics=nested,
                                     quant_type=quant_type)
    layer = layer.to("cpu")
    assert layer.weight.quant_state.nested == nested
    fw = frozen_weight(layer)
    dense = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    assert fw.form == quant_type and torch.equal(fw.weight_t, dense.T)
    model = _one_matmul(fw.weight_t.numpy())
    onnx_forms.write_bnb4(model, {"W": {"form": fw.form, "packed": fw.packed, "absmax": fw.absmax,
                                        "block_size": fw.block_size, "K": 192, "N": 96}})
    assert [n.op_type for n in model.graph.node] == ["MatMulBnb4"] and len(model.graph.initializer) == 2
    x = torch.randn(5, 192)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[
        0
    ]
    with torch.no_grad():
        for ref in (x @ dense.T, layer(x)):
            assert np.abs(y - ref.numpy()).max() <= 1e-5 * float(ref.abs().max())


@pytest.fixture(scope="module", params=[("llama", "nf4"), ("gpt2", "fp4")], ids=["llama-nf4", "gpt2-fp4"])
def bnb_export(request, tmp_path_factory, tokenizer, model_dirs):
    """A --bits 4 run (adapters on the tiny model), exported, and PyTorch's bitsandbytes model with the adapter."""
    from zoact_edge.models import load_model

    arch, quant_type = request.param
    _, layers = _adapted(arch, tokenizer, seed=5)
    run = _write_run(tmp_path_factory.mktemp(f"run-{arch}"), model_dirs[arch], layers, bits=4, quant_type=quant_type)
    out = tmp_path_factory.mktemp("onnx") / quant_type
    report = export(run, str(out), ExportOptions(eval_samples=16))
    bnb_model = load_model(str(model_dirs[arch]), 4, quant_type, device="cpu").model
    for name, layer in layers.items():
        tgt.wrap(bnb_model, name, layer.P, layer.B.detach())
    return arch, quant_type, out, report, bnb_model


def test_bnb4_export_ships_the_runs_own_4bit_data(bnb_export):
    arch, quant_type, out, report, bnb_model = bnb_export
    assert report[quant_type]["max_abs_logit_diff"] <= TOL * max(1.0, report[quant_type]["max_abs_logit"])
    graph = _graph(out).graph
    nodes = [n for n in graph.node if n.op_type == "MatMulBnb4"]
    assert len(nodes) == N_LINEARS[arch]
    data = {i.name: i for i in graph.initializer}
    from onnx import helper, numpy_helper

    for name, layer in tgt.adapters(bnb_model).items():
        (node,) = [n for n in nodes if n.input[1] == f"model.{name}.frozen_t.{quant_type}"]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["quant_type"] == {"fp4": 0, "nf4": 1}[quant_type] and attrs["block_size"] == 64
        packed = numpy_helper.to_array(data[node.input[1]])
        assert np.array_equal(packed, layer.base.weight.data.view(torch.uint8).reshape(-1).numpy())  # byte for byte
    assert not any(i.name.endswith("frozen_t") for i in graph.initializer)
    meta = json.loads((out / "zoact_onnx.json").read_text())
    assert {v["form"] for v in meta["layers"].values()} == {quant_type}


def test_bnb4_export_generates_like_the_bitsandbytes_model(bnb_export, tokenizer):
    _, _, out, _, bnb_model = bnb_export
    _assert_same_greedy(out, bnb_model, tokenizer)


# --------------------------------------------------------------------------- refusals


def test_runs_that_cannot_be_exported_faithfully_are_refused(tuned_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tuned_run[0], run)
    cfg = json.loads((run / "run_config.json").read_text())
    cases = [({"bits": 8}, ExportOptions(), "--bits 8 runs is refused: LLM.int8"),
             ({"bits": 4}, ExportOptions(int4=True), "--int4 re-quantizes"),
             ({"bits": 4}, ExportOptions(merge=True), "--merge needs float weights")]
    for extra, opts, message in cases:
        (run / "run_config.json").write_text(json.dumps({**cfg, **extra}))
        with pytest.raises(UserError, match=message):
            export(str(run), str(tmp_path / "out"), opts)
        assert not (tmp_path / "out").exists()
