"""``zoact-edge`` command line: the parser of every command, and one way of failing.

Options are generated from the commands' dataclasses (:mod:`zoact_edge.config`), so ``--help``,
config files and the saved run config never drift apart. The commands themselves live in
``cli/tune.py``, ``cli/onnx.py`` and ``cli/profile.py``; each imports what it runs only when run.
User errors print one line and exit with status 2; a bug prints one line and exits with status 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ..config import TuneConfig
from ..errors import UserError
from . import onnx as onnx_commands
from . import profile as profile_commands
from . import tune as tune_commands
from .onnx import add_onnx_parsers
from .options import add_options
from .profile import add_profile_parser
from .tune import EVAL_FIELDS, RESUME_MAY_CHANGE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zoact-edge",
        description="Forward-only (zeroth-order) fine-tuning in one-shot activation subspaces (ZO-Act).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tune = sub.add_parser(
        "tune", argument_default=argparse.SUPPRESS,
        help="tune a model with ZO-Act (runs with no arguments on the embedded model and data)",
        description="Tune LoRA-shaped adapters with forward passes only. With no arguments: SmolLM2-135M-Instruct "
                    "on Rotten Tomatoes sentence polarity, on CPU. Writes a PEFT LoRA adapter, metrics.jsonl, "
                    "summary.json and a resumable checkpoint to --output.",
    )
    tune.add_argument("--config", metavar="FILE", help="YAML/TOML/JSON file of options; CLI options override it")
    tune.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint, with the "
                                                      "options "
                      "it was started with; only " + ", ".join("--" + f.replace("_", "-") for f in RESUME_MAY_CHANGE)
                      + " may differ (anything else that differs is refused)")
    add_options(tune, TuneConfig)

    ev = sub.add_parser(
        "eval", argument_default=argparse.SUPPRESS,
        help="evaluate the base model, or base + adapter, on a task split",
        description="Accuracy (classification) or loss/perplexity (lm, completion). With --adapter, the model, "
                    "bits and task default to the ones the adapter was tuned with.",
    )
    ev.add_argument("--adapter", metavar="DIR", help="adapter folder written by tune (PEFT LoRA format)")
    ev.add_argument("--split", choices=["train", "validation", "test"], help="split to evaluate (default: validation)")
    ev.add_argument("--json", metavar="FILE", help="also write the metrics to FILE as JSON")
    ev.add_argument("--onnx", metavar="DIR", help="evaluate a model written by `zoact-edge export` instead")
    add_options(ev, TuneConfig, only=EVAL_FIELDS)
    add_onnx_parsers(sub)
    add_profile_parser(sub)
    return parser


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    args = {k: v for k, v in vars(ns).items() if k != "command"}
    try:
        _setup_logging()
        return COMMANDS[ns.command](args)
    except UserError as e:  # something the user can fix: their input, or their machine (disk, permissions)
        return _fail(str(e), 2)
    except OSError as e:
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        return _fail(f"{e.strerror or e}{where}", 2)
    except KeyboardInterrupt:
        print("zoact-edge: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: still one line, the traceback on request
        if os.environ.get("ZOACT_TRACEBACK"):
            raise
        return _fail(f"internal error: {type(e).__name__}: {e} (set ZOACT_TRACEBACK=1 to see where)", 1)


# Looked up when called, so a command can be replaced (tests) without rebuilding this table.
COMMANDS = {
    "tune": lambda args: tune_commands.cmd_tune(args),
    "eval": lambda args: tune_commands.cmd_eval(args),
    "export": lambda args: onnx_commands.cmd_export(args),
    "generate": lambda args: onnx_commands.cmd_generate(args),
    "profile": lambda args: profile_commands.cmd_profile(args),
    "profiles": lambda args: profile_commands.cmd_profiles(args),
}


def _fail(message: str, code: int) -> int:
    """Every failure is one line on stderr (exit 2: fix the input or the machine; 1: a bug)."""
    print("zoact-edge: error: " + " ".join(message.split()), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
