"""--compensate: a 4-bit layer's adapter starts at its rounding error inside the basis, so on span(P)
the compensated layer computes what the float layer computes (checked against a separate float load)."""

import json

import pytest
import torch
from helpers import add_adapters, rt_task

from zoact_edge.adapters.compensate import compensate_rounding
from zoact_edge.cli import main
from zoact_edge.models import float_tensors, load_model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: Conv1D checkpoints, one square weight (attn c_proj)
def test_compensated_layer_is_the_float_layer_on_its_subspace(model_dirs, arch):
    quant = load_model(str(model_dirs[arch]), bits=4, device="cpu")
    float_model = load_model(str(model_dirs[arch]), bits=32, device="cpu").model
    layers = add_adapters(quant.model, rt_task(quant.tokenizer), rank=4)
    gen = torch.Generator().manual_seed(0)
    inside, outside = {}, {}
    for name, layer in layers.items():
        P = layer.P.double()
        inside[name] = (torch.randn(6, P.shape[1], generator=gen, dtype=torch.float64) @ P.T).float()
        x = torch.randn(6, P.shape[0], generator=gen, dtype=torch.float64)
        outside[name] = (x - (x @ P) @ P.T).float()  # orthogonal to span(P)

    def gaps():  # largest |compensated - float| on span(P), relative to the float output
        with torch.no_grad():
            return {n: float((l(inside[n]) - float_model.get_submodule(n)(inside[n])).abs().max()
                             / float_model.get_submodule(n)(inside[n]).abs().max()) for n, l in layers.items()}

    before = gaps()
    assert compensate_rounding(layers, float_tensors(quant.folder)) == len(layers)
    after = gaps()
    assert min(before.values()) > 1e-3, before  # the rounding is visible before ...
    assert max(after.values()) < 1e-5, after  # ... and gone on the subspace after
    with torch.no_grad():  # off the subspace the layer stays the 4-bit one
        for name, layer in layers.items():
            torch.testing.assert_close(layer(outside[name]), layer.base(outside[name]), atol=1e-5, rtol=1e-4)


def test_tune_bits4_compensates_after_the_zero_shot_eval(model_dirs, tmp_path):
    fast = ["--model", str(model_dirs["llama"]), "--bits", "4", "--steps", "2", "--batch-size", "4",
            "--calib-samples", "8", "--rank", "4", "--eval-samples", "16", "--max-length", "24", "--device", "cpu"]
    runs = {}
    for flag in ("--compensate", "--no-compensate"):
        out = tmp_path / flag
        assert main(["tune", *fast, flag, "--output", str(out)]) == 0
        runs[flag] = (json.loads((out / "summary.json").read_text()),
                      [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()])
    (on, on_losses), (off, off_losses) = runs["--compensate"], runs["--no-compensate"]
    assert on["compensation"]["layers"] == on["adapted_layers"] == 14 and "compensation" not in off
    assert on["zero_shot"] == off["zero_shot"]  # zero-shot is the model as loaded
    assert on["compensation"]["start"]["loss"] != on["zero_shot"]["loss"]  # and the start is evaluated apart
    assert on_losses[0] != off_losses[0]  # the first step already runs from the compensated start


@pytest.mark.parametrize("change", [{"bits": 32}, {"bits": 8}, {"backend": "ort"}, {"method": "mezo", "bits": 16}])
def test_compensate_is_refused_where_there_is_no_bitsandbytes_rounding_to_undo(change):
    from zoact_edge.config import TuneConfig
    from zoact_edge.errors import UserError

    TuneConfig(bits=4, compensate=True).resolved().validate(None)  # the one place it applies
    with pytest.raises(UserError, match="--compensate .* needs --bits 4"):
        TuneConfig(**{"bits": 4, "compensate": True, **change}).resolved().validate(None)


def test_checkpoint_names_may_lose_leading_parts_but_never_the_block_index():
    from zoact_edge.adapters.compensate import _checkpoint_weight

    stored = {"layers.3.mlp.up_proj.weight": "inner", "mlp.up_proj.weight": "another block's"}
    assert _checkpoint_weight(stored.get, "model.layers.3.mlp.up_proj") == "inner"
    assert _checkpoint_weight(stored.get, "model.layers.4.mlp.up_proj") is None
