"""Pinned recipes: short tunes of the tiny Llama whose logged losses must match stored values.

A refactor of the recipes, the adapters or the loss engines must not change a number. Each case runs
``zoact-edge tune`` in-process on one thread and compares every ``metrics.jsonl`` loss and the final
validation metrics with the values stored in ``pinned_recipes.json`` (written by this file on a known-good
tree: ``ZOACT_PIN_WRITE=1 pytest tests/test_pinned_recipes.py``).

On the machine that wrote them the values repeat exactly. Another CPU runs other kernels (torch and MKL pick
AVX2, AVX-512 or AMX code at run time) that round differently: on an AVX-512 machine every case differed from
the pins, written on an earlier machine, by up to 7.4e-7 relative. So the values are
compared within a relative ``TOLERANCE`` of 5e-6, six times that and still far below what a change of the
recipe does: raising ``--eps`` or ``--lr`` by 0.1% moved the logged losses by up to 6.6e-5 and 2.2e-4 relative
(measured on that machine), and a changed seed, batch or direction stream changes the steps themselves.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from zoact_edge.cli import main

PINNED = Path(__file__).with_name("pinned_recipes.json")
TOLERANCE = 5e-6  # relative: above another CPU's rounding, below a 0.1% change of eps or lr (module docstring)
FAST = ["--steps", "5", "--batch-size", "4", "--calib-samples", "8", "--rank", "4", "--eval-samples", "16",
        "--max-length", "24", "--eps", "1e-2", "--batch-order", "random"]  # each case's order, unless it says
CASES = {
    "zoact": ["--lr", "1e-2"],
    "zoact-length-order": ["--lr", "1e-2", "--batch-order", "length"],
    "zoact-queries2-adam": ["--lr", "1e-2", "--queries", "2", "--optimizer", "adam", "--schedule", "cosine"],
    "subspace": ["--method", "subspace", "--lr", "1e-2"],
    "mezo": ["--method", "mezo", "--lr", "1e-6"],
    "fo-lora": ["--method", "fo-lora", "--lr", "1e-2"],
    "calibrate": ["--method", "calibrate"],
    "zoact-ort": ["--lr", "1e-2", "--backend", "ort"],
}


def _tune(model_dir, out: Path, extra: list[str]) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["tune", "--model", str(model_dir), "--output", str(out), *FAST, *extra]) == 0
    finally:
        torch.set_num_threads(threads)
    summary = json.loads((out / "summary.json").read_text())
    losses = [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    return {"losses": losses, "zero_shot": summary["zero_shot"], "tuned": summary["tuned"]}


@pytest.mark.parametrize("case", list(CASES))
def test_recipe_numbers_are_pinned(case, model_dirs, tmp_path):
    if case.endswith("-ort"):
        pytest.importorskip("onnxruntime")
    got = _tune(model_dirs["llama"], tmp_path / case, CASES[case])
    if os.environ.get("ZOACT_PIN_WRITE"):
        stored = json.loads(PINNED.read_text()) if PINNED.exists() else {}
        stored[case] = got
        PINNED.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
        return
    want = json.loads(PINNED.read_text())[case]
    assert got["losses"] == pytest.approx(want["losses"], rel=TOLERANCE, abs=0)
    assert got["zero_shot"] == pytest.approx(want["zero_shot"], rel=TOLERANCE, abs=0)
    assert got["tuned"] == pytest.approx(want["tuned"], rel=TOLERANCE, abs=0)
