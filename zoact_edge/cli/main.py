"""``zoact-edge`` command line: ``tune`` and ``eval``.

Options are generated from :class:`~zoact_edge.config.TuneConfig`, so ``--help``, config files
and the saved run config never drift apart. User errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from ..config import TuneConfig, build_config, field_type, read_config_file
from ..errors import UserError

# Options --resume accepts with a value other than the run's: they change how the run is watched
# and saved, never the adapter it produces. Any other option must match run_config.json.
RESUME_MAY_CHANGE = ("device", "save_every", "eval_every", "eval_batch_size", "test_eval")
EVAL_FIELDS = ("model", "bits", "quant_type", "device", "trust_remote_code", "task", "data", "text_field",
               "label_field", "labels", "template", "max_length", "eval_samples", "eval_batch_size")


def _add_config_options(parser: argparse.ArgumentParser, only=None) -> None:
    for f in dataclasses.fields(TuneConfig):
        if only is not None and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        helptext = f.metadata.get("help", "")
        default_note = f" (default: {f.default})" if f.default is not None else ""
        typ = field_type(f)
        if typ is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=helptext + default_note)
        else:
            parser.add_argument(flag, type=typ, metavar=f.name.upper(), choices=f.metadata.get("choices"),
                                help=helptext + default_note)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zoact-edge",
        description="Forward-only (zeroth-order) fine-tuning in one-shot activation subspaces (ZO-Act).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tune = sub.add_parser(
        "tune", argument_default=argparse.SUPPRESS,
        help="tune a model with ZO-Act (runs with no arguments on the embedded model and data)",
        description="Tune LoRA-shaped adapters with forward passes only. With no arguments: SmolLM2-135M-Instruct "
                    "on Rotten Tomatoes sentence polarity, on CPU. Writes a PEFT LoRA adapter, metrics.jsonl, "
                    "summary.json and a resumable checkpoint to --output.",
    )
    tune.add_argument("--config", metavar="FILE", help="YAML/TOML/JSON file of options; CLI options override it")
    tune.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint, with the options "
                      "it was started with; only " + ", ".join("--" + f.replace("_", "-") for f in RESUME_MAY_CHANGE)
                      + " may differ (anything else that differs is refused)")
    _add_config_options(tune)

    ev = sub.add_parser(
        "eval", argument_default=argparse.SUPPRESS,
        help="evaluate the base model, or base + adapter, on a task split",
        description="Accuracy (classification) or loss/perplexity (lm, completion). With --adapter, the model, "
                    "bits and task default to the ones the adapter was tuned with.",
    )
    ev.add_argument("--adapter", metavar="DIR", help="adapter folder written by tune (PEFT LoRA format)")
    ev.add_argument("--split", choices=["train", "validation", "test"], help="split to evaluate (default: validation)")
    ev.add_argument("--json", metavar="FILE", help="also write the metrics to FILE as JSON")
    ev.add_argument("--onnx", metavar="DIR", help="evaluate a model written by `zoact-edge export` instead")
    _add_config_options(ev, only=EVAL_FIELDS)
    from .onnx import add_onnx_parsers

    add_onnx_parsers(sub)
    from ..profiling.harness import add_profile_parser

    add_profile_parser(sub)
    return parser


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def cmd_tune(args: dict) -> int:
    from ..recipes.zoact import describe, tune

    resume = args.pop("resume", None)
    file_values = read_config_file(args.pop("config")) if "config" in args else {}
    if resume:
        from ..rundir import recover

        recover(Path(resume), f"--resume {resume}")  # an overwrite killed mid-swap leaves the run beside DIR
        saved = _saved_config(Path(resume), f"--resume {resume}")
        saved.pop("model_folder", None)
        given = build_config(TuneConfig, {**saved, **file_values}, args)
        base = build_config(TuneConfig, saved, {})
        changed = [f.name for f in dataclasses.fields(TuneConfig) if f.name not in RESUME_MAY_CHANGE
                   and getattr(given, f.name) != getattr(base, f.name)]
        if changed:
            flag = changed[0].replace("_", "-")
            raise UserError(f"--resume {resume} continues the run as it was started: --{flag} is "
                            f"{getattr(base, changed[0])!r} there, not {getattr(given, changed[0])!r} "
                            f"(only {', '.join('--' + f.replace('_', '-') for f in RESUME_MAY_CHANGE)} may change)")
        file_values = {**saved, **file_values}
    cfg = build_config(TuneConfig, file_values, args)
    summary = tune(cfg, resume=resume)
    print(describe(summary))
    return 0


def _saved_config(folder: Path, what: str) -> dict:
    """run_config.json of a run folder, as a dict of options."""
    path = folder / "run_config.json"
    if not folder.is_dir():
        raise UserError(f"{what}: no such run folder")
    if not path.is_file():
        raise UserError(f"{what}: not a run folder (no run_config.json)")
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{what}: unreadable {path}: {e}") from None
    if not isinstance(saved, dict):
        raise UserError(f"{what}: {path} is not a mapping of options")
    return saved


def cmd_eval(args: dict) -> int:
    import torch

    from ..adapters import files as adapter_io, targets as tgt
    from ..data.evaluate import evaluate
    from ..models import load_model
    from ..data.tasks import build_task
    from ..recipes.zoact import inject_adapters

    adapter = args.pop("adapter", None)
    split = args.pop("split", "validation")
    json_out = args.pop("json", None)
    if "onnx" in args:
        from .onnx import cmd_eval_onnx

        if adapter:
            raise UserError("--onnx and --adapter are alternatives: the export already contains the adapter")
        return cmd_eval_onnx(args.pop("onnx"), args, EVAL_FIELDS, split, json_out)
    base_values = {}
    if adapter:
        if (Path(adapter) / "run_config.json").is_file():
            saved = _saved_config(Path(adapter), f"--adapter {adapter}")
            base_values = {k: saved[k] for k in EVAL_FIELDS if k in saved}
        pcfg, pairs = adapter_io.load_peft(Path(adapter))
        if "model" not in base_values and "model" not in args:
            base_values["model"] = pcfg.get("base_model_name_or_path")
    cfg = build_config(TuneConfig, base_values, args)
    loaded = load_model(cfg.model, cfg.bits, cfg.quant_type, cfg.device, cfg.trust_remote_code)
    task, splits = build_task(cfg, loaded.tokenizer)
    if adapter:
        names = {n for n, _ in loaded.model.named_modules()}
        missing = sorted(set(pairs) - names)
        if missing:
            raise UserError(f"adapter {adapter} does not fit this model: no module {missing[0]}")
        found = [tgt.Target(n, -1, P.shape[0], B.shape[0]) for n, (P, B) in pairs.items()]
        for t in found:
            d_in, d_out = tgt.dims(loaded.model.get_submodule(t.name))
            if (d_in, d_out) != (t.d_in, t.d_out):
                raise UserError(f"adapter {adapter} does not fit this model: {t.name} is {d_in}->{d_out}")
        dtype = torch.float32 if loaded.device.type == "cpu" else torch.float16
        inject_adapters(loaded.model, found, {n: P for n, (P, _) in pairs.items()},
                        {n: B for n, (_, B) in pairs.items()}, dtype, loaded.device)
    examples = splits.get(split)[: cfg.eval_samples or None]
    metrics = evaluate(loaded.model, task, examples, cfg.eval_batch_size, loaded.device, desc=f"eval {split}")
    result = {"split": split, "adapter": adapter, "model": cfg.model or "default", "bits": cfg.bits, **metrics}
    print(json.dumps(result, indent=2))
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    args = {k: v for k, v in vars(ns).items() if k != "command"}
    try:
        _setup_logging()
        if ns.command == "tune":
            return cmd_tune(args)
        if ns.command in ("export", "generate"):
            from .onnx import cmd_export, cmd_generate

            return cmd_export(args) if ns.command == "export" else cmd_generate(args)
        if ns.command in ("profile", "profiles"):
            from ..profiling.harness import cmd_profile, cmd_profiles

            return cmd_profile(args) if ns.command == "profile" else cmd_profiles(args)
        return cmd_eval(args)
    except UserError as e:  # something the user can fix: their input, or their machine (disk, permissions)
        return _fail(str(e), 2)
    except OSError as e:
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        return _fail(f"{e.strerror or e}{where}", 2)
    except KeyboardInterrupt:
        print("zoact-edge: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: still one line, the traceback on request
        if os.environ.get("ZOACT_TRACEBACK"):
            raise
        return _fail(f"internal error: {type(e).__name__}: {e} (set ZOACT_TRACEBACK=1 to see where)", 1)


def _fail(message: str, code: int) -> int:
    """Every failure is one line on stderr (exit 2: fix the input or the machine; 1: a bug)."""
    print("zoact-edge: error: " + " ".join(message.split()), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
