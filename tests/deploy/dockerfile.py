"""Just enough of Dockerfile and .dockerignore semantics to check ours without a Docker engine.

Dockerfile: line continuations, comments, one ``Instruction`` per instruction, stages split at
FROM, ENV in both forms, exec-form (JSON) arguments. .dockerignore: moby's rules (patterns are
cleaned paths, ``*``/``?`` stay inside one path segment, ``**`` spans any number, ``!``
re-includes, the last matching pattern wins, a pattern excludes a directory's whole content).
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, ENV ...
    args: str  # the rest of the instruction, continuations joined with a space
    line: int  # 1-based line where it starts

    def exec_form(self) -> list[str]:
        """The JSON array form (ENTRYPOINT/CMD/HEALTHCHECK CMD); ValueError for shell form."""
        text = self.args
        if self.keyword == "HEALTHCHECK":
            text = text.split(" CMD ", 1)[1] if " CMD " in f" {text}" else ""
            text = text.strip()
        value = json.loads(text)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"Dockerfile line {self.line}: {self.keyword} is not a JSON string array")
        return value


def parse_dockerfile(path: Path) -> list[Instruction]:
    out: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped by Docker too
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        text = pending + stripped
        pending = ""
        keyword, _, args = text.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
    if pending:
        raise ValueError(f"{path}: line {start} continues past the end of the file")
    return out


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """Instructions grouped by build stage, each list starting with its FROM."""
    groups: list[list[Instruction]] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            groups.append([])
        if groups:
            groups[-1].append(ins)
    return groups


def env_of(stage: list[Instruction]) -> dict[str, str]:
    """ENV values set in a stage (``ENV A=1 B="x y"`` and legacy ``ENV A 1``)."""
    env: dict[str, str] = {}
    for ins in stage:
        if ins.keyword != "ENV":
            continue
        words = shlex.split(ins.args)
        if words and "=" not in words[0]:
            env[words[0]] = ins.args.split(None, 1)[1] if len(words) > 1 else ""
            continue
        for word in words:
            key, sep, value = word.partition("=")
            if not sep:
                raise ValueError(f"Dockerfile line {ins.line}: ENV word {word!r} has no '='")
            env[key] = value
    return env


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                out, i = out + "(?:.*/)?", i + 1
            else:
                out += ".*"
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


@dataclass(frozen=True)
class DockerIgnore:
    rules: tuple[tuple[bool, re.Pattern[str]], ...]  # (exclude?, pattern), in file order

    @classmethod
    def read(cls, path: Path) -> DockerIgnore:
        rules = []
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            exclude = not line.startswith("!")
            pattern = line.lstrip("!").strip().strip("/")
            rules.append((exclude, _pattern_regex(pattern)))
        return cls(tuple(rules))

    def excluded(self, relpath: str) -> bool:
        """True when ``relpath`` (a file, relative to the context root) stays out of the context."""
        parts = relpath.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        result = False
        for exclude, regex in self.rules:
            if any(regex.match(prefix) for prefix in prefixes):
                result = exclude
        return result
