"""One logger naming scheme (`emo_serve.<package>`) and one logging set-up for every command."""

from __future__ import annotations

import ast
import importlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.cli import SUBCOMMANDS, main
from server.logs import REQUEST_ID, configure

ROOT = Path(__file__).resolve().parents[2]


def logger_names(path: Path) -> list[tuple[int, str | None]]:
    """(line, name) of every ``logging.getLogger(...)`` call; name None when it is not a literal."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "getLogger" and node.args):
            arg = node.args[0]
            found.append((node.lineno, arg.value if isinstance(arg, ast.Constant) else None))
    return found


def package_of(path: Path) -> str:
    """`emo_serve.<this>` for a module: the folder under server/, or the top package otherwise."""
    parts = path.relative_to(ROOT).parts
    return parts[1] if parts[0] == "server" and len(parts) > 2 else parts[0]


def test_every_logger_is_named_after_its_package() -> None:
    modules = sorted((ROOT / "server").rglob("*.py")) + sorted((ROOT / "expert_cache").rglob("*.py"))
    checked, wrong = 0, []
    for path in modules:
        for line, name in logger_names(path):
            if path == ROOT / "server/logs.py" and name is None:
                continue  # configure() reaches the root logger
            checked += 1
            expected = f"emo_serve.{package_of(path)}"
            if name is None or not re.fullmatch(re.escape(expected) + r"(\.[a-z_]+)?", name):
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {name!r}, expected {expected!r}")
    assert checked >= 10 and not wrong, wrong


@pytest.fixture()
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, given back as it was (the set-up under test changes it for the process)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


ARGV = {
    "serve": [],
    "generate": ["--prompt", "hi"],
    "synth": ["out"],
    "bench": ["prefetch", "--model", "m"],
    "demo": ["build-corpus", "out"],
}


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_command_logs_through_the_one_setup(
        command: str, root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    module = importlib.import_module(f"server.cli.{command}")

    def run(_: object) -> int:
        logging.getLogger("emo_serve.model").info("not shown by default")
        logging.getLogger("emo_serve.model").warning("checkpoint %s looks odd", "x")
        return 0

    monkeypatch.setattr(module, "run", run)
    assert main([command, *ARGV[command]]) == 0
    err = capsys.readouterr().err
    assert re.search(r"^\S+ \S+ WARNING emo_serve\.model \[-\] checkpoint x looks odd$", err, re.M), err
    assert "not shown" not in err


def test_configuring_again_sets_the_level_and_keeps_one_handler(
        root_logger: logging.Logger, capsys: pytest.CaptureFixture[str]) -> None:
    configure()
    configure("debug")  # what `serve --log-level debug` does after main()'s set-up
    ours = [h for h in root_logger.handlers
            if h.formatter is not None and "request_id" in str(h.formatter._fmt)]
    assert len(ours) == 1 and root_logger.level == logging.DEBUG
    token = REQUEST_ID.set("req-42")
    try:
        logging.getLogger("emo_serve.api").debug("inside a request")
    finally:
        REQUEST_ID.reset(token)
    assert re.search(r" DEBUG emo_serve\.api \[req-42\] inside a request$", capsys.readouterr().err, re.M)
