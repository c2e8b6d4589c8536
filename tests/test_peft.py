"""Adapters saved in PEFT LoRA format load in stock peft and reproduce our logits."""

import json

import pytest
import torch
from conftest import make_model
from helpers import add_adapters, randomize_coefficients, rt_examples, rt_task
from peft import PeftModel

from zoact_edge.adapters.files import load_peft, save_peft


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_peft_reload_reproduces_logits(tokenizer, tmp_path, arch):
    model = make_model(arch, len(tokenizer))
    task = rt_task(tokenizer)
    layers = add_adapters(model, task, rank=4)
    randomize_coefficients(layers, scale=0.5)
    save_peft(tmp_path, layers, base_model=arch)
    batch = task.collate(rt_examples(6))
    kw = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    with torch.inference_mode():
        ours = model(**kw).logits
        plain = make_model(arch, len(tokenizer))(**kw).logits
        peft_model = PeftModel.from_pretrained(make_model(arch, len(tokenizer)), str(tmp_path))
        theirs = peft_model(**kw).logits
    assert (ours - plain).abs().max() > 1e-3  # the adapter really changes the output
    assert (ours - theirs).abs().max() <= 1e-5
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 4 and cfg["fan_in_fan_out"] == (arch == "gpt2")


def test_load_peft_round_trip(tokenizer, tmp_path):
    model = make_model("llama", len(tokenizer))
    layers = add_adapters(model, rt_task(tokenizer), rank=3)
    randomize_coefficients(layers)
    save_peft(tmp_path, layers, base_model="x")
    _, pairs = load_peft(tmp_path)
    assert set(pairs) == set(layers)
    for name, (P, B) in pairs.items():
        assert torch.equal(P, layers[name].P) and torch.equal(B, layers[name].B)
