"""The one way the tools read and write a results file under docs/results/: read-modify-write under a lock.

Several benchmark processes may run side by side (one thread each is faster in total on a 2-core CPU)
and append to the same file; each change re-reads the file under an exclusive lock, so no process
writes back a stale copy over another's records, and the write is atomic (a temp file renamed).
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from pathlib import Path


def _lock(path: Path):
    return open(Path(tempfile.gettempdir()) / f"{path.name}.lock", "w")


def read_results(path: Path) -> dict:
    """The results file as it stands, read under a shared lock (never mid-write); ``{"records": []}`` if absent.
    Nothing is written."""
    with _lock(path) as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        return json.loads(path.read_text()) if path.exists() else {"records": []}


def locked_update(path: Path, change) -> dict:
    """Read-modify-write of the results file under an exclusive lock; the write is atomic. Returns the data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _lock(path) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(path.read_text()) if path.exists() else {"records": []}
        change(data)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
        return data
