"""Named expert pools over HTTP: /v1/pools, models "<served>:<name>", persistence, pinning and
the gateway metrics, against a live server on the tiny synthetic EMO (planted domains)."""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from server.model.config import load_config
from server.tools.synth import sample_prompt
from tests.api.live_server import LiveServer, live_server, serve_config, wait_for

KEY = "pool-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LAW = [sample_prompt("law", 20, random.Random(i)) for i in range(3)]
CODE = [sample_prompt("code", 20, random.Random(10 + i)) for i in range(3)]
MUSIC = sample_prompt("music", 20, random.Random(20))


@pytest.fixture(scope="module")
def live(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    pools_dir = tmp_path_factory.mktemp("pools")
    with live_server(serve_config(checkpoint, api_key=KEY, pools_dir=pools_dir)) as server:
        yield server


def post(live: LiveServer, path: str, body: dict[str, Any], headers: dict[str, str] = AUTH) -> httpx.Response:
    return httpx.post(live.url + path, json=body, headers=headers, timeout=60)


def create(live: LiveServer, name: str, examples: list[str], **extra: Any) -> dict[str, Any]:
    r = post(live, "/v1/pools", {"name": name, "examples": examples, **extra})
    assert r.status_code == 200, r.text
    return dict(r.json())


def complete(live: LiveServer, model: str, prompt: str, **extra: Any) -> httpx.Response:
    return post(live, "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 4,
                                          "temperature": 0, "return_expert_pool": True, **extra})


def error(r: httpx.Response) -> dict[str, Any]:
    return dict(r.json()["error"])


def test_create_list_get_replace_delete(live: LiveServer) -> None:
    pool = create(live, "legal", LAW[:2], size=8)
    assert pool["object"] == "expert_pool" and pool["name"] == "legal" and pool["model"] == "tiny:legal"
    mc = live.engine.model_config
    assert pool["size"] == 8 and len(pool["experts"]) == mc.num_layers
    for layer, ids in enumerate(pool["experts"]):
        assert len(ids) == 8 and ids == sorted(set(ids)) and set(ids) <= set(mc.routable_experts(layer))
    listed = httpx.get(live.url + "/v1/pools", headers=AUTH, timeout=10).json()
    assert listed["object"] == "list" and [p["name"] for p in listed["data"]] == ["legal"]
    one = httpx.get(live.url + "/v1/pools/legal", headers=AUTH, timeout=10).json()
    assert one["experts"] == pool["experts"]
    models = httpx.get(live.url + "/v1/models", headers=AUTH, timeout=10).json()["data"]
    card = next(m for m in models if m["id"] == "tiny:legal")
    assert card["parent"] == "tiny" and card["object"] == "model" and card["max_model_len"] == 512
    assert all(m["parent"] is None for m in models if m["id"] in ("tiny", "tiny-alias"))

    replaced = create(live, "legal", CODE[:1])  # a POST to an existing name replaces it
    assert replaced["size"] == live.engine.default_pool and replaced["experts"] != pool["experts"]
    assert [p["name"] for p in httpx.get(live.url + "/v1/pools", headers=AUTH).json()["data"]] == ["legal"]

    gone = httpx.delete(live.url + "/v1/pools/legal", headers=AUTH, timeout=10)
    assert gone.status_code == 200 and gone.json() == {"object": "expert_pool", "name": "legal",
                                                       "model": "tiny:legal", "deleted": True}
    assert not (Path(live.app.state.serving.pools.directory) / "legal.json").exists()
    again = httpx.delete(live.url + "/v1/pools/legal", headers=AUTH, timeout=10)
    assert again.status_code == 404 and error(again)["code"] == "pool_not_found"
    assert complete(live, "tiny:legal", LAW[0]).status_code == 404


@pytest.mark.parametrize("name", ["", ".hidden", "-dash", "a" * 65, "has space", "col:on", "sl/ash",
                                  "ünï", "tab\t"])
def test_bad_names_are_400(live: LiveServer, name: str) -> None:
    r = post(live, "/v1/pools", {"name": name, "examples": LAW[:1]})
    assert r.status_code == 400 and error(r)["param"] == "name", r.text
    assert error(r)["type"] == "invalid_request_error"


def test_longest_and_dotted_names_are_fine(live: LiveServer) -> None:
    for name in ("a" * 64, "v1.2_law-x", "9"):
        assert create(live, name, LAW[:1])["model"] == f"tiny:{name}"
        assert httpx.delete(live.url + f"/v1/pools/{name}", headers=AUTH).status_code == 200


@pytest.mark.parametrize("body, param", [
    ({"name": "x", "examples": []}, "examples"),
    ({"name": "x", "examples": LAW[:1] * 17}, "examples"),
    ({"name": "x", "examples": [LAW[0], ""]}, "examples"),
    ({"name": "x", "examples": "just one string"}, "examples"),
    ({"name": "x"}, "examples"),
    ({"name": "x", "examples": LAW[:1], "size": 2}, "size"),  # below top_k
    ({"name": "x", "examples": LAW[:1], "size": 32}, "size"),  # more than the 31 routable experts
    ({"name": "x", "examples": LAW[:1], "size": 0}, "size"),
    ({"name": "x", "examples": LAW[:1], "size": "8"}, "size"),
])
def test_bad_examples_and_sizes_are_400(live: LiveServer, body: dict[str, Any], param: str) -> None:
    r = post(live, "/v1/pools", body)
    assert r.status_code == 400 and error(r)["param"] == param, r.text
    assert "x" not in live.app.state.serving.pools.records


def test_an_example_longer_than_max_model_len_is_400(live: LiveServer) -> None:
    r = post(live, "/v1/pools", {"name": "long", "examples": [LAW[0], "law " * 600]})
    assert r.status_code == 400 and error(r)["code"] == "context_length_exceeded", r.text
    assert "examples[1]" in error(r)["message"] and "512" in error(r)["message"]


def test_pools_need_the_api_key(live: LiveServer) -> None:
    for r in (post(live, "/v1/pools", {"name": "x", "examples": LAW[:1]}, headers={}),
              httpx.get(live.url + "/v1/pools", timeout=10),
              httpx.delete(live.url + "/v1/pools/x", timeout=10)):
        assert r.status_code == 401, r.text


def test_one_example_gives_the_pool_its_prompt_would_get(live: LiveServer) -> None:
    """The serving rule over one example equals the pool a request with that prompt picks."""
    pool = create(live, "one", [LAW[0]])
    own = complete(live, "tiny", LAW[0]).json()["expert_pool"]
    assert own == {"size": pool["size"], "experts": pool["experts"]}


def test_a_named_model_runs_on_its_pool_whatever_the_prompt(live: LiveServer) -> None:
    code = create(live, "code", CODE)
    music_own = complete(live, "tiny", MUSIC).json()["expert_pool"]["experts"]
    assert music_own != code["experts"]  # so the named pool is visibly not the prompt's own
    r = complete(live, "tiny:code", MUSIC)
    assert r.status_code == 200 and r.json()["model"] == "tiny:code"
    assert r.json()["expert_pool"] == {"size": code["size"], "experts": code["experts"]}
    assert complete(live, "tiny-alias:code", MUSIC).json()["expert_pool"]["experts"] == code["experts"]
    chat = post(live, "/v1/chat/completions", {"model": "tiny:code", "max_tokens": 3, "temperature": 0,
                                                "messages": [{"role": "user", "content": MUSIC}],
                                                "return_expert_pool": True, "stream": True})
    last = [json.loads(line[6:]) for line in chat.text.splitlines() if line.startswith("data: {")][-1]
    assert last["model"] == "tiny:code" and last["expert_pool"]["experts"] == code["experts"]
    # the pool's experts decide the probabilities: same prompt, own pool vs named pool
    own, named = (complete(live, model, MUSIC, logprobs=0).json()["choices"][0]["logprobs"]["token_logprobs"]
                  for model in ("tiny", "tiny:code"))
    assert own != pytest.approx(named, abs=1e-4)


def test_expert_pool_with_a_named_model_is_400_and_unknown_names_404(live: LiveServer) -> None:
    create(live, "law", LAW[:1])
    r = complete(live, "tiny:law", LAW[0], expert_pool=8)
    assert r.status_code == 400 and error(r)["param"] == "expert_pool"
    r = complete(live, "tiny:nosuch", LAW[0])
    assert r.status_code == 404 and error(r)["code"] == "model_not_found" and error(r)["param"] == "model"
    r = complete(live, "other:law", LAW[0])
    assert r.status_code == 404 and error(r)["code"] == "model_not_found"


def test_concurrent_requests_on_different_named_pools(live: LiveServer) -> None:
    pools = {"c-law": create(live, "c-law", LAW[:1]), "c-code": create(live, "c-code", CODE[:1])}
    assert pools["c-law"]["experts"] != pools["c-code"]["experts"]
    before = {name: live.metric("emo_serve_pool_requests_total", {"pool": name}) for name in pools}
    jobs = [(name, prompt) for name in pools for prompt in (LAW[1], CODE[1], MUSIC)] * 2
    with ThreadPoolExecutor(len(jobs) + 1) as ex:
        replies = [ex.submit(complete, live, f"tiny:{name}", prompt, max_tokens=16) for name, prompt in jobs]
        made = ex.submit(create, live, "c-music", [MUSIC])  # computed between the others' steps
        replies = [r.result() for r in replies]
        assert made.result()["experts"] == complete(live, "tiny", MUSIC).json()["expert_pool"]["experts"]
    for (name, _), r in zip(jobs, replies, strict=True):
        assert r.status_code == 200, r.text
        assert r.json()["expert_pool"]["experts"] == pools[name]["experts"]
    for name in pools:
        assert live.metric("emo_serve_pool_requests_total", {"pool": name}) == before[name] + 6
    live.wait_idle()


def test_the_openai_client_uses_named_models(live: LiveServer) -> None:
    pool = create(live, "client", CODE[:2])
    client = OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0, timeout=60)
    assert "tiny:client" in {m.id for m in client.models.list()}
    r = client.completions.create(model="tiny:client", prompt=MUSIC, max_tokens=4, temperature=0,
                                  extra_body={"return_expert_pool": True})
    assert r.model == "tiny:client" and (r.model_extra or {})["expert_pool"]["experts"] == pool["experts"]
    chat = client.chat.completions.create(
        model="tiny:client", messages=[{"role": "user", "content": MUSIC}], max_tokens=4, temperature=0,
        extra_body={"return_expert_pool": True})
    assert chat.model == "tiny:client" and chat.choices[0].message.content is not None
    assert (chat.model_extra or {})["expert_pool"]["experts"] == pool["experts"]
    import openai

    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="tiny:absent", prompt=MUSIC, max_tokens=2)


# ---- persistence ----------------------------------------------------------------------------

def test_pools_survive_a_restart_and_bad_files_are_skipped(
        checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = serve_config(checkpoint, pools_dir=tmp_path)
    with live_server(config) as first:
        made = {name: create(first, name, examples) for name, examples in (("law", LAW), ("code", CODE[:1]))}
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["code.json", "law.json"]  # nothing else: the temporary files were renamed
    good = json.loads((tmp_path / "law.json").read_text())
    broken = {
        "truncated.json": (tmp_path / "law.json").read_text()[:40],
        "other-model.json": json.dumps({**good, "name": "other-model",
                                        "checkpoint": {"fingerprint": "0" * 32, "model": "elsewhere"}}),
        "misnamed.json": json.dumps({**good, "name": "law2"}),
        "bad-experts.json": json.dumps({**good, "name": "bad-experts",
                                        "experts": [[0, 1, 2]] * len(good["experts"])}),
        "not-a-pool.json": json.dumps([1, 2, 3]),
    }
    for name, text in broken.items():
        (tmp_path / name).write_text(text)
    caplog.set_level(logging.WARNING, logger="emo_serve.api")
    with live_server(config) as second:
        listed = httpx.get(second.url + "/v1/pools", timeout=10).json()["data"]
        assert {p["name"]: p["experts"] for p in listed} == {n: p["experts"] for n, p in made.items()}
        assert complete(second, "tiny:law", MUSIC).json()["expert_pool"]["experts"] == made["law"]["experts"]
    warned = {r.getMessage() for r in caplog.records if "skipped" in r.getMessage()}
    for name in broken:
        assert any(str(tmp_path / name) in message for message in warned), (name, warned)
    assert any("another checkpoint" in m and "other-model.json" in m for m in warned)


def test_the_default_pools_dir_is_per_model_under_the_cache(
        checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMO_SERVE_CACHE", str(tmp_path))
    with live_server(serve_config(checkpoint)) as server:
        create(server, "mine", LAW[:1])
    assert (tmp_path / "pools" / "tiny" / "mine.json").is_file()


# ---- pinning and the gateway metrics ----------------------------------------------------------

def expert_bytes(checkpoint: Path) -> int:
    mc = load_config(checkpoint)
    return 3 * mc.intermediate_size * mc.hidden_size * 4  # gate, up, down in fp32


def lora_info(live: LiveServer) -> list[tuple[dict[str, str], float]]:
    text = httpx.get(live.url + "/metrics", timeout=10).text
    return [(s.labels, s.value) for f in text_string_to_metric_families(text)
            if f.name == "emo_serve_lora_requests_info" for s in f.samples]


def test_pinned_pools_stay_resident_and_count_in_admission(checkpoint: Path, tmp_path: Path) -> None:
    slots = 48  # one slab for the 4 MoE layers: a pool of 8 takes 32 of them
    cache = slots * expert_bytes(checkpoint)
    with live_server(serve_config(checkpoint, pools_dir=tmp_path, expert_cache=cache)) as first:
        create(first, "law", LAW)
        create(first, "code", CODE)
    config = serve_config(checkpoint, pools_dir=tmp_path, expert_cache=cache, pin_pools=("law", "later"),
                          max_num_seqs=1)
    with live_server(config) as live:
        assert live.engine.resident_pools == ["law"]
        assert live.store.stats().pinned_slots == 32  # idle, and still pinned
        listed = {p["name"]: p["resident"] for p in httpx.get(live.url + "/v1/pools").json()["data"]}
        assert listed == {"law": True, "code": False}
        [(labels, stamp)] = lora_info(live)
        assert labels == {"running_lora_adapters": "tiny:law", "waiting_lora_adapters": "",
                          "max_lora": "1"}  # 48 slots hold one pool of 8 x 4 layers
        assert abs(stamp - time.time()) < 120
        # a default-size pool of its own no longer fits next to the pinned one (16 free slots)...
        r = complete(live, "tiny", MUSIC)
        assert r.status_code == 400 and error(r)["code"] == "expert_pool_too_large", r.text
        assert "held by pinned pools" in error(r)["message"]
        # ...but the pinned pool needs no slot, and a smaller pool still fits
        assert complete(live, "tiny:law", MUSIC).status_code == 200
        assert complete(live, "tiny", MUSIC, expert_pool=4).status_code == 200
        # the code pool (not pinned) needs a slot for each expert it does not share with law
        law, code = (httpx.get(live.url + f"/v1/pools/{n}").json()["experts"] for n in ("law", "code"))
        shared = sum(len(set(a) & set(b)) for a, b in zip(law, code, strict=True))
        r = complete(live, "tiny:code", MUSIC)
        assert r.status_code == (200 if 32 - shared <= slots - 32 else 400), r.text
        # a pool listed in --pin-pools becomes resident when it is created
        created = create(live, "later", LAW)  # law's pool again: it fits beside law
        assert created["resident"] and live.engine.resident_pools == ["later", "law"]
        assert httpx.delete(live.url + "/v1/pools/later").status_code == 200
        assert live.engine.resident_pools == ["law"]
        wait_for(lambda: live.engine.num_running == live.engine.num_waiting == 0, what="idle")
        assert live.store.stats().pinned_slots == 32  # law's pins, and no request's


def test_start_up_refuses_pinned_pools_that_cannot_fit(checkpoint: Path, tmp_path: Path) -> None:
    slots = 48
    cache = slots * expert_bytes(checkpoint)
    with live_server(serve_config(checkpoint, pools_dir=tmp_path, expert_cache=cache)) as first:
        law, code = create(first, "law", LAW), create(first, "code", CODE)
    union = sum(len(set(a) | set(b)) for a, b in zip(law["experts"], code["experts"], strict=True))
    assert union > slots - 4  # the two pools cannot be resident together with room for others
    pinned = serve_config(checkpoint, pools_dir=tmp_path, pin_pools=("law", "code"), expert_cache=cache)
    with pytest.raises(ValueError) as refused, live_server(pinned):
        pass
    message = str(refused.value)
    assert "--pin-pools law,code" in message and f"need {union} distinct device expert slots" in message
    assert "holds 48" in message


def test_running_and_waiting_named_pools_reach_the_adapter_gauge(checkpoint: Path, tmp_path: Path) -> None:
    with live_server(serve_config(checkpoint, pools_dir=tmp_path, max_num_seqs=1)) as live:
        create(live, "law", LAW[:1])
        create(live, "code", CODE[:1])
        results: list[httpx.Response] = []

        def run(model: str) -> None:
            results.append(complete(live, model, MUSIC, max_tokens=400, ignore_eos=True))

        first = threading.Thread(target=run, args=("tiny:law",))
        first.start()
        wait_for(lambda: live.engine.num_running == 1, what="the law request running")
        second = threading.Thread(target=run, args=("tiny:code",))
        second.start()
        seen: list[dict[str, str]] = []

        def both() -> bool:
            seen[:] = [labels for labels, _ in lora_info(live)]
            return any(s["running_lora_adapters"] == "tiny:law" and s["waiting_lora_adapters"] == "tiny:code"
                       for s in seen)

        wait_for(both, what="law running and code waiting")
        first.join(60)
        second.join(60)
        assert [r.status_code for r in results] == [200, 200]
        [(labels, _)] = lora_info(live)  # one series: the old ones are removed
        assert labels["running_lora_adapters"] == labels["waiting_lora_adapters"] == ""


def test_a_pool_waits_for_free_slots_while_requests_pin_them_all(checkpoint: Path, tmp_path: Path) -> None:
    """A device tier of exactly one pool: while a request pins it, computing a pool has no slot
    to run its experts in; it waits for the request to end instead of failing."""
    config = serve_config(checkpoint, pools_dir=tmp_path, expert_cache=32 * expert_bytes(checkpoint),
                          max_num_seqs=1)
    with live_server(config) as live:
        ended: list[float] = []

        def long_request() -> None:
            r = complete(live, "tiny", MUSIC, max_tokens=300, ignore_eos=True)
            ended.append(time.monotonic())
            assert r.status_code == 200, r.text

        runner = threading.Thread(target=long_request)
        runner.start()
        wait_for(lambda: live.store.stats().pinned_slots == 32, what="the request pinning every slot")
        made = create(live, "waited", [LAW[0]])
        finished = time.monotonic()
        runner.join(60)
        assert ended and ended[0] <= finished
        assert made["experts"] == complete(live, "tiny", LAW[0]).json()["expert_pool"]["experts"]
