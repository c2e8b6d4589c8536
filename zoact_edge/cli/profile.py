"""``zoact-edge profile`` and ``zoact-edge profiles``: options, running the harness, printing the report."""

from __future__ import annotations

import sys
from pathlib import Path

from ..config import PROFILE_METHODS, ProfileSpec
from ..errors import UserError
from .options import add_options, option_fields


def add_profile_parser(sub) -> None:
    """``zoact-edge profile`` (its options generated from :class:`ProfileSpec`) and ``zoact-edge profiles``."""
    p = sub.add_parser(
        "profile", help="measure peak memory of inference vs ZO-Act vs MeZO vs backprop, each in its own process",
        description="Runs each method in a fresh subprocess on the same model, batch and loss and reports peak "
                    "memory, a breakdown and the ratio to an inference forward. Writes report.json, report.md "
                    "and report.png to --out.")
    add_options(p, ProfileSpec, with_defaults=True)
    p.add_argument("--methods", default="inference,zoact,mezo,fo-lora",
                   help=f"comma-separated, from {','.join(PROFILE_METHODS)} (default: inference,zoact,mezo,fo-lora)")
    p.add_argument("--budget", help="memory budget, e.g. 8GiB: marks each method fits / does not fit")
    p.add_argument("--profile", help="device profile whose budget to use (see `zoact-edge profiles`)")
    p.add_argument("--malloc-mmap-threshold", type=int, metavar="BYTES",
                   help="set glibc MALLOC_MMAP_THRESHOLD_ for every method (less fragmentation, slower steps)")
    p.add_argument("--out", help="folder for report.json, report.md and report.png")
    sub.add_parser("profiles", help="list the device profiles (memory budget, device, bits, limits)",
                   description="Device profiles for `tune --profile NAME` and `profile --profile NAME`: TOML files "
                               "installed with the package in zoact_edge/assets/profiles/ (or in $ZOACT_PROFILES).")


def cmd_profiles(args: dict) -> int:
    from ..profiling.profiles import describe_profiles, list_profiles

    print(describe_profiles(list_profiles()))
    return 0


def cmd_profile(args: dict) -> int:
    from ..profiling.harness import parse_methods, profile
    from ..profiling.profiles import load_profile, parse_bytes
    from ..profiling.report import describe, write_report

    budget, name = None, args.get("profile")
    if args.get("budget") and name:
        raise UserError("give --budget or --profile, not both")
    if args.get("budget"):
        budget = parse_bytes(args["budget"])
    elif name:
        budget = load_profile(name).budget_bytes
    env = {}
    if args.get("malloc_mmap_threshold") is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = int(args["malloc_mmap_threshold"])
    spec = ProfileSpec(**{f.name: args[f.name] for f in option_fields(ProfileSpec)}, env=env)
    methods = parse_methods(args["methods"])
    report = profile(spec, methods, budget, name, progress=lambda m: print(f"profiling {m} ...", file=sys.stderr))
    print(describe(report))
    if args.get("out"):
        write_report(report, Path(args["out"]))
        print(f"report: {args['out']}/report.json, report.md, report.png")
    failed = [n for n, e in report["methods"].items() if e.get("status") == "failed"]
    return 1 if failed else 0


