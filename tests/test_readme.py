"""The README's reference tables agree with the code (settings and subcommands), and the demo
model's report (docs/demo.md, summed up in the README) agrees with the shipped files."""

from __future__ import annotations

import json
import re
from pathlib import Path

from server.cli import SUBCOMMANDS
from server.runtime.settings import OPTIONS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DEMO_REPORT = (ROOT / "docs/demo.md").read_text()


def test_every_setting_is_documented_and_no_other() -> None:
    documented = set(re.findall(r"`(EMO_SERVE_[A-Z_]+)`", README)) - {"EMO_SERVE_CACHE"}
    assert documented == {opt.env for opt in OPTIONS}


def test_the_settings_table_names_each_setting_s_flag_and_commands() -> None:
    rows: dict[str, list[str]] = {}
    for line in README.splitlines():
        if line.startswith("| `EMO_SERVE_"):
            cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
            rows[cells[0].strip("`")] = cells
    for opt in OPTIONS:
        _env, flag, commands, *_ = rows.pop(opt.env)
        assert flag.strip("`").split()[0] == opt.flag, opt.env
        assert set(commands.split(", ")) == set(opt.commands), opt.env
    assert set(rows) == {"EMO_SERVE_CACHE"}  # the one variable that is not a setting


def test_every_documented_command_exists() -> None:
    documented = set(re.findall(r"`emo-serve ([a-z-]+)", README))
    assert documented and documented <= set(SUBCOMMANDS)
    assert set(SUBCOMMANDS) <= documented


CHECKPOINT = ROOT / "server/demo_model/checkpoint"


def test_the_evaluation_table_is_the_shipped_evaluation() -> None:
    shipped = (CHECKPOINT / "evaluation.md").read_text().strip()
    assert shipped in DEMO_REPORT, \
        "docs/demo.md's evaluation table differs from server/demo_model/checkpoint/evaluation.md"


def test_the_training_table_is_the_shipped_training_records() -> None:
    rows = {"EMO (document pools)": "training_record.json",
            "baseline (standard MoE)": "baseline_training_record.json"}
    for label, name in rows.items():
        r = json.loads((CHECKPOINT / name).read_text())
        row = (f"| {label} | {r['steps']} | {r['tokens_seen']:,} | {r['seconds'] / 60:.1f} min | "
               f"{r['final_ce']:.3f} | {r['final_lb']:.3f} |")
        assert row in DEMO_REPORT, row


def test_the_evaluation_prose_is_the_shipped_numbers() -> None:
    """Every ratio the text quotes, recomputed from evaluation.json and the training records."""
    numbers = json.loads((CHECKPOINT / "evaluation.json").read_text())
    mean = {column: losses["mean"] for column, losses in numbers["losses"].items()}
    pool, full, rand = mean["emo/pool"], mean["emo/full"], mean["emo/random"]
    base_pool, base_full = mean["baseline/pool"], mean["baseline/full"]
    domains = [d for d, n in numbers["documents"].items() if n]
    costs = {d: numbers["losses"]["emo/pool"][d] / numbers["losses"]["emo/full"][d] - 1 for d in domains}
    worst = max(costs, key=lambda d: costs[d])
    tokens = [json.loads((CHECKPOINT / n).read_text())["tokens_seen"]
              for n in ("training_record.json", "baseline_training_record.json")]
    jac = numbers["jaccard"]
    text = " ".join(DEMO_REPORT.split())  # the prose wraps lines anywhere
    quoted = [
        f"costs EMO {pool / full - 1:.1%} of loss on average "
        f"(at most {costs[worst]:.1%}, on {worst.capitalize()})",
        f"costs {rand / pool - 1:.1%} more than the serving-rule pool ({rand:.3f} vs {pool:.3f};",
        f"{rand / full - 1:.1%} more than full routing's {full:.3f})",
        f"loses {base_pool / base_full - 1:.1%} ({base_pool:.3f} vs its {base_full:.3f} full)",
        f"({full:.3f} vs {base_full:.3f}; the control saw {tokens[1] / tokens[0] - 1:.1%} more tokens",
        f"of {jac['emo']['same_domain']:.3f}, of different domains {jac['emo']['different_domain']:.3f}",
        f"(control: {jac['baseline']['same_domain']:.3f} vs {jac['baseline']['different_domain']:.3f})",
    ]
    for phrase in quoted:
        assert phrase in text, phrase


def test_the_readme_summary_quotes_the_shipped_numbers() -> None:
    """The README's short account of the demo quotes the report's headline ratios."""
    mean = {column: losses["mean"]
            for column, losses in json.loads((CHECKPOINT / "evaluation.json").read_text())["losses"].items()}
    text = " ".join(README.split())
    assert f"costs EMO {mean['emo/pool'] / mean['emo/full'] - 1:.1%} of loss on average" in text
    assert f"loses {mean['baseline/pool'] / mean['baseline/full'] - 1:.1%} under the very same rule" in text
    assert "[docs/demo.md](docs/demo.md)" in README
