"""Device profiles (``zoact_edge/assets/profiles/*.toml``, or ``$ZOACT_PROFILES``): a memory budget, the
device kind, preferred compute dtype and bits, and limits on batch, sequence length and rank.

``tune --profile NAME`` lowers its settings until :mod:`zoact_edge.profiling.fit` estimates they fit
the budget; ``profile --profile NAME`` marks each measured method as fitting or not.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..config import BITS
from ..errors import UserError
from ..memory import fmt_bytes

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'8GiB', '8 GB', '512MiB', '1e9' -> bytes (GB = 10^9, GiB = 2^30)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UserError(f"{text!r} is not a memory size; use e.g. 8GiB, 16GB or 512MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    device: str  # cpu | cuda
    memory_total_bytes: int
    budget_bytes: int  # what one tuning process may use
    reserve_bytes: int  # needed outside the measured peak (CUDA context); counted against the budget
    compute_dtype: str
    bits: tuple[int, ...]  # preferred first
    max_batch: int
    max_seq: int
    max_rank: int
    min_batch: int
    min_seq: int
    min_rank: int
    path: str


def profiles_dir() -> Path:
    """``$ZOACT_PROFILES``, else the profiles installed with the package (``zoact_edge/assets/profiles``)."""
    env = os.environ.get("ZOACT_PROFILES")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "assets" / "profiles"


def _parse_profile(path: Path) -> Profile:
    try:
        d = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"profile {path}: {e}") from None
    lim = d.get("limits", {})
    try:
        p = Profile(
            name=path.stem, description=d["description"], device=d["device"],
            memory_total_bytes=parse_bytes(d["memory_total"]), budget_bytes=parse_bytes(d["budget"]),
            reserve_bytes=parse_bytes(d.get("reserve", "0")), compute_dtype=d["compute_dtype"],
            bits=tuple(int(b) for b in d["bits"]),
            max_batch=int(lim.get("max_batch", 16)), max_seq=int(lim.get("max_seq", 256)),
            max_rank=int(lim.get("max_rank", 32)), min_batch=int(lim.get("min_batch", 1)),
            min_seq=int(lim.get("min_seq", 16)), min_rank=int(lim.get("min_rank", 1)), path=str(path))
    except KeyError as e:
        raise UserError(f"profile {path}: missing key {e.args[0]}") from None
    if p.device not in ("cpu", "cuda") or not set(p.bits) <= set(BITS) or not p.bits:
        raise UserError(f"profile {path}: device must be cpu or cuda, bits a list from 4, 8, 16, 32")
    return p


def list_profiles() -> list[Profile]:
    d = profiles_dir()
    return [_parse_profile(f) for f in sorted(d.glob("*.toml"))] if d.is_dir() else []


def load_profile(name: str) -> Profile:
    """A profile by name (file stem in the profiles folder) or by path to a .toml file."""
    if name.endswith(".toml") and Path(name).is_file():
        return _parse_profile(Path(name))
    for p in list_profiles():
        if p.name == name:
            return p
    names = ", ".join(p.name for p in list_profiles()) or f"none found in {profiles_dir()}"
    raise UserError(f"unknown profile {name!r}; available: {names}")



def describe_profiles(profiles: list[Profile]) -> str:
    if not profiles:
        return f"no profiles found in {profiles_dir()}"
    rows = [f"{'name':24s} {'device':6s} {'budget':>10s}  {'bits':8s} {'dtype':6s} description"]
    for p in profiles:
        rows.append(f"{p.name:24s} {p.device:6s} {fmt_bytes(p.budget_bytes):>10s}  "
                    f"{','.join(map(str, p.bits)):8s} {p.compute_dtype:6s} {p.description}")
    return "\n".join(rows)
