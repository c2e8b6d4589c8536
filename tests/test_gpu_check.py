"""tools/gpu_check.sh --dry-run: the prepared GPU check runs end to end on the CPU, so it cannot rot
between the rare sessions that have a GPU. (The CUDA tests it runs are tests/test_cuda.py, here on the
CPU against the same CPU references.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "VIRTUAL_ENV": sys.prefix, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path / "out"),
                           "--work", str(tmp_path / "work"), "--budget", "900"],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert {n: s["status"] for n, s in r["stages"].items()} == {
        n: "ok" for n in ("env", "tests", "shapes", "profile", "bench_step", "fit")
    }
    assert r["tests"]["counts"]["passed"] >= 10 and not r["tests"]["counts"]["failed"]
    assert all(p["status"] == "ok" for p in r["profile"].values()) and len(r["profile"]) == 2
    assert all(b["status"] == "ok" for b in r["bench_step"].values())
    assert {row["bits"] for row in r["fit"]["estimates"]} == {4, 16}
    assert (tmp_path / "out" / "cuda-tests.xml").is_file() and (tmp_path / "out" / "reports.tar.gz").is_file()
