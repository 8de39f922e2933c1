"""`emo-serve bench decode` end to end on the tiny synthetic model (CPU), and its pieces:
config validation, tier sizing, the PNG writer. No timing asserts: only that every number the
report promises is there, finite where it must be, and consistent with the scenario."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from server.cli import main
from server.tools.bench.config import DecodeBenchConfig, Scenario, scenarios, tier_slots
from server.tools.bench.report import JSON_NAME, MARKDOWN_NAME, PLOTS
from server.tools.bench.run import run_decode_bench
from server.tools.bench.scenario import ScenarioResult
from server.tools.bench.targets import check_targets
from server.tools.png import Canvas, encode_png
from tests.tools.bench.png_reader import read_png


@pytest.fixture(scope="module")
def bench_run(tiny_emo_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("bench-decode")
    argv = ["bench", "decode", "--model", str(tiny_emo_checkpoint), "--device", "cpu", "--out", str(out),
            "--tiers", "0.25,1", "--prompt-tokens", "12", "--decode-tokens", "3", "--concurrency", "4",
            "--repeats", "2"]
    assert main(argv) == 0
    return out, (out / MARKDOWN_NAME).read_text()


def test_json_has_every_scenario_with_its_numbers(bench_run: tuple[Path, str]) -> None:
    out, _ = bench_run
    report = json.loads((out / JSON_NAME).read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert set(rows) == {f"{r}@{t}" for r in ("pool8", "pool4", "full") for t in ("resident", "tier25%")}
    for name, r in rows.items():
        assert r["skipped"] is None, name
        assert r["decode_tps_b1"] > 0 and r["decode_tps_concurrent"] > 0, name
        assert r["ttft_warm_s"] > 0 and 0.0 <= r["hit_rate"] <= 1.0, name
        # on CPU nothing measures a device peak: reported as unknown, never as the budget itself
        assert r["peak_device_bytes"] is None and r["budget_bytes"] > 0, name
        if name.endswith("@resident"):
            assert r["device_slots"] == 4 * 31 and r["bytes_paged"] == 0 and r["hit_rate"] == 1.0
            assert r["ttft_cold_s"] is None and r["vs_resident"]["decode_tps_b1"] == 1.0
        else:  # a quarter of the 31 routable experts per layer, over 4 layers
            assert r["device_slots"] == 4 * 8
            assert r["ttft_cold_s"] > 0 and r["cold_paged_bytes"] > 0
            assert r["bytes_paged"] >= r["cold_paged_bytes"]
            assert r["h2d_gb_s"] > 0 and r["hit_rate"] < 1.0
            assert r["vs_resident"]["decode_tps_b1"] > 0 and r["vs_resident"]["decode_tps_concurrent"] > 0
    assert report["header"]["pools"] == [8, 4] and report["header"]["concurrency"] == 4
    parity = report["parity"]
    assert parity["prompt_tokens"] == 12 and parity["pool"] == 8
    assert parity["greedy_agreement"] >= 0.9, parity  # bf16 rounding may flip a near-tie, not more
    assert parity["max_abs_diff"] < 0.05 * parity["logit_scale"], parity
    assert any("Hugging Face reference skipped" in n for n in report["notes"])
    step = report["decode_step"]
    assert step["device"] == "cpu" and step["fullgraph"] is True and step["host_syncs_per_token"] is None
    assert 0 < step["ops_per_layer"] <= 40 and "pool 8" in step["counted_on"]


def test_markdown_table_is_well_formed(bench_run: tuple[Path, str]) -> None:
    _, text = bench_run
    tables = [block.splitlines() for block in text.split("\n\n") if block.startswith("|")]
    table, step = tables  # the scenarios, then the decode step
    header, rule, rows = table[0], table[1], table[2:]
    columns = header.count("|")
    assert "b1 tok/s" in header and "x4 tok/s" in header and "TTFT cold s" in header
    assert rule.count("|") == columns and len(rows) == 6
    assert all(row.count("|") == columns for row in rows)
    assert all(re.search(r"\| - / \d+\.\d MB \|$", row) for row in rows), rows  # CPU: no measured peak
    assert step[0].startswith("| decode step on | fullgraph | ops / layer / token | host syncs / token |")
    assert len(step) == 3 and step[2].startswith("| cpu | yes (aot_eager) |")
    assert "bf16 vs fp32 on cpu" in text


def test_plots_are_valid_pngs(bench_run: tuple[Path, str]) -> None:
    out, _ = bench_run
    for name in PLOTS:
        width, height, _, raw = read_png(out / name)
        assert width > 100 and height > 100
        assert len(set(raw)) > 2, f"{name} is blank"


def test_png_encoder_round_trips_pixels(tmp_path: Path) -> None:
    c = Canvas(5, 3, background=(10, 20, 30))
    c.dot(0, 0, (255, 0, 0))
    c.box(3, 1, 4, 2, (0, 255, 0))
    c.save(tmp_path / "x.png")
    width, height, color, raw = read_png(tmp_path / "x.png")
    assert (width, height, color) == (5, 3, 2)
    rows = [raw[y * 16 + 1 : (y + 1) * 16] for y in range(3)]  # drop each row's filter byte
    assert all(raw[y * 16] == 0 for y in range(3))
    assert b"".join(rows) == bytes(c.pixels)
    assert rows[0][:3] == bytes((255, 0, 0)) and rows[2][9:12] == bytes((0, 255, 0))
    with pytest.raises(ValueError, match="not a 2x2 RGB image"):
        encode_png(2, 2, b"\x00" * 11)


def test_tier_slots_hold_the_default_pool() -> None:
    assert tier_slots([31] * 4, 0.25) == 32  # tiny: ceil(31/4) = 8 per layer, the default pool
    assert tier_slots([127] * 16, 0.25) == 512  # EMO-1b14b: 32 per layer, one default pool
    assert tier_slots([127] * 16, 0.5) == 1024 and tier_slots([127] * 16, 1.0) == 16 * 127


def test_scenarios_put_the_resident_baseline_first(tmp_path: Path) -> None:
    cfg = DecodeBenchConfig(tmp_path, "cpu", "fp32", tiers=(0.25, 1.0, 0.5))
    got = [s.name for s in scenarios(cfg, (32, 16))]
    assert got[:3] == ["pool32@resident", "pool16@resident", "full@resident"]
    assert got[-1] == "full@tier25%" and len(got) == 9
    assert Scenario("full", 1.0).resident and not Scenario(8, 0.5).resident


@pytest.mark.parametrize(("field", "value", "message"), [
    ("tiers", (0.0,), "tiers must be fractions"),
    ("tiers", (1.5,), "tiers must be fractions"),
    ("pools", (0,), "pools must be integers"),
    ("dtype", "int8", "dtype must be"),
    ("decode_tokens", 1, "decode_tokens must be"),
    ("model_dir", Path("/nonexistent/emo"), "is not a directory"),
])
def test_config_rejects_bad_values(tmp_path: Path, field: str, value: object, message: str) -> None:
    kwargs = {"out_dir": tmp_path, "device": "cpu", "dtype": "fp32", field: value}
    with pytest.raises(ValueError, match=message):
        DecodeBenchConfig(**kwargs)  # type: ignore[arg-type]


def test_cli_reports_a_bad_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ckpt").mkdir()
    assert main(["bench", "decode", "--model", str(tmp_path / "ckpt"), "--device", "cpu",
                 "--out", str(tmp_path / "out")]) == 2
    assert "emo-serve bench decode: error:" in capsys.readouterr().err


def test_targets_compare_against_the_resident_baseline() -> None:
    def row(tier: float, b1: float, conc: float, **kw: object) -> ScenarioResult:
        r = ScenarioResult(f"pool32@{tier}", 32, tier, 0, decode_tps_b1=b1, decode_tps_concurrent=conc,
                           ttft_warm_s=0.2, budget_bytes=10**9, peak_device_bytes=10**9 + 5 * 10**8)
        for k, v in kw.items():
            setattr(r, k, v)
        return r

    rows = [row(1.0, 700.0, 4000.0), row(0.5, 650.0, 2000.0),
            row(0.25, 680.0, 1000.0, ttft_cold_s=0.35, cold_paged_bytes=6_400_000_000)]
    got = {t.name: t for t in check_targets(rows, 32, pinned_gb_s=53.9)}
    assert got["pool32@resident batch-1 tok/s"].met is True
    assert got["pool32@tier25% / resident, batch-1"].value == pytest.approx(680 / 700)
    assert got["pool32@tier25% / resident, batch-1"].met is True
    cold = got["pool32@tier25% cold TTFT s"]  # 1.5 x 6.4 GB / 53.9 GB/s + 0.2 s = 0.378 s
    assert cold.bound == pytest.approx(1.5 * 6.4 / 53.9 + 0.2) and cold.met is True
    assert got["pool32@tier50% / resident, concurrent"].met is False  # 0.5 < 0.7
    assert got["pool32@1.0 peak - budget, MB"].value == pytest.approx(500.0)
    assert check_targets([], 32)[0].met is None  # nothing measured: neither met nor failed


def test_json_reports_the_targets(bench_run: tuple[Path, str]) -> None:
    out, text = bench_run
    targets = {t["name"]: t for t in json.loads((out / JSON_NAME).read_text())["targets"]}
    assert "pool8@tier25% / resident, batch-1" in targets and "pool8@tier25% cold TTFT s" in targets
    assert targets["pool8@tier25% / resident, batch-1"]["value"] > 0
    assert "Targets (set for an H100" in text


def test_without_a_model_a_synthetic_checkpoint_is_written_and_reused(tmp_path: Path) -> None:
    cfg = DecodeBenchConfig(tmp_path, "cpu", "fp32", synth_layers=1, tiers=(0.25,), pools=(4,),
                            full_routing=False, prompt_tokens=6, decode_tokens=2, concurrency=2,
                            repeats=1, parity=False)
    logs: list[str] = []
    result, _, files = run_decode_bench(cfg, logs.append)
    config = json.loads((tmp_path / "synth-tiny-1layers-seed0" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and all(f.exists() for f in files)
    assert [r.name for r in result.rows] == ["pool4@tier25%"] and result.rows[0].device_slots == 8
    run_decode_bench(cfg, logs.append)
    assert any("reusing the synthetic checkpoint" in m for m in logs)
