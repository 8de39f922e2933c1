"""Where an engine benchmark runs: --device, --dtype and --log-level, from the one settings table,
read and resolved exactly as `serve` reads them (EMO_SERVE_* variables included)."""

from __future__ import annotations

import argparse
import os

import torch

from server.logs import configure as configure_logging
from server.runtime.settings import add_arguments, load_settings, resolved_placement


def add_placement_arguments(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, "bench")


def placement(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """The resolved device and compute dtype; sets the log level on the way. Raises ConfigError
    (a ValueError) naming the flag and variable at fault."""
    settings = load_settings(args, os.environ, "bench")
    configure_logging(settings.log_level)
    return resolved_placement(settings)
