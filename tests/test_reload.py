"""SIGHUP's reload, in process: parse, prepare every part, then commit them all."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from gateway import config
from gateway.mock_upstream import MockSettings, create_mock_app
from gateway.process.reload import RELOADERS, Reloaders, reload_file, restart_needed
from gateway.upstream.pool import UpstreamPool

from .conftest import (
    TEST_KEY_SHA,
    UPSTREAM_KEY,
    GatewayFactory,
    StartUpstream,
    chat_body,
    config_text,
)


def _mock(chunks: int, delay: float = 0.0) -> web.Application:
    return create_mock_app(MockSettings(chunks=chunks, delay=delay, api_key=UPSTREAM_KEY))


async def test_reload_sends_new_requests_upstream_anew_without_dropping_a_running_stream(
    gateway_factory: GatewayFactory,
    start_upstream: StartUpstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    old = await start_upstream(
        _mock(chunks=30, delay=0.03)
    )
    new = await start_upstream(_mock(chunks=3))
    gw = await gateway_factory(old.url)
    path = tmp_path / "config.toml"
    path.write_text(config_text(new.url))
    async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body()) as running:
        await running.content.readuntil(b"\n\n")
        with capture_logs() as logs:
            assert reload_file(gw.app, str(path))
        async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body()) as after:
            assert (await after.read()).endswith(b"data: [DONE]\n\n")
        body = await running.content.read()
    assert body.endswith(b"data: [DONE]\n\n")  # the stream that started before went on
    assert body.count(b"data: {") >= 30
    assert new.state.requests["/v1/chat/completions"] == 1
    assert old.state.requests["/v1/chat/completions"] == 1
    parts = [e for e in logs if e["event"] == "reloaded"][0]["parts"]
    assert parts == ["policy", "ticker", "metrics", "upstreams"]
    assert gw.app[RELOADERS].current.upstreams[0].base_url == config.parse(
        path.read_text(), env={}
    ).upstreams[0].base_url


@pytest.mark.parametrize(
    "text, problem",
    [
        ("[server\n", "(toml)"),
        ("[server]\nport = 8080\nworkerz = 2\n", "server.workerz: unknown key"),
        ("[server]\nport = 8080\n", "upstreams: at least one [[upstreams]] is required"),
    ],
)
async def test_reload_of_a_bad_file_keeps_the_old_config_and_logs_why(
    gateway_factory: GatewayFactory,
    start_upstream: StartUpstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    text: str,
    problem: str,
) -> None:
    up = await start_upstream(_mock(chunks=3))
    gw = await gateway_factory(up.url)
    before = gw.app[RELOADERS].current
    path = tmp_path / "config.toml"
    path.write_text(text)
    with capture_logs() as logs:
        assert not reload_file(gw.app, str(path))
    failed = [e for e in logs if e["event"] == "reload_failed"]
    assert failed and any(problem in p for p in failed[0]["problems"])
    assert failed[0]["log_level"] == "error"
    assert gw.app[RELOADERS].current is before
    async with http.post(f"{gw.url}/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 200
        assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    assert up.state.requests["/v1/chat/completions"] == 1


async def test_reload_of_a_missing_file_keeps_the_old_config(
    gateway_factory: GatewayFactory, start_upstream: StartUpstream, tmp_path: Path
) -> None:
    up = await start_upstream(_mock(chunks=3))
    gw = await gateway_factory(up.url)
    with capture_logs() as logs:
        assert not reload_file(gw.app, str(tmp_path / "nope.toml"))
    assert "(file): cannot read" in logs[0]["problems"][0]


def test_a_part_refusing_the_new_config_leaves_every_part_unchanged() -> None:
    cfg = config.parse('[[upstreams]]\nname = "a"\nbase_url = "http://127.0.0.1:1/v1"\n', env={})
    new = config.parse('[[upstreams]]\nname = "b"\nbase_url = "http://127.0.0.1:2/v1"\n', env={})
    reloaders = Reloaders(cfg)
    committed: list[str] = []

    def good(c: config.Config) -> Callable[[], None]:
        return lambda: committed.append("good")

    def bad(c: config.Config) -> Callable[[], None]:
        raise ValueError("cannot use upstream b")

    reloaders.add("good", good)
    reloaders.add("bad", bad)
    with pytest.raises(ValueError, match="bad: cannot use upstream b"):
        reloaders.apply(new)
    assert committed == []
    assert reloaders.current is cfg


def test_restart_needed_names_the_keys_read_only_at_start() -> None:
    base = '[[upstreams]]\nname = "a"\nbase_url = "http://127.0.0.1:1/v1"\n'
    old = config.parse("[server]\nport = 8080\n" + base, env={})
    new = config.parse('[server]\nport = 9000\n[limits]\nper_ip_rpm = 5\n' + base, env={})
    assert restart_needed(old, new) == ["server"]
    assert restart_needed(old, old) == []


async def test_upstream_reload_keeps_a_kept_upstreams_breaker_and_applies_new_settings() -> None:
    def cfg(second_url: str, threshold: int) -> config.Config:
        return config.parse(
            f"[breaker]\nfailure_threshold = {threshold}\n"
            '[[upstreams]]\nname = "a"\nbase_url = "http://127.0.0.1:1/v1"\n'
            f'[[upstreams]]\nname = "b"\nbase_url = "{second_url}"\n',
            env={},
        )

    async with aiohttp.ClientSession() as session:
        pool = UpstreamPool(cfg("http://127.0.0.1:2/v1", 5), session)
        a, b = pool.upstreams
        commit = pool.prepare_reload(cfg("http://127.0.0.1:3/v1", 2))
        assert a.breaker.threshold == 5  # nothing changes before the commit
        commit()
        new_a, new_b = pool.upstreams
        assert new_a.breaker is a.breaker and new_a.slots is a.slots
        assert new_a.breaker.threshold == 2
        assert new_b.breaker is not b.breaker  # same name, another URL: a new upstream
        assert str(new_b.base) == "http://127.0.0.1:3/v1"


async def test_a_client_added_by_a_reload_gets_its_own_tokens_total_label(
    gateway_factory: GatewayFactory,
    start_upstream: StartUpstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    up = await start_upstream(_mock(chunks=3))
    gw = await gateway_factory(up.url, auth={"mode": "keys"})
    newbie_key = "gw-newbie-key-0123456789abcdefghijklmnopqrstuv"
    keys = [
        {"client": "tester", "sha256": TEST_KEY_SHA},
        {"client": "newbie", "sha256": hashlib.sha256(newbie_key.encode()).hexdigest()},
    ]
    path = tmp_path / "config.toml"
    path.write_text(config_text(up.url, auth={"mode": "keys"}, keys=keys))
    assert reload_file(gw.app, str(path))
    headers = {"Authorization": f"Bearer {newbie_key}"}
    async with http.post(
        f"{gw.url}/v1/chat/completions", json=chat_body(stream=False), headers=headers
    ) as resp:
        assert resp.status == 200
        usage = (await resp.json())["usage"]
    async with http.get(f"{gw.url}/metrics") as resp:
        text = await resp.text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    newbie = (("client", "newbie"), ("kind", "completion"))
    assert samples[("gateway_tokens_total", newbie)] == usage["completion_tokens"] > 0
    jwt = (("client", "jwt"), ("kind", "completion"))
    assert samples.get(("gateway_tokens_total", jwt), 0.0) == 0.0
