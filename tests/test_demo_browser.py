"""The demo page in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright).

Playwright's async API runs on its own event loop in a helper thread, so one browser serves
the whole module while each test's gateway and mock upstream run on the test's own loop;
the two meet only over loopback sockets, as a browser and a server do.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gateway.mock_upstream import MockSettings, create_mock_app, reply_pieces
from gateway.process.reload import reload

from .conftest import TEST_KEY, GatewayFactory, StartUpstream, make_config
from .nginx_server import NGINX, Nginx
from .test_service import free_port

playwright_api = pytest.importorskip("playwright.async_api")

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
SCREENSHOTS = Path(__file__).resolve().parents[1] / "build" / "screenshots"
PROMPT = "hello browser"
T = TypeVar("T")

pytestmark = pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="needs Debian's chromium")


class Chromium:
    """A headless Chromium on a loop of its own, in a thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.pw = self._wait(playwright_api.async_playwright().start())
        self.browser = self._wait(
            self.pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        )

    def _wait(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(120)

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the browser's loop; await it from the test's loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def close(self) -> None:
        self._wait(self.browser.close())
        self._wait(self.pw.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


@pytest.fixture(scope="module")
def chromium() -> Iterator[Chromium]:
    c = Chromium()
    yield c
    c.close()


async def open_page(chromium: Chromium, url: str) -> Any:
    async def go() -> Any:
        page = await chromium.browser.new_page(viewport={"width": 900, "height": 640})
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.errors = errors
        await page.goto(url)
        await page.wait_for_selector("body[data-ready=true]")
        return page

    return await chromium.run(go())


async def send(chromium: Chromium, page: Any, prompt: str = PROMPT) -> None:
    async def go() -> None:
        await page.fill("#prompt", prompt)
        await page.click("#send")

    await chromium.run(go())


async def wait_status(chromium: Chromium, page: Any, prefix: str, timeout: float = 30) -> str:
    async def go() -> str:
        await page.wait_for_function(
            "p => document.getElementById('status').textContent.startsWith(p)",
            arg=prefix,
            timeout=timeout * 1000,
        )
        return str(await page.text_content("#output"))

    return await chromium.run(go())


async def test_a_prompt_streams_into_the_page_incrementally(
    chromium: Chromium, gateway_factory: GatewayFactory, start_upstream: StartUpstream
) -> None:
    up = await start_upstream(create_mock_app(MockSettings(chunks=25, delay=0.08)))
    gw = await gateway_factory(up.url)  # auth "none": no key field
    page = await open_page(chromium, gw.url + "/")
    assert await chromium.run(page.is_hidden("#key-row"))
    # Record every length the reply takes on screen as it grows.
    await chromium.run(
        page.evaluate(
            """() => { window.lengths = [];
            new MutationObserver(() => window.lengths.push(
                document.getElementById('output').textContent.length))
              .observe(document.getElementById('output'),
                       {childList: true, characterData: true, subtree: true}); }"""
        )
    )
    await send(chromium, page)
    text = await wait_status(chromium, page, "done")
    assert text == "".join(reply_pieces(PROMPT, 25, 1))
    lengths = await chromium.run(page.evaluate("() => window.lengths"))
    growing = [n for n in lengths if n > 0]
    assert len(set(growing)) >= 10, lengths  # many steps, not one final paint
    assert growing == sorted(growing)
    assert "tokens:" in str(await chromium.run(page.text_content("#usage")))
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOTS / "demo.png"
    await chromium.run(page.screenshot(path=str(shot), full_page=True))
    print(f"\nscreenshot: {shot}")
    assert shot.stat().st_size > 1000
    assert page.errors == []
    await chromium.run(page.close())


async def test_the_text_is_exact_across_connections_closed_by_max_connection_age(
    chromium: Chromium, gateway_factory: GatewayFactory, start_upstream: StartUpstream
) -> None:
    up = await start_upstream(create_mock_app(MockSettings(chunks=40, delay=0.08)))
    gw = await gateway_factory(up.url, sse={"max_connection_age": 1, "retry_ms": 100})
    page = await open_page(chromium, gw.url + "/")
    await send(chromium, page)
    text = await wait_status(chromium, page, "done")
    assert text == "".join(reply_pieces(PROMPT, 40, 1))
    shown = str(await chromium.run(page.text_content("#reconnects")))
    assert shown.startswith("reconnected ") and int(shown.split()[1].rstrip("x")) >= 2
    await chromium.run(page.close())


async def test_stop_ends_the_upstream_generation(
    chromium: Chromium, gateway_factory: GatewayFactory, start_upstream: StartUpstream
) -> None:
    up = await start_upstream(create_mock_app(MockSettings(chunks=400, delay=0.05)))
    gw = await gateway_factory(up.url)
    page = await open_page(chromium, gw.url + "/")
    await send(chromium, page)

    async def stop_once_text_shows() -> None:
        await page.wait_for_function(
            "() => document.getElementById('output').textContent.length > 20"
        )
        await page.click("#stop")

    await chromium.run(stop_once_text_shows())
    await asyncio.wait_for(up.state.client_disconnected.wait(), 10)
    assert up.state.completed_streams == 0
    text = await wait_status(chromium, page, "stopped")
    assert 0 < len(text) < len("".join(reply_pieces(PROMPT, 400, 1)))
    assert await chromium.run(page.is_enabled("#send"))
    await chromium.run(page.close())


async def test_with_auth_on_the_page_asks_for_the_key_and_sends_it(
    chromium: Chromium, gateway_factory: GatewayFactory, start_upstream: StartUpstream
) -> None:
    up = await start_upstream(create_mock_app(MockSettings(chunks=5, delay=0.0)))
    gw = await gateway_factory(up.url, auth={"mode": "keys"})
    page = await open_page(chromium, gw.url + "/")
    assert await chromium.run(page.is_visible("#key"))
    await send(chromium, page)  # no key typed: the page says what to do
    assert "API key" in await wait_status(chromium, page, "error")
    sent: list[str | None] = []

    async def with_key() -> None:
        page.on(
            "request",
            lambda r: sent.append(r.headers.get("authorization")) if r.method == "POST" else None,
        )
        await page.fill("#key", TEST_KEY)
        await page.click("#send")

    await chromium.run(with_key())
    await wait_status(chromium, page, "done")
    assert sent == [f"Bearer {TEST_KEY}"]
    await chromium.run(page.close())


# ------------------------------------------------------------- errors the page must explain


@pytest.fixture
async def nginx_in_front(tmp_path: Path) -> AsyncIterator[Callable[[int], Awaitable[Nginx]]]:
    started: list[Nginx] = []

    async def go(gateway_port: int) -> Nginx:
        if not Path(NGINX).exists():
            pytest.skip("nginx is not installed")
        tmp = tmp_path / f"nginx{len(started)}"
        tmp.mkdir()
        nginx = Nginx(tmp, gateway_port, free_port())
        started.append(nginx)
        await nginx.start()
        return nginx

    yield go
    for nginx in started:
        nginx.stop()


async def _output(chromium: Chromium, page: Any) -> str:
    return str(await chromium.run(page.text_content("#output")))


async def test_a_502_page_from_nginx_reads_as_a_message_not_a_syntax_error(
    chromium: Chromium,
    gateway_factory: GatewayFactory,
    start_upstream: StartUpstream,
    nginx_in_front: Callable[[int], Awaitable[Nginx]],
) -> None:
    up = await start_upstream(create_mock_app(MockSettings(chunks=5)))
    gw = await gateway_factory(up.url)
    nginx = await nginx_in_front(gw.port)
    page = await open_page(chromium, nginx.url + "/")
    await gw.runner.cleanup()  # the gateway goes away; nginx answers 502 with its HTML page
    await send(chromium, page)
    text = await wait_status(chromium, page, "error")
    assert text.startswith("HTTP 502"), text
    assert "SyntaxError" not in text and "JSON" not in text
    await chromium.run(page.close())


async def test_a_413_page_from_nginx_says_the_prompt_is_too_large(
    chromium: Chromium,
    gateway_factory: GatewayFactory,
    start_upstream: StartUpstream,
    nginx_in_front: Callable[[int], Awaitable[Nginx]],
) -> None:
    up = await start_upstream(create_mock_app(MockSettings(chunks=5)))
    gw = await gateway_factory(up.url)
    nginx = await nginx_in_front(gw.port)
    page = await open_page(chromium, nginx.url + "/")
    # Above the site's client_max_body_size (2m): nginx itself answers, in HTML.
    await chromium.run(page.evaluate(
        "() => { document.getElementById('prompt').value = 'x'.repeat(3 * 1024 * 1024);"
        " document.getElementById('send').click(); }"
    ))
    text = await wait_status(chromium, page, "error")
    assert text == "HTTP 413: the prompt is too large", text
    await chromium.run(page.close())


async def test_a_failed_stop_says_so_instead_of_stopping_forever(
    chromium: Chromium, gateway_factory: GatewayFactory, start_upstream: StartUpstream
) -> None:
    up = await start_upstream(create_mock_app(MockSettings(chunks=400, delay=0.05)))
    gw = await gateway_factory(up.url)
    page = await open_page(chromium, gw.url + "/")

    async def proxy_fails_deletes() -> None:
        async def fail(route: Any) -> None:
            if route.request.method == "DELETE":
                await route.fulfill(status=502, content_type="text/html",
                                    body="<html><body>502 Bad Gateway</body></html>")
            else:
                await route.continue_()

        await page.route("**/v1/streams/*", fail)

    await chromium.run(proxy_fails_deletes())
    await send(chromium, page)

    async def stop_once_text_shows() -> None:
        await page.wait_for_function(
            "() => document.getElementById('output').textContent.length > 20"
        )
        await page.click("#stop")

    await chromium.run(stop_once_text_shows())
    # The generation runs 20 s more: the page must say the stop failed long before that.
    status = await chromium.run(page.wait_for_function(
        "() => document.getElementById('status').textContent.startsWith('stop failed')",
        timeout=5000,
    ))
    assert status
    shown = str(await chromium.run(page.text_content("#status")))
    assert shown.startswith("stop failed: HTTP 502"), shown
    assert await chromium.run(page.is_enabled("#stop"))  # may be tried again
    await chromium.run(page.close())


async def test_a_key_with_non_latin1_characters_gets_a_readable_message(
    chromium: Chromium, gateway_factory: GatewayFactory, start_upstream: StartUpstream
) -> None:
    up = await start_upstream(create_mock_app(MockSettings(chunks=5)))
    gw = await gateway_factory(up.url, auth={"mode": "keys"})
    page = await open_page(chromium, gw.url + "/")
    await chromium.run(page.fill("#key", "gw-ключ-鍵"))
    await send(chromium, page)
    text = await wait_status(chromium, page, "error")
    assert "not an API key" in text, text
    assert "TypeError" not in text and "fetch" not in text
    await chromium.run(page.close())


async def test_whether_the_page_asks_for_a_key_follows_a_reload_of_auth_mode(
    chromium: Chromium, gateway_factory: GatewayFactory, start_upstream: StartUpstream
) -> None:
    up = await start_upstream(create_mock_app(MockSettings(chunks=5)))
    gw = await gateway_factory(up.url)  # auth "none": the page hides the key field
    page = await open_page(chromium, gw.url + "/")
    assert await chromium.run(page.is_hidden("#key-row"))
    reload(gw.app, make_config(up.url, auth={"mode": "keys"}))  # SIGHUP's work, in process
    await send(chromium, page)
    assert "API key" in await wait_status(chromium, page, "error")
    assert await chromium.run(page.is_visible("#key"))
    await chromium.run(page.fill("#key", TEST_KEY))
    await send(chromium, page)
    await wait_status(chromium, page, "done")
    # ... and back: with auth off again, an empty key field is no obstacle.
    reload(gw.app, make_config(up.url))
    await chromium.run(page.fill("#key", ""))
    await send(chromium, page)
    await wait_status(chromium, page, "done")
    assert page.errors == [] or all("401" in e for e in page.errors), page.errors
    await chromium.run(page.close())
