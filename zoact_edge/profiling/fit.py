"""Will it fit? A peak-memory estimator for ZO-Act tuning, and the device profiles' choice of settings.

The estimate is built from parts the profiler measures separately (``zoact-edge profile``):

    peak = runtime + weights(bits) + adapter state(rank) + activations(batch x seq)

* weights are counted exactly from the model's config (instantiated on the ``meta`` device, no
  memory): the adapted linears at the storage cost of ``bits`` (4-bit: half a byte per weight plus
  one fp32 absmax per 64-weight block), everything else at the compute dtype;
* adapter state is B, P, B's gradient and two Adam moments, exactly (B and its optimizer state
  are fp32 on every device);
* runtime (interpreter, torch, allocator) and the activation coefficient are *calibrated* on the
  profiler's measurements of the default model (``docs/profile-default/``), see ``CALIBRATION``.

A device profile (:mod:`zoact_edge.profiling.profiles`) holds a memory budget, the device kind,
preferred compute dtype and bits, and limits on batch, sequence length and rank. :func:`choose`
walks the settings from the most to the least preferred and returns the first whose estimate fits
the budget, or refuses, saying what would fit instead.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters import targets as tgt
from ..config import QUANTIZED_BITS
from ..errors import UserError
from ..memory import fmt_bytes
from ..models import resolve_model
from .profiles import Profile, list_profiles, load_profile

log = logging.getLogger(__name__)

# Calibration from `zoact-edge profile` on the default model (SmolLM2-135M, CPU, 2 cores; see
# docs/profile-default/*/report.json; fit.calibrate derives these from them, a test checks it).
# runtime_cpu: resident RSS after loading minus the weights, for 16/32-bit models and for 4/8-bit
# ones (bitsandbytes' kernels and buffers add ~45 MiB). act_bytes_per_token_width: the zoact
# method's "activations + transients" divided by batch x seq x (hidden + intermediate), the
# widest per-token tensors of a decoder block.
CALIBRATION = {
    "runtime_cpu_bytes": 404748800,
    "runtime_cpu_quantized_bytes": 451331456,
    "act_bytes_per_token_width": 53.52,
    # On CUDA, from `profile --device cuda` on an H200 (docs/results/gpu-h200/; fit.calibrate_cuda
    # derives both, a test checks it): what the allocator holds after loading beyond the weights
    # (the CUDA context itself sits outside the allocator: device profiles give it as `reserve`),
    # and the activation coefficient of a fused step with fp16/bf16 activations.
    "cuda_runtime_bytes": 73468032,
    "cuda_act_bytes_per_token_width": 25.33,
    "safety": 1.10,  # estimates are multiplied by this before comparing with a budget
}

BITS_BYTES = {32: 4.0, 16: 2.0, 8: 1.0, 4: 0.5 + 4 / 64}


def block_width(config) -> int:
    """hidden + intermediate size: the widest per-token tensors of a decoder block."""
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    return hidden + (getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None) or 4 * hidden)


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a model, read from its config without loading it."""

    adapted_params: int  # weights of the linears that get adapters (what 4/8-bit quantizes)
    other_params: int  # embeddings, norms, untied head: kept at the compute dtype
    sum_d_in: int  # over adapted linears
    sum_d_out: int
    width: int  # hidden + intermediate size of a block
    vocab: int

    @classmethod
    def from_config(cls, config, targets: str | None = None, layers: str | None = None) -> "ModelShape":
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        found = tgt.find_targets(model, targets, layers)
        adapted = sum(t.d_in * t.d_out for t in found)
        total = sum(p.numel() for p in model.parameters())
        return cls(adapted, total - adapted, sum(t.d_in for t in found), sum(t.d_out for t in found),
                   block_width(config), config.vocab_size)

    @classmethod
    def from_model(cls, model: str | None, targets: str | None = None, layers: str | None = None) -> "ModelShape":
        from transformers import AutoConfig

        source = resolve_model(model)
        try:
            config = AutoConfig.from_pretrained(source)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"cannot read the config of {source!r}: {e}") from None
        return cls.from_config(config, targets, layers)

    @property
    def params(self) -> int:
        return self.adapted_params + self.other_params


@dataclass(frozen=True)
class Setting:
    bits: int
    batch: int
    seq: int
    rank: int


def estimate_bytes(shape: ModelShape, s: Setting, device: str = "cpu", task: str = "classification",
                   calibration: dict | None = None) -> int:
    """Estimated peak of a ZO-Act run (before the safety factor)."""
    cal = {**CALIBRATION, **(calibration or {})}
    other_bytes = 4 if (device == "cpu" and s.bits != 16) or (device != "cpu" and s.bits == 32) else 2
    weights = shape.adapted_params * BITS_BYTES[s.bits] + shape.other_params * other_bytes
    basis_bytes = 4 if device == "cpu" else 2  # P in the adapter dtype; B, its gradient and Adam's moments fp32
    state = (4 * 4 * shape.sum_d_out + basis_bytes * shape.sum_d_in) * s.rank
    tokens = s.batch * s.seq
    act = (
        cal["act_bytes_per_token_width" if device == "cpu" else "cuda_act_bytes_per_token_width"] * tokens * shape.width
    )
    if task in ("lm", "completion"):  # fp32 logits and their log-softmax, 1024 positions at a time
        act += 2 * 4 * min(tokens, 1024) * shape.vocab
    if device != "cpu":
        runtime = cal["cuda_runtime_bytes"]
    else:
        runtime = cal["runtime_cpu_quantized_bytes"] if s.bits in QUANTIZED_BITS else cal["runtime_cpu_bytes"]
    return int(runtime + weights + state + act)


def calibrate(reports: list[dict], shape: ModelShape) -> dict:
    """CALIBRATION values from CPU profiler reports of one model (``zoact-edge profile`` JSON).

    Conservative: the largest runtime (per precision class) and the largest activation coefficient
    seen for ``zoact``. A class without a measurement borrows the other's runtime.
    """
    runtime, act = {False: 0, True: 0}, 0.0
    for r in reports:
        e, s = r["methods"]["zoact"], r["settings"]
        if e.get("status") != "ok" or s["device"] != "cpu":
            continue
        quantized = s["bits"] in QUANTIZED_BITS
        runtime[quantized] = max(runtime[quantized], e["breakdown"]["runtime"])
        act = max(act, e["breakdown"]["activations_transients"] / (s["batch"] * s["seq"] * shape.width))
    if not any(runtime.values()):
        raise UserError("no CPU zoact measurement in the reports")
    return {"runtime_cpu_bytes": int(runtime[False] or runtime[True]),
            "runtime_cpu_quantized_bytes": int(runtime[True] or runtime[False]),
            "act_bytes_per_token_width": round(act, 2)}


def calibrate_cuda(measured: list[tuple[dict, ModelShape]]) -> dict:
    """``cuda_act_bytes_per_token_width`` from CUDA profiler reports, each with its model's shape.

    Conservative like :func:`calibrate`: the largest values seen for ``zoact``. The runtime is what
    the allocator holds after loading beyond the weights (cuBLAS workspace, buffers): ~50 MiB.
    """
    act, runtime = 0.0, 0
    for r, shape in measured:
        e, s = r["methods"]["zoact"], r["settings"]
        if e.get("status") == "ok" and s["device"] == "cuda":
            act = max(act, e["breakdown"]["activations_transients"] / (s["batch"] * s["seq"] * shape.width))
            runtime = max(runtime, e["resident_bytes"] - e["breakdown"]["weights"])
    if not act:
        raise UserError("no CUDA zoact measurement in the reports")
    return {"cuda_runtime_bytes": runtime,
            "cuda_act_bytes_per_token_width": math.ceil(act * 100) / 100}  # rounded up: never below


def _halvings(top: int, bottom: int) -> list[int]:
    out, v = [], top
    while v >= bottom:
        out.append(v)
        if v == bottom:
            break
        v = max(v // 2, bottom)
    return out


def fits(shape, s: Setting, profile: Profile, task: str = "classification", calibration=None) -> tuple[bool, int]:
    """(whether ``s`` fits ``profile``'s budget, the bytes it needs: estimate x safety + the profile's reserve)."""
    need = int(estimate_bytes(shape, s, profile.device, task, calibration) * (calibration or {}).get(
        "safety", CALIBRATION["safety"])) + profile.reserve_bytes
    return need <= profile.budget_bytes, need


def choose(shape: ModelShape, profile: Profile, want: Setting, task: str = "classification",
           calibration: dict | None = None) -> tuple[Setting, int]:
    """The most preferred setting (at most ``want``, within the profile's limits) that fits.

    Order: the profile's bits preference first; at each bits, the largest batch x seq (the run
    the user asked for, then halving batch before seq), then rank. Returns (setting, estimate).
    """
    batch_top = max(min(want.batch, profile.max_batch), profile.min_batch)
    seq_top = max(min(want.seq, profile.max_seq), profile.min_seq)
    rank_top = max(min(want.rank, profile.max_rank), profile.min_rank)
    for bits in profile.bits:
        shapes = [(b, q) for q in _halvings(seq_top, profile.min_seq) for b in _halvings(batch_top, profile.min_batch)]
        shapes.sort(key=lambda bq: (-(bq[0] * bq[1]), -bq[1]))
        for b, q in shapes:
            for r in _halvings(rank_top, profile.min_rank):
                s = Setting(bits, b, q, r)
                ok, need = fits(shape, s, profile, task, calibration)
                if ok:
                    return s, need
    smallest = Setting(min(profile.bits, key=lambda b: BITS_BYTES[b]), profile.min_batch, profile.min_seq,
                       profile.min_rank)
    _, need = fits(shape, smallest, profile, task, calibration)
    others = [p.name for p in list_profiles() if p.name != profile.name and
              any(fits(shape, dataclasses.replace(smallest, bits=b), p, task, calibration)[0] for b in p.bits)]
    raise UserError(
        f"the model ({shape.params / 1e6:.0f}M parameters) does not fit profile {profile.name} "
        f"(budget {fmt_bytes(profile.budget_bytes)}): even {smallest.bits}-bit, batch {smallest.batch}, "
        f"seq {smallest.seq}, rank {smallest.rank} needs about {fmt_bytes(need)}. "
        + (f"It would fit: {', '.join(others)}." if others else
           "No listed profile fits it; use a smaller model or a device with more memory."))


def apply_profile(cfg):
    """TuneConfig with bits, batch size, max length and rank chosen to fit ``cfg.profile``.

    The values in ``cfg`` are upper bounds (what the user asked for); the profile only lowers them.
    """
    profile = load_profile(cfg.profile)
    shape = ModelShape.from_model(cfg.model, cfg.targets, cfg.layers)
    task = "classification" if cfg.task in ("rotten-tomatoes", "tweets", "classification") else cfg.task
    s, need = choose(shape, profile, Setting(cfg.bits, cfg.batch_size, cfg.max_length, cfg.rank), task)
    log.info(
        "profile %s: --bits %d --batch-size %d --max-length %d --rank %d (estimated peak %s of %s)", profile.name,
        s.bits, s.batch, s.seq, s.rank, fmt_bytes(need), fmt_bytes(profile.budget_bytes))
    device = cfg.device if cfg.device != "auto" else profile.device
    return dataclasses.replace(cfg, bits=s.bits, batch_size=s.batch, max_length=s.seq, rank=s.rank, device=device)


# --------------------------------------------------------------------------- a loaded model's batch


def headroom_bytes(device) -> int | None:
    """Memory this process can still take: CUDA free memory; on Linux MemAvailable, capped by a cgroup limit."""
    if device.type == "cuda":
        return (
            torch.cuda.mem_get_info(device)[0]
            + torch.cuda.memory_reserved(device)
            - torch.cuda.memory_allocated(device)
        )
    try:
        with open("/proc/meminfo") as f:
            free = next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    try:  # cgroup v2 (containers): what is left under the limit
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            free = min(free, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return free


def check_batch_fits(config, found, cfg, device, rows_per_example: int = 1) -> None:
    """Refuse, before any forward, a batch x length whose activations (the estimate above, minus the
    weights and runtime already loaded) cannot fit in the memory left; say the largest batch that fits.

    ``rows_per_example``: rows a training forward holds per example (2 or 2 x queries when fused).
    """
    free = headroom_bytes(device)
    if free is None:
        return
    shape = ModelShape(0, 0, sum(t.d_in for t in found), sum(t.d_out for t in found), block_width(config),
                       config.vocab_size)
    task = cfg.task if cfg.task in ("lm", "completion") else "classification"
    loaded = {"runtime_cpu_bytes": 0, "runtime_cpu_quantized_bytes": 0, "cuda_runtime_bytes": 0}

    def need(rows: int) -> int:
        setting = Setting(cfg.bits, rows, cfg.max_length, cfg.rank)
        return int(estimate_bytes(shape, setting, device.type, task, loaded) * CALIBRATION["safety"])

    for flag, size, per in (
        ("--batch-size", cfg.batch_size, rows_per_example),
        ("--eval-batch-size", cfg.eval_batch_size, 1),
    ):
        if need(size * per) <= free:
            continue
        lo, hi = 0, size  # the largest size that fits, by bisection (need grows with the batch)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if need(mid * per) <= free else (lo, mid - 1)
        advice = (f"the largest {flag} that fits at this length is {lo}" if lo else
                  "it does not fit even at batch 1: lower --max-length")
        raise UserError(f"{flag} {size} x --max-length {cfg.max_length} needs about {fmt_bytes(need(size * per))} "
                        f"for activations, more than the {fmt_bytes(free)} left on {device.type}; {advice}")
