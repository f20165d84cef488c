"""`kiln bench MODE ...`: one sub-command per benchmark mode, each in its own module.

A mode module defines `add_parser(modes)`, which adds its sub-command to `modes` (an
argparse sub-parsers object) with `set_defaults(func=...)`. To add a mode, write the
module and list it in MODES. Mode modules import heavy things inside their commands,
so that `kiln --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib

from kiln.config import OneLineParser

MODES = ("kiln.bench.offline", "kiln.bench.serving")


# A mode's options: a bad one is one line (kiln.config.OneLineParser).
ModeParser = OneLineParser


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: one mode each (see kiln bench --help)")
    modes = p.add_subparsers(dest="mode", required=True, metavar="MODE",
                             parser_class=ModeParser)
    for module in MODES:
        importlib.import_module(module).add_parser(modes)
