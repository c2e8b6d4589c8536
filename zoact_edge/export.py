"""``zoact-edge export``: the tuned model as a standalone ONNX decoder with a KV cache.

Why our own ``torch.onnx.export`` and not a packaged exporter: optimum-onnx (whose
``ORTModelForCausalLM`` would run the result) needs ``transformers<4.58`` and this project runs
on transformers 5; onnxruntime-genai's model builder re-implements each architecture itself and
covers Llama-family models but not GPT-2 or OPT, which this toolkit tunes too. Exporting the very
forward PyTorch runs (with the adapter merged) works for every architecture the tuner supports,
is checked against PyTorch logit by logit at export time, and needs only onnxruntime + numpy
to run (:mod:`zoact_edge.onnx_runtime`).

The graph is one decoder step for any prompt length: inputs ``input_ids``, ``attention_mask``
(past + new tokens), ``position_ids`` and ``past_key_values.{i}.key/value`` (batch, kv heads,
past, head dim; length 0 for the prompt); outputs ``logits`` and ``present.{i}.key/value``.
The names follow the usual ONNX decoder convention.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import adapter_io, rundir, targets as tgt
from .errors import UserError
from .onnx_runtime import META, OnnxDecoder, folder_bytes
from .paths import atomic_dir

log = logging.getLogger(__name__)
OPSET = 18
PARITY_TEXTS = [
    "Review: a gripping, beautifully acted film\nSentiment: It was",
    "the plot is thin and the jokes fall flat",
    "One of the best movies of the year.",
]


# --------------------------------------------------------------------------- merging


def merge_adapter(model: nn.Module, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """``W += B P^T`` for every adapted linear, in place (GPT-2's Conv1D stores W transposed)."""
    with torch.no_grad():
        for name, (P, B) in pairs.items():
            module = model.get_submodule(name)
            if not isinstance(getattr(module, "weight", None), torch.Tensor) or not module.weight.is_floating_point():
                raise UserError(f"cannot merge into {name}: its weight is not a float tensor")
            delta = (B.double() @ P.double().T)  # (d_out, d_in)
            if type(module).__name__ == "Conv1D":
                delta = delta.T
            if delta.shape != module.weight.shape:
                raise UserError(f"adapter does not fit the model: {name} is {tuple(module.weight.shape)}")
            module.weight.add_(delta.to(module.weight.dtype))


def load_merged(adapter_dir: str | Path, trust_remote_code: bool = False):
    """The fp32 base model of a run with its adapter merged, its tokenizer and the run config."""
    from .models import load_model

    adapter_dir = Path(adapter_dir)
    pcfg, pairs = adapter_io.load_peft(adapter_dir)
    run_cfg_path = adapter_dir / "run_config.json"
    run_cfg = json.loads(run_cfg_path.read_text()) if run_cfg_path.is_file() else {}
    if run_cfg.get("bits", 32) in (4, 8):
        # The adapter was tuned against quantized weights; merging into the fp32 originals would
        # silently export a different model than the one evaluated.
        raise UserError("export of adapters tuned with --bits 4/8 is not supported; tune with --bits 32 or 16")
    model_id = run_cfg.get("model") or pcfg.get("base_model_name_or_path")
    loaded = load_model(model_id, 32, device="cpu", trust_remote_code=trust_remote_code)
    for name, (P, B) in pairs.items():
        try:
            d_in, d_out = tgt.dims(loaded.model.get_submodule(name))
        except AttributeError:
            raise UserError(f"adapter {adapter_dir} does not fit this model: no module {name}") from None
        if (d_in, d_out) != (P.shape[0], B.shape[0]):
            raise UserError(f"adapter {adapter_dir} does not fit this model: {name} is {d_in}->{d_out}")
    merge_adapter(loaded.model, pairs)
    return loaded.model, loaded.tokenizer, run_cfg


# --------------------------------------------------------------------------- the decoder graph


class DecoderWithPast(nn.Module):
    """One decoder call with an explicit KV cache: tensors in, tensors out (what ONNX needs)."""

    def __init__(self, model: nn.Module, n_layers: int):
        super().__init__()
        self.model = model
        self.n_layers = n_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(self.n_layers)], config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        presents = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return (out.logits.float(), *presents)


def kv_shape(model: nn.Module) -> tuple[int, int, int]:
    """(layers, kv heads, head dim), read from a real cache rather than from config field names."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 2]]), use_cache=True)
    layers = out.past_key_values.layers
    k = layers[0].keys
    return len(layers), k.shape[1], k.shape[3]


def export_decoder(model: nn.Module, path: Path) -> dict:
    """Export ``model`` as a decoder-with-past ONNX graph at ``path``; return its metadata."""
    n_layers, kv_heads, head_dim = kv_shape(model)
    b, s, p = 2, 3, 4  # example sizes; none is 0 or 1, which torch.export would specialise on
    ids = torch.randint(4, model.config.vocab_size, (b, s))
    mask = torch.ones(b, p + s, dtype=torch.long)
    pos = torch.arange(p, p + s).expand(b, s).contiguous()
    kv = [torch.zeros(b, kv_heads, p, head_dim) for _ in range(2 * n_layers)]
    names_past = [f"past_key_values.{i}.{kind}" for i in range(n_layers) for kind in ("key", "value")]
    names_present = [f"present.{i}.{kind}" for i in range(n_layers) for kind in ("key", "value")]
    # Named dims become Dim.DYNAMIC; the exporter infers "total = past + seq" from the forward.
    dynamic = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
               "position_ids": {0: "batch", 1: "seq"}, "past": tuple({0: "batch", 2: "past"} for _ in kv)}
    with torch.no_grad():
        torch.onnx.export(DecoderWithPast(model, n_layers).eval(), (ids, mask, pos, *kv), str(path), dynamo=True,
                          external_data=True, opset_version=OPSET, verbose=False,
                          input_names=["input_ids", "attention_mask", "position_ids", *names_past],
                          output_names=["logits", *names_present], dynamic_shapes=dynamic)
    return {"num_layers": n_layers, "kv_heads": kv_heads, "head_dim": head_dim,
            "past_names": names_past, "present_names": names_present}


# --------------------------------------------------------------------------- parity


def _torch_logits(model, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(pos), use_cache=False)
    return out.logits.float().numpy()


def parity(model, decoder: OnnxDecoder, tokenizer, texts=PARITY_TEXTS, new_tokens: int = 3) -> tuple[float, float]:
    """(largest |logit difference| ONNX vs PyTorch, largest |PyTorch logit|) over a left-padded
    prompt batch and then cached decode steps.

    The decode steps feed ONNX its own KV cache and compare with a full PyTorch forward over the
    whole sequence, so a wrong cache shows up as a difference too.
    """
    seqs = [tokenizer(t).input_ids for t in texts]
    ids, mask, pos = decoder.left_pad(seqs, tokenizer.pad_token_id)
    logits, past = decoder.run(ids, mask, pos, decoder.empty_past(len(seqs)))
    ref = _torch_logits(model, ids, mask, pos)
    real = mask[:, :, None].astype(bool)
    worst = float(np.abs(np.where(real, logits - ref, 0)).max())
    scale = float(np.abs(np.where(real, ref, 0)).max())
    for _ in range(new_tokens):
        nxt = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        ids = np.concatenate([ids, nxt], axis=1)
        mask = np.concatenate([mask, np.ones_like(nxt)], axis=1)
        step_pos = pos[:, -1:] + 1
        pos = np.concatenate([pos, step_pos], axis=1)
        logits, past = decoder.run(nxt, mask, step_pos, past)
        ref = _torch_logits(model, ids, mask, pos)[:, -1:]
        worst = max(worst, float(np.abs(logits - ref).max()))
        scale = max(scale, float(np.abs(ref).max()))
    return worst, scale


def quantize_int4(src: Path, dst: Path, block_size: int) -> None:
    """Every constant-weight MatMul becomes an int4 MatMulNBits (symmetric, per block)."""
    import onnx

    from .onnx_backend import matmul_nbits_quantizer

    q = matmul_nbits_quantizer()(onnx.load(str(src)), bits=4, block_size=block_size, is_symmetric=True)
    q.process()
    q.model.save_model_to_file(str(dst), use_external_data_format=True)


# --------------------------------------------------------------------------- the command


def export(adapter: str, out: str, int4: bool = False, tolerance: float = 1e-4, block_size: int = 32,
           overwrite: bool = False, eval_samples: int = 200, trust_remote_code: bool = False) -> dict:
    """Merge, export, check parity (fail above ``tolerance``), optionally int4; write ``out``."""
    from .onnx_backend import require_onnxruntime

    require_onnxruntime()
    out_dir = Path(out)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not overwrite)):
        raise UserError(f"--out {out} exists and is not an empty folder; pass --overwrite to replace it")
    if overwrite and out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / META).is_file():
        raise UserError(f"--out {out} is not an export (no {META}); --overwrite only replaces an earlier export")
    with rundir.reading(adapter, f"--adapter {adapter}"):  # refused while a tune writes it
        model, tokenizer, run_cfg = load_merged(adapter, trust_remote_code)
    report: dict = {"adapter": str(adapter), "tolerance": tolerance}
    with atomic_dir(out_dir) as tmp:
        meta = export_decoder(model, tmp / "model.onnx")
        meta.update({"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id})
        (tmp / META).write_text(json.dumps(meta, indent=2))
        fp32 = OnnxDecoder(tmp)
        diff, scale = parity(model, fp32, tokenizer)
        report["fp32"] = {"max_abs_logit_diff": diff, "max_abs_logit": scale, "bytes": folder_bytes(tmp)}
        # relative to the logits' scale: fp32 rounding grows with depth and logit size
        if not np.isfinite(diff) or diff > tolerance * max(1.0, scale):
            raise UserError(f"exported model disagrees with PyTorch: max |logit diff| {diff:.3g} > tolerance "
                            f"{tolerance:g} x max |logit| {max(1.0, scale):.3g}; nothing was written")
        if int4:
            report["int4"] = _to_int4(tmp, model, tokenizer, run_cfg, block_size, eval_samples, fp32)
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if run_cfg:
            (tmp / "run_config.json").write_text(json.dumps(run_cfg, indent=2))
        meta["export"] = report
        (tmp / META).write_text(json.dumps(meta, indent=2))
    return report


def _to_int4(folder: Path, model, tokenizer, run_cfg, block_size, eval_samples, fp32: OnnxDecoder) -> dict:
    """Replace ``folder/model.onnx`` by its int4 version; report size and accuracy changes."""
    from .onnx_runtime import evaluate_onnx

    task = examples = None
    info: dict = {"block_size": block_size}
    if run_cfg:
        from .config import TuneConfig, build_config
        from .tasks import build_task

        known = {k: v for k, v in run_cfg.items() if k in TuneConfig.__dataclass_fields__}
        task, splits = build_task(build_config(TuneConfig, known, {}), tokenizer)
        examples = splits.validation[:eval_samples or None]
        info["validation_fp32"] = evaluate_onnx(fp32, task, examples)
    with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:
        q = Path(scratch) / "model.onnx"
        quantize_int4(folder / "model.onnx", q, block_size)
        for f in ("model.onnx", "model.onnx.data"):
            (folder / f).unlink(missing_ok=True)
        for f in Path(scratch).iterdir():
            shutil.move(str(f), folder / f.name)
    int4 = OnnxDecoder(folder)
    info["bytes"] = folder_bytes(folder)
    info["max_abs_logit_diff_vs_torch"], _ = parity(model, int4, tokenizer)
    if task is not None:
        info["validation_int4"] = evaluate_onnx(int4, task, examples)
    return info
