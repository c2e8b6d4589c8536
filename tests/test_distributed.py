"""Data-parallel ZO-Act under torchrun with 2 CPU processes (gloo) against single-process runs."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from zoact_edge.cli import main
from zoact_edge.zo.distributed import Ranks, init_from_env, payload_bytes

COMMON = ["--device", "cpu", "--steps", "3", "--calib-samples", "8", "--rank", "4", "--eval-samples", "8",
          "--max-length", "24", "--lr", "1e-2", "--eps", "1e-2", "--save-every", "0"]


def _adapter(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def _single_thread_run(args):
    """torchrun gives each worker one thread; the reference runs with one too, so GEMMs round alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([str(a) for a in args]) == 0
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is needed")
def test_two_ranks_equal_one_process_on_the_concatenated_batch(model_dirs, tmp_path):
    model = model_dirs["llama"]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["OMP_NUM_THREADS"] = "1"
    dp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                         "-m", "zoact_edge", "tune", "--model", str(model), "--batch-size", "4",
                         "--output", str(tmp_path / "dp"), *COMMON],
                        capture_output=True, text=True, env=env, timeout=300)
    assert dp.returncode == 0, dp.stderr[-3000:]
    # Rank 0 alone wrote the run; the summary counts both ranks' examples.
    assert json.loads((tmp_path / "dp/summary.json").read_text())["examples_per_step"] == 8
    assert len(list(tmp_path.iterdir())) == 1

    # One process, the same 8 examples per step as 2 micro-batches of 4: the same arithmetic,
    # so the adapter is bit-identical.
    _single_thread_run(["tune", "--model", model, "--batch-size", "4", "--accum-steps", "2",
                        "--output", tmp_path / "accum", *COMMON])
    # One process, one batch of 8: the same estimate up to rounding in the loss reduction.
    _single_thread_run(["tune", "--model", model, "--batch-size", "8", "--output", tmp_path / "big", *COMMON])

    a, b, c = _adapter(tmp_path / "dp"), _adapter(tmp_path / "accum"), _adapter(tmp_path / "big")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)  # it really trained
    for k in a:
        torch.testing.assert_close(a[k], c[k], rtol=1e-3, atol=1e-5)
    dp_loss = [json.loads(l)["loss"] for l in (tmp_path / "dp/metrics.jsonl").read_text().splitlines()]
    big_loss = [json.loads(l)["loss"] for l in (tmp_path / "big/metrics.jsonl").read_text().splitlines()]
    assert dp_loss == pytest.approx(big_loss, abs=1e-5)


def test_without_torchrun_there_is_one_rank(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_from_env("cpu") == Ranks(0, 1, 0)
    assert Ranks().is_main and not Ranks().active and not Ranks(1, 2, 1).is_main


def test_payload_is_a_few_scalars_whatever_the_model():
    assert payload_bytes(1) == 32 and payload_bytes(4) == 128
