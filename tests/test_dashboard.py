"""The live dashboard, in a real headless Chromium against a real proxy's admin listener.

Chromium is Debian's (``/usr/bin/chromium``, ``make test`` installs it), driven by Playwright's
Python package, whose wheel carries its own driver; Playwright never downloads a browser here.
Without Chromium these tests fail, on purpose: CI must run them.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest

try:
    from playwright.async_api import Page, async_playwright, expect
except ImportError as exc:  # a clear word instead of a bare ModuleNotFoundError
    raise ImportError(
        "tests/test_dashboard.py needs the playwright package: pip install -e '.[dev]'"
    ) from exc

from lb.app import App
from tests.conftest import ADMIN_AUTH, pool, proxy_config, url

if TYPE_CHECKING:  # imported by name, pytest would try to collect the class as a test
    from tests.conftest import TestBackend

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("LB_CHROMIUM", "/usr/bin/chromium"))
# Headless, as root, on a machine without internet: no sandbox, no GPU, and none of the
# background calls home (their refused connections would only add noise and time).
# Playwright gives every launch a fresh, empty profile (--user-data-dir) of its own.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
UPDATE_SCREENSHOT = os.environ.get("LB_UPDATE_SCREENSHOT") == "1"
# The page polls every second; a change must show within a few polls.
SHOWS_WITHIN_MS = 8000
# How the page prints a positive rate ("12.5", "130") and a duration ("4.2 ms", "> 600 s").
POSITIVE_RATE = re.compile(r"^(?!0\.0$)\d+(\.\d)?$")
DURATION = re.compile(r"^(> )?\d+(\.\d+)? m?s$")

StartProxy = Callable[[dict[str, Any]], Awaitable[App]]
StartBackends = Callable[..., Awaitable[list["TestBackend"]]]


@pytest.fixture(autouse=True)
def _open_admin(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test configs set no admin token; none may come from the environment either."""
    monkeypatch.delenv("LB_ADMIN_TOKEN", raising=False)


@pytest.fixture
def chromium() -> Path:
    """The Chromium binary; a test that needs it fails (never skips) when it is missing."""
    if not CHROMIUM.is_file():
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: the dashboard tests drive a real browser. "
            "Install it with `apt-get install chromium` (make test does), or point "
            "LB_CHROMIUM at a Chromium binary.",
            pytrace=False,
        )
    return CHROMIUM


@pytest.fixture
async def page(chromium: Path) -> AsyncIterator[Page]:
    """A fresh page in headless Chromium, closed with its browser after the test."""
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(
                viewport={"width": 1280, "height": 860}, color_scheme="light"
            )
            yield await context.new_page()
        finally:
            await browser.close()


def dashboard(app: App) -> str:
    return f"http://127.0.0.1:{app.admin_port}/dashboard"


def backend_row(page: Page, pool_name: str, backend: str) -> Any:
    """The row of one backend (names here are plain, so no CSS escaping is needed)."""
    return page.locator(f'tr[data-pool="{pool_name}"][data-backend="{backend}"]')


def state_of(page: Page, pool_name: str, backend: str) -> Any:
    return backend_row(page, pool_name, backend).locator('[data-field="state"]')


async def admin_post(app: App, path: str) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://127.0.0.1:{app.admin_port}{path}", headers=ADMIN_AUTH) as resp,
    ):
        await resp.read()
        return resp.status


async def send_traffic(app: App, stop: asyncio.Event, path: str, workers: int) -> None:
    """Requests through the proxy until ``stop`` is set, at most 2000 in all."""
    sent = 0

    async with aiohttp.ClientSession() as session:

        async def worker() -> None:
            nonlocal sent
            while not stop.is_set() and sent < 2000:
                sent += 1
                async with session.post(url(app, path), json={"input": "hello"}) as resp:
                    await resp.read()
                await asyncio.sleep(0.01)

        await asyncio.gather(*(worker() for _ in range(workers)))


async def test_every_backend_shows_available_and_a_drain_through_the_api_shows_live(
    backends: StartBackends, start_proxy: StartProxy, page: Page, tmp_path: Path
) -> None:
    """Every backend of the running proxy is listed as available, and draining one through
    the admin API turns its row to ``drained`` (and undraining back) without a reload."""
    chat = await backends(3)
    embed = await backends(2)
    for b, delay_s in zip(chat, (0.004, 0.012, 0.03), strict=True):
        b.delay_s = delay_s
    config = proxy_config(
        [
            pool("chat", chat, "least_connections", timeouts={"response_headers_s": 0.3}),
            pool("embeddings", embed, "round_robin"),
        ],
        routes=[
            {"path_prefix": "/v1/embeddings", "pool": "embeddings"},
            {"path_prefix": "/", "pool": "chat"},
        ],
    )
    app = await start_proxy(config)

    requests: list[str] = []
    problems: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on(
        "console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None
    )

    stop = asyncio.Event()
    traffic = [
        asyncio.create_task(send_traffic(app, stop, "/v1/chat/completions", workers=3)),
        asyncio.create_task(send_traffic(app, stop, "/v1/embeddings", workers=1)),
    ]
    try:
        # One timed-out request, so the chat pool has a recent error to show.
        async with aiohttp.ClientSession() as session, session.get(url(app, "/hang")) as resp:
            assert resp.status == 504

        await page.goto(dashboard(app))
        for pool_name, group in (("chat", chat), ("embeddings", embed)):
            for b in group:
                await expect(state_of(page, pool_name, b.name)).to_have_text(
                    "available", timeout=SHOWS_WITHIN_MS
                )
        assert await page.locator("tr[data-backend]").count() == len(chat) + len(embed)

        assert await admin_post(app, "/api/v1/pools/chat/backends/b1/drain") == 200
        await expect(state_of(page, "chat", "b1")).to_have_text("drained", timeout=SHOWS_WITHIN_MS)
        for b in (chat[0], chat[2]):
            await expect(state_of(page, "chat", b.name)).to_have_text("available")

        # Figures computed from counter deltas between polls show up for a busy backend,
        # and the timed-out request is listed.
        busy = backend_row(page, "chat", "b0")
        await expect(busy.locator('[data-field="rps"]')).to_have_text(
            POSITIVE_RATE, timeout=SHOWS_WITHIN_MS
        )
        await expect(busy.locator('[data-field="p50"]')).to_have_text(
            DURATION, timeout=SHOWS_WITHIN_MS
        )
        errors = page.locator('[data-pool-panel="chat"] [data-field="recent_errors"] tr')
        await expect(errors.first).to_contain_text("timeout", timeout=SHOWS_WITHIN_MS)

        shot = tmp_path / "dashboard.png"
        await page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 0
        if UPDATE_SCREENSHOT:
            (ROOT / "docs").mkdir(exist_ok=True)
            shutil.copyfile(shot, ROOT / "docs" / "dashboard.png")

        assert await admin_post(app, "/api/v1/pools/chat/backends/b1/undrain") == 200
        await expect(state_of(page, "chat", "b1")).to_have_text(
            "available", timeout=SHOWS_WITHIN_MS
        )
    finally:
        stop.set()
        await asyncio.gather(*traffic)

    admin = f"http://127.0.0.1:{app.admin_port}/"
    assert [r for r in requests if not r.startswith(admin)] == []
    assert problems == []


async def test_a_backend_held_by_retry_after_shows_held_not_available(
    backends: StartBackends, start_proxy: StartProxy, page: Page
) -> None:
    """A 503 with ``Retry-After: 60`` passed on to the client holds its backend out of the
    pool: the row says ``held``, with the time left, where the API says it is not available."""
    b0, b1 = await backends(2)
    app = await start_proxy(proxy_config([pool("chat", [b0, b1], retry={"max_retries": 0})]))
    async with (
        aiohttp.ClientSession() as session,
        session.get(url(app, "/status/503?retry_after=60")) as resp,
    ):
        assert resp.status == 503
        held = resp.headers["x-lb-backend"]
    other = "b1" if held == "b0" else "b0"
    await page.goto(dashboard(app))
    await expect(state_of(page, "chat", held)).to_have_text("held", timeout=SHOWS_WITHIN_MS)
    note = backend_row(page, "chat", held).locator('[data-field="state_note"]')
    await expect(note).to_contain_text("Retry-After")
    await expect(state_of(page, "chat", other)).to_have_text("available")


async def test_a_banner_shows_while_polls_fail_and_goes_when_they_succeed(
    backends: StartBackends, start_proxy: StartProxy, page: Page
) -> None:
    """Failed polls raise the connection-lost banner; the next good poll takes it down."""
    app = await start_proxy(proxy_config([pool("chat", await backends(1))]))
    banner = page.locator("#banner-lost")
    await page.goto(dashboard(app))
    await expect(page.locator("#status")).to_have_text("live", timeout=SHOWS_WITHIN_MS)
    await expect(banner).to_be_hidden()

    await page.route("**/api/v1/state", lambda route: route.abort())
    await expect(banner).to_be_visible(timeout=SHOWS_WITHIN_MS)
    await expect(page.locator("#status")).to_have_text("connection lost")

    await page.unroute("**/api/v1/state")
    await expect(banner).to_be_hidden(timeout=SHOWS_WITHIN_MS)
    await expect(page.locator("#status")).to_have_text("live")


async def test_at_most_twenty_recent_errors_are_shown_newest_first(
    backends: StartBackends, start_proxy: StartProxy, page: Page
) -> None:
    """More recent errors than the page shows are cut to the newest twenty."""
    (b,) = await backends(1)
    config = proxy_config(
        [pool("chat", [b], timeouts={"response_headers_s": 0.1}, retry={"max_retries": 0})]
    )
    app = await start_proxy(config)
    async with aiohttp.ClientSession() as session:

        async def hang() -> int:
            async with session.get(url(app, "/hang")) as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(hang() for _ in range(25)))
    assert all(s >= 500 for s in statuses)

    await page.goto(dashboard(app))
    rows = page.locator('[data-pool-panel="chat"] [data-field="recent_errors"] tr')
    await expect(rows).to_have_count(20, timeout=SHOWS_WITHIN_MS)
    times = [float(t) for t in await rows.evaluate_all("rs => rs.map(r => r.dataset.time)")]
    assert times == sorted(times, reverse=True)
    await expect(page.locator('[data-pool-panel="chat"] h3')).to_have_text(
        "Recent errors (newest 20 of 25)"
    )


async def test_names_from_the_api_are_shown_as_text_never_as_html(
    backends: StartBackends, start_proxy: StartProxy, page: Page
) -> None:
    """A backend named like markup is shown literally and nothing in it runs."""
    evil = '<img src=x onerror="window.__xss = 1"><b>bold</b>'
    (b,) = await backends(1)
    app = await start_proxy(
        proxy_config([{"name": "chat", "backends": [{"url": b.url, "name": evil}]}])
    )
    await page.goto(dashboard(app))
    await expect(page.locator("tr[data-backend]")).to_have_count(1, timeout=SHOWS_WITHIN_MS)
    row = page.locator("tr[data-backend]")
    assert await row.get_attribute("data-backend") == evil
    await expect(row.locator('[data-field="name"]')).to_have_text(evil)
    assert await page.locator("main img, main b").count() == 0
    assert await page.evaluate("window.__xss") is None


async def test_latency_quantiles_interpolate_inside_the_bucket_like_histogram_quantile(
    backends: StartBackends, start_proxy: StartProxy, page: Page
) -> None:
    """p50/p99 follow Prometheus' histogram_quantile on non-cumulative bucket counts."""
    app = await start_proxy(proxy_config([pool("chat", await backends(1))]))
    await page.goto(dashboard(app))
    cases = await page.evaluate(
        """() => {
          const q = window.lbDashboard.histogramQuantile;
          const b = [0.005, 0.01, 0.025, 0.05, 0.1];
          return {
            oneBucket: [q(0.5, b, [0, 0, 10, 0, 0, 0]), q(0.99, b, [0, 0, 10, 0, 0, 0])],
            firstBucket: q(0.5, b, [4, 0, 0, 0, 0, 0]),
            twoBuckets: [q(0.5, b, [0, 0, 10, 0, 10, 0]), q(0.99, b, [0, 0, 10, 0, 10, 0])],
            aboveAll: q(0.5, b, [0, 0, 0, 0, 0, 3]),
            empty: q(0.5, b, [0, 0, 0, 0, 0, 0]),
          };
        }"""
    )
    assert cases["oneBucket"][0]["s"] == pytest.approx(0.0175)
    assert cases["oneBucket"][1]["s"] == pytest.approx(0.01 + 0.015 * 0.99)
    assert cases["firstBucket"]["s"] == pytest.approx(0.0025)
    # rank 10 of 20 ends exactly at the top of the first filled bucket
    assert cases["twoBuckets"][0]["s"] == pytest.approx(0.025)
    assert cases["twoBuckets"][1]["s"] == pytest.approx(0.05 + 0.05 * 0.98)
    assert cases["aboveAll"] == {"s": 0.1, "overflow": True}
    assert cases["empty"] is None


async def test_rates_come_from_counter_deltas_and_a_counter_reset_shows_no_figure(
    backends: StartBackends, start_proxy: StartProxy, page: Page
) -> None:
    """req/s is Δrequests/Δt, the error rate is the 5xx and no-answer share of the answers in
    the window, and a counter that went down (a restart) yields no figure rather than a wrong
    one."""
    app = await start_proxy(proxy_config([pool("chat", await backends(1))]))
    await page.goto(dashboard(app))
    figures = await page.evaluate(
        """() => {
          const d = window.lbDashboard;
          const prev = d.sampleOf({requests_total: 10, responses_by_class: {"2xx": 10}}, 100);
          const cur = d.sampleOf(
            {requests_total: 30, responses_by_class: {none: 1, "2xx": 27, "4xx": 0, "5xx": 2}},
            102,
          );
          const reset = d.sampleOf({requests_total: 3, responses_by_class: {"2xx": 3}}, 103);
          return {window: d.windowFigures(prev, cur), reset: d.windowFigures(cur, reset)};
        }"""
    )
    assert figures["window"]["rps"] == pytest.approx(10.0)
    assert figures["window"]["errorRate"] == pytest.approx(3 / 20)
    assert figures["reset"]["rps"] is None
    assert figures["reset"]["errorRate"] is None


def test_the_script_never_turns_strings_into_html() -> None:
    """dashboard.js builds the page with DOM calls only, never from HTML strings."""
    source = (ROOT / "lb" / "static" / "dashboard.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in source, sink
