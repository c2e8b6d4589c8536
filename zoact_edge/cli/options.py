"""Command-line options generated from a dataclass's fields (name, type, default, ``help``, ``choices``).

tune's and eval's options come from :class:`~zoact_edge.config.TuneConfig`, profile's from
:class:`~zoact_edge.profiling.methods.ProfileSpec`, export's from :class:`~zoact_edge.onnx.export.ExportOptions`,
so a config file's keys, the ``--options`` and what a run saves always agree.
"""

from __future__ import annotations

import argparse
import dataclasses

from ..config import field_type


def option_fields(cls) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are command-line options (``opt(..., cli=False)`` ones are not)."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def add_options(parser: argparse.ArgumentParser, cls, only=None, with_defaults: bool = False) -> None:
    """One ``--option`` per field; ``with_defaults`` puts the defaults in the parsed values (else they stay unset)."""
    for f in option_fields(cls):
        if only is not None and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.metadata.get("cli_default", f.default)
        helptext = f.metadata.get("help", "") + (f" (default: {default})" if default is not None else "")
        kw = {"default": default} if with_defaults else {}
        typ = field_type(f)
        if typ is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=helptext, **kw)
        else:
            parser.add_argument(flag, type=typ, metavar=f.name.upper(), choices=f.metadata.get("choices"),
                                help=helptext, **kw)
