"""Nothing on the serving path imports server/tools: all of server/ outside server/tools, and
expert_cache/, except the wiring of the tool commands in server/cli. Read from the source's import
statements (relative and ``importlib.import_module`` ones too; none is executed), so a lazy
import cannot slip past.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The CLI modules that wire the tool commands (and the default-model fallback to a synthetic
# checkpoint when the demo is not shipped) are the only serving-side files allowed to reach in.
TOOL_WIRING = frozenset(
    {"server.cli.bench", "server.cli.demo", "server.cli.synth", "server.cli.default_model"}
)


@dataclass(frozen=True)
class Rule:
    importer: str  # a package: the rule covers it and every module below it
    forbidden: str
    exempt: frozenset[str] = frozenset()
    excluded: str | None = None  # a subpackage of ``importer`` the rule does not cover

    def covers(self, module: str) -> bool:
        return (
            _within(module, self.importer)
            and module not in self.exempt
            and not (self.excluded and _within(module, self.excluded))
        )


RULES = (
    Rule("server", "server.tools", TOOL_WIRING, excluded="server.tools"),
    Rule("expert_cache", "server.tools"),
)


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(root: Path, path: Path) -> set[str]:
    """Every module ``path`` names in an import, a ``from`` import (relative ones resolved; each
    imported name counted as a possible submodule) or an ``importlib.import_module("...")``."""
    module = module_name(root, path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value)
    return found


def violations(root: Path) -> list[str]:
    found = []
    for top in ("server", "expert_cache"):
        for path in sorted((root / top).rglob("*.py")):
            module = module_name(root, path)
            names = imports(root, path)
            for rule in RULES:
                if rule.covers(module):
                    found += [
                        f"{path.relative_to(root)} imports {name} ({rule.importer} must not import "
                        f"{rule.forbidden})"
                        for name in sorted(names)
                        if _within(name, rule.forbidden)
                    ]
    return found


def test_no_serving_module_imports_the_tools() -> None:
    assert violations(ROOT) == []


def test_a_planted_tool_import_on_the_serving_path_is_caught(tmp_path: Path) -> None:
    files = {
        "server/__init__.py": "",
        "server/engine/planted.py": "from server.tools.synth import write_checkpoint\n",
        "server/model/relative.py": "from ..tools import png\n",
        "server/api/dynamic.py": "import importlib\nimportlib.import_module('server.tools.bench')\n",
        "server/demo_model/__init__.py": "def f() -> None:\n    import server.tools.demo.train\n",
        "expert_cache/bench.py": "from server.tools.bench import paging\n",
        # allowed: the tools themselves, the tool commands' wiring, an unrelated name
        "server/tools/synth/writer.py": "from server.model.families import emo\n",
        "server/cli/synth.py": "from server.tools.synth.spec import make_spec\n",
        "server/engine/fine.py": "from server.model import toolsmith\n",
        "server/model/sideways.py": "from server.engine import engine\n",  # another test's rule
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    flagged = {line.split(" imports ")[0] for line in violations(tmp_path)}
    assert flagged == {
        "server/engine/planted.py",
        "server/model/relative.py",
        "server/api/dynamic.py",
        "server/demo_model/__init__.py",
        "expert_cache/bench.py",
    }
