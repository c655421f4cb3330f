"""The ``cargohold`` command line: its arguments (``parser``), the commands that run on
this host (``node``) and those that ask a node's API (``client`` and one module per group
of commands), how results are printed (``output``) and the exit codes (``exits``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from cargohold.cli.client import run_client
from cargohold.cli.exits import EXIT_CODES, EXIT_OK, EXIT_WARNING, salvage_status, scrub_status
from cargohold.cli.node import pki_command, run_node
from cargohold.cli.parser import build
from cargohold.errors import CargoholdError

__all__ = ["EXIT_CODES", "EXIT_OK", "EXIT_WARNING", "main", "salvage_status", "scrub_status"]


def main(argv: Sequence[str] | None = None) -> int:
    args = build().parse_args(argv)
    try:
        if args.command == "node" and args.action is None:
            return run_node(args)
        if args.command == "pki":
            return pki_command(args)
        return run_client(args)
    except CargoholdError as e:
        print(f"Error: {e.message} [{e.code}]", file=sys.stderr)
        return EXIT_CODES[e.kind]
    except KeyboardInterrupt:
        return 130

