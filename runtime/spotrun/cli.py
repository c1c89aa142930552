"""The `spotrun` command: one entry point whose subcommands live in their own modules.

Each subcommand is a module with `HELP` (one line), `add_arguments(parser)` and
`main(args) -> int`; this file only lists them. Adding one is a line in `SUBCOMMANDS`.
A command line that names its subcommand imports that module alone: `spotrun launch` in a
pod starts workers without loading the TrainJob validator (jsonschema) or the terminal UI.
`spotrun --help` imports them all, so a subcommand module must stay light to import (no
torch at module level).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> module implementing it (HELP, add_arguments, main).
SUBCOMMANDS: dict[str, str] = {
    "launch": "spotrun.pod.launcher",
    "run": "spotrun.local.supervisor",
    "status": "spotrun.local.status_command",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The `spotrun` parser; with `only`, the other subcommands' modules are not imported."""
    parser = argparse.ArgumentParser(
        prog="spotrun",
        description="Keeps distributed PyTorch training running on preemptible (spot) GPU nodes.",
    )
    subparsers = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        if only is not None and name != only:
            subparsers.add_parser(name)
            continue
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=module.HELP, description=module.__doc__)
        module.add_arguments(sub)
        sub.set_defaults(_main=module.main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default sys.argv[1:]), run the subcommand, return its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    args = build_parser(only=chosen).parse_args(argv)
    code: int = args._main(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
