"""Frozen weights stay bit-identical in every precision; bitsandbytes 4/8-bit paths train on CPU."""

from pathlib import Path

import pytest
import torch
from helpers import fingerprint, rt_examples, rt_task

from zoact_edge.adapters import targets as tgt
from zoact_edge.adapters.build import build_adapters
from zoact_edge.models import load_model
from zoact_edge.zo.estimator import zo_step


def _warm_up(loaded):
    """One inference forward before the first fingerprint.

    bitsandbytes' bf16 CPU kernel would repack 4-bit weights at the first inference call; we
    switch it off (``models._keep_cpu_4bit_in_fp32``), so nothing may change here either."""
    with torch.inference_mode():
        loaded.model(input_ids=torch.tensor([[5, 6, 7]], device=loaded.device))
    for m in loaded.model.modules():
        assert not getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False)


def _train(loaded, steps, lr, seed=0):
    model = loaded.model
    task = rt_task(loaded.tokenizer)
    found = tgt.find_targets(model)
    dev = loaded.device
    calib = [task.collate(rt_examples(16, offset=100)).to(dev)]

    layers = list(build_adapters(model, calib, 4, found=found, dtype=torch.float32, device=dev).values())
    batch = task.collate(rt_examples(8)).to(dev)  # a toy task: fit eight fixed labels

    def loss():
        with torch.inference_mode():
            return float(task.loss(model, batch))

    opt = torch.optim.Adam([l.B for l in layers], lr=lr)
    first = loss()
    for step in range(steps):
        zo_step(layers, loss, opt, step_seed=seed * 1000 + step, eps=1e-2, queries=2)
    return first, loss(), layers


@pytest.mark.parametrize("bits", [4, 8, 32])
def test_frozen_weights_are_untouched_and_loss_goes_down(model_dirs, bits):
    loaded = load_model(str(model_dirs["llama"]), bits=bits, device="cpu")
    if bits == 4:
        assert any(type(m).__name__ == "Linear4bit" for m in loaded.model.modules())
    if bits == 8:
        assert any(type(m).__name__ == "Linear8bitLt" for m in loaded.model.modules())
    _warm_up(loaded)
    before = fingerprint(loaded.model)
    first, last, layers = _train(loaded, steps=60, lr=2e-2)
    assert fingerprint(loaded.model) == before
    assert last < 0.6 * first, f"{bits}-bit: loss {first:.4f} -> {last:.4f}"
    assert any(float(l.B.abs().max()) > 0 for l in layers)


def test_quantized_model_is_cached_and_reloaded(model_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("ZOACT_CACHE", str(tmp_path))
    load_model(str(model_dirs["gpt2"]), bits=4, device="cpu")
    cached = list((tmp_path / "quantized").iterdir())
    assert len(cached) == 1 and (cached[0] / "config.json").is_file()
    again = load_model(str(model_dirs["gpt2"]), bits=4, device="cpu")
    assert any(type(m).__name__ == "Linear4bit" for m in again.model.modules())
    assert len(list((tmp_path / "quantized").iterdir())) == 1


def test_a_gguf_is_converted_once_per_content_not_per_path(tmp_path, monkeypatch):
    """The same GGUF file in another environment (another path, another mtime) reuses the converted folder;
    a file with one byte changed gets its own. The digest the cache is keyed by is the file's SHA-256."""
    import hashlib
    import os
    import shutil
    import types

    import transformers

    from zoact_edge import models

    monkeypatch.setenv("ZOACT_CACHE", str(tmp_path / "cache"))
    conversions = []

    class Saved:
        def __init__(self, name):
            self.name, self.config = name, types.SimpleNamespace()

        def save_pretrained(self, folder):
            (Path(folder) / f"{self.name}.json").write_text("{}")

    def model_from(folder, gguf_file, **kw):
        conversions.append(Path(folder) / gguf_file)
        return Saved("config")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model_from)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **kw: Saved("tokenizer_config"))
    data = bytes(range(256)) * 1000
    first = tmp_path / "env1" / "m.gguf"
    first.parent.mkdir()
    first.write_bytes(data)
    copy = tmp_path / "env2" / "m.gguf"
    copy.parent.mkdir()
    shutil.copy(first, copy)
    os.utime(copy, ns=(1, 1))
    changed = tmp_path / "env3" / "m.gguf"
    changed.parent.mkdir()
    changed.write_bytes(data[:-1] + b"\x00")

    assert models.content_digest(first) == models.content_digest(copy) == hashlib.sha256(data).hexdigest()
    folder = models.convert_gguf(first)
    assert (folder / "config.json").is_file() and models.convert_gguf(copy) == folder
    assert models.convert_gguf(changed) != folder
    assert conversions == [first, changed]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits", [4, 16])
def test_cuda_paths_train_and_keep_weights(model_dirs, bits):
    loaded = load_model(str(model_dirs["llama"]), bits=bits, device="cuda")
    _warm_up(loaded)
    before = fingerprint(loaded.model)
    first, last, _ = _train(loaded, steps=60, lr=2e-2)
    assert last < first
    assert fingerprint(loaded.model) == before
