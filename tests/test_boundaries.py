"""The package boundaries hold: each package imports only what sits below it.

expert_cache never imports server; server.model never imports server.engine, server.api or
server.runtime; server.engine never imports server.api or server.runtime; server.runtime (the
composition root) builds the engine but never imports the HTTP layer or the commands.
Read from the source (every import statement, also those inside functions), so a lazy import
cannot slip past.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "expert_cache": ("server",),
    "server/model": ("server.engine", "server.api", "server.runtime"),
    "server/engine": ("server.api", "server.runtime"),
    "server/runtime": ("server.api", "server.cli"),
}


def imported_modules(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_nothing_above_it(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no sources under {package}"
    crossings = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in files
        for name in imported_modules(path)
        if any(name == banned or name.startswith(banned + ".") for banned in FORBIDDEN[package])
    ]
    assert crossings == []
