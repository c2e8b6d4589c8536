"""docs/gpu.md: the GPU check's results, fit.py against them, and what fits on each GPU profile.

Reads the committed outputs of ``tools/gpu_check.sh`` (docs/results/gpu-h200/run-*/) and writes:

* ``docs/results/gpu-h200.json``: per GPU-check run, the CUDA test outcomes and the figures they
  recorded, the measured peaks and step times, the goals; and fit.py's estimate (with today's
  calibration) against every measured ZO-Act peak;
* ``docs/results/fit.json`` and the tables of ``docs/gpu.md``: for every CUDA device profile in profiles/ and
  three real model shapes (Llama-3-8B, Qwen2.5-7B, SmolLM2-1.7B, from their published configs;
  nothing is downloaded), the largest batch x length that fits at 4 bits, rank 16.

    python tools/fit_report.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from gpu_check import GOALS, SHAPES, fit_row, shape_of  # noqa: E402

from zoact_edge.paths import atomic_write  # noqa: E402
from zoact_edge.profiling import fit  # noqa: E402
from zoact_edge.profiling.profiles import Profile, list_profiles  # noqa: E402

RESULTS = ROOT / "docs" / "results"
GPU_RUNS = RESULTS / "gpu-h200"
# Published configs (config.json of each model), the fields the estimate needs.
BIG_MODELS = {
    "Llama-3-8B": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)),
    "Qwen2.5-7B": ("qwen2", dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)),
    "SmolLM2-1.7B": ("llama", dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                                   num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=True)),
}
RANK = 16
# Runs made with today's adapter state (fp32 coefficients and Adam state). run-1 predates that fix
# (fp16 coefficients, whose Adam state turned tune's losses non-finite) and is kept as evidence only.
CURRENT_RUNS = ("run-2", "run-3", "run-4", "run-5")


def _shape(kind: str, fields: dict) -> fit.ModelShape:
    from transformers import LlamaConfig, Qwen2Config

    return fit.ModelShape.from_config((Qwen2Config if kind == "qwen2" else LlamaConfig)(**fields))


def gpu_reports() -> list[tuple[str, dict, fit.ModelShape]]:
    """(run name, profile report, model shape) for every committed CUDA profile report."""
    out = []
    for path in sorted(GPU_RUNS.glob("run-*/profile-*/report.json")):
        if path.parent.parent.name not in CURRENT_RUNS:
            continue
        report = json.loads(path.read_text())
        name = Path(report["settings"]["model"]).name
        out.append((path.parent.parent.name, report, shape_of(SHAPES[name])))
    return out


def estimates_vs_measured(reports) -> list[dict]:
    return [{"run": run, **row} for run, r, shape in reports if (row := fit_row(r, shape)) is not None]


def gpu_summary(reports) -> dict:
    runs = {}
    for path in sorted(GPU_RUNS.glob("run-*/gpu-check.json")):
        r = json.loads(path.read_text())
        runs[path.parent.name] = {k: r.get(k) for k in ("env", "started", "stages", "tests", "bench_step", "fit")}
    lo, hi = GOALS["fit_estimate_over_measured"]
    rows = estimates_vs_measured(reports)
    return {
        "what": "tools/gpu_check.sh on a lent H200 (random-weight models of real shapes, batch 8 x 256 for profile)",
        "runs": runs,
        "fit_now": {
            "calibration": {
                k: fit.CALIBRATION[k] for k in ("cuda_runtime_bytes", "cuda_act_bytes_per_token_width", "safety")
            },
            "rows": rows,
            "goal": f"{lo} <= estimate / measured <= {hi}",
            "in_sample": "the CUDA coefficients are calibrated on these same reports (fit.calibrate_cuda)",
            "runs_used": list(CURRENT_RUNS),
            "all_met": all(lo <= r["estimate_over_measured"] <= hi for r in rows),
        },
    }


def largest_fit(shape: fit.ModelShape, profile: Profile, bits: int = 4) -> dict | None:
    """The largest batch x seq (ties: the longer seq) within the profile's limits that fits at ``bits``."""
    best = None
    seqs = [q for q in (32, 64, 128, 256, 512, 1024, 2048, 4096) if profile.min_seq <= q <= profile.max_seq]
    batches = [b for b in (1, 2, 4, 8, 16, 32, 64, 128) if profile.min_batch <= b <= profile.max_batch]
    for q in seqs:
        for b in batches:
            ok, need = fit.fits(shape, fit.Setting(bits, b, q, RANK), profile)
            if ok and (best is None or (b * q, q) > (best["batch"] * best["seq"], best["seq"])):
                best = {"batch": b, "seq": q, "tokens": b * q, "need_bytes": need}
    return best


def fit_table() -> dict:
    profiles = [p for p in list_profiles() if p.device == "cuda"]
    rows = []
    for model, (kind, fields) in BIG_MODELS.items():
        shape = _shape(kind, fields)
        for p in profiles:
            best = largest_fit(shape, p)
            weights = fit.estimate_bytes(shape, fit.Setting(4, 1, 1, RANK), "cuda")
            rows.append({"model": model, "params": shape.params, "profile": p.name, "budget_bytes": p.budget_bytes,
                         "reserve_bytes": p.reserve_bytes, "bits": 4, "rank": RANK, "fits": best is not None,
                         "weights_and_state_bytes": weights, **(best or {})})
    return {"calibration": fit.CALIBRATION, "rows": rows}


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f}"


INTRO = """# zoact-edge on a GPU

Generated by `tools/fit_report.py` from the committed results of `tools/gpu_check.sh`
(docs/results/gpu-h200/) and from `zoact_edge/profiling/fit.py`; do not edit by hand.

## Running the check

A GPU is lent to this project now and then, for minutes. `tools/gpu_check.sh` does everything that
needs one in a single command, each stage with its own time limit (a failed stage is recorded and
the others go on): the CUDA tests (tests/test_cuda.py and the CUDA tests of other files, JUnit XML
with every figure they record), random-weight models of real shapes built on the spot (SmolLM2-135M
and a 1.1 B Llama; memory and time do not depend on trained values), `zoact-edge profile` for
inference / zoact / fo-lora at 4 and 16 bits (batch 8 x 256), `tools/bench_step.py` on both shapes,
and fit.py's estimate against the measured peaks. Results go to `$OUT` (gpu-check.json,
cuda-tests.xml, gpu-check.log, reports.tar.gz).

    bash tools/gpu_wheels.sh            # here: the wheels the GPU machine lacks, into .whl/ (21 MiB)
    bash tools/gpu_check.sh             # there, with .whl carried: about 6 minutes on an H200
    bash tools/gpu_check.sh --dry-run   # anywhere: CPU, tiny shape (CI runs this)
    python tools/fit_report.py          # here, after committing the outputs under docs/results/gpu-h200/
"""


def _mib(n) -> str:
    return "" if n is None else f"{n / 2**20:,.0f}"


def _tests_section(summary: dict) -> list[str]:
    lines = ["## CUDA tests", "", "| run | passed | failed | skipped | failed tests |", "|---|---|---|---|---|"]
    for run, r in summary["runs"].items():
        t = r.get("tests")
        if not t:
            lines.append(f"| {run} | not run | | | |")
            continue
        c = t["counts"]
        failed = ", ".join(f"`{n.split('::')[1]}`" for n, v in t["cases"].items() if v["outcome"] == "failed")
        lines.append(f"| {run} | {c['passed']} | {c['failed']} | {c['skipped']} | {failed} |")
    lines += ["", "Run 1 found a real bug: with fp16 coefficients (then the CUDA default) `tune`'s loss was non-finite "
              "from the second step on, because Adam's second moment 0.001 g^2 underflows to 0 in fp16. "
              "Coefficients, their gradient and Adam's state are fp32 on every device since run 2. The ONNX Runtime "
              "CUDA tests skip: that machine has the CPU build of onnxruntime.", ""]
    return lines


def _memory_section(reports) -> list[str]:
    lines = ["## Peak memory (CUDA reserved, MiB; batch 8 x 256, rank 16)", "",
             "| run | shape | bits | inference | zoact | fo-lora | zoact / inference | fo-lora / inference |",
             "|---|---|---|---|---|---|---|---|"]
    for run, r, _ in reports:
        m = r["methods"]
        peak = {k: m[k].get("peak_bytes") for k in ("inference", "zoact", "fo-lora")}
        lines.append(f"| {run} | {Path(r['settings']['model']).name} | {r['settings']['bits']} | "
                     + " | ".join(_mib(peak[k]) for k in ("inference", "zoact", "fo-lora"))
                     + f" | {m['zoact'].get('ratio_to_inference'):.3f} | {m['fo-lora'].get('ratio_to_inference'):.3f} "
                       f"|")
    lines += ["", "Runs 2 and 3 measured the 4-bit inference peak in the process that had just quantized the model, "
              "whose quantizing copy stayed resident, so their 4-bit inference column is too high and their ratios "
              "too low. Since run 4 `profile` quantizes in a separate process first: the 4-bit inference peak reads "
              "188 MiB (135M shape) and 942 MiB (1.1 B) where runs 2-3 read 246 and 1,256, and ZO-Act's 4-bit peak "
              "is 1.61x and 1.36x an inference forward, so the goal of 1.05x is not met; at 16 bits it is 1.27x and "
              "1.14x. ZO-Act's own peaks are the same in every run (302 and 1,280 MiB at 4 bits). What it adds over "
              "inference is about the same at 4 and 16 bits for a given model (+114 / +90 MiB for the 135M shape, "
              "+338 / +310 MiB for the 1.1 B one): the fp32 coefficients with their gradient and Adam moments, the "
              "bases and the second forward's transients do not shrink with the weights, so the ratio is largest "
              "where the 4-bit weights are smallest. Run 5 is run 4's step timing (its budget ran out before it), "
              "with no profile of its own.", ""]
    return lines


def _step_section(summary: dict) -> list[str]:
    lines = ["## ZO step time over one inference forward (bench_step, batch 8, median of 5)", "",
             "| run | shape / bits | adapted blocks | inference ms | plain step | fused step | fused + prefix cache |",
             "|---|---|---|---|---|---|---|"]
    for run, r in summary["runs"].items():
        for key, b in (r.get("bench_step") or {}).items():
            if b.get("status") != "ok":
                continue
            for c in b["configs"]:
                ratio = c["step_over_inference_forward"]
                cached = f"{ratio['fused_prefix_cache_step']:.2f}" if "fused_prefix_cache_step" in ratio else ""
                lines.append(f"| {run} | {key} | {c['layers']} | {c['median_seconds']['inference_forward'] * 1e3:.1f} "
                             f"| {ratio['plain_step']:.2f} | {ratio['fused_step']:.2f} | "
                             f"{cached} |")
    ratios = _step_ratios(summary)
    first, last = min(ratios, key=_run_number), max(ratios, key=_run_number)
    first_name, last_name = first.replace("-", " "), last.replace("-", " ")  # "run 5" in prose

    def span(run, key):
        values = [c[key] for c in ratios[run] if key in c]
        return f"{min(values):.2f}-{max(values):.2f}x"

    forwards_1b = [c["forward_ms"] for run in (first, last) for c in ratios[run]
                   if c["shape"].startswith("llama-1.1b/16")]
    small_4bit = " and ".join(str(v) for v in sorted({round(c["forward_ms"]) for c in ratios[last]
                                                       if c["shape"] == "smollm2-135m/4bit"}))
    met = [c for c in ratios[last] if min(c["fused_step"], c.get("fused_prefix_cache_step", c["fused_step"])) <= 1.3]
    lines += ["", "Rows are review sentences (about 43 tokens): at this size an H200 forward is bound by kernel "
              f"launches, not arithmetic (the 1.1 B shape's 16-bit forward takes {min(forwards_1b):.0f}-"
              f"{max(forwards_1b):.0f} ms), and a ZO step adds per-layer noise draws and small matmuls. Run 1 predates "
              "fp32 coefficients; since run 2 each forward also casts every layer's d_out x r coefficients to the "
              f"compute dtype, one small copy per layer, and {last_name} reads every step slower: the fused step at "
              f"{span(last, 'fused_step')} one forward ({first_name}: {span(first, 'fused_step')}), with the prefix "
              f"cache on the upper half of the blocks {span(last, 'fused_prefix_cache_step')} ({first_name}: "
              f"{span(first, 'fused_prefix_cache_step')}). Launch-bound timings wander on that machine "
              f"({last_name}'s 135M 4-bit forward reads {small_4bit} ms in two configurations of the same "
              "model), so read the ratios to within about a quarter. The goal of a fused step within 1.3x one forward "
              f"is met in {len(met) or 'none'} of the {len(ratios[last])} configurations of {last_name}.", ""]
    return lines


def _run_number(run: str) -> int:
    return int(run.rsplit("-", 1)[1])


def _step_ratios(summary: dict) -> dict[str, list[dict]]:
    """Each GPU-check run's bench_step configurations: shape, forward time (ms) and step / forward ratios."""
    out: dict[str, list[dict]] = {}
    for run, r in summary["runs"].items():
        for key, b in (r.get("bench_step") or {}).items():
            if b.get("status") == "ok":
                out.setdefault(run, []).extend(
                    {"shape": key, "forward_ms": c["median_seconds"]["inference_forward"] * 1e3,
                     **c["step_over_inference_forward"]} for c in b["configs"])
    return out


def markdown(table: dict, summary: dict, reports=()) -> str:
    lines = [
        INTRO,
        *_tests_section(summary),
        *_memory_section(reports),
        *_step_section(summary),
        "## Will it fit? Largest batch x length at 4 bits (rank 16, classification loss)",
        "",
        "fit.py's estimate covers the frozen 4-bit weights, the adapters with their fp32 coefficients and Adam "
        "state, the allocator's runtime and the activations of a fused ZO-Act step; it is multiplied by the "
        f"safety factor {fit.CALIBRATION['safety']} and the profile's reserve (CUDA context) is added. Batch and "
        "length are searched over powers of two within each profile's limits.",
        "",
        "| model | params | profile | budget GiB | fits | batch x length | needs GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table["rows"]:
        shape = f"{r['batch']} x {r['seq']}" if r["fits"] else "nothing"
        need = _gib(r["need_bytes"]) if r["fits"] else f"> {_gib(r['budget_bytes'])}"
        lines.append(f"| {r['model']} | {r['params'] / 1e9:.2f} B | {r['profile']} | {_gib(r['budget_bytes'])} | "
                     f"{'yes' if r['fits'] else 'no'} | {shape} | {need} |")
    fn = summary["fit_now"]
    lines += ["", "## fit.py against the H200 measurements", "",
              f"Goal: {fn['goal']}. The CUDA runtime ({fn['calibration']['cuda_runtime_bytes'] / 2**20:.0f} MiB) and "
              f"activation coefficient ({fn['calibration']['cuda_act_bytes_per_token_width']} bytes per token x "
              "(hidden + intermediate)) are calibrated on these same runs (the largest seen), so this table checks the "
              "model's form, not its out-of-sample accuracy. Run 1 predates fp32 coefficients and is not used. "
              "The calibration did not move with run 4, whose 1.1 B 16-bit row no earlier run had measured: "
              "that row (1.030) is the one estimate made before its measurement.",
              "", "| run | model | bits | batch x seq | measured MiB | estimate MiB | estimate / measured |",
              "|---|---|---|---|---|---|---|"]
    for r in fn["rows"]:
        lines.append(f"| {r['run']} | {r['model']} | {r['bits']} | {r['batch']} x {r['seq']} | "
                     f"{_mib(r['measured_zoact_peak_bytes'])} | {_mib(r['estimate_bytes'])} | "
                     f"{r['estimate_over_measured']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    reports = gpu_reports()
    summary = gpu_summary(reports)
    table = fit_table()
    with atomic_write(RESULTS / "gpu-h200.json") as f:
        json.dump(summary, f, indent=2)
    with atomic_write(RESULTS / "fit.json") as f:
        json.dump(table, f, indent=2)
    page = markdown(table, summary, reports)
    with atomic_write(ROOT / "docs" / "gpu.md") as f:
        f.write(page)
    print(page)


if __name__ == "__main__":
    main()
