"""The dashboard in a real browser: it shows every server and follows health live.

Headless Chromium (Debian's, through Playwright) opens the admin endpoint's
page; a backend's health check is then broken, and the page must show the
server down within 2 s of the balancer logging it, by polling, without a
reload, and without asking any other host for anything.  A second instance
has tunnels opened through one listener, a backend whose servers are all in
drain or maint, and a check failing with a long reason: the charts follow the
tunnels, the backend takes no traffic, nothing is cut at 1280 px, and a
restart (every counter starts again from zero) draws nothing below zero.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import struct
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.integration import clients
from tests.integration.harness import (
    EchoBackend,
    FlakyBackend,
    Proc,
    SpliceLB,
    backend,
    cli,
    config,
    free_port,
    listener,
    wait_until,
)

try:
    from playwright.sync_api import (
        Browser,
        ConsoleMessage,
        Frame,
        Locator,
        Page,
        Request,
        Response,
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
SHARED_SCREENSHOT_1280 = Path("/tmp/splicelb-dashboard-1280.png")
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


def need_chromium() -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (Debian package chromium)")
    if not PLAYWRIGHT:
        pytest.skip("the playwright Python package is missing")


@contextlib.contextmanager
def chromium() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True, timeout=30_000
        )
        try:
            yield browser
        finally:
            browser.close()


class Trouble:
    """What a page logged as an error, the requests that failed and the answers >= 400."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        self.failed: list[str] = []
        self.answers: dict[str, int] = {}  # url -> status of its last answer
        page.on("console", self.on_console)
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("requestfailed", lambda request: self.failed.append(request.url))
        page.on("response", self.on_response)

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":  # a CSP violation, a failed load, an error in the script
            self.errors.append(f"{message.text} ({message.location['url']})")

    def on_response(self, response: Response) -> None:
        self.answers[response.url] = response.status

    def bad_answers(self) -> dict[str, int]:
        return {url: status for url, status in self.answers.items() if status >= 400}


@pytest.mark.timeout(120)
def test_dashboard_shows_servers_and_follows_health_without_reload(
    procs: list[Proc], start_lb: Callable[..., SpliceLB], tmp_path: Path
) -> None:
    need_chromium()
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

    def on_request(request: Request) -> None:
        requests.append(request.url)

    def on_navigation(frame: Frame) -> None:
        if frame.parent_frame is None:
            navigations.append(frame.url)

    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1366, "height": 768})
        page.set_default_timeout(10_000)
        page.on("request", on_request)
        page.on("framenavigated", on_navigation)
        trouble = Trouble(page)
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
        assert trouble.errors == [] and trouble.failed == []
        assert trouble.bad_answers() == {}
        # Chromium fetches the icon outside the page's view: the page fetches it the same way.
        icon = page.evaluate(ICON)
        assert icon == [f"{origin}/favicon.ico", 200, "image/svg+xml"], icon

        second = tmp_path / "dashboard-down.png"
        page.screenshot(path=second, full_page=True)
        check_png(second, 1366)
        shutil.copyfile(second, SHARED_SCREENSHOT)  # for a person to look at


# A check that fails with a reason longer than its column is wide at 1280 px.
NEVER_SAID = "the-phrase-this-server-never-puts-in-its-health-answer"
LONG_REASON = f"HTTP 200 without '{NEVER_SAID}' in the body"
LISTENER_ROW = 'tr[data-listener="{}"]'
CHART = '{} svg.spark[data-series="{}"]'
POINT = re.compile(r"[ML](-?[\d.]+),(-?[\d.]+)")
TUNNELS = 3
# Every cell of every table: its content wider than its box (cut), the last check's
# excepted (it is ellipsized, its whole text in its title); and whether anything is
# wider than the page.
CUT_CELLS = """() => ({
  cut: [...document.querySelectorAll("th, td")]
    .filter((cell) => cell.dataset.field !== "check" && cell.scrollWidth > cell.clientWidth)
    .map((cell) => cell.textContent || cell.innerHTML.slice(0, 80)),
  wideTables: [...document.querySelectorAll("table")]
    .filter((table) => table.scrollWidth > table.parentElement.clientWidth).length,
  pageWidth: document.documentElement.scrollWidth,
})"""

# The page's icon: where it is and what the endpoint answers for it.
ICON = """async () => {
  const link = document.querySelector('link[rel~="icon"]');
  const reply = await fetch(link.href);
  return [link.href, reply.status, reply.headers.get("content-type")];
}"""


@dataclass(frozen=True)
class Chart:
    samples: int
    peak: float
    last: str
    points: list[tuple[float, float]]
    height: float


def chart(page: Page, selector: str) -> Chart:
    data = page.eval_on_selector(
        selector,
        """svg => ({samples: Number(svg.dataset.samples), peak: Number(svg.dataset.peak),
          last: svg.dataset.last, line: svg.querySelector("path.line").getAttribute("d") || "",
          height: svg.viewBox.baseVal.height})""",
    )
    points = [(float(x), float(y)) for x, y in POINT.findall(data["line"])]
    return Chart(data["samples"], data["peak"], data["last"], points, data["height"])


def wait_chart(page: Page, selector: str, test: str) -> None:
    """Until the chart at ``selector`` passes ``test``, JS over its dataset ``d``."""
    page.wait_for_function(
        f"sel => {{ const svg = document.querySelector(sel); const d = svg && svg.dataset;"
        f" return !!svg && ({test}); }}",
        arg=selector,
    )


def status_of(origin: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{origin}/status", timeout=10) as reply:
        return dict(json.loads(reply.read()))


def check_of(status: dict[str, Any], backend_name: str, server: str) -> str | None:
    for b in status["backends"]:
        for s in b["servers"]:
            if (b["name"], s["name"]) == (backend_name, server) and "check" in s:
                return str(s["check"]["result"])
    return None


@pytest.mark.timeout(150)
def test_dashboard_charts_traffic_counts_servers_taking_it_and_fits_1280_px(
    procs: list[Proc],
    start_lb: Callable[..., SpliceLB],
    echo_pair: tuple[EchoBackend, EchoBackend],
    tmp_path: Path,
) -> None:
    need_chromium()
    echo1, echo2 = echo_pair
    picky = FlakyBackend("picky")
    procs.append(picky)
    public, side, admin = free_port(), free_port(), free_port()
    text = config(
        listener(f"127.0.0.1:{public}", "app", name="public")
        + listener(f"127.0.0.1:{side}", "app", name="side"),
        backend("app", [("echo1", echo1.address), ("echo2", echo2.address)], extra=HEALTH)
        + backend("parked", [("p1", echo1.address), ("p2", echo2.address)])
        + backend(
            "strict", [("picky", picky.address)], extra=f'{HEALTH}expect_body = "{NEVER_SAID}"\n'
        ),
        admin_bind=f"127.0.0.1:{admin}",
    )
    lb = start_lb(text)
    origin = f"http://127.0.0.1:{admin}"
    for name in ("echo1", "echo2"):
        wait_until(lambda n=name: state_change(lb, n, "up"), 10, f"{name} up")  # type: ignore[misc]
    wait_until(lambda: lb.events("admin_start"), 10, "the admin endpoint")
    wait_until(lambda: check_of(status_of(origin), "strict", "picky"), 10, "picky's check")
    assert check_of(status_of(origin), "strict", "picky") == LONG_REASON
    for command, server in (("drain", "parked/p1"), ("maint", "parked/p2")):
        result = cli(command, "-c", str(lb.config_path), server)
        assert result.returncode == 0, result.stderr

    public_active = CHART.format(LISTENER_ROW.format("public"), "active")
    public_traffic = CHART.format(LISTENER_ROW.format("public"), "traffic")
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(10_000)
        trouble = Trouble(page)
        page.goto(f"{origin}/", wait_until="load")

        # A backend counts the servers that take new connections, not those merely up.
        for name, count in (("parked", "0 / 2"), ("app", "2 / 2"), ("strict", "0 / 1")):
            badge = page.locator(f'section[data-backend="{name}"] h2 .count')
            expect(badge).to_have_text(f"{count} taking traffic")
        expect(page.locator('section[data-backend="parked"] h2 .count')).to_have_class(
            re.compile(r"\bnone\b")
        )
        expect(page.locator('section[data-backend="parked"] h2 .meta')).to_contain_text(
            "1 in drain"
        )

        # The charts grow by a point a second, from the page's own polls.
        wait_chart(page, public_active, "Number(d.samples) >= 1")
        before = chart(page, public_active)
        wait_chart(page, public_active, f"Number(d.samples) >= {before.samples + 2}")
        after = chart(page, public_active)
        assert len(after.points) > len(before.points) >= 1
        assert after.peak == 0 and len({y for _, y in after.points}) == 1  # flat: no tunnel yet

        # Tunnels through one listener: its chart rises to them, the other's stays flat.
        tunnels = [clients.ws_tunnel(public) for _ in range(TUNNELS)]
        try:
            for tunnel in tunnels:
                assert clients.ws_ping(tunnel, b"x" * 90)  # its echo fits one read
            expect(
                page.locator(f'{LISTENER_ROW.format("public")} [data-field="active"]')
            ).to_have_text(str(TUNNELS))
            wait_chart(page, public_active, f"d.last === '{TUNNELS}'")
            rose = chart(page, public_active)
            assert rose.peak == TUNNELS
            ys = [y for _, y in rose.points]
            assert ys[-1] == min(ys) < ys[0], rose.points  # from the bottom line to the top
            wait_chart(page, public_traffic, "Number(d.peak) > 0")
            quiet = chart(page, CHART.format(LISTENER_ROW.format("side"), "active"))
            assert quiet.samples >= rose.samples and quiet.peak == 0
            assert chart(page, CHART.format(LISTENER_ROW.format("side"), "traffic")).peak == 0
            servers = [
                CHART.format(ROW.format("app", name), "active") for name in ("echo1", "echo2")
            ]
            page.wait_for_function(
                "sels => sels.reduce((sum, sel) => sum + Number(document.querySelector(sel)"
                f".dataset.last), 0) === {TUNNELS}",
                arg=servers,
            )

            # Nothing is cut at 1280 px; a long check reason is whole in its title.
            layout = page.evaluate(CUT_CELLS)
            assert layout["cut"] == [], layout
            assert layout["wideTables"] == 0 and layout["pageWidth"] <= 1280, layout
            status = status_of(origin)
            for b in status["backends"]:
                for s in b["servers"]:
                    cell = field(page, b["name"], s["name"], "check")
                    title = cell.get_attribute("title") or ""
                    if "check" in s:
                        assert title.split("\n")[0] == s["check"]["result"], (s["name"], title)
            expect(field(page, "strict", "picky", "check")).to_have_attribute(
                "title", re.compile("^" + re.escape(LONG_REASON) + "\n")
            )
            shot = tmp_path / "dashboard-1280.png"
            page.screenshot(path=shot, full_page=True)
            check_png(shot, 1280)
            shutil.copyfile(shot, SHARED_SCREENSHOT_1280)  # for a person to look at
        finally:
            for tunnel in tunnels:
                tunnel.close()

        # No console error, no failed request, no error answer: the icon included.
        assert trouble.errors == [] and trouble.failed == [], (trouble.errors, trouble.failed)
        assert trouble.bad_answers() == {}
        # Chromium fetches the icon outside the page's view: the page fetches it the same way.
        icon = page.evaluate(ICON)
        assert icon == [f"{origin}/favicon.ico", 200, "image/svg+xml"], icon

        # A restart sets every counter back to zero: no rate below zero is drawn.
        seen = (len(trouble.errors), len(trouble.failed))
        assert lb.stop() == 0
        expect(page.locator("#banner")).to_be_visible()
        lb = start_lb(text)
        wait_until(lambda: lb.events("admin_start"), 10, "the admin endpoint again")
        expect(page.locator("#banner")).to_be_hidden()
        back = chart(page, public_active)
        wait_chart(page, public_active, f"Number(d.samples) >= {back.samples + 2}")
        for row in (
            LISTENER_ROW.format("public"),
            ROW.format("app", "echo1"),
            ROW.format("app", "echo2"),
        ):
            drawn = chart(page, CHART.format(row, "traffic"))
            assert drawn.last != "" and float(drawn.last) >= 0, (row, drawn)
            assert all(0 <= y <= drawn.height for _, y in drawn.points), (row, drawn.points)
            for number in page.locator(f"{row} td.num").all_text_contents():
                assert not number.startswith("-"), (row, number)
        # What the browser said while the instance was down: only the polls it missed.
        errors, failed = trouble.errors[seen[0] :], trouble.failed[seen[1] :]
        assert all(f"{origin}/status" in error for error in errors), errors
        assert set(failed) <= {f"{origin}/status"}, failed
