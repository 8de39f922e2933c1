"""open_engine (server/runtime): settings in, a built engine out, for every command alike."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from expert_cache.cache import TieredExpertCache
from expert_cache.resident import ResidentExpertStore
from server.engine.request import GenerationRequest
from server.engine.sampling_defaults import SamplingDefaults
from server.model.config import load_config
from server.runtime import PlanError, open_engine, settings_of
from server.runtime.memory_plan import expert_bytes
from tests.engine.conftest import greedy, prompt_ids, run_all

CACHE_METRIC = "emo_serve_expert_cache_hits_total"


def settings(model: Path, **overrides: object) -> dict[str, object]:
    return {"model": model, "device": "cpu", "dtype": "fp32", "max_model_len": 256, **overrides}


def test_resident_and_tiered_stores_give_the_same_text(tiny_emo_checkpoint: Path) -> None:
    """--expert-cache all reads every expert onto the device; a small tier pages them. The
    store differs, the tokens do not."""
    per_expert = expert_bytes(load_config(tiny_emo_checkpoint), torch.float32) // 124
    texts, stores = [], []
    for cache in ("all", 12 * per_expert):
        with open_engine(settings_of(**settings(tiny_emo_checkpoint, expert_cache=cache,
                                                pool_size="full"))) as runtime:
            stores.append(type(runtime.store))
            ids = prompt_ids(runtime.loaded, 0, 12, seed=3)
            done = run_all(runtime.engine, [GenerationRequest("r", ids, greedy(8))])
            texts.append(done.tokens("r"))
            if cache == "all":
                assert runtime.plan.host_cache_bytes == 0  # no host tier behind a resident store
    assert stores == [ResidentExpertStore, TieredExpertCache]
    assert texts[0] == texts[1] and len(texts[0]) == 8


def test_a_failed_open_releases_the_store_and_close_is_idempotent(tiny_emo_checkpoint: Path) -> None:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    with pytest.raises(ValueError, match="pool size"):
        open_engine(settings_of(**settings(tiny_emo_checkpoint, pool_size=999)), registry=registry)
    # the cache was built (and registered its metrics) before the engine refused the pool: a
    # failed open leaves the registry as it was, so the next open can register on it again
    assert registry.get_sample_value(CACHE_METRIC, {"tier": "device"}) is None
    runtime = open_engine(settings_of(**settings(tiny_emo_checkpoint)), registry=registry)
    assert registry.get_sample_value(CACHE_METRIC, {"tier": "device"}) is not None
    runtime.close()
    runtime.close()
    assert registry.get_sample_value(CACHE_METRIC, {"tier": "device"}) is None
    assert runtime.engine.num_running == 0


def test_a_plan_that_cannot_fit_is_refused_before_any_weight_is_read(tmp_path: Path,
                                                                      tiny_emo_checkpoint: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_emo_checkpoint, model)
    for weights in model.glob("*.safetensors"):
        weights.write_bytes(b"not read")  # reading any weight would fail with a CheckpointError
    with pytest.raises(PlanError, match="lower --expert-cache"):
        open_engine(settings_of(**settings(model, expert_cache=1 << 60)))


def test_sampling_defaults_follow_generation_config(tmp_path: Path, tiny_emo_checkpoint: Path) -> None:
    assert SamplingDefaults.from_generation_config({}) == SamplingDefaults()
    assert SamplingDefaults.from_generation_config(
        {"do_sample": False, "temperature": 0.7, "top_k": 5}).temperature == 0.0
    sampled = SamplingDefaults.from_generation_config({"do_sample": True, "temperature": 0.7, "top_p": 0.9,
                                                        "top_k": 5, "repetition_penalty": True})
    picked = (sampled.temperature, sampled.top_p, sampled.top_k, sampled.repetition_penalty)
    assert picked == (0.7, 0.9, 5, 1.0)  # a bool is not a number
    model = tmp_path / "model"
    shutil.copytree(tiny_emo_checkpoint, model)
    (model / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.7}))
    with open_engine(settings_of(**settings(model)), start=False) as runtime:
        assert runtime.engine.sampling_defaults.temperature == 0.0
