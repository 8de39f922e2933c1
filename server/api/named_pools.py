"""Named expert pools: the in-memory registry behind /v1/pools and its files on disk.

A named pool is computed once from a few examples (the engine does that, see
``Engine.compute_pool``) and then served as the model ``<served>:<name>``: every request on it
runs on that pool whatever its prompt. Each pool is one JSON file ``<name>.json`` in the pools
directory, written atomically (a temporary file in the same directory, fsync, rename), so a
crash leaves either the old file or the new one. A file is bound to the checkpoint it was made
for by ``checkpoint_fingerprint`` (config + router weights); at start every file is loaded,
and one that is broken, misnamed, or made for another checkpoint is skipped with a warning that
names it: the server still starts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.engine.engine import Engine
from server.engine.request import NamedPool, RequestError
from server.runtime.settings import POOL_NAME_PATTERN

logger = logging.getLogger("emo_serve.api")

POOL_NAME = re.compile(POOL_NAME_PATTERN)
FILE_FORMAT = 1  # bump when the file layout changes


def valid_pool_name(name: str) -> bool:
    return POOL_NAME.fullmatch(name) is not None


@dataclass(frozen=True)
class PoolRecord:
    name: str
    size: int
    experts: list[list[int]]  # per layer, sorted ids ([] for dense layers)
    created: int  # unix seconds
    examples: int  # how many examples it was computed from
    example_tokens: int

    def as_file(self, fingerprint: str, model: str) -> dict[str, Any]:
        return {"object": "expert_pool", "format": FILE_FORMAT, "name": self.name, "size": self.size,
                "experts": self.experts, "created": self.created, "examples": self.examples,
                "example_tokens": self.example_tokens,
                "checkpoint": {"fingerprint": fingerprint, "model": model}}

    @classmethod
    def from_file(cls, data: Any, fingerprint: str) -> PoolRecord:
        """Raises ValueError naming what is wrong."""
        if not isinstance(data, dict) or data.get("object") != "expert_pool":
            raise ValueError('not an expert pool file (no "object": "expert_pool")')
        if data.get("format") != FILE_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, this server reads format {FILE_FORMAT}")
        checkpoint = data.get("checkpoint")
        theirs = checkpoint.get("fingerprint") if isinstance(checkpoint, dict) else None
        if theirs != fingerprint:
            model = checkpoint.get("model") if isinstance(checkpoint, dict) else None
            raise ValueError(f"made for another checkpoint ({model!r}, fingerprint {theirs!r}); this one "
                             f"has fingerprint {fingerprint!r}")
        experts = data.get("experts")
        if not (isinstance(experts, list) and all(isinstance(layer, list) and all(
                isinstance(e, int) and not isinstance(e, bool) for e in layer) for layer in experts)):
            raise ValueError('"experts" must be a list of lists of expert ids')
        fields = {name: data.get(name) for name in ("size", "created", "examples", "example_tokens")}
        bad = [name for name, value in fields.items()
               if not isinstance(value, int) or isinstance(value, bool)]
        if bad:
            raise ValueError(f"{', '.join(bad)} must be integers")
        name = data.get("name")
        if not isinstance(name, str) or not valid_pool_name(name):
            raise ValueError(f"bad pool name {name!r}")
        return cls(name, fields["size"], experts, fields["created"], fields["examples"],  # type: ignore[arg-type]
                   fields["example_tokens"])  # type: ignore[arg-type]


class PoolRegistry:
    """The named pools of one served model, kept in ``directory``. Mutations are serialised by
    the routes (one at a time); lookups are plain dict reads on the event loop."""

    def __init__(self, directory: Path, fingerprint: str, model: str) -> None:
        self.directory, self.fingerprint, self.model = Path(directory), fingerprint, model
        self.records: dict[str, PoolRecord] = {}

    def model_id(self, name: str) -> str:
        return f"{self.model}:{name}"

    def named_pool(self, record: PoolRecord) -> NamedPool:
        return NamedPool(record.name, self.model_id(record.name), tuple(tuple(ids) for ids in record.experts))

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.json"

    def load(self, engine: Engine) -> None:
        """Every valid pool file of the directory (none when it does not exist yet: the first
        save creates it). Files that fail are skipped with a warning naming the file and why."""
        if not self.directory.is_dir():
            return
        for path in sorted(self.directory.glob("*.json")):
            try:
                record = PoolRecord.from_file(json.loads(path.read_text(encoding="utf-8")), self.fingerprint)
                if path.name != f"{record.name}.json":
                    raise ValueError(f"holds pool {record.name!r}, whose file would be {record.name}.json")
                named = self.named_pool(record)
                if named.size != record.size:
                    raise ValueError(f"size {record.size} but its layers hold {named.size} experts")
                engine.check_named_pool(named)
            except (OSError, UnicodeDecodeError, ValueError) as exc:  # RequestError is a ValueError
                message = exc.message if isinstance(exc, RequestError) else str(exc)
                logger.warning("expert pool file %s skipped: %s", path, message)
                continue
            self.records[record.name] = record
        if self.records:
            logger.info("loaded %d named expert pool(s) from %s: %s", len(self.records), self.directory,
                        ", ".join(sorted(self.records)))

    def save(self, record: PoolRecord) -> None:
        """Write ``record``'s file atomically (callers run this off the event loop)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        data = json.dumps(record.as_file(self.fingerprint, self.model), indent=1) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=f".{record.name}.", suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path(record.name))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._sync_directory()

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(name).unlink()
        self._sync_directory()

    def _sync_directory(self) -> None:
        """Make the rename or unlink itself durable (the directory entry), where the OS allows."""
        with contextlib.suppress(OSError):
            fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def now() -> int:
    return int(time.time())
