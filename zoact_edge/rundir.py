"""Run folders are owned and locked: what ``tune`` may write into, replace, resume or read.

* **Owned.** A run folder carries a marker, ``.zoact-run.json`` (the run's id), written before
  anything else. ``tune`` writes into a folder that is missing or empty; ``--overwrite`` replaces
  only a run folder holding nothing but zoact-edge's own files. Anything else is refused before
  the model is loaded.
* **Replaced safely.** An overwriting run lives in a hidden sibling (``.NAME.zoact-new-ID``) until
  its first checkpoint; only then is the old run moved aside and the new one renamed into place.
  A crash before that leaves the old run as it was. The next start on the folder finishes or
  undoes whatever an interrupted run left (siblings, ``.tmp`` files).
* **Locked.** Every process working on a run folder holds an OS lock (``flock``) on its
  ``.zoact-run.lock``: exclusive for ``tune`` and ``--resume``, shared for readers like ``export``.
  The kernel releases it when the process ends, however it ends. A second process stops at once,
  naming the holder's pid.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from datetime import datetime
from pathlib import Path

from .errors import UserError
from .paths import atomic_write

MARKER = ".zoact-run.json"
LOCK = ".zoact-run.lock"
# Everything a run writes (fo-lora's peft adapter brings its README.md). Killed writes leave
# ``.NAME.*.tmp`` files and folders (ours), ``.tmpXXXXXX`` files (safetensors' own temp files)
# and a ``.adapter.partial`` folder (fo-lora's adapter).
RUN_FILES = {MARKER, LOCK, "run_config.json", "metrics.jsonl", "summary.json", "adapter_config.json",
             "adapter_model.safetensors", "mezo_weights.safetensors", "README.md", "checkpoint", ".checkpoint.old"}
LEFTOVERS = (".adapter.partial",)


def _is_leftover(name: str) -> bool:
    return (name.startswith(".") and name.endswith(".tmp")) or name.startswith(".tmp") or name in LEFTOVERS


def _own(name: str) -> bool:
    return name in RUN_FILES or _is_leftover(name)


def _checkpoint_step(folder: Path) -> int | None:
    for cand in ("checkpoint", ".checkpoint.old"):
        try:
            return int(json.loads((folder / cand / "state.json").read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


# --------------------------------------------------------------------------- locks


def _holder(fd: int) -> str:
    """Who holds the flock on ``fd``'s file: 'pid N' from /proc/locks (Linux), else 'another process'."""
    st = os.fstat(fd)
    want = (f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}")
    with contextlib.suppress(OSError):
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if "FLOCK" in parts and len(parts) > 5 and parts[5] == want and parts[4] != str(os.getpid()):
                    return f"pid {parts[4]}"
    return "another process"


def lock(folder: Path, what: str, shared: bool = False) -> int | None:
    """Take ``folder``'s lock without waiting; returns the open descriptor (close it to release).

    Shared locks are for readers: they do not create the lock file (a run folder of an older
    version, or a read-only one, has none and is read unlocked: returns None).
    """
    path = folder / LOCK
    try:
        fd = os.open(path, os.O_RDONLY) if shared else os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except FileNotFoundError:
        if shared:
            return None
        raise UserError(f"{what}: {folder} disappeared") from None
    except OSError as e:
        raise UserError(f"{what} {folder}: cannot open its lock file: {e.strerror}") from None
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise UserError(
            f"{what} {folder} is in use by {holder} (a zoact-edge run); wait for it to end or stop it"
        ) from None
    return fd


@contextlib.contextmanager
def reading(folder: str | os.PathLike, what: str):
    """Hold a shared lock on a run folder while reading it (``export --adapter``)."""
    fd = lock(Path(folder), what, shared=True) if Path(folder).is_dir() else None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


# --------------------------------------------------------------------------- what a folder is


def _kind(folder: Path) -> tuple[str, list[str]]:
    """('empty' | 'run' | 'foreign', names not written by zoact-edge)."""
    names = [p.name for p in folder.iterdir()]
    foreign = sorted(n for n in names if not _own(n))
    if not [n for n in names if n not in (MARKER, LOCK) and not _is_leftover(n)]:
        return "empty", foreign
    # A marker says so; a run of an older version is known by its run_config.json
    is_run = MARKER in names or "run_config.json" in names
    return ("run" if is_run and not foreign else "foreign"), foreign


def _siblings(final: Path, kind: str) -> list[Path]:
    return sorted(final.parent.glob(f".{final.name}.zoact-{kind}-*"))


def recover(final: Path, what: str) -> None:
    """Finish or undo what a killed run left beside ``final`` (an overwrite's siblings).

    ``.NAME.zoact-new-ID`` is an overwriting run; ``.NAME.zoact-old-ID`` the run it replaces, moved
    aside during the swap. Each is locked first: one still in use belongs to a live process.
    """
    for kind in ("new", "old"):
        for sib in _siblings(final, kind):
            fd = lock(sib, what)
            try:
                if not final.exists() and (kind == "old" or _checkpoint_step(sib) is not None):
                    os.rename(sib, final)  # a swap killed between its two renames: finish (new) or undo (old)
                else:
                    shutil.rmtree(sib)  # a new run killed before its first checkpoint, or a swapped-out old one
            finally:
                os.close(fd)


def _clean_leftovers(folder: Path) -> None:
    """Remove temp files of killed writes (only ever called under the folder's lock)."""
    for p in folder.iterdir():
        if _is_leftover(p.name) or (p.name == ".checkpoint.old" and (folder / "checkpoint" / "state.json").is_file()):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


# --------------------------------------------------------------------------- a claimed run folder


class RunDir:
    """A run folder this process owns and has locked, from the start of a run to its end.

    ``path`` is where files go now: the folder itself, or, for an overwrite before the first
    checkpoint, the hidden sibling that :meth:`commit` swaps into place. Used as a context manager,
    it releases the locks on exit; if the run fails before its first checkpoint it first removes
    what it wrote, leaving the folder as it was, and it turns an OS error into one line naming
    the last good checkpoint.
    """

    def __init__(self, final: Path, path: Path, fds: list[int], fresh: bool, made: list[Path]):
        self.final, self.path, self._fds = final, path, fds
        self._fresh = fresh  # the folder was missing or empty: a failed start empties it again
        self._made = made  # folders this run created (the run folder and missing parents), deepest first

    # ---- the swap
    @property
    def staging(self) -> bool:
        return self.path != self.final

    def commit(self) -> None:
        """After the first checkpoint of an overwrite: move the old run aside and this one in."""
        if not self.staging:
            return
        old = self.final.with_name(f".{self.final.name}.zoact-old-{uuid.uuid4().hex[:8]}")
        os.rename(self.final, old)
        os.rename(self.path, self.final)
        self.path = self.final
        shutil.rmtree(old, ignore_errors=True)
        os.close(self._fds.pop(0))  # the old run's lock went with it

    def write_json(self, name: str, obj) -> None:
        """``obj`` as the run's file ``name`` (indented JSON), written atomically."""
        with atomic_write(self.path / name) as f:
            json.dump(obj, f, indent=2)

    # ---- the end
    def last_good(self) -> str:
        step = _checkpoint_step(self.path)
        if step is None:
            return "no checkpoint had been written, so nothing of this run was kept"
        return f"the last good checkpoint (step {step}) is in {self.final}: --resume {self.final} continues from it"

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, typ, exc, tb) -> bool:
        try:
            message = self.last_good() if isinstance(exc, OSError) else None
            if exc is not None and _checkpoint_step(self.path) is None:
                with contextlib.suppress(OSError):  # the run's own error is the one to report
                    self._abandon()
        finally:
            self.release()
        if message:
            where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
            raise UserError(f"{exc.strerror or exc}{':' if where else ''}{where}; {message}") from None
        return False

    def _abandon(self) -> None:
        if self.staging:
            shutil.rmtree(self.path, ignore_errors=True)
        elif self._fresh:
            for p in self.path.iterdir():
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            for d in self._made:
                with contextlib.suppress(OSError):
                    d.rmdir()

    def release(self) -> None:
        while self._fds:
            os.close(self._fds.pop())


def _write_marker(folder: Path, run_id: str) -> None:
    with atomic_write(folder / MARKER) as f:
        json.dump({"tool": "zoact-edge", "run_id": run_id, "created": datetime.now().isoformat(timespec="seconds")}, f)


def _writable(folder: Path, what: str) -> None:
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{what}: {folder} is not a writable folder")


def claim(output: str | None, task: str, overwrite: bool) -> RunDir:
    """The folder for a new run (``--output``, else ``runs/<task>-<date>-<time>``), claimed and locked before
    anything is loaded."""
    output = output or f"runs/{task}-{datetime.now():%Y%m%d-%H%M%S}"
    final = Path(output)
    what = f"--output {output}"
    if final.exists() and not final.is_dir():
        raise UserError(f"{what} exists and is not a folder")
    parent = next((p for p in final.absolute().parents if p.exists()), Path("/"))
    _writable(final if final.exists() else parent, what)
    recover(final, what)
    run_id = uuid.uuid4().hex[:12]
    if not final.exists():
        made = [final, *[p for p in final.absolute().parents if not p.exists()]]
        try:
            final.mkdir(parents=True)
        except FileExistsError:  # another run created it just now: start over (the lock decides)
            return claim(output, task, overwrite)
        except OSError as e:
            raise UserError(f"{what}: cannot create it: {e.strerror}") from None
        fd = lock(final, what)
        _write_marker(final, run_id)
        return RunDir(final, final, [fd], fresh=True, made=made)
    kind, foreign = _kind(final)
    if kind == "foreign":  # refused without writing anything into it
        listed = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise UserError(f"{what} is not empty and not a zoact-edge run folder (it holds {listed}); "
                        + ("--overwrite only replaces run folders; " if overwrite else "") + "choose another --output")
    fd = lock(final, what)
    try:
        _clean_leftovers(final)
        if kind == "empty":
            _write_marker(final, run_id)
            return RunDir(final, final, [fd], fresh=True, made=[])
        if not overwrite:
            step = _checkpoint_step(final)
            if step is None:
                raise UserError(f"{what} holds a run that stopped before its first checkpoint (nothing to resume); "
                                "pass --overwrite to replace it")
            raise UserError(f"{what} holds a run (checkpoint at step {step}); --resume {output} continues it, "
                            "--overwrite replaces it")
        here = Path.cwd().resolve()
        if final.resolve() == here or final.resolve() in here.parents:
            raise UserError(f"{what} --overwrite would replace the current directory; run from elsewhere")
        staging = final.with_name(f".{final.name}.zoact-new-{run_id}")
        staging.mkdir()
        fds = [fd, lock(staging, what)]
        _write_marker(staging, run_id)
        return RunDir(final, staging, fds, fresh=True, made=[staging])
    except BaseException:
        os.close(fd)
        raise


def claim_existing(folder: str, what: str) -> RunDir:
    """A run folder to continue (``--resume``): recovered, cleaned of leftovers and locked."""
    final = Path(folder)
    recover(final, what)
    if not final.is_dir():
        raise UserError(f"{what}: no such run folder")
    if not (final / MARKER).exists() and not (final / "run_config.json").exists():
        raise UserError(f"{what}: not a zoact-edge run folder (no {MARKER} or run_config.json)")
    _writable(final, what)
    fd = lock(final, what)
    try:
        _clean_leftovers(final)
        if _checkpoint_step(final) is None and not (final / "checkpoint").exists():
            raise UserError(f"{what}: the run stopped before its first checkpoint, so there is nothing to resume; "
                            f"start it again with --output {folder} --overwrite")
        if not (final / MARKER).exists():
            _write_marker(final, uuid.uuid4().hex[:12])  # a run of an older version: owned from now on
    except BaseException:
        os.close(fd)
        raise
    return RunDir(final, final, [fd], fresh=False, made=[])


def truncate_metrics(folder: Path, step: int) -> None:
    """Drop the run log's records past ``step`` (the checkpoint resumed from): a resumed run's log reads as one run."""
    path = folder / "metrics.jsonl"
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError):
            break  # a torn last line from a killed run
    with atomic_write(path) as f:
        f.write("".join(l + "\n" for l in keep))
