"""`trident` command line. Each subcommand is a module here with `add_arguments(parser)` and
`run(args) -> int`; modules are imported only when their command runs, so `trident sim` never
imports torch and `trident generate` never imports the solver.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from trident_rs.errors import TridentError

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("trident_rs.cli.generate", "generate an image or video through the three stage executors"),
    "profile": ("trident_rs.cli.profile", "measure stage latency and memory on this device"),
    "plan": ("trident_rs.cli.plan", "print the placement plan for a workload and cluster"),
    "sim": ("trident_rs.cli.sim", "simulate policies on a workload in virtual time"),
    "status": ("trident_rs.cli.status", "show a running server's plan, queues and SLO attainment"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="trident", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    # Parse only the command name first, then let its module build the full parser.
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv[:1] or ["--help"])
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    cmd_parser = argparse.ArgumentParser(prog=f"trident {argv[0]}", description=COMMANDS[argv[0]][1])
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except TridentError as e:
        print(f"trident {argv[0]}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
