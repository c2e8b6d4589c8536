"""Where zoact-edge keeps converted and quantized models, and how it writes files safely.

Conversions (GGUF -> safetensors, fp32 -> 4/8-bit) are slow and memory hungry, so they run once
and are cached. ``ZOACT_CACHE`` overrides the location (CI and tests point it at a temp dir).
Every file the toolkit writes goes through :func:`atomic_write` / :func:`atomic_dir`, so a crash
(even SIGKILL) leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import platformdirs


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file under the current umask."""
    return 0o666 & ~_umask()


@contextlib.contextmanager
def _temp_beside(path: Path):
    """``(fd, name)`` of a new temp file beside ``path``, renamed over ``path`` when the block succeeds and
    removed when it fails; the block must close ``fd``."""
    # mkstemp creates 0600 files; give the final file the mode a plain open() would have.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, file_mode())
    try:
        yield fd, tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def cache_dir() -> Path:
    root = os.environ.get("ZOACT_CACHE")
    path = Path(root) if root else Path(platformdirs.user_cache_dir("zoact-edge"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w"):
    """Write to a temp file beside ``path`` and rename it over ``path`` on success."""
    with _temp_beside(Path(path)) as (fd, _), os.fdopen(fd, mode) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def atomic_save_file(write_fn, path: str | os.PathLike) -> None:
    """Call ``write_fn(tmp_path)`` and rename the result to ``path`` (for libraries that want a path)."""
    with _temp_beside(Path(path)) as (fd, tmp):
        os.close(fd)
        write_fn(tmp)
        os.chmod(tmp, file_mode())  # libraries that write via their own temp file (safetensors) leave 0600
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike):
    """Build a directory under a temp name and move it into place only when complete.

    An existing ``final`` is replaced (moved aside first, then deleted), so readers see the old
    or the new directory, never a mixture.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
