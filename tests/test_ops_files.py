"""The shipped unit and nginx site: `systemd-analyze verify` is clean, and the settings the
issue names are there with values that agree with config.toml."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gateway import config
from gateway.process.server import FINISH_TIMEOUT

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "gateway.service"
SITE = ROOT / "systemd" / "nginx-gateway.conf"
PROXY = ROOT / "systemd" / "nginx-proxy.conf"
LOCAL = ROOT / "systemd" / "nginx-local.conf"
SHIPPED = config.parse((ROOT / "config.toml").read_text(), env={})


def _unit() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is absent")
def test_unit_passes_systemd_analyze_verify_cleanly(tmp_path: Path) -> None:
    # verify checks that ExecStart's program exists: point it at a stand-in, nothing else.
    stand_in = tmp_path / "gateway"
    stand_in.write_text("#!/bin/sh\n")
    stand_in.chmod(0o755)
    unit = tmp_path / "gateway.service"
    unit.write_text(UNIT.read_text().replace("/opt/gateway/venv/bin/gateway", str(stand_in)))
    run = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == run.stderr == "", run.stdout + run.stderr  # not even a warning


def test_unit_is_notify_typed_hardened_and_reloads_with_hup() -> None:
    unit = _unit()
    expected = {
        "Type": "notify",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "EnvironmentFile": "-/etc/gateway/gateway.env",
        "User": "gateway",
        "Group": "gateway",
        "UMask": "0077",
        "LogRateLimitIntervalSec": "0",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "CapabilityBoundingSet": "",
        "LimitNOFILE": "65536",
        "Restart": "on-failure",
    }
    for key, value in expected.items():
        assert unit.get(key) == [value], key
    assert "DynamicUser" not in unit  # no stable group: the config had to be world-readable
    assert unit["ExecStart"] == [
        "/opt/gateway/venv/bin/gateway serve --config /etc/gateway/config.toml"
    ]


def test_unit_stop_timeout_leaves_margin_above_the_grace_and_the_ending_of_streams() -> None:
    stop = float(_unit()["TimeoutStopSec"][0])
    assert stop >= SHIPPED.server.shutdown_grace + 2 * FINISH_TIMEOUT + 15


def _directives(*paths: Path) -> list[str]:
    lines = [
        line.split("#", 1)[0].strip() for path in paths for line in path.read_text().splitlines()
    ]
    return [line for line in lines if line]


def _site_directives() -> list[str]:
    return _directives(SITE, PROXY)


def test_site_relays_sse_unbuffered_over_http11_with_keepalive() -> None:
    site = _site_directives()
    for directive in (
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        "proxy_buffering off;",
        "proxy_cache off;",
        "proxy_set_header X-Forwarded-For $remote_addr;",
        "keepalive 64;",
    ):
        assert directive in site, directive
    timeouts = [m for d in site if (m := re.fullmatch(r"proxy_read_timeout (\d+)s;", d))]
    assert timeouts and all(int(m.group(1)) > SHIPPED.sse.heartbeat_interval for m in timeouts)


def test_site_sends_to_the_port_the_shipped_config_serves() -> None:
    assert f"server 127.0.0.1:{SHIPPED.server.port};" in _site_directives()
    # ... and the gateway believes nginx's X-Forwarded-For.
    assert any(str(n) == "127.0.0.1/32" for n in SHIPPED.server.trusted_proxies)


def test_site_listens_on_loopback_only_until_the_operator_fills_in_local_conf() -> None:
    listens = [d for d in _site_directives() if d.startswith("listen ")]
    assert listens == ["listen 127.0.0.1:80;", "listen [::1]:80;"]
    assert "include /etc/nginx/gateway/local.conf;" in _directives(SITE)
    assert "include /etc/nginx/gateway/proxy.conf;" in _directives(SITE)
    assert _directives(LOCAL) == []  # shipped all commented out: nothing public


def test_site_never_appends_to_a_client_supplied_x_forwarded_for() -> None:
    assert "$proxy_add_x_forwarded_for" not in " ".join(_site_directives())


def test_the_tls_template_redirects_plain_http_with_308() -> None:
    template = re.search(r"^# BEGIN TLS\n(.*?)^# END TLS$", LOCAL.read_text(), re.M | re.S)
    assert template
    body = template.group(1)
    assert "#    return 308 https://$host$request_uri;" in body
    assert "return 301" not in body and "return 302" not in body
    assert "#    include /etc/nginx/gateway/proxy.conf;" in body
