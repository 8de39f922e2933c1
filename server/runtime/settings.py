"""Settings: every setting of every command, from flags or EMO_SERVE_* variables.

One table (``OPTIONS``) names each setting once; it yields the command-line flag, the
environment variable, the parser and the commands that take it, so flags and variables cannot
drift apart and `serve`, `generate` and `bench` read a setting the same way. Flags override
variables, variables override the defaults. Values are parsed from strings in one place so a bad
variable is reported exactly like a bad flag.

Settings chain like the layers they configure: the engine's own options are an ``EngineConfig``
(``Settings.engine``), defaulted and validated there only; the rest (which checkpoint, where it
runs, the expert cache's budgets, the HTTP server) are ``Settings``' own fields.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch

from expert_cache.memory import MiB, parse_bytes
from server.engine.config import ConfigError, EngineConfig
from server.model.devices import resolve_device
from server.model.dtypes import COMPUTE_DTYPES, resolve_dtype

__all__ = ["OPTIONS", "ConfigError", "Option", "Settings", "add_arguments", "load_settings", "settings_of"]

ENV_PREFIX = "EMO_SERVE_"

DTYPES = ("auto", *COMPUTE_DTYPES)
POOL_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"  # names of named expert pools
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
ALL_EXPERTS = "all"  # --expert-cache all: every expert resident on the device, no paging
Command = Literal["serve", "generate", "bench"]


def _expert_cache(text: str) -> int | Literal["all"] | None:
    value = text.strip().lower()
    if value == "auto":
        return None
    if value == "all":
        return "all"
    return parse_bytes(text)


def _optional_size(text: str) -> int | None:
    return None if text.strip().lower() == "auto" else parse_bytes(text)


def _pool_size(text: str) -> int | Literal["full"]:
    if text.strip().lower() == "full":
        return "full"
    return _int(text)


def _int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not an integer") from None


def _optional_int(text: str) -> int | None:
    return None if text.strip().lower() == "auto" else _int(text)


def _float(text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


@dataclass(frozen=True)
class Settings:
    """Validated once at start; ``api_key`` is kept out of ``repr`` so it is never logged."""

    model: Path | None = None  # None: the built-in demo model (server/cli/default_model.py)
    device: str = "auto"
    dtype: str = "auto"
    expert_cache: int | Literal["all"] | None = None  # device-tier bytes; None: what fits after the rest
    host_cache: int | None = None  # host-tier bytes; None: all experts, capped by free RAM
    engine: EngineConfig = EngineConfig()
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = field(default=None, repr=False)
    served_model_name: tuple[str, ...] = ()  # empty: the checkpoint directory's name
    max_body_bytes: int = 8 * MiB
    max_n: int = 16  # choices per request: n times the number of prompts
    max_stop: int = 8
    max_stop_len: int = 256
    drain_timeout: float = 30.0
    log_level: str = "info"
    pools_dir: Path | None = None  # None: <cache dir>/pools/<served model name>
    pin_pools: tuple[str, ...] = ()  # named pools kept resident on the device tier

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError("port", f"{self.port} is outside 0..65535")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError("device", f"{self.device!r} is not auto, cpu, cuda or cuda:N")
        if self.dtype not in DTYPES:
            raise ConfigError("dtype", f"{self.dtype!r} is not one of {', '.join(DTYPES)}")
        for name in ("max_body_bytes", "max_n", "max_stop_len"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"{getattr(self, name)} must be >= 1")
        for name in ("expert_cache", "host_cache", "max_stop"):
            value = getattr(self, name)
            if isinstance(value, int) and value < 0:
                raise ConfigError(name, f"{value} must be >= 0")
        if self.expert_cache == ALL_EXPERTS and self.host_cache is not None:
            raise ConfigError("host_cache", "has no use with --expert-cache all (every expert is read "
                              "onto the device at start; there is no host tier)")
        if self.drain_timeout < 0:
            raise ConfigError("drain_timeout", f"{self.drain_timeout} must be >= 0")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError("log_level", f"{self.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
        if self.api_key is not None and not self.api_key:
            raise ConfigError("api_key", "must not be empty when given")
        bad = [name for name in self.pin_pools if not re.fullmatch(POOL_NAME_PATTERN, name)]
        if bad:
            raise ConfigError("pin_pools", f"{bad[0]!r} is not a pool name ({POOL_NAME_PATTERN})")

    @property
    def resident_experts(self) -> bool:
        """Every expert on the device, read at start: no tiers, no paging."""
        return self.expert_cache == ALL_EXPERTS


# the engine's options; device and dtype are Settings' own (the engine follows the model's)
ENGINE_FIELDS = frozenset(f.name for f in fields(EngineConfig)) - {f.name for f in fields(Settings)}


def settings_of(**values: Any) -> Settings:
    """Settings from parsed values named as in ``OPTIONS``: the engine's go into ``engine``."""
    engine = {k: v for k, v in values.items() if k in ENGINE_FIELDS}
    rest = {k: v for k, v in values.items() if k not in ENGINE_FIELDS}
    return Settings(engine=EngineConfig(**engine), **rest)


SERVE: frozenset[Command] = frozenset({"serve"})
RUNS_A_MODEL: frozenset[Command] = frozenset({"serve", "generate"})
EVERY_COMMAND: frozenset[Command] = frozenset({"serve", "generate", "bench"})


@dataclass(frozen=True)
class Option:
    """One setting: ``--flag`` and ``EMO_SERVE_<NAME>`` both map onto ``Settings`` (or, for the
    engine's options, ``Settings.engine``) field ``name``; ``commands`` take it."""

    name: str
    parse: Callable[[str], Any]
    metavar: str
    help: str
    commands: frozenset[Command] = SERVE

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


OPTIONS: tuple[Option, ...] = (
    Option("model", Path, "DIR", "checkpoint directory (default: the built-in demo model, emo-demo)",
           RUNS_A_MODEL),
    Option("host", str, "ADDR", "address to bind (default 127.0.0.1)"),
    Option("port", _int, "N", "port to bind (default 8000)"),
    Option("device", str, "auto|cpu|cuda:N", "device for trunk, expert slots and KV (default auto)",
           EVERY_COMMAND),
    Option("dtype", str, "|".join(DTYPES), "compute dtype (default auto: bf16 on CUDA, fp32 on CPU)",
           EVERY_COMMAND),
    Option("pool_size", _pool_size, "N|full", "default expert pool per request (default: model's)",
           RUNS_A_MODEL),
    Option("expert_cache", _expert_cache, "BYTES|all",
           "device-tier budget for expert slots; all = every expert resident, no paging (default auto)",
           RUNS_A_MODEL),
    Option("host_cache", _optional_size, "BYTES", "host-RAM tier budget for experts (default auto)",
           RUNS_A_MODEL),
    Option("max_num_seqs", _int, "N", "most sequences decoded at once (default 16)"),
    Option("max_model_len", _optional_int, "N", "longest prompt + completion (default: model's, <= 4096)",
           RUNS_A_MODEL),
    Option("max_queue", _int, "N", "most waiting requests before 429 (default 256)"),
    Option("prefill_chunk_tokens", _int, "N",
           "prefill work per engine step, in token rows, between decode steps (default 2048)"),
    Option("api_key", str, "KEY", "require 'Authorization: Bearer KEY' on /v1 and tokenizer routes"),
    Option("served_model_name", _names, "NAME[,NAME]", "model names clients may ask for"),
    Option("max_body_bytes", parse_bytes, "BYTES", "largest request body (default 8MiB)"),
    Option("max_n", _int, "N", "most choices per request, n x prompts (default 16)"),
    Option("max_stop", _int, "N", "most stop strings per request (default 8)"),
    Option("max_stop_len", _int, "CHARS", "longest stop string (default 256)"),
    Option("drain_timeout", _float, "SECONDS", "grace for running requests on SIGTERM (default 30)"),
    Option("expert_load_timeout", _float, "SECONDS",
           "longest wait for an expert being read before its requests fail (default 60)", RUNS_A_MODEL),
    Option("log_level", str, "|".join(LOG_LEVELS), "log level (default info)", EVERY_COMMAND),
    Option("pools_dir", Path, "DIR", "named expert pools, one JSON file each (default: under the "
           "cache directory, per model)"),
    Option("pin_pools", _names, "NAME[,NAME]", "named pools kept resident on the device expert cache"),
)


def resolved_placement(settings: Settings) -> tuple[torch.device, torch.dtype]:
    """The device and compute dtype the settings name ('auto' resolved for this machine)."""
    device = resolve_device(settings.device)
    return device, resolve_dtype(settings.dtype, device)


def options_of(command: Command) -> tuple[Option, ...]:
    return tuple(opt for opt in OPTIONS if command in opt.commands)


def add_arguments(parser: argparse.ArgumentParser, command: Command) -> None:
    """``command``'s flags; each takes a string (parsed later, like its variable), default None."""
    for opt in options_of(command):
        parser.add_argument(opt.flag, dest=opt.name, metavar=opt.metavar, default=None,
                            help=f"{opt.help} [env {opt.env}]")


def load_settings(args: argparse.Namespace | Mapping[str, Any], environ: Mapping[str, str],
                  command: Command = "serve", **fixed: Any) -> Settings:
    """Flags (``args``) override ``environ``; only ``command``'s options are read. ``fixed``
    values are the command's own choices, beyond any flag (generate decodes one sequence).
    Raises ConfigError naming the flag and variable."""
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    options = options_of(command)
    values: dict[str, Any] = {}
    for opt in options:
        raw = given.get(opt.name)
        source = opt.flag
        if raw is None:
            raw, source = environ.get(opt.env), opt.env
            # compose files and k8s manifests often pass VAR="" to mean "not set"
            if raw is not None and not raw.strip():
                raw = None
        if raw is None:
            continue
        try:
            values[opt.name] = opt.parse(str(raw))
        except ValueError as exc:
            raise ConfigError(source, str(exc)) from None
    try:
        return settings_of(**values, **fixed)
    except ConfigError as exc:
        culprit = next((o for o in options if o.name == exc.setting), None)
        if culprit is None:  # a value the command fixed itself
            raise
        raise ConfigError(f"{culprit.flag} / {culprit.env}", exc.message) from None
