"""ServeConfig: every setting of `emo-serve serve`, from flags or EMO_SERVE_* variables.

One table (``OPTIONS``) names each setting once; it yields the command-line flag, the
environment variable and the parser, so flags and variables cannot drift apart. Flags override
variables, variables override the dataclass defaults. Values are parsed from strings in one
place so a bad variable is reported exactly like a bad flag.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from expert_cache.memory import MiB, parse_bytes
from server.model.dtypes import COMPUTE_DTYPES

ENV_PREFIX = "EMO_SERVE_"

DTYPES = ("auto", *COMPUTE_DTYPES)
POOL_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"  # names of named expert pools
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")

class ConfigError(ValueError):
    """A setting has a bad value; ``setting`` names the field, flag or variable at fault."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting, self.message = setting, message


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
class ServeConfig:
    """Validated once at start; ``api_key`` is kept out of ``repr`` so it is never logged."""

    model: Path | None = None  # None: the built-in demo model (server/cli/default_model.py)
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    dtype: str = "auto"
    pool_size: int | Literal["full"] | None = None  # None: the model's default pool
    expert_cache: int | None = None  # device-tier bytes; None: what fits after the rest
    host_cache: int | None = None  # host-tier bytes; None: all experts, capped by free RAM
    max_num_seqs: int = 16
    max_model_len: int | None = None  # None: the model's, capped by the engine
    max_queue: int = 256
    prefill_chunk_tokens: int = 2048
    api_key: str | None = field(default=None, repr=False)
    served_model_name: tuple[str, ...] = ()  # empty: the checkpoint directory's name
    max_body_bytes: int = 8 * MiB
    max_n: int = 16  # choices per request: n times the number of prompts
    max_stop: int = 8
    max_stop_len: int = 256
    drain_timeout: float = 30.0
    expert_load_timeout: float = 60.0
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
        if isinstance(self.pool_size, int) and self.pool_size < 1:
            raise ConfigError("pool_size", f"{self.pool_size} must be >= 1 or 'full'")
        for name in ("max_num_seqs", "max_queue", "prefill_chunk_tokens", "max_body_bytes", "max_n",
                     "max_stop_len"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"{getattr(self, name)} must be >= 1")
        for name in ("expert_cache", "host_cache", "max_stop"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(name, f"{value} must be >= 0")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError("max_model_len", f"{self.max_model_len} must be >= 2")
        if self.drain_timeout < 0:
            raise ConfigError("drain_timeout", f"{self.drain_timeout} must be >= 0")
        if not self.expert_load_timeout > 0:
            raise ConfigError("expert_load_timeout", f"{self.expert_load_timeout} must be > 0")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError("log_level", f"{self.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
        if self.api_key is not None and not self.api_key:
            raise ConfigError("api_key", "must not be empty when given")
        bad = [name for name in self.pin_pools if not re.fullmatch(POOL_NAME_PATTERN, name)]
        if bad:
            raise ConfigError("pin_pools", f"{bad[0]!r} is not a pool name ({POOL_NAME_PATTERN})")


@dataclass(frozen=True)
class Option:
    """One setting: ``--flag`` and ``EMO_SERVE_<FIELD>`` both map onto ``ServeConfig.<field>``."""

    field: str
    parse: Callable[[str], Any]
    metavar: str
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.field.upper()


OPTIONS: tuple[Option, ...] = (
    Option("model", Path, "DIR", "checkpoint directory (default: the built-in demo model, emo-demo)"),
    Option("host", str, "ADDR", "address to bind (default 127.0.0.1)"),
    Option("port", _int, "N", "port to bind (default 8000)"),
    Option("device", str, "auto|cpu|cuda:N", "device for trunk, expert slots and KV (default auto)"),
    Option("dtype", str, "|".join(DTYPES), "compute dtype (default auto: bf16 on CUDA, fp32 on CPU)"),
    Option("pool_size", _pool_size, "N|full", "default expert pool per request (default: model's)"),
    Option("expert_cache", _optional_size, "BYTES", "device-tier budget for expert slots (default auto)"),
    Option("host_cache", _optional_size, "BYTES", "host-RAM tier budget for experts (default auto)"),
    Option("max_num_seqs", _int, "N", "most sequences decoded at once (default 16)"),
    Option("max_model_len", _optional_int, "N", "longest prompt + completion (default: model's, <= 4096)"),
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
           "longest wait for an expert being read before its requests fail (default 60)"),
    Option("log_level", str, "|".join(LOG_LEVELS), "log level (default info)"),
    Option("pools_dir", Path, "DIR", "named expert pools, one JSON file each (default: under the "
           "cache directory, per model)"),
    Option("pin_pools", _names, "NAME[,NAME]", "named pools kept resident on the device expert cache"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every flag takes a string (parsed later, like its variable) and defaults to None."""
    for opt in OPTIONS:
        parser.add_argument(opt.flag, dest=opt.field, metavar=opt.metavar, default=None,
                            help=f"{opt.help} [env {opt.env}]")


def load_config(
    args: argparse.Namespace | Mapping[str, str | None], environ: Mapping[str, str]
) -> ServeConfig:
    """Flags (``args``) override ``environ``; raises ConfigError naming the flag and variable."""
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        raw = given.get(opt.field)
        source = opt.flag
        if raw is None:
            raw, source = environ.get(opt.env), opt.env
            # compose files and k8s manifests often pass VAR="" to mean "not set"
            if raw is not None and not raw.strip():
                raw = None
        if raw is None:
            continue
        try:
            values[opt.field] = opt.parse(str(raw))
        except ValueError as exc:
            raise ConfigError(source, str(exc)) from None
    try:
        return ServeConfig(**values)
    except ConfigError as exc:
        opt = next(o for o in OPTIONS if o.field == exc.setting)
        raise ConfigError(f"{opt.flag} / {opt.env}", exc.message) from None
