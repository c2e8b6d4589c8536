"""Run configuration: one dataclass, filled from defaults, then a YAML/TOML file, then the CLI.

The CLI options are generated from these fields (name, type, default, ``help``), so the config
file keys, the ``--options`` and the saved ``run_config.json`` always agree.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError


def opt(default, help: str, choices=None):  # noqa: A002 - mirrors argparse
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TuneConfig:
    # model
    model: str | None = opt(None, "hub id, local HF folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    bits: int = opt(32, "frozen weight precision: 4 (bitsandbytes nf4/fp4), 8 (LLM.int8), 16 (fp16/bf16), 32", [4, 8, 16, 32])
    quant_type: str = opt("nf4", "4-bit quantization type", ["nf4", "fp4"])
    device: str = opt("auto", "where to run: auto picks cuda when available", ["auto", "cpu", "cuda"])
    trust_remote_code: bool = opt(False, "allow model code from the hub (only for models you trust)")
    # task and data
    task: str = opt("rotten-tomatoes", "rotten-tomatoes (embedded), classification, lm ({'text'} JSONL) or completion ({'prompt','completion'} JSONL)",
                    ["rotten-tomatoes", "classification", "lm", "completion"])
    data: str | None = opt(None, "CSV/TSV/JSONL file for classification, lm and completion tasks (split 80/10/10 with a fixed seed)")
    text_field: str = opt("text", "column/key holding the text")
    label_field: str = opt("label", "column/key holding the label (classification)")
    labels: str | None = opt(None, "verbalizer LABEL:WORD,... e.g. positive:great,negative:terrible (classification)")
    template: str | None = opt(None, "prompt template with {text}; the label word is scored right after it")
    max_length: int = opt(64, "maximum tokens per example (prompts are cut from the left, text from the right)")
    # adapters and basis
    targets: str | None = opt(None, "comma-separated name patterns of linears to adapt, e.g. 'q_proj,v_proj' (default: all in the blocks)")
    layers: str | None = opt(None, "block range to adapt, e.g. 20-29 (default: all blocks)")
    rank: int = opt(16, "rank r of each adapter (basis size)")
    calib_samples: int = opt(64, "training examples in the one-shot basis calibration pass")
    basis_method: str = opt("auto", "basis estimator: exact gram (d_in^2 memory) or streamed randomized sketch", ["auto", "gram", "sketch"])
    basis_passes: int = opt(3, "calibration passes for the sketch estimator (>= 2; more = closer to exact)")
    adapter_dtype: str = opt("auto", "dtype of bases and coefficients: auto = fp32 on CPU, fp16 on GPU", ["auto", "fp32", "fp16", "bf16"])
    # ZO step and optimizer
    steps: int = opt(150, "ZO steps (each costs 2 x queries forwards)")
    batch_size: int = opt(16, "training examples per step")
    eps: float = opt(1e-3, "perturbation size epsilon")
    queries: int = opt(1, "random directions averaged per step")
    optimizer: str = opt("adam", "optimizer fed with the projected gradient", ["adam", "sgd"])
    lr: float = opt(1e-3, "learning rate")
    weight_decay: float = opt(0.0, "weight decay on the coefficients")
    momentum: float = opt(0.0, "momentum (sgd only)")
    schedule: str = opt("constant", "learning-rate schedule after warmup", ["constant", "linear", "cosine"])
    warmup_steps: int = opt(0, "linear warmup steps")
    seed: int = opt(0, "seed for data order, basis sketch and perturbations")
    # evaluation, checkpoints, output
    eval_every: int = opt(0, "evaluate on the validation split every N steps (0: only before and after)")
    eval_samples: int = opt(500, "validation examples per evaluation (0: all)")
    eval_batch_size: int = opt(16, "batch size for evaluation (larger is not faster on CPU, and costs memory)")
    save_every: int = opt(25, "write a resumable checkpoint every N steps (0: only at the end)")
    output: str | None = opt(None, "output folder (default: runs/<task>-<date>-<time>)")
    overwrite: bool = opt(False, "allow writing into a non-empty --output")
    max_bad_steps: int = opt(10, "abort after this many consecutive non-finite losses")

    def validate(self) -> None:
        checks = [
            (self.steps >= 0, "--steps must be >= 0"),
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.eval_batch_size >= 1, "--eval-batch-size must be >= 1"),
            (self.max_length >= 4, "--max-length must be >= 4"),
            (self.eps > 0, "--eps must be > 0"),
            (self.lr > 0, "--lr must be > 0"),
            (self.queries >= 1, "--queries must be >= 1"),
            (self.calib_samples >= 1, "--calib-samples must be >= 1"),
            (self.basis_passes >= 2, "--basis-passes must be >= 2"),
            (self.save_every >= 0 and self.eval_every >= 0, "--save-every / --eval-every must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise UserError(f"--{f.name.replace('_', '-')} {getattr(self, f.name)!r}: choose one of {', '.join(map(str, choices))}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def read_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        if p.suffix.lower() == ".toml":
            data = tomllib.loads(p.read_text())
        elif p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(p.read_text()) or {}
        elif p.suffix.lower() == ".json":
            data = json.loads(p.read_text())
        else:
            raise UserError(f"config file {path}: use .toml, .yaml or .json")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"config file {path}: {e}") from None
    except Exception as e:
        if type(e).__module__.startswith("yaml"):
            raise UserError(f"config file {path}: {str(e).splitlines()[0]}") from None
        raise
    if not isinstance(data, dict):
        raise UserError(f"config file {path}: expected a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}


def build_config(cls, file_values: dict, cli_values: dict):
    """Defaults < config file < explicit CLI options. Unknown keys are errors, not silently ignored."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(file_values) - set(names))
    if unknown:
        raise UserError(f"unknown option(s) in config file: {', '.join(unknown)}")
    values = {**file_values, **cli_values}
    for k, v in list(values.items()):
        if v is None:
            continue
        typ = type(names[k].default) if names[k].default is not None else str
        try:
            if typ is bool and not isinstance(v, bool):
                raise ValueError
            values[k] = typ(v) if typ in (int, float, str) else v
        except (TypeError, ValueError):
            raise UserError(f"option {k}: {v!r} is not a valid {typ.__name__}") from None
    cfg = cls(**values)
    cfg.validate()
    return cfg
