"""Settings from flags and EMO_SERVE_* variables, for every command, and the device memory plan."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from server.cli import generate, serve
from server.engine.config import EngineConfig
from server.model.config import load_config as load_model_config
from server.runtime.memory_plan import PlanError, expert_bytes, plan_memory, trunk_bytes
from server.runtime.settings import OPTIONS, ConfigError, Settings, load_settings, options_of, settings_of


def parse(argv: list[str], env: dict[str, str] | None = None) -> Settings:
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return load_settings(parser.parse_args(argv), env or {}, "serve")


def test_every_setting_is_a_flag_and_a_variable() -> None:
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    help_text = parser.format_help()
    own = set(Settings.__dataclass_fields__) - {"engine"}
    engine = set(EngineConfig.__dataclass_fields__)
    names = {o.name for o in OPTIONS}
    assert own <= names and names <= own | engine  # every field a user sets is in the one table
    assert options_of("serve") == OPTIONS  # serve takes every setting
    for opt in OPTIONS:
        assert opt.flag in help_text and opt.env in help_text
        assert opt.env == "EMO_SERVE_" + opt.name.upper()


def test_generate_reads_the_same_table() -> None:
    """generate's flags and variables are the table's, parsed and validated the same way."""
    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    flags = {flag for action in parser._actions for flag in action.option_strings}
    for opt in OPTIONS:
        assert (opt.flag in flags) == ("generate" in opt.commands), opt.flag
    args = parser.parse_args(["--prompt", "x", "--expert-cache", "all", "--pool-size", "full"])
    settings = load_settings(args, {"EMO_SERVE_DTYPE": "bf16", "EMO_SERVE_PORT": "1"}, "generate",
                             max_num_seqs=1)
    assert settings.resident_experts and settings.engine.pool_size == "full"
    assert settings.dtype == "bf16" and settings.engine.max_num_seqs == 1
    assert settings.port == Settings().port  # a serve-only variable does not reach generate
    with pytest.raises(ConfigError, match="--host-cache / EMO_SERVE_HOST_CACHE: has no use"):
        load_settings(args, {"EMO_SERVE_HOST_CACHE": "1GiB"}, "generate")


def test_flags_override_environment() -> None:
    env = {"EMO_SERVE_PORT": "9001", "EMO_SERVE_EXPERT_CACHE": "6GiB", "EMO_SERVE_POOL_SIZE": "full",
           "EMO_SERVE_SERVED_MODEL_NAME": "a, b", "EMO_SERVE_MAX_MODEL_LEN": "1024"}
    config = parse(["--port", "9002", "--host-cache", "512MiB", "--pool-size", "16"], env)
    assert config.port == 9002 and config.engine.pool_size == 16
    assert config.expert_cache == 6 * 1024**3 and config.host_cache == 512 * 1024**2
    assert config.served_model_name == ("a", "b") and config.engine.max_model_len == 1024
    defaults = parse([])
    assert defaults == Settings() and defaults.host == "127.0.0.1" and defaults.port == 8000
    assert defaults.engine == EngineConfig() and defaults.engine.max_num_seqs == 16
    assert parse(["--expert-cache", "123456", "--max-model-len", "auto"]).expert_cache == 123456


def test_empty_variables_count_as_unset() -> None:
    """Compose and k8s pass VAR="" for "not set"; that must not become Path(".") or a bad key."""
    config = parse([], {"EMO_SERVE_MODEL": "", "EMO_SERVE_API_KEY": "  ", "EMO_SERVE_PORT": ""})
    assert config == Settings()


def test_api_key_is_never_in_the_repr() -> None:
    config = parse([], {"EMO_SERVE_API_KEY": "sk-very-secret"})
    assert config.api_key == "sk-very-secret" and "sk-very-secret" not in repr(config)


@pytest.mark.parametrize(("argv", "env", "names"), [
    ([], {"EMO_SERVE_PORT": "eighty"}, "EMO_SERVE_PORT"),
    (["--port", "70000"], {}, "--port / EMO_SERVE_PORT"),
    (["--expert-cache", "6 parsecs"], {}, "--expert-cache"),
    ([], {"EMO_SERVE_DEVICE": "tpu"}, "--device / EMO_SERVE_DEVICE"),
    (["--dtype", "int8"], {}, "--dtype / EMO_SERVE_DTYPE"),
    (["--pool-size", "0"], {}, "--pool-size / EMO_SERVE_POOL_SIZE"),
    (["--max-num-seqs", "0"], {}, "--max-num-seqs"),
    (["--api-key", ""], {}, "--api-key"),
])
def test_bad_values_name_the_flag_and_variable(argv: list[str], env: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(argv, env)
    assert str(err.value).startswith(names)


def test_cli_reports_a_bad_variable_and_exits_2(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("EMO_SERVE_MAX_QUEUE", "lots")
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    assert serve.run(parser.parse_args([])) == 2
    assert "EMO_SERVE_MAX_QUEUE: 'lots' is not an integer" in capsys.readouterr().err


def test_memory_plan_counts_every_part_and_refuses_what_cannot_fit(checkpoint: Path) -> None:
    mc = load_model_config(checkpoint)
    config = settings_of(max_num_seqs=4, max_model_len=256, host_cache=0)
    plan = plan_memory(config, checkpoint, torch.device("cpu"), torch.float32, free_bytes=1 << 40)
    assert plan.trunk_bytes == trunk_bytes(mc, torch.float32) > 0
    assert plan.expert_slot_bytes == plan.all_experts_bytes == expert_bytes(mc, torch.float32)
    per_slot = 2 * mc.num_layers * mc.num_kv_heads * 256 * mc.head_dim * 4
    assert plan.kv_bytes == 4 * per_slot and plan.workspace_bytes > 0
    plan.check()
    text = plan.describe()
    for row in ("trunk", "expert slots", "KV cache", "workspace", "free on the device"):
        assert row in text
    tight = plan_memory(config, checkpoint, torch.device("cpu"), torch.float32,
                        free_bytes=plan.needed_bytes - 1)
    assert tight.expert_slot_bytes < plan.expert_slot_bytes  # auto shrinks the expert slots
    fixed = settings_of(max_num_seqs=4, max_model_len=256, host_cache=0, expert_cache=plan.all_experts_bytes)
    too_big = plan_memory(fixed, checkpoint, torch.device("cpu"), torch.float32,
                          free_bytes=plan.needed_bytes - 1)
    with pytest.raises(PlanError) as err:
        too_big.check()
    assert "expert slots" in str(err.value) and "free on the device" in str(err.value)
