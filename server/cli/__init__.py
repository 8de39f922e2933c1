"""`emo-serve` command line: one module per subcommand, imported only when it runs.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Logging is
set up here, the same for every subcommand (server/logs.py).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from server.logs import configure as configure_logging

SUBCOMMANDS: dict[str, str] = {
    "serve": "Serve a model over an OpenAI-compatible HTTP API",
    "generate": "Generate text for one prompt, streaming to stdout",
    "synth": "Write a synthetic EMO-format checkpoint with planted domains",
    "bench": "Benchmark decoding, paging and time to first token",
    "demo": "Build, train and evaluate the built-in demo EMO",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emo-serve", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        module = importlib.import_module(f"server.cli.{name}")
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("emo-serve")
    except PackageNotFoundError:
        return "0+unknown"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    module = importlib.import_module(f"server.cli.{args.command}")
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
