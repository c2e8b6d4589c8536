"""``zoact-edge tune`` (with ``--config`` files and ``--resume``) and ``zoact-edge eval``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..config import TuneConfig, build_config, read_config_file
from ..errors import UserError

# Options --resume accepts with a value other than the run's: they change how the run is watched
# and saved, never the adapter it produces. Any other option must match run_config.json.
RESUME_MAY_CHANGE = ("device", "save_every", "eval_every", "eval_batch_size", "test_eval")
EVAL_FIELDS = ("model", "bits", "quant_type", "device", "trust_remote_code", "task", "data", "text_field",
               "label_field", "labels", "template", "max_length", "eval_samples", "eval_batch_size")



def cmd_tune(args: dict) -> int:
    from ..recipes.tune import describe, tune

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
    # an option newer than the run: the value the run ran with (its field's ``absent``), not today's default
    return {**{f.name: f.metadata["absent"] for f in dataclasses.fields(TuneConfig) if "absent" in f.metadata},
            **saved}


def cmd_eval(args: dict) -> int:
    import torch

    from ..adapters import files as adapter_io
    from ..adapters import targets as tgt
    from ..adapters.build import inject_adapters
    from ..data.evaluate import evaluate
    from ..data.tasks import build_task
    from ..models import load_model

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
