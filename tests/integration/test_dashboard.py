"""The dashboard in a real browser: it shows every server and follows health live.

Headless Chromium (Debian's, through Playwright) opens the admin endpoint's
page; a backend's health check is then broken, and the page must show the
server down within 2 s of the balancer logging it, by polling, without a
reload, and without asking any other host for anything.
"""

from __future__ import annotations

import shutil
import struct
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import (
    FlakyBackend,
    Proc,
    SpliceLB,
    backend,
    config,
    free_port,
    listener,
    wait_until,
)

try:
    from playwright.sync_api import (
        ConsoleMessage,
        Frame,
        Locator,
        Page,
        Request,
        expect,
        sync_playwright,
    )
except ImportError:  # the test below skips and says so
    PLAYWRIGHT = False
else:
    PLAYWRIGHT = True

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHARED_SCREENSHOT = Path("/tmp/splicelb-dashboard.png")
HEALTH = '[backends.health]\ntype = "http"\ninterval = 0.5\ntimeout = 0.3\nfall = 1\nrise = 1\n'
SEEN_WITHIN = 2.0  # seconds from the balancer's server_state line to the page showing it
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROW = 'tr[data-backend="{}"][data-server="{}"]'


def state_change(lb: SpliceLB, server: str, to: str, after: int = 0) -> dict[str, Any] | None:
    for line in lb.events("server_state")[after:]:
        if line["server"] == server and line["to"] == to:
            return line
    return None


def check_png(path: Path, width: int) -> None:
    """A real screenshot: a PNG of the viewport's width with more in it than a blank page."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    png_width, png_height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert png_width == width and png_height >= 400, (png_width, png_height)
    assert len(data) > 20_000, f"{path} is only {len(data)} bytes: a blank page?"


def field(page: Page, backend_name: str, server: str, name: str) -> Locator:
    return page.locator(f'{ROW.format(backend_name, server)} [data-field="{name}"]')


@pytest.mark.timeout(120)
def test_dashboard_shows_servers_and_follows_health_without_reload(
    procs: list[Proc], start_lb: Callable[..., SpliceLB], tmp_path: Path
) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (Debian package chromium)")
    if not PLAYWRIGHT:
        pytest.skip("the playwright Python package is missing")
    alpha = FlakyBackend("alpha")
    procs.append(alpha)
    beta = FlakyBackend("beta")
    procs.append(beta)
    port, admin = free_port(), free_port()
    lb = start_lb(
        config(
            listener(f"127.0.0.1:{port}", "app"),
            backend("app", [("alpha", alpha.address), ("beta", beta.address)], extra=HEALTH),
            admin_bind=f"127.0.0.1:{admin}",
        )
    )
    for name in ("alpha", "beta"):
        wait_until(lambda n=name: state_change(lb, n, "up"), 10, f"{name} up")  # type: ignore[misc]
    wait_until(lambda: lb.events("admin_start"), 10, "the admin endpoint")
    origin = f"http://127.0.0.1:{admin}"

    requests: list[str] = []
    navigations: list[str] = []
    errors: list[str] = []

    def on_request(request: Request) -> None:
        requests.append(request.url)

    def on_navigation(frame: Frame) -> None:
        if frame.parent_frame is None:
            navigations.append(frame.url)

    def on_console(message: ConsoleMessage) -> None:
        # Chromium asks for /favicon.ico by itself; the endpoint has none (404).
        if message.type == "error" and not message.location["url"].endswith("/favicon.ico"):
            errors.append(message.text)  # a CSP violation or an error in the page's script

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True, timeout=30_000
        )
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 768})
            page.set_default_timeout(10_000)
            page.on("request", on_request)
            page.on("framenavigated", on_navigation)
            page.on("console", on_console)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{origin}/", wait_until="load")

            for server in (alpha, beta):
                expect(field(page, "app", server.name, "health")).to_have_text("up", timeout=5_000)
                expect(field(page, "app", server.name, "admin")).to_have_text("ready")
                expect(field(page, "app", server.name, "active")).to_have_text("0")
                row = page.locator(ROW.format("app", server.name))
                expect(row).to_contain_text(server.name)
                expect(row).to_contain_text(server.address)
            expect(page.locator("#banner")).to_be_hidden()
            page.wait_for_timeout(1_200)  # a second poll: throughput columns have their rates
            first = tmp_path / "dashboard-up.png"
            page.screenshot(path=first, full_page=True)
            check_png(first, 1366)

            page.evaluate("window.__before_change = 'still here'")
            mark = len(lb.events("server_state"))
            alpha.set_mode("500")
            down = wait_until(lambda: state_change(lb, "alpha", "down", mark), 10, "alpha down")
            logged = datetime.fromisoformat(down["timestamp"]).timestamp()
            page.wait_for_function(  # checked every 20 ms, so the time measured is the page's
                "selector => document.querySelector(selector)?.textContent === 'down'",
                arg=f'{ROW.format("app", "alpha")} [data-field="health"]',
                polling=20,
                timeout=(logged + SEEN_WITHIN - time.time()) * 1000 + 5_000,
            )
            took = time.time() - logged
            assert took <= SEEN_WITHIN, f"the page showed alpha down {took:.2f} s after the log"
            expect(field(page, "app", "beta", "health")).to_have_text("up")
            expect(field(page, "app", "alpha", "admin")).to_have_text("ready")

            assert page.evaluate("window.__before_change") == "still here"  # no reload
            assert navigations == [f"{origin}/"]
            assert len([url for url in requests if url == f"{origin}/status"]) >= 3
            assert all(url.startswith(f"{origin}/") for url in requests), requests
            assert errors == []

            second = tmp_path / "dashboard-down.png"
            page.screenshot(path=second, full_page=True)
            check_png(second, 1366)
            shutil.copyfile(second, SHARED_SCREENSHOT)  # for a person to look at
        finally:
            browser.close()
