"""End-to-end through the CLI on tiny models: outputs, resume after SIGKILL, config files, errors."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from zoact_edge.cli import main
from zoact_edge.data.tasks import ClassificationTask

FAST = ["--steps", "6", "--batch-size", "4", "--calib-samples", "8", "--rank", "4", "--eval-samples", "16",
        "--max-length", "24", "--lr", "1e-2", "--eps", "1e-2"]


def _run(args):
    return main([str(a) for a in args])


def test_tune_writes_a_complete_run(model_dirs, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(["tune", "--model", model_dirs["llama"], "--output", out, "--eval-every", "3", *FAST]) == 0
    printed = capsys.readouterr().out
    assert "zero-shot" in printed and "peak memory" in printed
    for f in ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "summary.json",
              "run_config.json", "checkpoint/state.json"):
        assert (out / f).is_file(), f
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert "eval" in records[2] and all(r["loss"] is not None for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and 0 <= summary["tuned"]["accuracy"] <= 1
    assert summary["peak_rss_bytes"] > 0
    # no temp files left: only the run's marker and lock are hidden
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".zoact-run.json", ".zoact-run.lock"]
    mask = os.umask(0)
    os.umask(mask)
    for f in (out / "adapter_model.safetensors", out / "checkpoint/coefficients.safetensors"):
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f  # the umask decides, not safetensors' 0600


def test_every_training_loss_runs_under_inference_mode(model_dirs, tmp_path, monkeypatch):
    modes = []
    original = ClassificationTask.loss

    def spy(self, model, batch):
        modes.append(torch.is_inference_mode_enabled())
        return original(self, model, batch)

    monkeypatch.setattr(ClassificationTask, "loss", spy)
    assert _run(["tune", "--model", model_dirs["gpt2"], "--output", tmp_path / "r", *FAST]) == 0
    assert len(modes) == 12 and all(modes)


def _cli(args, env=None):
    return subprocess.run([sys.executable, "-m", "zoact_edge", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_resume_after_sigkill_is_bit_identical(model_dirs, tmp_path):
    args = ["tune", "--model", model_dirs["llama"], *FAST, "--steps", "10", "--save-every", "3", "--queries", "2"]
    ref = _cli([*args, "--output", tmp_path / "ref"])
    assert ref.returncode == 0, ref.stderr
    # The testing hook SIGKILLs the process at the start of step 8: steps 7-8 ran past the
    # step-6 checkpoint and are lost, as they would be in a real crash.
    killed = _cli([*args, "--output", tmp_path / "run"], env={"ZOACT_KILL_AT_STEP": "8"})
    assert killed.returncode == -9
    assert json.loads((tmp_path / "run/checkpoint/state.json").read_text())["step"] == 6
    assert not (tmp_path / "run/adapter_model.safetensors").exists()
    resumed = _cli(["tune", "--resume", tmp_path / "run"])
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(tmp_path / "ref/adapter_model.safetensors"))
    b = load_file(str(tmp_path / "run/adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(l)["step"] for l in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))


def test_a_run_from_before_batch_order_resumes_in_random_order(tmp_path):
    """run_config.json of a run started before --batch-order existed has no such key: that run read random
    batches, and --resume must go on reading them, not switch to today's default mid-run."""
    from zoact_edge.cli.tune import _saved_config
    from zoact_edge.config import TuneConfig, build_config

    old = {k: v for k, v in TuneConfig().to_dict().items() if k != "batch_order"}
    (tmp_path / "run_config.json").write_text(json.dumps(old))
    saved = _saved_config(tmp_path, "--resume")
    assert build_config(TuneConfig, saved, {}).batch_order == "random" != TuneConfig().batch_order
    (tmp_path / "run_config.json").write_text(json.dumps({**old, "batch_order": "length"}))
    assert build_config(TuneConfig, _saved_config(tmp_path, "--resume"), {}).batch_order == "length"


def test_config_file_with_cli_override(model_dirs, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'model = "{model_dirs["opt"]}"\nsteps = 2\nrank = 3\nbatch-size = 4\ncalib-samples = 8\n'
                   'eval-samples = 8\nmax-length = 24\n')
    assert _run(["tune", "--config", cfg, "--rank", "2", "--output", tmp_path / "r"]) == 0
    saved = json.loads((tmp_path / "r/run_config.json").read_text())
    assert (saved["steps"], saved["rank"]) == (2, 2)
    y = tmp_path / "c.yaml"
    y.write_text(f"model: {model_dirs['opt']}\nsteps: 1\nbatch_size: 4\ncalib_samples: 8\neval_samples: 8\n")
    assert _run(["tune", "--config", y, "--output", tmp_path / "y"]) == 0
    assert json.loads((tmp_path / "y/run_config.json").read_text())["steps"] == 1


def test_eval_base_and_adapter(model_dirs, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(["tune", "--model", model_dirs["llama"], "--output", out, *FAST]) == 0
    capsys.readouterr()
    assert _run(["eval", "--adapter", out, "--eval-samples", "16"]) == 0
    tuned = json.loads(capsys.readouterr().out)
    summary = json.loads((out / "summary.json").read_text())
    assert tuned["accuracy"] == summary["tuned"]["accuracy"]
    assert _run(["eval", "--model", model_dirs["llama"], "--eval-samples", "16", "--max-length", "24"]) == 0
    base = json.loads(capsys.readouterr().out)
    assert base["accuracy"] == summary["zero_shot"]["accuracy"]


def test_lm_and_completion_tasks(model_dirs, tmp_path, capsys):
    text = tmp_path / "t.jsonl"
    text.write_text("".join(json.dumps({"text": f"it was a great movie {i}"}) + "\n" for i in range(40)))
    assert _run(["tune", "--model", model_dirs["llama"], "--task", "lm", "--data", text, "--output", tmp_path / "a",
                 *FAST]) == 0
    comp = tmp_path / "c.jsonl"
    comp.write_text("".join(json.dumps({"prompt": "review : it was", "completion": "great"}) + "\n" for _ in range(40)))
    assert _run(["tune", "--model", model_dirs["llama"], "--task", "completion", "--data", comp,
                 "--output", tmp_path / "b", *FAST]) == 0
    s = json.loads((tmp_path / "b/summary.json").read_text())
    assert s["tuned"]["perplexity"] > 1 and "accuracy" not in s["tuned"]


def test_user_classification_file(model_dirs, tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("sentence,y\n" + "".join(f"movie {i} was fun,{'p' if i % 2 else 'n'}\n" for i in range(40)))
    assert _run(["tune", "--model", model_dirs["gpt2"], "--task", "classification", "--data", data,
                 "--text-field", "sentence", "--label-field", "y", "--labels", "p:good,n:bad",
                 "--output", tmp_path / "r", *FAST]) == 0


# --------------------------------------------------------------------------- bad input


def _bad(args, capsys, fragment, output=None):
    code = _run(args)
    err = capsys.readouterr().err
    assert code != 0
    lines = [l for l in err.strip().splitlines() if l.startswith("zoact-edge: error")]
    assert len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err
    if output is not None:
        assert not output.exists(), "a failed run left output behind"


def test_bad_inputs_fail_cleanly(model_dirs, tmp_path, capsys):
    out = tmp_path / "never"
    m = str(model_dirs["llama"])
    _bad(["tune", "--model", tmp_path / "missing", "--output", out], capsys, "model path not found", out)
    (tmp_path / "empty").mkdir()
    _bad(["tune", "--model", tmp_path / "empty", "--output", out], capsys, "not a model folder", out)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    _bad(["tune", "--model", broken, "--output", out], capsys, "cannot load", out)
    _bad(["tune", "--model", tmp_path / "x.gguf", "--output", out], capsys, "model file not found", out)
    _bad(["tune", "--model", "zoact-test-org/no-such-model", "--output", out], capsys, "cannot load", out)
    _bad(
        ["tune", "--model", m, "--rank", "500", *FAST[:2], "--output", out], capsys, "larger than the input width", out
    )
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    _bad(["tune", "--model", m, "--task", "lm", "--data", empty, "--output", out], capsys, "no rows", out)
    bad_label = tmp_path / "l.csv"
    bad_label.write_text("text,label\na,pos\nb,meh\n")
    _bad(["tune", "--model", m, "--task", "classification", "--data", bad_label, "--labels", "pos:great,neg:terrible",
          "--output", out], capsys, "unknown label 'meh'", out)
    (tmp_path / "file").write_text("x")
    _bad(["tune", "--model", m, "--output", tmp_path / "file" / "sub"], capsys, "not a writable folder", None)
    cfg = tmp_path / "bits.toml"
    cfg.write_text("bits = 5\n")
    _bad(["tune", "--config", cfg, "--output", out], capsys, "--bits 5", out)
    (tmp_path / "nonempty").mkdir()
    (tmp_path / "nonempty" / "x").write_text("keep me")
    _bad(["tune", "--model", m, "--output", tmp_path / "nonempty"], capsys, "is not empty", None)
    assert (tmp_path / "nonempty" / "x").read_text() == "keep me"


def test_unknown_bits_on_the_command_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["tune", "--bits", "5"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_corrupt_adapter(model_dirs, tmp_path, capsys):
    bad = tmp_path / "adapter"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4}))
    (bad / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    _bad(["eval", "--adapter", bad, "--model", model_dirs["llama"]], capsys, "corrupt adapter")


def test_nan_loss_aborts_cleanly_and_leaves_nothing(model_dirs, tmp_path, capsys):
    out = tmp_path / "nan"
    _bad(["tune", "--model", model_dirs["llama"], *FAST, "--steps", "40", "--lr", "1e30", "--max-bad-steps", "3",
          "--save-every", "0", "--output", out], capsys, "NaN/inf", out)
