"""``GET /status`` in a real browser: headless Chromium (Debian's ``chromium`` package, not a
browser Playwright downloads) driven by Playwright, against the real gateway in front of two real
upstreams on loopback, one of which is then stopped.

The screenshot is written to the test's tmp path, and also to ``$INTERLOCK_ARTIFACTS`` when that
names a folder (``INTERLOCK_ARTIFACTS=artifacts pytest tests/test_status_page.py``).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright

from gateway.status_page import REFRESH_MS
from tests.conftest import run_gateway, wait_ready
from tests.fakes import FakeUpstream, openai_backend

CHROMIUM = (
    os.environ.get("INTERLOCK_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
)

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium installed (Debian: apt-get install chromium; or set INTERLOCK_CHROMIUM)",
)

MESSAGES = [{"role": "user", "content": "Say hello."}]
#: a loaded 2-core machine: the page may see the change up to this long after one refresh
SLACK_MS = 4000


def chat(url: str, model: str, stream: bool = False) -> httpx.Response:
    body = {"model": model, "messages": MESSAGES, "stream": stream}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=10)


def backend_state(url: str, name: str) -> str:
    state: str = httpx.get(url + "/status.json", timeout=10).json()["backends"][name]["state"]
    return state


def test_the_page_shows_the_routes_and_a_killed_backend_turns_to_an_open_breaker(tmp_path: Path) -> None:
    assert CHROMIUM is not None
    victim = FakeUpstream()
    running = False
    with FakeUpstream() as steady:
        victim.__enter__()
        running = True
        try:
            config = {
                "backends": {
                    "steady": openai_backend(steady.base_url, "ok"),
                    "victim": openai_backend(victim.base_url, "ok"),
                },
                "models": {
                    "chat": {"targets": ["victim"], "fallback": ["steady"]},
                    "summarise": {"targets": ["steady", "victim"], "policy": "least_busy"},
                },
                "resilience": {
                    # checked once at start, then not for a minute: the requests below open the
                    # breaker, so each of them is listed with the failure it met
                    "health_check": {"interval_s": 60, "timeout_s": 1},
                    "breaker": {"consecutive_failures": 2, "cooldown_s": 300, "max_cooldown_s": 300},
                    "retry": {"backoff_initial_s": 0.001, "backoff_max_s": 0.01},
                },
            }
            with run_gateway(config) as url, sync_playwright() as playwright:
                wait_ready(url)
                for stream in (False, True, False, True):
                    assert chat(url, "chat", stream).status_code == 200
                    assert chat(url, "summarise", stream).status_code == 200
                browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
                try:
                    page = browser.new_page(viewport={"width": 1500, "height": 900})
                    page.goto(url + "/status")
                    assert page.title().startswith("Interlock status")
                    routes = page.locator("#routes tr[data-route]")
                    assert routes.evaluate_all("rows => rows.map(r => r.dataset.route)") == [
                        "chat",
                        "summarise",
                    ]
                    order = page.locator('#routes tr[data-route="chat"] ol li')
                    expect(order).to_have_text(["victim: only target", "steady: fallback 1"])
                    backends = page.locator("#backends tr[data-backend]")
                    assert backends.evaluate_all("rows => rows.map(r => r.dataset.backend)") == [
                        "steady",
                        "victim",
                    ]
                    state = page.locator('#backends tr[data-backend="victim"] td.state')
                    expect(state).to_have_text("healthy")
                    page.evaluate("window.sameDocument = true")  # gone if the page reloads

                    victim.__exit__(None, None, None)  # its socket closes: connections are refused
                    running = False
                    rescued = [chat(url, "chat") for _ in range(2)]
                    assert [r.status_code for r in rescued] == [200, 200]  # by the fallback
                    deadline = time.monotonic() + 10
                    while backend_state(url, "victim") != "open":
                        assert time.monotonic() < deadline, "the breaker did not open"
                        time.sleep(0.05)

                    # within one refresh (and slack for a loaded machine), without reloading the page
                    expect(state).to_have_text("breaker open", timeout=REFRESH_MS + SLACK_MS)
                    assert page.evaluate("window.sameDocument === true")
                    expect(state).to_have_attribute("data-v", "open")
                    errors = page.locator("#errors tbody tr:not([hidden]) td:nth-child(2)")
                    expect(errors.first).to_have_text(rescued[-1].headers["x-request-id"])
                    assert rescued[0].headers["x-request-id"] in errors.all_inner_texts()
                    # the script formats as the server does: the same text after a refresh
                    hash_cell = page.locator('#gateway td[data-k="gateway config hash"]')
                    expect(hash_cell).to_have_text(
                        httpx.get(url + "/status.json").json()["gateway"]["config"]["hash"][:12]
                    )

                    shot = tmp_path / "status-page.png"
                    page.screenshot(path=str(shot), full_page=True)
                    assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
                    artifacts = os.environ.get("INTERLOCK_ARTIFACTS")
                    if artifacts:
                        Path(artifacts).mkdir(parents=True, exist_ok=True)
                        shutil.copy(shot, Path(artifacts) / shot.name)
                finally:
                    browser.close()
        finally:
            if running:
                victim.__exit__(None, None, None)


def test_a_reload_that_adds_a_backend_reloads_the_page_with_its_row(tmp_path: Path) -> None:
    import yaml

    assert CHROMIUM is not None
    with FakeUpstream() as up:
        config = {
            "backends": {"first": openai_backend(up.base_url, "ok")},
            "models": {"chat": {"targets": ["first"]}},
            "resilience": {"health_check": {"interval_s": 60}},
        }
        path = tmp_path / "routing.yaml"
        path.write_text(yaml.safe_dump(config))
        with run_gateway(path, reload_watch=False) as url, sync_playwright() as playwright:
            wait_ready(url)
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
            try:
                page = browser.new_page()
                page.goto(url + "/status")
                rows = page.locator("#backends tr[data-backend]")
                expect(rows).to_have_count(1)
                page.evaluate("window.sameDocument = true")
                config["backends"]["second"] = openai_backend(up.base_url, "ok")  # type: ignore[index]
                config["models"]["spare"] = {"targets": ["second"]}  # type: ignore[index]
                path.write_text(yaml.safe_dump(config))
                assert httpx.post(url + "/admin/reload", timeout=10).status_code == 200
                # the data's layout no longer matches the page's: the script reloads it
                expect(page.locator('#backends tr[data-backend="second"]')).to_have_count(
                    1, timeout=REFRESH_MS + SLACK_MS
                )
                expect(page.locator('#routes tr[data-route="spare"]')).to_have_count(1)
                assert page.evaluate("window.sameDocument === undefined")
                expect(page.locator('#gateway td[data-k="gateway reload last_status"]')).to_have_text("ok")
            finally:
                browser.close()
