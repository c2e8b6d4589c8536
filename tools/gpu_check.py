"""The prepared GPU check: CUDA tests, peak memory and step time on real model shapes, fit.py's error.

A GPU is lent to this project now and then, for minutes. This runs everything that needs one in a
single command (``tools/gpu_check.sh`` installs carried wheels first, then calls this):

1. ``env``: GPU, driver, package versions, ONNX Runtime providers;
2. ``tests``: the CUDA tests (tests/test_cuda.py and the CUDA tests of other files), JUnit XML with
   every figure the tests recorded;
3. ``shapes``: random-weight models of real shapes built on the spot (weights do not change memory
   or time): SmolLM2-135M's and a 1.1 B Llama's, with the tests' word-level tokenizer;
4. ``profile``: ``zoact-edge profile`` (inference, zoact, fo-lora) at 4 and 16 bits, batch 8 x 256;
5. ``bench_step``: tools/bench_step.py (plain vs fused vs prefix-shared ZO step) on both shapes;
6. ``fit``: fit.py's estimate for each profiled shape against the measured ZO-Act peak, and the
   goals (zoact peak <= 1.05 x inference at 4 bits; fused step <= 1.3 x one inference forward).

Each stage has a time limit and the whole run a budget (``--budget``, seconds); a stage that fails
or runs out of time is recorded as such and the rest go on. ``--dry-run`` does all of it on the
CPU with a tiny shape, so CI proves the check has not rotted before a GPU is next available.

Writes to ``--out`` (default ``$OUT``): gpu-check.json (everything), cuda-tests.xml,
gpu-check.log, and reports.tar.gz (the profile reports and bench_step JSON files).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

# Real shapes (config fields of LlamaConfig). Memory and time depend on shapes, not trained values.
SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         tie_word_embeddings=True, rope_theta=100000.0),
    "llama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                       tie_word_embeddings=False),
}
TINY = {"tiny": dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                     tie_word_embeddings=True)}
CUDA_TEST_FILES = [
    "tests/test_cuda.py",
    "tests/test_quant.py",
    "tests/test_profiler.py",
    "tests/test_ort_loss_graph.py",
    "tests/test_ort_engine.py",
    "tests/test_ort_tune.py",
]
GOALS = {"zoact_peak_over_inference_4bit": 1.05, "fused_step_over_inference_forward": 1.3,
         "fit_estimate_over_measured": (1.0, 1.15)}


class Run:
    """Stage bookkeeping: a log file, a deadline, and subprocesses that never outlive either."""

    def __init__(self, out: Path, budget: float, slack: float = 1.0):
        self.out, self.deadline, self.slack = out, time.time() + budget, slack  # slack: stage limits x this
        self.log = open(out / "gpu-check.log", "a", buffering=1)
        self.results: dict = {"stages": {}}

    def left(self) -> float:
        return self.deadline - time.time()

    def say(self, text: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")

    def sh(self, cmd: list[str], limit: float, env: dict | None = None) -> subprocess.CompletedProcess | None:
        limit = min(limit * self.slack, self.left())
        if limit < 5:
            self.say(f"skipped (out of time): {' '.join(cmd)}")
            return None
        self.say("$ " + " ".join(cmd))
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit,
                                  env={**os.environ, **(env or {})})
        except subprocess.TimeoutExpired as e:
            self.log.write(str(e.stdout or "") + str(e.stderr or ""))
            self.say(f"timed out after {limit:.0f} s")
            return None
        self.log.write(proc.stdout + proc.stderr)
        self.say(f"exit {proc.returncode}")
        return proc

    def stage(self, name: str, fn, *args):
        t0 = time.time()
        self.say(f"== {name} ({self.left():.0f} s left)")
        try:
            value = fn(self, *args)
            status = "ok"
        except Exception as e:  # a stage's failure is a finding; the next stages still run
            value, status = None, f"failed: {type(e).__name__}: {e}"
            self.say(status)
        self.results["stages"][name] = {"status": status, "seconds": round(time.time() - t0, 1)}
        if value is not None:
            self.results[name] = value
        self.write()
        return value

    def write(self) -> None:
        tmp = self.out / ".gpu-check.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=2, default=str))
        tmp.replace(self.out / "gpu-check.json")


# --------------------------------------------------------------------------- stages


def stage_env(run: Run, device: str) -> dict:
    import importlib.metadata as md

    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": device, "packages": {}}
    for pkg in ("transformers", "bitsandbytes", "peft", "onnxruntime", "onnxruntime-gpu", "accelerate", "pytest"):
        try:
            env["packages"][pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env["packages"][pkg] = None
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device")
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_memory_bytes=p.total_memory, capability=f"{p.major}.{p.minor}",
                   bf16=torch.cuda.is_bf16_supported())
        smi = shutil.which("nvidia-smi")
        if smi:
            q = subprocess.run([smi, "--query-gpu=driver_version,name,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True)
            env["nvidia_smi"] = q.stdout.strip()
    try:
        import onnxruntime

        env["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        env["onnxruntime_providers"] = None
    try:
        import bitsandbytes  # noqa: F401  (loads its native library for this torch's CUDA)

        env["bitsandbytes_import"] = "ok"
    except Exception as e:  # noqa: BLE001
        env["bitsandbytes_import"] = f"{type(e).__name__}: {e}"
    return env


def stage_tests(run: Run, dry: bool) -> dict:
    xml = run.out / "cuda-tests.xml"
    if dry:  # the CUDA tests themselves, run on the CPU against the same CPU references
        cmd = [sys.executable, "-m", "pytest", "tests/test_cuda.py"]
        env = {"ZOACT_CUDA_TESTS_DEVICE": "cpu"}
    else:
        cmd = [sys.executable, "-m", "pytest", *CUDA_TEST_FILES, "-k", "cuda", "--continue-on-collection-errors"]
        env = {}
    proc = run.sh([*cmd, "-q", "-p", "no:cacheprovider", "-o", "addopts=", f"--junitxml={xml}"], 300, env)
    if proc is None or not xml.is_file():
        raise RuntimeError("the tests did not finish")
    return parse_junit(xml) | {"exit": proc.returncode, "summary": (proc.stdout.strip().splitlines() or [""])[-1]}


def parse_junit(path: Path) -> dict:
    """Outcome and recorded properties of every test case in a JUnit XML file."""
    cases = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                cases[name] = {"outcome": outcome, "message": (el.get("message") or "")[:400]}
                break
        else:
            cases[name] = {"outcome": outcome}
        props = {p.get("name"): _number(p.get("value")) for p in case.iter("property")}
        if props:
            cases[name]["recorded"] = props
    counts = {k: sum(c["outcome"] == k for c in cases.values()) for k in ("passed", "failed", "error", "skipped")}
    return {"counts": counts, "cases": cases}


def _number(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return text


def stage_shapes(run: Run, shapes: dict, device: str, work: Path) -> dict:
    import torch
    from conftest import make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    out = {}
    for name, fields in shapes.items():
        folder = work / "models" / name
        if not (folder / "config.json").is_file():
            cfg = LlamaConfig(**fields, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id)
            torch.manual_seed(0)
            with torch.device(device):
                model = LlamaForCausalLM(cfg)
            if device == "cuda":  # stored as bf16: 16-bit runs load it as is, 4-bit runs quantize it
                model = model.to(torch.bfloat16)
            model.save_pretrained(folder)
            tok.save_pretrained(folder)
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
        params = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        out[name] = {"folder": str(folder), "config": fields, "safetensors_bytes": params}
        run.say(f"{name}: {params / 2**20:.0f} MiB of weights in {folder}")
    return out


def stage_profile(run: Run, shapes: dict, device: str, bits: list[int], batch: int, seq: int, work: Path) -> dict:
    out = {}
    for name in shapes:
        for b in bits:
            folder = work / "reports" / f"profile-{name}-{b}bit"
            proc = run.sh([sys.executable, "-m", "zoact_edge", "profile", "--model", str(work / "models" / name),
                           "--bits", str(b), "--batch", str(batch), "--seq", str(seq), "--device", device,
                           "--methods", "inference,zoact,fo-lora", "--out", str(folder)], 150)
            key = f"{name}/{b}bit"
            if proc is None or not (folder / "report.json").is_file():
                out[key] = {"status": "failed" if proc else "timed out or skipped",
                            "error": (proc.stderr.strip().splitlines() or [""])[-1][:400] if proc else None}
                continue
            report = json.loads((folder / "report.json").read_text())
            out[key] = {"status": "ok", "report": str(folder / "report.json"), "methods": {
                m: {k: e.get(k) for k in ("status", "peak_bytes", "resident_bytes", "ratio_to_inference",
                                          "breakdown", "cuda", "fused", "method_seconds", "error", "reason")}
                for m, e in report["methods"].items()}}
    return out


def stage_bench_step(run: Run, shapes: dict, device: str, bits: list[int], batch: int, work: Path) -> dict:
    out = {}
    for name, fields in shapes.items():
        layers = fields["num_hidden_layers"]
        prefix = f"{layers // 2}-{layers - 1}"  # the upper half: what --layers/--cache-prefix users adapt
        for b in bits:
            path = work / "reports" / f"bench_step-{name}-{b}bit.json"
            proc = run.sh([sys.executable, "tools/bench_step.py", "--model", str(work / "models" / name),
                           "--bits", str(b), "--device", device, "--batch-size", str(batch), "--repeats", "5",
                           "--prefix-layers", prefix, "--output", str(path)], 150)
            key = f"{name}/{b}bit"
            if proc is None or not path.is_file():
                out[key] = {"status": "failed" if proc else "timed out or skipped"}
                continue
            r = json.loads(path.read_text())
            out[key] = {"status": "ok", "configs": [{k: c[k] for k in ("layers", "median_seconds",
                                                                        "step_over_inference_forward")}
                                                    for c in r["configs"]]}
    return out


def shape_of(fields: dict):
    """fit.py's view of a Llama shape given by its config fields."""
    from transformers import LlamaConfig

    from zoact_edge.profiling.fit import ModelShape

    return ModelShape.from_config(LlamaConfig(**fields))


def fit_row(report: dict, shape) -> dict | None:
    """fit.py's estimate for a profile report's settings against its measured ZO-Act peak."""
    from zoact_edge.profiling.fit import Setting, estimate_bytes

    s, e = report["settings"], report["methods"].get("zoact", {})
    if e.get("status") != "ok":
        return None
    est = estimate_bytes(shape, Setting(s["bits"], s["batch"], s["seq"], s["rank"]), s["device"], s["task"])
    return {
        "model": Path(s["model"]).name,
        "bits": s["bits"],
        "batch": s["batch"],
        "seq": s["seq"],
        "measured_zoact_peak_bytes": e["peak_bytes"],
        "estimate_bytes": est,
        "estimate_over_measured": round(est / e["peak_bytes"], 3),
        "zoact_over_inference": e.get("ratio_to_inference"),
    }


def stage_fit(run: Run, shapes: dict, profiled: dict, benched: dict) -> dict:
    """fit.py's estimate for each profiled run against its measured zoact peak; the goals."""
    rows, goals = [], {}
    for key, p in (profiled or {}).items():
        if p.get("status") != "ok":
            continue
        name = key.split("/")[0]
        row = fit_row(json.loads(Path(p["report"]).read_text()), shape_of(shapes[name]))
        if row is None:
            continue
        rows.append(row)
        if row["bits"] == 4 and p["methods"].get("inference", {}).get("status") == "ok":
            goals[f"zoact_peak_over_inference_4bit/{name}"] = row["zoact_over_inference"]
    for key, b in (benched or {}).items():
        if b.get("status") == "ok":
            goals[f"fused_step_over_inference_forward/{key}"] = b["configs"][0]["step_over_inference_forward"].get(
                "fused_step")
    lo, hi = GOALS["fit_estimate_over_measured"]
    met = {k: (v is not None and v <= (GOALS["zoact_peak_over_inference_4bit"] if k.startswith("zoact")
                                        else GOALS["fused_step_over_inference_forward"])) for k, v in goals.items()}
    met.update({f"fit/{r['model']}/{r['bits']}bit": lo <= r["estimate_over_measured"] <= hi for r in rows})
    return {"estimates": rows, "goals": goals, "goal_limits": GOALS, "met": met}


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shape, small batch: proves the check runs")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu-check-out", help="results folder (default: $OUT)")
    ap.add_argument("--work", default=None, help="scratch folder for models and caches (default: a temp folder)")
    ap.add_argument("--budget", type=float, default=450, help="seconds for the whole check (default: 450)")
    ap.add_argument("--stages", default="env,tests,shapes,profile,bench_step,fit", help="comma-separated subset")
    ap.add_argument("--bits", default="4,16", help="weight precisions to profile and bench (default: 4,16)")
    args = ap.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or os.environ.get("TMPDIR", "/tmp")) / "zoact-gpu-check"
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("ZOACT_CACHE", str(work / "cache"))  # quantized copies of the shape models
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run = Run(out, args.budget, slack=4.0 if args.dry_run else 1.0)  # a shared 2-core CI machine is slow
    device = "cpu" if args.dry_run else "cuda"
    shapes = TINY if args.dry_run else SHAPES
    batch, seq = (2, 32) if args.dry_run else (8, 256)
    bits = [int(b) for b in args.bits.split(",")]
    stages = set(args.stages.split(","))
    run.results.update(dry_run=args.dry_run, device=device, batch=batch, seq=seq, bits=bits,
                       started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    if "env" in stages:
        run.stage("env", stage_env, device)
    if "tests" in stages:
        run.stage("tests", stage_tests, args.dry_run)
    built = run.stage("shapes", stage_shapes, shapes, device, work) if stages & {"shapes", "profile",
                                                                                 "bench_step"} else None
    profiled = benched = None
    if built and "profile" in stages:
        profiled = run.stage("profile", stage_profile, shapes, device, bits, batch, seq, work)
    if built and "bench_step" in stages:
        benched = run.stage("bench_step", stage_bench_step, shapes, device, bits, batch, work)
    if "fit" in stages and (profiled or benched):
        run.stage("fit", stage_fit, shapes, profiled, benched)

    reports = work / "reports"
    if reports.is_dir():
        with tarfile.open(out / "reports.tar.gz", "w:gz") as tar:
            tar.add(reports, arcname="reports")
    run.results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    run.write()
    bad = [n for n, s in run.results["stages"].items() if s["status"] != "ok"]
    tests = run.results.get("tests", {}).get("counts", {})
    run.say(f"done: stages not ok: {bad or 'none'}; tests {tests}")
    return 1 if bad or tests.get("failed") or tests.get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
