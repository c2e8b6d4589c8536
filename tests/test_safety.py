"""Never lose a user's data, never exit 0 on a broken result (issue 15).

Bad inputs and faults go through the CLI on the tiny model. Each must fail with exactly one
``zoact-edge: error:`` line and no traceback, and leave every file under the test's folder
(the output, a user's own folder, earlier runs) byte for byte as it was.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from zoact_edge import rundir
from zoact_edge.adapters import files as adapter_io
from zoact_edge.cli import main

FAST = ["--batch-size", "4", "--calib-samples", "8", "--rank", "4", "--eval-samples", "8", "--eval-batch-size", "8",
        "--max-length", "24", "--lr", "1e-2", "--eps", "1e-2"]


def _run(args) -> int:
    return main([str(a) for a in args])


def _tree(root: Path) -> dict:
    """{relative path: (sha256 or 'dir', mode)} of everything under root (hidden files included)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        digest = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        out[str(p.relative_to(root))] = (digest, st.st_mode)
    return out


def _one_error_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("zoact-edge: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err  # before it: progress bars of a run that started
    assert "Traceback" not in err, err
    return errors[0]


@pytest.fixture(scope="module")
def finished_run(model_dirs, tmp_path_factory):
    """A complete tiny run (checkpoints at steps 2 and 4), copied by the cases that need one."""
    out = tmp_path_factory.mktemp("finished") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZOACT_CACHE", str(tmp_path_factory.getbasetemp() / "zoact-cache"))
        args = ["tune", "--model", model_dirs["llama"], "--output", out, *FAST, "--steps", "4", "--save-every", "2"]
        assert _run(args) == 0
    return out


class Ctx:
    """What a case builds its arguments from; everything it creates lives under ``tmp``."""

    def __init__(self, tmp: Path, model: Path, finished: Path, monkeypatch):
        self.tmp, self.m, self._finished, self._mp, self.fds = tmp, str(model), finished, monkeypatch, []
        self.out = tmp / "out"
        self.user = tmp / "user"  # a user's own folder
        self.user.mkdir()
        (self.user / "notes.txt").write_text("my notes")
        (self.user / "data.csv").write_text("text,label\nfine,pos\n")

    def run(self) -> Path:
        dst = self.tmp / "run"
        if not dst.exists():
            shutil.copytree(self._finished, dst)
        return dst

    def file(self, name: str, text: str) -> Path:
        (self.tmp / name).write_text(text)
        return self.tmp / name

    def hold(self, folder: Path) -> Path:
        self.fds.append(rundir.lock(folder, "test"))
        return folder

    def chdir(self, folder: Path) -> str:
        self._mp.chdir(folder)
        return "."

    def edit_run_file(self, rel: str, fn) -> Path:
        run = self.run()
        fn(run / rel)
        return run


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-8:] = b"\xff" * 8  # the last coefficients: 0xffffffff is a float NaN
    path.write_bytes(bytes(data))


def _nan_coefficients_without_checksum(run: Path) -> None:
    ckpt = run / "checkpoint"
    coeffs = load_file(str(ckpt / "coefficients.safetensors"))
    coeffs[next(iter(coeffs))][0, 0] = float("nan")
    save_file(coeffs, str(ckpt / "coefficients.safetensors"))
    state = json.loads((ckpt / "state.json").read_text())
    del state["sha256"]  # as a checkpoint of an older version: only the finiteness check is left
    (ckpt / "state.json").write_text(json.dumps(state))


def _no_checkpoint(run: Path) -> None:
    shutil.rmtree(run / "checkpoint")
    for f in ("adapter_config.json", "adapter_model.safetensors", "summary.json"):
        (run / f).unlink()


T, M = "tune", "--model"
CASES = [  # (id, fragment of the error line, arguments from a Ctx)
    # options that cannot make a sound run: refused before anything is loaded
    ("eps-inf", "--eps must be a finite", lambda c: [T, M, c.m, "--output", c.out, "--eps", "inf"]),
    ("eps-nan", "--eps must be a finite", lambda c: [T, M, c.m, "--output", c.out, "--eps", "nan"]),
    ("eps-zero", "--eps must be a finite", lambda c: [T, M, c.m, "--output", c.out, "--eps", "0"]),
    ("lr-inf", "--lr must be a finite", lambda c: [T, M, c.m, "--output", c.out, "--lr", "inf"]),
    ("lr-nan", "--lr must be a finite", lambda c: [T, M, c.m, "--output", c.out, "--lr", "nan"]),
    ("lr-negative", "--lr must be a finite", lambda c: [T, M, c.m, "--output", c.out, "--lr", "-1"]),
    ("steps-negative", "--steps must be", lambda c: [T, M, c.m, "--output", c.out, "--steps", "-1"]),
    ("batch-zero", "--batch-size must be", lambda c: [T, M, c.m, "--output", c.out, "--batch-size", "0"]),
    ("length-tiny", "--max-length must be", lambda c: [T, M, c.m, "--output", c.out, "--max-length", "2"]),
    ("queries-zero", "--queries must be", lambda c: [T, M, c.m, "--output", c.out, "--queries", "0"]),
    ("weight-decay-nan", "--weight-decay", lambda c: [T, M, c.m, "--output", c.out, "--weight-decay", "nan"]),
    ("momentum-too-big", "--momentum",
     lambda c: [T, M, c.m, "--output", c.out, "--optimizer", "sgd", "--momentum", "1.5"]),
    ("max-bad-steps-zero", "--max-bad-steps", lambda c: [T, M, c.m, "--output", c.out, "--max-bad-steps", "0"]),
    ("config-missing", "config file not found", lambda c: [T, "--config", c.tmp / "nope.toml", "--output", c.out]),
    ("config-unknown-key", "unknown option",
     lambda c: [T, "--config", c.file("k.toml", "stepz = 3\n"), "--output", c.out]),
    ("config-bad-toml", "config file", lambda c: [T, "--config", c.file("b.toml", "steps = = 3\n"), "--output", c.out]),
    ("config-bad-type", "option steps",
     lambda c: [T, "--config", c.file("t.toml", 'steps = "many"\n'), "--output", c.out]),
    ("config-bad-bits", "--bits 5", lambda c: [T, "--config", c.file("bits.toml", "bits = 5\n"), "--output", c.out]),
    # output folders that are not ours to write
    ("output-is-a-file", "is not a folder", lambda c: [T, M, c.m, "--output", c.file("f", "x")]),
    ("output-under-a-file", "not a writable folder", lambda c: [T, M, c.m, "--output", c.file("g", "x") / "sub"]),
    ("output-unwritable", "cannot create it", lambda c: [T, M, c.m, "--output", "/proc/zoact-edge-test/run"]),
    ("output-user-folder", "not a zoact-edge run folder", lambda c: [T, M, c.m, "--output", c.user]),
    ("overwrite-user-folder", "--overwrite only replaces run folders",
     lambda c: [T, M, c.m, "--output", c.user, "--overwrite"]),
    ("overwrite-run-holding-user-file", "not a zoact-edge run folder",
     lambda c: [T, M, c.m, "--output", c.edit_run_file("mine.txt", lambda p: p.write_text("mine")), "--overwrite"]),
    ("output-finished-run", "--resume", lambda c: [T, M, c.m, "--output", c.run()]),
    ("overwrite-current-directory", "current directory",
     lambda c: [T, M, c.m, *FAST, "--output", c.chdir(c.run()), "--overwrite"]),
    ("output-in-use", "in use by", lambda c: [T, M, c.m, "--output", c.hold(c.run()), "--overwrite"]),
    # resume: only a sound, unchanged run continues
    ("resume-missing", "no such run folder", lambda c: [T, "--resume", c.tmp / "nothing"]),
    ("resume-user-folder", "not a run folder", lambda c: [T, "--resume", c.user]),
    ("resume-corrupt-run-config", "unreadable", lambda c: [T, "--resume", c.edit_run_file(
        "run_config.json", lambda p: p.write_text("{not json"))]),
    ("resume-run-config-not-a-mapping", "not a mapping", lambda c: [T, "--resume", c.edit_run_file(
        "run_config.json", lambda p: p.write_text("[1, 2]"))]),
    ("resume-changes-lr", "--lr is 0.01 there, not 0.5", lambda c: [T, "--resume", c.run(), "--lr", "0.5"]),
    ("resume-changes-output", "--output", lambda c: [T, "--resume", c.run(), "--output", c.out]),
    ("resume-corrupt-coefficients", "checksum mismatch", lambda c: [T, "--resume", c.edit_run_file(
        "checkpoint/coefficients.safetensors", _flip_bytes)]),
    ("resume-nan-coefficients", "NaN/inf",
     lambda c: [T, "--resume", c.edit_run_file(".", _nan_coefficients_without_checksum)]),
    ("resume-torn-state", "corrupt checkpoint", lambda c: [T, "--resume", c.edit_run_file(
        "checkpoint/state.json", lambda p: p.write_text(p.read_text()[:50]))]),
    ("resume-missing-optimizer", "corrupt checkpoint", lambda c: [T, "--resume", c.edit_run_file(
        "checkpoint/optimizer.safetensors", Path.unlink)]),
    ("resume-before-first-checkpoint", "--overwrite", lambda c: [T, "--resume", c.edit_run_file(".", _no_checkpoint)]),
    ("resume-in-use", "in use by", lambda c: [T, "--resume", c.hold(c.run())]),
    ("export-in-use", "in use by", lambda c: ["export", "--adapter", c.hold(c.run()), "--out", c.out]),
    ("export-overwrite-user-folder", "only replaces an earlier export",
     lambda c: ["export", "--adapter", c.run(), "--out", c.user, "--overwrite"]),
    ("eval-corrupt-run-config", "unreadable", lambda c: ["eval", "--adapter", c.edit_run_file(
        "run_config.json", lambda p: p.write_text("{"))]),
    # templates
    ("template-other-field", "{foo} is not allowed",
     lambda c: [T, M, c.m, "--output", c.out, "--template", "{foo} {text}"]),
    ("template-escaped-braces", "must contain {text}",
     lambda c: [T, M, c.m, "--output", c.out, "--template", "{{text}} was"]),
    ("template-unbalanced", "literal braces", lambda c: [T, M, c.m, "--output", c.out, "--template", "{text was"]),
    ("template-conversion", "{text!r} is not allowed",
     lambda c: [T, M, c.m, "--output", c.out, "--template", "{text!r}"]),
    ("template-no-room", "leaves no room", lambda c: [T, M, c.m, "--output", c.out, "--max-length", "8",
                                                      "--template", "{text}" + " it was" * 10]),
    # sizes that cannot fit, and runs that cannot give a sound adapter
    ("batch-cannot-fit", "the largest --batch-size that fits", lambda c: [T, M, c.m, "--output", c.out,
                                                                        "--batch-size", str(10**9)]),
    ("eval-batch-cannot-fit", "the largest --eval-batch-size", lambda c: [T, M, c.m, "--output", c.out,
                                                                         "--eval-batch-size", str(10**9)]),
    ("eps-huge-every-step-nan", "NaN/inf", lambda c: [T, M, c.m, "--output", c.out, *FAST, "--steps", "4",
                                                       "--eps", "1e30"]),
    # data
    ("labels-malformed", "--labels", lambda c: [T, M, c.m, "--output", c.out, "--task", "classification",
                                                "--data", c.user / "data.csv", "--labels", "pos"]),
    ("data-unknown-label", "unknown label", lambda c: [T, M, c.m, "--output", c.out, "--task", "classification",
                                                       "--data", c.user / "data.csv", "--labels", "neg:bad,meh:good"]),
    ("lm-without-data", "needs --data", lambda c: [T, M, c.m, "--output", c.out, "--task", "lm"]),
    ("model-missing", "model path not found", lambda c: [T, M, c.tmp / "no-model", "--output", c.out]),
    ("rank-too-large", "larger than the input width", lambda c: [T, M, c.m, "--output", c.out, "--rank", "500"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_with_one_line_and_touches_nothing(case, model_dirs, finished_run, tmp_path, monkeypatch,
                                                           capsys):
    _, fragment, make = case
    c = Ctx(tmp_path, model_dirs["llama"], finished_run, monkeypatch)
    try:
        args = make(c)
        before = _tree(tmp_path)
        capsys.readouterr()
        code = _run(args)
        err = capsys.readouterr().err
    finally:
        for fd in c.fds:
            os.close(fd)
    assert code != 0
    line = _one_error_line(err)
    assert fragment in line, line
    assert _tree(tmp_path) == before


def test_enough_cases():
    assert len(CASES) >= 40


# --------------------------------------------------------------------------- faults during a run


def test_disk_full_during_a_checkpoint_keeps_the_last_one(model_dirs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    calls, seen = [], {}
    real = adapter_io.save_file

    def failing(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 4:  # the first file of the second checkpoint (3 files per checkpoint)
            seen["checkpoint"] = _tree(out / "checkpoint")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(adapter_io, "save_file", failing)
    code = _run(["tune", "--model", model_dirs["llama"], "--output", out, *FAST, "--steps", "6", "--save-every", "2"])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and "No space left on device" in line and "last good checkpoint (step 2)" in line, line
    assert _tree(out / "checkpoint") == seen["checkpoint"]
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".tmp")]
    monkeypatch.setattr(adapter_io, "save_file", real)
    # what killed writes leave (ours and safetensors' own temp files) goes at the next start
    orphans = [out / ".metrics.jsonl.x1.tmp", out / ".tmpAbC123", out / ".checkpoint.x2.tmp"]
    orphans[0].write_text("{")
    orphans[1].write_bytes(b"\0")
    orphans[2].mkdir()
    assert _run(["tune", "--resume", out, "--save-every", "3"]) == 0  # the space is back: it continues
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))
    assert not any(p.exists() for p in orphans)


def test_a_bug_is_one_line_and_exit_1(monkeypatch, capsys):
    import zoact_edge.cli.tune as cli

    def broken(args):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(cli, "cmd_eval", broken)
    assert main(["eval"]) == 1
    assert "internal error: RuntimeError: boom second line" in _one_error_line(capsys.readouterr().err)


def _cli(args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "zoact_edge", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, **kw)


def test_second_tune_on_a_folder_in_use_stops_at_once(model_dirs, tmp_path, capsys):
    out = tmp_path / "run"
    first = _cli(["tune", "--model", model_dirs["llama"], "--output", out, *FAST, "--steps", "100000"])
    try:
        deadline = time.time() + 120
        while not (out / rundir.LOCK).exists():  # the lock is taken before the model loads
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.1)
        time.sleep(0.2)
        t0 = time.time()
        code = _run(["tune", "--model", model_dirs["llama"], "--output", out, *FAST, "--overwrite"])
        line = _one_error_line(capsys.readouterr().err)
        assert code == 2 and f"in use by pid {first.pid}" in line, line
        assert time.time() - t0 < 5  # at once: nothing was loaded
    finally:
        first.kill()
        first.communicate()


def test_sigkill_during_overwrite_keeps_the_old_run_or_leaves_the_new_one_resumable(model_dirs, tmp_path):
    out = tmp_path / "run"
    args = ["tune", "--model", model_dirs["llama"], *FAST, "--steps", "6", "--save-every", "3"]
    assert _run([*args, "--output", out]) == 0
    old = _tree(out)
    # killed at step 2, before the new run's first checkpoint: the old run is untouched
    killed = _cli([*args, "--output", out, "--overwrite"], env={"ZOACT_KILL_AT_STEP": "2"})
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL
    assert _tree(out) == old
    # killed at step 5, after the new run's step-3 checkpoint: the new run has replaced it
    killed = _cli([*args, "--output", out, "--overwrite"], env={"ZOACT_KILL_AT_STEP": "5"})
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL
    assert json.loads((out / "checkpoint/state.json").read_text())["step"] == 3
    assert not (out / "adapter_model.safetensors").exists()
    assert _run(["tune", "--resume", out]) == 0
    assert [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 7))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no sibling left behind


def test_an_interrupted_swap_is_finished_on_the_next_start(tmp_path):
    final = tmp_path / "run"
    new, old = tmp_path / ".run.zoact-new-1", tmp_path / ".run.zoact-old-1"
    for folder, step in ((new, 3), (old, 6)):
        (folder / "checkpoint").mkdir(parents=True)
        (folder / "checkpoint/state.json").write_text(json.dumps({"step": step}))
    rundir.recover(final, "test")  # killed between its two renames: the new run had its checkpoint
    assert json.loads((final / "checkpoint/state.json").read_text())["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_templates_read_escapes(tokenizer):
    from zoact_edge.data.tasks import ClassificationTask

    task = ClassificationTask(tokenizer, r"Review: {text}\nSentiment:\tIt was", ["terrible", "great"], 32)
    assert task.template == "Review: {text}\nSentiment:\tIt was"


def test_non_finite_adapter_is_never_saved(tmp_path):
    from zoact_edge.adapters.layer import ZOActLinear
    from zoact_edge.errors import UserError

    layer = ZOActLinear(torch.nn.Linear(4, 3), torch.eye(4)[:, :2].contiguous(), torch.full((3, 2), float("inf")))
    with pytest.raises(UserError, match="NaN/inf"):
        adapter_io.save_peft(tmp_path, {"l": layer}, "base")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("how", ["file", "path"])
def test_atomic_writes_replace_whole_or_leave_the_old_file(tmp_path, how):
    """paths.atomic_write (a file object) and atomic_save_file (a path for a library): a failure half-way
    leaves the old file as it was and no temp file; success replaces it, with the mode a plain open() gives."""
    from zoact_edge.paths import atomic_save_file, atomic_write

    target = tmp_path / "out.json"
    target.write_text("old")

    def write(text: str, fail: bool) -> None:
        if how == "file":
            with atomic_write(target) as f:
                f.write(text)
                if fail:
                    raise RuntimeError("disk full")
        else:
            def write_fn(p):
                Path(p).write_text(text)
                if fail:
                    raise RuntimeError("disk full")
            atomic_save_file(write_fn, target)

    with pytest.raises(RuntimeError):
        write("half", fail=True)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.json"]
    write("new", fail=False)
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
