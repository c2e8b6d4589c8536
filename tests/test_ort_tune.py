"""``tune --backend ort`` end to end: it follows the torch run, and with ``--bits 4`` it trains and evaluates
the int4 graph (CUDA: skipped without one)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("onnxruntime")

from conftest import ORT_FAST  # noqa: E402

from zoact_edge.cli import main  # noqa: E402
from zoact_edge.onnx import session  # noqa: E402

TOL = 1e-4  # fp32 loss parity required by the issue


FAST = ORT_FAST


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


def test_tune_bits_4_on_ort_trains_and_evaluates_the_int4_graph(ort_runs, llama_cls, llama_int4):
    from zoact_edge.data.datasets import load_rotten_tomatoes

    records = _records(ort_runs["ort4"])
    assert len(records) == 5 and all(r["loss"] is not None for r in records)
    summary = json.loads((ort_runs["ort4"] / "summary.json").read_text())
    assert summary["bits"] == 4
    assert json.loads((ort_runs["ort4"] / "run_config.json").read_text())["bits"] == 4
    # zero-shot (B = 0) was evaluated on the int4 graph: what it computes, not the fp32 torch model
    task = llama_cls[0]
    assert all(float(l.B.abs().max()) == 0.0 for l in llama_int4.layers)
    eval_set = load_rotten_tomatoes().validation[:16]
    expected = llama_int4.evaluate(task, eval_set, 8)
    assert abs(summary["zero_shot"]["loss"] - expected["loss"]) <= 1e-6
    assert summary["zero_shot"]["accuracy"] == expected["accuracy"]
    fp32_zero_shot = json.loads((ort_runs["ort"] / "summary.json").read_text())["zero_shot"]
    assert abs(summary["zero_shot"]["loss"] - fp32_zero_shot["loss"]) > 1e-4


def _cuda_ort() -> bool:
    if not torch.cuda.is_available():
        return False
    import onnxruntime as ort

    return session.CUDA_EP in ort.get_available_providers()


cuda_ort = pytest.mark.skipif(not _cuda_ort(), reason="needs a CUDA GPU and onnxruntime-gpu")


@cuda_ort
def test_tune_backend_ort_on_cuda(model_dirs, tmp_path):
    options = ["cuda" if a == "cpu" else a for a in FAST]
    for bits in ("32", "4"):
        out = tmp_path / f"run-{bits}"
        assert main(["tune", "--model", str(model_dirs["llama"]), "--output", str(out), "--backend", "ort",
                     "--bits", bits, *options]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["device"].startswith("cuda") and summary["bits"] == int(bits)
        assert all(r["loss"] is not None for r in _records(out))
