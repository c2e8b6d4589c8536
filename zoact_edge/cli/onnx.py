"""``zoact-edge export`` (its options generated from :class:`~zoact_edge.config.ExportOptions`), ``generate``
and ``eval --onnx``: the commands for exported ONNX models. Their optional dependencies (onnx, onnxruntime)
are imported only when one of them runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import ExportOptions
from ..errors import UserError
from .options import add_options, option_fields


def add_onnx_parsers(sub) -> None:
    ex = sub.add_parser(
        "export", argument_default=argparse.SUPPRESS,
        help="write a tuned run as a standalone ONNX model with KV cache",
        description="Export an ONNX decoder with KV cache plus tokenizer and config: the frozen weights as the "
                    "run tuned them (fp32, or the run's own bitsandbytes nf4/fp4 data for --bits 4) and the "
                    "adapter path (x P) B^T in float beside them. Checks its logits against PyTorch running the "
                    "same model and adapter (fails above --tolerance) and reports size and validation accuracy. "
                    "Run it with `zoact-edge generate --onnx DIR` or `zoact-edge eval --onnx DIR`.",
    )
    ex.add_argument("--adapter", metavar="DIR", required=True, help="run folder written by tune")
    ex.add_argument("--out", metavar="DIR", required=True, help="folder to write the ONNX model to")
    add_options(ex, ExportOptions)

    gen = sub.add_parser(
        "generate", argument_default=argparse.SUPPRESS,
        help="print a greedy completion from an exported ONNX model",
        description="Greedy decoding with the exported model and its KV cache (onnxruntime + numpy only).",
    )
    gen.add_argument("--onnx", metavar="DIR", required=True, help="folder written by export")
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.add_argument("--max-new-tokens", type=int, metavar="N", help="tokens to generate (default: 32)")


def cmd_export(args: dict) -> int:
    from ..onnx.export import export

    opts = ExportOptions(**{f.name: args[f.name] for f in option_fields(ExportOptions) if f.name in args})
    opts.validate()
    report = export(args["adapter"], args["out"], opts)
    print(json.dumps({"out": args["out"], **report}, indent=2))
    return 0


def cmd_generate(args: dict) -> int:
    from ..onnx.runtime import generate_text

    n = args.get("max_new_tokens", 32)
    if n < 1:
        raise UserError("--max-new-tokens must be >= 1")
    print(generate_text(args["onnx"], args["prompt"], n))
    return 0


def cmd_eval_onnx(folder: str, args: dict, eval_fields, split: str, json_out: str | None) -> int:
    """``eval --onnx DIR``: the task (by default the one the adapter was tuned on) on the export."""
    from ..config import TuneConfig, build_config
    from ..data.tasks import build_task
    from ..models import load_tokenizer
    from ..onnx.runtime import OnnxDecoder, evaluate_onnx

    decoder = OnnxDecoder(folder)
    saved_path = Path(folder) / "run_config.json"
    saved = json.loads(saved_path.read_text()) if saved_path.is_file() else {}
    base_values = {k: saved[k] for k in eval_fields if k in saved}
    base_values.pop("model", None)
    args.pop("model", None)
    cfg = build_config(TuneConfig, base_values, args)
    task, splits = build_task(cfg, load_tokenizer(folder))
    examples = splits.get(split)[: cfg.eval_samples or None]
    metrics = evaluate_onnx(decoder, task, examples, cfg.eval_batch_size)
    result = {"split": split, "onnx": folder, **metrics}
    print(json.dumps(result, indent=2))
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2))
    return 0
