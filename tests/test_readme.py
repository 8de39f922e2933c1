"""The README's reference tables agree with the code: settings and subcommands."""

from __future__ import annotations

import re
from pathlib import Path

from server.api.config import OPTIONS
from server.cli import SUBCOMMANDS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_setting_is_documented_and_no_other() -> None:
    documented = set(re.findall(r"`(EMO_SERVE_[A-Z_]+)`", README)) - {"EMO_SERVE_CACHE"}
    assert documented == {opt.env for opt in OPTIONS}


def test_every_documented_command_exists() -> None:
    documented = set(re.findall(r"`emo-serve ([a-z-]+)", README))
    assert documented and documented <= set(SUBCOMMANDS)
    assert set(SUBCOMMANDS) <= documented
