"""The operator page in a real browser: Playwright driving Debian's chromium against spade-serve.

Screenshots (desktop 1366x768, phone 390x844) go to screenshots/ (git-ignored; override with
SPADE_SCREENSHOTS=DIR).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
sync_api = pytest.importorskip("playwright.sync_api")

from serve_support import defect_array, make_gallery, normal_array, png_bytes  # noqa: E402

from spade_edge_testing.station_helpers import need_binary  # noqa: E402
from spade_edge_testing.station_server import TOKEN, station_server  # noqa: E402

SHOTS = Path(os.environ.get("SPADE_SCREENSHOTS", Path(__file__).parents[1] / "screenshots"))
DESKTOP = {"width": 1366, "height": 768}
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from tiny_model import make_tiny_model

    d = tmp_path_factory.mktemp("station_page")
    model = make_tiny_model(d / "tiny.onnx", image_size=32)
    gallery = make_gallery(model, d)
    with station_server(model, gallery, d / "archive") as (url, _):
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    exe = need_binary("chromium", "chromium")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


class Page:
    """A browser page that records console errors and uncaught exceptions."""

    def __init__(self, browser: Any, url: str, viewport: dict[str, int], **kw: Any) -> None:
        self.ctx = browser.new_context(viewport=viewport, **kw)
        self.page = self.ctx.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(url + "/")
        self.page.wait_for_selector("body[data-ready='1']", timeout=10_000)
        self.page.wait_for_selector("#conn.up", timeout=10_000)

    def close(self) -> None:
        self.ctx.close()


def post(url: str, arr: Any, part_id: str) -> dict[str, Any]:
    r = httpx.post(
        f"{url}/v1/inspect",
        params={"part_id": part_id},
        content=png_bytes(arr),
        headers={"Content-Type": "image/png"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return r.json()


def gallery_version(url: str) -> int:
    return int(httpx.get(f"{url}/v1/gallery", timeout=10).json()["current"])


def test_page_loads_without_console_errors(server: str, browser: Any) -> None:
    post(server, normal_array(1), "warm-1")
    p = Page(browser, server, DESKTOP)
    try:
        assert p.page.title().endswith("spade-edge")
        assert p.page.locator(".card").count() >= 1
        assert p.page.locator("#c-parts").inner_text() != "–"
        assert p.page.locator("#versions tbody tr").count() >= 1
        p.page.wait_for_timeout(300)  # images and late requests
        assert p.errors == []
    finally:
        p.close()


def test_posted_part_appears_within_2s_and_is_escaped(server: str, browser: Any) -> None:
    p = Page(browser, server, DESKTOP)
    try:
        evil = "<img src=x onerror=alert(1)>"
        t0 = time.monotonic()
        r = post(server, defect_array(), evil)
        card = p.page.wait_for_selector(f".card[data-id='{r['id']}']", timeout=2000)
        dt = time.monotonic() - t0
        assert dt < 2.0
        assert evil in card.inner_text()  # shown as text, never parsed as markup
        assert p.page.locator(".card img[src='x']").count() == 0
        verdict = "REJECT" if r["anomalous"] else "GOOD"
        assert verdict in card.inner_text()
        assert p.errors == []
    finally:
        p.close()


def test_mark_as_good_wrong_token_then_right_token(server: str, browser: Any) -> None:
    r = post(server, defect_array((44, 52)), "suspect-7")
    p = Page(browser, server, DESKTOP)
    page = p.page
    try:
        before = gallery_version(server)
        page.locator(f".card[data-id='{r['id']}'] .card-btn").press("Enter")  # keyboard
        page.wait_for_selector("#review[open]")
        assert "suspect-7" in page.locator("#rv-title").inner_text()
        page.wait_for_function("() => document.getElementById('rv-orig').naturalWidth > 0")
        assert page.locator("#rv-svg rect").count() == len(r["regions"])
        page.click("#mark-good")  # no token yet: asks for it
        page.wait_for_selector("#token-row:not([hidden])")
        page.fill("#token", "wrong-token")
        page.click("#mark-good")
        page.wait_for_selector("#good-msg.error", timeout=10_000)
        assert "Token rejected" in page.locator("#good-msg").inner_text()
        assert gallery_version(server) == before  # nothing changed
        assert page.evaluate("sessionStorage.getItem('spade-edge-token')") is None

        page.fill("#token", TOKEN)
        page.click("#mark-good")
        page.wait_for_selector("#good-msg.ok", timeout=20_000)
        after = gallery_version(server)
        assert after == before + 1
        assert f"v{after}" in page.locator("#good-msg").inner_text()
        page.wait_for_function(
            f"() => document.getElementById('c-gallery').textContent.startsWith('v{after}')"
        )
        # kept for this session only: in sessionStorage, not localStorage
        assert page.evaluate("sessionStorage.getItem('spade-edge-token')") == TOKEN
        assert page.evaluate("localStorage.length") == 0
        page.keyboard.press("Escape")
        page.wait_for_function("() => !document.getElementById('review').open")
        # Chromium logs every non-2xx response itself; the 401 we provoked is the only one.
        assert [e for e in p.errors if "status of 401" not in e] == []
        assert len(p.errors) == 1
    finally:
        p.close()


def test_rollback_from_gallery_panel_and_screenshots(server: str, browser: Any) -> None:
    for i in range(6):
        post(server, normal_array(20 + i), f"part-{i:03d}")
    last = post(server, defect_array(), "part-006")
    v0 = gallery_version(server)
    add = httpx.post(
        f"{server}/v1/gallery/normal",
        json={"ids": [last["id"] - 1]},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=60,
    )
    assert add.status_code == 200, add.text
    p = Page(browser, server, DESKTOP)
    page = p.page
    try:
        v = gallery_version(server)
        assert v == v0 + 1
        page.get_by_role("button", name=f"Roll back to gallery v{v - 1}").click()
        page.fill("#gal-token-input", TOKEN)  # asked here when no token was given yet
        page.keyboard.press("Enter")
        page.wait_for_selector("#gallery-msg.ok", timeout=20_000)
        assert gallery_version(server) == v - 1
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.wait_for_timeout(300)
        page.screenshot(path=str(SHOTS / "station-desktop.png"))
        page.locator(".card .card-btn").first.click()
        page.wait_for_selector("#review[open]")
        page.wait_for_function("() => document.getElementById('rv-orig').naturalWidth > 0")
        page.screenshot(path=str(SHOTS / "station-review-desktop.png"))
        assert p.errors == []
    finally:
        p.close()
    phone = Page(browser, server, PHONE, is_mobile=True, has_touch=True, device_scale_factor=2)
    try:
        phone.page.screenshot(path=str(SHOTS / "station-phone.png"), full_page=True)
        width = phone.page.evaluate("document.documentElement.scrollWidth")
        assert width <= PHONE["width"]  # no horizontal scrolling on a phone
        assert phone.errors == []
    finally:
        phone.close()
