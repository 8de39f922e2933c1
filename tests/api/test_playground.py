"""The playground at / in a real browser: Debian's chromium, headless, driven by playwright.

It types a prompt, clicks Send and checks what a person would see: the streamed text, exactly
as the server sent it; the request's pool marked on the map; residency colours that agree with
/v1/expert_cache; the key dialog of a server with --api-key; a layout that fits 1280x800 and a
phone; and no JavaScript error on the way. Skipped only where chromium or playwright is absent
and CI is unset (in CI it must run: .ci/run installs Debian's `chromium`).

``EMO_SERVE_PLAYGROUND_SCREENSHOT=docs/playground.png`` also writes the README's screenshot.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.demo_model import DEMO_MODEL_NAME, demo_model_dir
from server.model.config import load_config
from tests.api.live_server import LiveServer, live_server, serve_config, wait_for
from tests.api.slow_steps import slowed_decode_steps
from tests.optional import missing

CHROMIUM = "/usr/bin/chromium"  # Debian's package; playwright's own browser download is not used
SCREENSHOT_ENV = "EMO_SERVE_PLAYGROUND_SCREENSHOT"
KEY = "sk-playground-test"
SLOTS = 48  # device slots, of 4 x 32 pageable experts: paging happens
POOL = 8
PROMPT = "Permission is hereby granted, free of charge, to any person obtaining a copy"

if importlib.util.find_spec("playwright") is not None:
    from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright


def require_browser() -> None:
    absent = [what for what, ok in (("the playwright package", importlib.util.find_spec("playwright")),
                                    (CHROMIUM, os.access(CHROMIUM, os.X_OK))) if not ok]
    if absent:
        missing(" and ".join(absent), "apt-get install -y chromium; pip install playwright")


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    require_browser()
    # chromium keeps a crash-report database and dconf settings under $HOME even with a
    # temporary profile: give it a home in tmp
    home = tmp_path_factory.mktemp("chromium-home")
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
           "XDG_CACHE_HOME": str(home / ".cache")}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, env=env)
        yield browser
        browser.close()


def demo_config(**overrides: object) -> Any:
    """The shipped demo EMO (real text for the screenshot), with a device tier smaller than
    the model."""
    model = demo_model_dir()
    assert model is not None, "the demo checkpoint is package data and must be present"
    mc = load_config(model)
    expert_bytes = 3 * mc.intermediate_size * mc.hidden_size * 4  # fp32 gate, up, down
    return serve_config(model, served_model_name=(DEMO_MODEL_NAME,), expert_cache=SLOTS * expert_bytes,
                        **overrides)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with live_server(demo_config(pools_dir=tmp_path_factory.mktemp("pools"))) as server:
        yield server


@dataclass
class Tab:
    page: Page
    errors: list[str] = field(default_factory=list)  # console errors and uncaught exceptions

    def cell_states(self) -> dict[tuple[int, int], str]:
        cells = self.page.eval_on_selector_all(
            "#pool-map .cell", "els => els.map(e => [+e.dataset.layer, +e.dataset.expert, e.dataset.state])")
        return {(layer, expert): state for layer, expert, state in cells}

    def pool_cells(self) -> list[tuple[int, int]]:
        cells = self.page.eval_on_selector_all(
            '#pool-map [data-pool="1"]', "els => els.map(e => [+e.dataset.layer, +e.dataset.expert])")
        return sorted((layer, expert) for layer, expert in cells)


@pytest.fixture
def open_tab(browser: Browser) -> Iterator[Any]:
    contexts = []

    def open_at(url: str, width: int = 1280, height: int = 800) -> Tab:
        context = browser.new_context(viewport={"width": width, "height": height})
        contexts.append(context)
        tab = Tab(context.new_page())

        def on_console(message: ConsoleMessage) -> None:
            if message.type == "error":
                tab.errors.append(f"console: {message.text}")

        tab.page.on("console", on_console)
        tab.page.on("pageerror", lambda exc: tab.errors.append(f"pageerror: {exc}"))
        tab.page.goto(url + "/")
        return tab

    yield open_at
    for context in contexts:
        context.close()


def streamed(body: bytes) -> tuple[str, dict[str, Any]]:
    """The text and the final expert pool of an SSE completion body."""
    text, pool = "", None
    for block in body.decode("utf-8").split("\n\n"):
        if not block.startswith("data: ") or block == "data: [DONE]":
            continue
        chunk = json.loads(block.removeprefix("data: "))
        text += "".join(c["text"] for c in chunk["choices"])
        pool = chunk.get("expert_pool") or pool
    assert pool is not None, "the stream carried no expert_pool"
    return text, pool


def expected_states(snapshot: dict[str, Any]) -> dict[tuple[int, int], str]:
    """What each cell must show, from /v1/expert_cache: the most active state wins."""
    states = {}
    for layer in snapshot["layers"]:
        dev, host = layer["device"], layer["host"]
        sets = [("loading", dev["loading"]), ("pinned", dev["pinned"]), ("resident", dev["resident"]),
                ("host", host["resident"])]
        for e in layer["experts"]:
            states[(layer["layer"], e)] = next((name for name, ids in sets if e in ids), "absent")
    return states


def send_and_wait(tab: Tab, prompt: str, pool: str, max_tokens: int) -> tuple[str, dict[str, Any]]:
    page = tab.page
    page.wait_for_selector("#model option", state="attached")
    page.fill("#prompt", prompt)
    page.fill("#pool-size", pool)
    page.fill("#max-tokens", str(max_tokens))
    # every change of #output's text, to see it arrive in pieces rather than at once
    page.evaluate("""() => {
        const out = document.getElementById('output');
        window.outputLengths = [];
        new MutationObserver(() => window.outputLengths.push(out.textContent.length))
            .observe(out, {childList: true, characterData: true, subtree: true});
    }""")
    with page.expect_response(lambda r: r.url.endswith("/v1/completions")) as response:
        page.click("#send")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('Done')", timeout=60_000)
    assert response.value.status == 200 and "text/event-stream" in response.value.headers["content-type"]
    return streamed(response.value.body())


def test_a_prompt_streams_and_its_pool_is_marked(demo: LiveServer, open_tab: Any, tmp_path: Path) -> None:
    tab = open_tab(demo.url)
    page = tab.page
    mc = load_config(demo.engine.loaded.checkpoint_dir)
    page.wait_for_function(f"document.querySelectorAll('#pool-map .cell').length === {4 * 32}")
    assert page.eval_on_selector_all("#model option", "els => els.map(e => e.value)") == [DEMO_MODEL_NAME]

    text, pool = send_and_wait(tab, PROMPT, str(POOL), 48)
    shown = page.eval_on_selector("#output", "e => e.textContent")
    assert text and shown == text  # every streamed piece, in order, nothing else
    lengths = page.evaluate("window.outputLengths")
    assert len(set(lengths)) >= 3 and lengths == sorted(lengths), lengths  # grew piece by piece

    assert pool["size"] == POOL
    marked = tab.pool_cells()
    assert len(marked) == POOL * len(mc.moe_layers)
    assert marked == sorted((layer, e) for layer, ids in enumerate(pool["experts"]) for e in ids)
    assert "this request" in page.inner_text("#hit-rate") and "%" in page.inner_text("#hit-rate")

    # after the request: the map shows what /v1/expert_cache says (the page polls it)
    demo.wait_idle()
    demo.engine.loaded.model.expert_store.wait_for_prefetch(30)  # type: ignore[attr-defined]
    snapshot = httpx.get(demo.url + "/v1/expert_cache", timeout=30).json()
    wait_for(lambda: tab.cell_states() == expected_states(snapshot), what="the map to match the snapshot")
    assert set(tab.cell_states().values()) >= {"resident", "absent"}
    assert tab.pool_cells() == marked  # polling keeps the pool marked

    shot = tmp_path / "playground.png"
    page.screenshot(path=str(shot))
    if os.environ.get(SCREENSHOT_ENV):
        shutil.copyfile(shot, os.environ[SCREENSHOT_ENV])
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert tab.errors == []


def test_the_pool_is_marked_while_the_stream_runs(demo: LiveServer, open_tab: Any) -> None:
    """The pool is outlined as soon as the server knows it (the first token's chunk), not when
    the stream ends: text keeps arriving after the map shows it."""
    tab = open_tab(demo.url)
    page = tab.page
    page.wait_for_selector("#pool-map .cell", state="attached")
    page.evaluate("""() => {
        window.textWhenMarked = null;
        new MutationObserver(() => {
            if (window.textWhenMarked === null && document.querySelector('#pool-map [data-pool="1"]'))
                window.textWhenMarked = document.getElementById('output').textContent.length;
        }).observe(document.getElementById('pool-map'), {attributes: true, subtree: true});
    }""")
    with slowed_decode_steps(0.05):  # each later token is a chunk of its own
        text, pool = send_and_wait(tab, PROMPT, str(POOL), 24)
    marked_at = page.evaluate("window.textWhenMarked")
    assert marked_at is not None and marked_at < len(text), (marked_at, len(text))
    assert tab.pool_cells() == sorted((layer, e) for layer, ids in enumerate(pool["experts"]) for e in ids)
    assert tab.errors == []


def test_pins_show_while_held(demo: LiveServer, open_tab: Any) -> None:
    """A pin held on the store (as a running request holds its pool) turns the cell 'pinned'
    on the next poll, and back when released: the map follows paging as it happens."""
    tab = open_tab(demo.url)
    store = demo.engine.loaded.model.expert_store
    tab.page.wait_for_selector("#pool-map .cell", state="attached")
    key = (2, 5)
    store.acquire([key])
    try:
        cell = tab.page.locator('#pool-map [data-layer="2"][data-expert="5"]')
        wait_for(lambda: cell.get_attribute("data-state") == "pinned", what="the pinned cell")
    finally:
        store.release([key])
    wait_for(lambda: cell.get_attribute("data-state") == "resident", what="the released cell")
    assert tab.errors == []


def test_phone_width(demo: LiveServer, open_tab: Any, tmp_path: Path) -> None:
    tab = open_tab(demo.url, width=390, height=844)
    page = tab.page
    text, _ = send_and_wait(tab, PROMPT, "full", 16)
    assert page.eval_on_selector("#output", "e => e.textContent") == text
    assert tab.pool_cells() == []  # a full pool restricts nothing
    # nothing wider than the screen: no sideways scrolling of the page
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    for selector in ("#prompt", "#model", "#pool-size", "#send", "#output", "#hit-rate", "#pool-map"):
        box = page.locator(selector).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, (selector, box)
    cell = page.locator("#pool-map .cell").first.bounding_box()
    assert cell is not None and cell["width"] >= 4  # 32 experts still visible as cells
    page.screenshot(path=str(tmp_path / "playground-phone.png"), full_page=True)
    assert tab.errors == []


def test_a_named_pool_model_disables_the_pool_size(demo: LiveServer, open_tab: Any) -> None:
    """A named pool ("<served>:<name>") fixes its pool: #pool-size is disabled while one is chosen
    and what it holds is not sent."""
    made = httpx.post(demo.url + "/v1/pools", timeout=60, json={"name": "licences", "examples": [PROMPT]})
    assert made.status_code == 200, made.text
    named = f"{DEMO_MODEL_NAME}:licences"
    try:
        tab = open_tab(demo.url)
        page = tab.page
        page.wait_for_selector(f'#model option[value="{named}"]', state="attached")
        page.fill("#pool-size", "not a size")  # would be refused if it were read
        assert page.is_enabled("#pool-size")
        page.select_option("#model", named)
        assert page.is_disabled("#pool-size")
        page.fill("#prompt", PROMPT)
        page.fill("#max-tokens", "8")
        with page.expect_response(lambda r: r.url.endswith("/v1/completions")) as response:
            page.click("#send")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('Done')",
                               timeout=60_000)
        assert response.value.status == 200
        sent = json.loads(response.value.request.post_data or "{}")
        assert sent["model"] == named and "expert_pool" not in sent
        assert len(tab.pool_cells()) == made.json()["size"] * 4
        page.select_option("#model", DEMO_MODEL_NAME)
        assert page.is_enabled("#pool-size")
        assert tab.errors == []
    finally:
        assert httpx.delete(demo.url + "/v1/pools/licences", timeout=30).status_code == 200


def test_api_key_is_asked_once_and_sent(open_tab: Any) -> None:
    with live_server(demo_config(api_key=KEY)) as live:
        tab = open_tab(live.url)
        page = tab.page
        dialog = page.locator("#key-dialog")
        dialog.wait_for(state="visible")
        page.fill("#api-key", "not-the-key")
        page.click("#key-submit")
        page.wait_for_function("document.getElementById('key-error').textContent.includes('refused')")
        assert dialog.is_visible()
        page.fill("#api-key", KEY)
        page.click("#key-submit")
        dialog.wait_for(state="hidden")
        text, _ = send_and_wait(tab, PROMPT, str(POOL), 8)
        assert text and page.eval_on_selector("#output", "e => e.textContent") == text
        assert len(tab.pool_cells()) == POOL * 4

        page.reload()  # the key is kept for the tab: no second question
        page.wait_for_selector("#model option", state="attached")
        page.wait_for_selector("#pool-map .cell", state="attached")
        assert not dialog.is_visible()
        # the browser reports each 401 it received (the key probe, the wrong key); nothing else
        unexpected = [e for e in tab.errors if "status of 401" not in e]
        assert tab.errors and unexpected == [], tab.errors
