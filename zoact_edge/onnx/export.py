"""``zoact-edge export``: the tuned model as a standalone ONNX decoder with a KV cache.

Why our own ``torch.onnx.export`` and not a packaged exporter: optimum-onnx (whose
``ORTModelForCausalLM`` would run the result) needs ``transformers<4.58`` and this project runs
on transformers 5; onnxruntime-genai's model builder re-implements each architecture itself and
covers Llama-family models but not GPT-2 or OPT, which this toolkit tunes too. Exporting the very
forward PyTorch runs works for every architecture the tuner supports, is checked against PyTorch
logit by logit at export time, and needs only onnxruntime + numpy to run
(:mod:`zoact_edge.onnx.runtime`).

What is exported is what was tuned: the frozen weights and the adapter path ``(x @ P) @ B^T``
stay apart (:mod:`zoact_edge.onnx.export_layers`), so a run tuned on bitsandbytes 4-bit weights ships
those very weights (``MatMulBnb4``), and ``--int4`` re-quantizes only the frozen weights of a
16/32-bit run while the small update stays float (:mod:`zoact_edge.onnx.forms`). ``--merge``
folds ``B P^T`` into float weights instead, for a plain model.

The graph is one decoder step for any prompt length: inputs ``input_ids``, ``attention_mask``
(past + new tokens), ``position_ids`` and ``past_key_values.{i}.key/value`` (batch, kv heads,
past, head dim; length 0 for the prompt); outputs ``logits`` and ``present.{i}.key/value``.
The names follow the usual ONNX decoder convention.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import rundir
from ..adapters import files as adapter_io
from ..adapters import targets as tgt
from ..config import ExportOptions
from ..errors import UserError
from ..paths import atomic_dir
from . import forms as onnx_forms
from .export_layers import COEFF, FROZEN, INT8_REFUSAL, stand_ins, swapped
from .forms import INT4_BLOCK
from .runtime import META, MODEL, OnnxDecoder, folder_bytes
from .session import require_onnxruntime

log = logging.getLogger(__name__)
OPSET = 18
PARITY_TEXTS = [
    "Review: a gripping, beautifully acted film\nSentiment: It was",
    "the plot is thin and the jokes fall flat",
    "One of the best movies of the year.",
]


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


# --------------------------------------------------------------------------- the tuned run


@dataclass
class TunedRun:
    model: nn.Module  # the frozen model the run tuned (fp32 or bitsandbytes 4-bit), no adapters yet
    tokenizer: object
    config: dict  # run_config.json ({} if the folder has none)
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]  # {linear: (P, B)}
    int4_block: int | None  # the run tuned int4 MatMulNBits weights of this block size (--backend ort --bits 4)


def load_run(adapter_dir: str | Path, opts: ExportOptions) -> TunedRun:
    """The frozen model exactly as the run tuned it, its adapter, tokenizer and config.

    Refuses what cannot be exported faithfully before loading anything large.
    """
    from ..models import load_model

    adapter_dir = Path(adapter_dir)
    pcfg, pairs = adapter_io.load_peft(adapter_dir)
    cfg_path = adapter_dir / "run_config.json"
    run_cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    bits, ort_int4 = run_cfg.get("bits", 32), run_cfg.get("backend") == "ort" and run_cfg.get("bits") == 4
    if bits == 8:
        raise UserError(INT8_REFUSAL)
    if bits == 4 and opts.merge:
        raise UserError("--merge needs float weights; this run was tuned on 4-bit weights, which are exported "
                        "as they are with the adapter path beside them")
    if bits == 4 and opts.int4 and not ort_int4:
        raise UserError("--int4 re-quantizes the weights of 16/32-bit runs; this run was tuned on bitsandbytes "
                        f"{run_cfg.get('quant_type', 'nf4')} weights, which are exported as they are")
    model_id = run_cfg.get("model") or pcfg.get("base_model_name_or_path")
    # --backend ort --bits 4 tuned the int4 graph of the fp32 weights: load fp32 and re-quantize alike
    load_bits = 4 if bits == 4 and not ort_int4 else 32
    loaded = load_model(model_id, load_bits, run_cfg.get("quant_type", "nf4"), device="cpu",
                        trust_remote_code=opts.trust_remote_code)
    return TunedRun(loaded.model, loaded.tokenizer, run_cfg, pairs, INT4_BLOCK if ort_int4 else None)


def _validation_set(run: TunedRun, eval_samples: int):
    """The run's task and its first ``eval_samples`` validation examples (None, None without a run config)."""
    if not run.config:
        return None, None
    from ..config import TuneConfig, build_config
    from ..data.tasks import build_task

    known = {k: v for k, v in run.config.items() if k in TuneConfig.__dataclass_fields__}
    task, splits = build_task(build_config(TuneConfig, known, {}), run.tokenizer)
    return task, splits.validation[:eval_samples or None]


def _measure(folder: Path, reference, tokenizer, task, examples) -> dict:
    """Size, largest logit difference against ``reference`` and validation metrics of the graph in ``folder``."""
    from .runtime import evaluate_onnx

    decoder = OnnxDecoder(folder)
    diff, scale = parity(reference, decoder, tokenizer)
    info = {"bytes": folder_bytes(folder), "max_abs_logit_diff": diff, "max_abs_logit": scale}
    if task is not None:
        info["validation"] = evaluate_onnx(decoder, task, examples)
    return info


# --------------------------------------------------------------------------- the command


def export(adapter: str, out: str, opts: ExportOptions | None = None) -> dict:
    """Export the run in ``adapter`` to ``out``; fail if the graph disagrees with PyTorch."""
    opts = opts or ExportOptions()
    require_onnxruntime()
    out_dir = Path(out)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not opts.overwrite)):
        raise UserError(f"--out {out} exists and is not an empty folder; pass --overwrite to replace it")
    if opts.overwrite and out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / META).is_file():
        raise UserError(f"--out {out} is not an export (no {META}); --overwrite only replaces an earlier export")
    with rundir.reading(adapter, f"--adapter {adapter}"):  # refused while a tune writes it
        run = load_run(adapter, opts)
    int4 = opts.int4 or run.int4_block is not None
    block = run.int4_block or opts.block_size
    modules, weights = stand_ins(run.model, run.pairs, merge=opts.merge)
    task, examples = _validation_set(run, opts.eval_samples)
    report: dict = {"adapter": str(adapter), "tolerance": opts.tolerance, "merged": opts.merge}
    with atomic_dir(out_dir) as tmp:
        log.info("exporting the decoder graph (%d linears, adapter %s)", len(weights),
                 "merged" if opts.merge else "as a float path")
        with swapped(run.model, modules):
            meta = export_decoder(run.model, tmp / MODEL)
        del modules
        for name, (P, B) in run.pairs.items():  # the PyTorch reference: the run's model with its adapter
            tgt.wrap(run.model, name, P.float(), B.float())
        initializer = {name: f"model.{name}.{FROZEN}" for name in weights}  # DecoderWithPast holds it as .model
        bnb4 = {initializer[n]: {"form": w.form, "packed": w.packed, "absmax": w.absmax, "block_size": w.block_size,
                                 "K": w.shape[0], "N": w.shape[1]} for n, w in weights.items() if w.form != "float"}
        if bnb4:
            log.info("writing the run's own 4-bit weights into %d MatMulBnb4 nodes", len(bnb4))
            onnx_forms.rewrite(tmp / MODEL, bnb4=bnb4)
        first = next(iter(bnb4.values()))["form"] if bnb4 else "fp32"
        meta.update({"eos_token_id": run.tokenizer.eos_token_id, "pad_token_id": run.tokenizer.pad_token_id})
        (tmp / META).write_text(json.dumps(meta, indent=2))
        report[first] = _measure(tmp, run.model, run.tokenizer, task, examples)
        diff, scale = report[first]["max_abs_logit_diff"], report[first]["max_abs_logit"]
        # relative to the logits' scale: fp32 rounding grows with depth and logit size
        if not np.isfinite(diff) or diff > opts.tolerance * max(1.0, scale):
            raise UserError(f"exported model disagrees with PyTorch: max |logit diff| {diff:.3g} > tolerance "
                            f"{opts.tolerance:g} x max |logit| {max(1.0, scale):.3g}; nothing was written")
        forms = {n: w.form for n, w in weights.items()}
        # --int4 on a float run: the adapter path absorbs the rounding error in its subspace; a run tuned
        # on these very int4 weights (--backend ort --bits 4) and a merged model have nothing to correct
        fixed = run.pairs if int4 and opts.compensate and not opts.merge and run.int4_block is None else {}
        if int4:  # the int4 graph is measured against the float model: rounding the weights is the point
            log.info("quantizing %d frozen weights to int4 MatMulNBits (block %d)", len(initializer), block)
            comp = {initializer[n]: (f"model.{n}.{COEFF}", P.float().numpy(), weights[n].weight_t.numpy())
                    for n, (P, _) in fixed.items()}
            onnx_forms.rewrite(tmp / MODEL, int4=set(initializer.values()), block_size=block, compensate=comp)
            report["int4"] = {"block_size": block, "compensated": len(comp),
                              **_measure(tmp, run.model, run.tokenizer, task, examples)}
            forms = dict.fromkeys(weights, "int4")
        meta["layers"] = {n: {"form": f, "adapter": n in run.pairs and not opts.merge} for n, f in forms.items()}
        for n in fixed:
            meta["layers"][n]["compensated"] = True
        meta["export"] = report
        _write_companions(tmp, run, meta)
    return report


def _write_companions(folder: Path, run: TunedRun, meta: dict) -> None:
    """Config, tokenizer, run config and the graph description beside the model."""
    config = copy.deepcopy(run.model.config)
    if hasattr(config, "quantization_config"):  # the graph holds the weights; nothing for transformers to quantize
        del config.quantization_config
    config.save_pretrained(folder)
    if getattr(run.model, "generation_config", None) is not None:
        run.model.generation_config.save_pretrained(folder)
    run.tokenizer.save_pretrained(folder)
    if run.config:
        (folder / "run_config.json").write_text(json.dumps(run.config, indent=2))
    (folder / META).write_text(json.dumps(meta, indent=2))
