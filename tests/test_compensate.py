"""--compensate: a 4-bit layer's adapter starts at its rounding error inside the basis, so on span(P)
the compensated layer computes what the float layer computes (checked against a separate float load)."""

import json
from pathlib import Path

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
    assert compensate_rounding(layers, float_tensors(quant.folder)) == (len(layers), [])
    after = gaps()
    assert min(before.values()) > 1e-3, before  # the rounding is visible before ...
    assert max(after.values()) < 1e-5, after  # ... and gone on the subspace after
    with torch.no_grad():  # off the subspace the layer stays the 4-bit one
        for name, layer in layers.items():
            torch.testing.assert_close(layer(outside[name]), layer.base(outside[name]), atol=1e-5, rtol=1e-4)


FAST = ["--bits", "4", "--steps", "2", "--batch-size", "4", "--calib-samples", "8", "--rank", "4",
        "--eval-samples", "16", "--max-length", "24", "--device", "cpu"]


def _tune(model, out, *flags) -> tuple[dict, list[float]]:
    assert main(["tune", "--model", str(model), *FAST, *flags, "--output", str(out)]) == 0
    return (json.loads((out / "summary.json").read_text()),
            [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()])


def test_tune_bits4_compensates_by_default_after_the_zero_shot_eval(model_dirs, tmp_path):
    (on, on_losses), (off, off_losses) = (_tune(model_dirs["llama"], tmp_path / "default"),
                                          _tune(model_dirs["llama"], tmp_path / "off", "--no-compensate"))
    assert on["compensation"]["layers"] == on["adapted_layers"] == 14 and "compensation" not in off
    assert on["zero_shot"] == off["zero_shot"]  # zero-shot is the model as loaded
    assert on["compensation"]["start"]["loss"] != on["zero_shot"]["loss"]  # and the start is evaluated apart
    assert on_losses[0] != off_losses[0]  # the first step already runs from the compensated start
    explicit, explicit_losses = _tune(model_dirs["llama"], tmp_path / "explicit", "--compensate")
    assert (explicit_losses, explicit["compensation"], explicit["tuned"]) == (on_losses, on["compensation"],
                                                                              on["tuned"])  # the default's run


def test_default_tunes_uncompensated_when_the_float_weights_are_unreadable(model_dirs, tmp_path, monkeypatch,
                                                                            caplog):
    from zoact_edge.adapters import compensate
    from zoact_edge.errors import UserError

    def unreadable(source):
        raise UserError(f"cannot read the float weights of {source!r} from the local cache: not cached")

    monkeypatch.setattr(compensate, "float_tensors", unreadable)
    summary, _ = _tune(model_dirs["llama"], tmp_path / "default")  # no --compensate: a warning, then the run
    assert "compensation" not in summary
    assert any("as rounded (no compensation)" in r.getMessage() for r in caplog.records)
    assert main(["tune", "--model", str(model_dirs["llama"]), *FAST, "--compensate",
                 "--output", str(tmp_path / "explicit")]) != 0  # asked for: refused instead
    assert not (tmp_path / "explicit" / "summary.json").exists()


def test_layers_without_a_float_weight_are_skipped_by_default_and_refused_when_asked(model_dirs):
    from zoact_edge.errors import UserError

    quant = load_model(str(model_dirs["llama"]), bits=4, device="cpu")
    layers = add_adapters(quant.model, rt_task(quant.tokenizer), rank=4)
    read = float_tensors(quant.folder)
    kept = next(iter(layers))
    count, missing = compensate_rounding(layers, lambda n: read(n) if n.startswith(kept) else None, strict=False)
    assert (count, missing) == (1, [n for n in layers if n != kept])
    assert all(not layer.B.any() for n, layer in layers.items() if n != kept)  # skipped layers keep B = 0
    assert layers[kept].B.abs().sum() > 0
    with pytest.raises(UserError, match="no float weight for"):
        compensate_rounding(layers, lambda n: None, strict=True)


@pytest.mark.parametrize("change", [{"bits": 32}, {"bits": 8}, {"backend": "ort"}, {"method": "mezo", "bits": 16}])
def test_compensate_is_refused_where_there_is_no_bitsandbytes_rounding_to_undo(change):
    from zoact_edge.config import TuneConfig
    from zoact_edge.errors import UserError

    TuneConfig(bits=4, compensate=True).resolved().validate(None)  # the one place it applies
    assert TuneConfig(bits=4).compensates and not TuneConfig(**{"bits": 4, **change}).compensates  # the default
    TuneConfig(**{"bits": 4, **change}).resolved().validate(None)  # is auto: never refused
    with pytest.raises(UserError, match="--compensate .* needs --bits 4"):
        TuneConfig(**{"bits": 4, "compensate": True, **change}).resolved().validate(None)


def test_checkpoint_names_may_lose_leading_parts_but_never_the_block_index():
    from zoact_edge.adapters.compensate import _checkpoint_weight

    stored = {"layers.3.mlp.up_proj.weight": "inner", "mlp.up_proj.weight": "another block's"}
    assert _checkpoint_weight(stored.get, "model.layers.3.mlp.up_proj") == "inner"
    assert _checkpoint_weight(stored.get, "model.layers.4.mlp.up_proj") is None


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's memory map (Linux)")
def test_float_tensors_keeps_no_file_mapped_between_reads(model_dirs):
    files = [str(f) for f in Path(model_dirs["llama"]).glob("*.safetensors")]

    def mapped() -> int:  # mappings of the checkpoint's files (a model loaded elsewhere may hold some)
        return sum(line.endswith(tuple(files)) for line in Path("/proc/self/maps").read_text().splitlines())

    before = mapped()
    read = float_tensors(str(model_dirs["llama"]))
    w = read("model.layers.0.mlp.up_proj.weight")
    assert w is not None and w.abs().sum() > 0 and read("no.such.weight") is None
    del w  # the tensor may view the mapped file; once it is gone, nothing of the file may stay mapped
    assert files and mapped() == before  # a mapping left open would keep every page read through it in RSS
