"""`make install-service INSTANCES=N` (staged under DESTDIR) and `make rolling-restart` (with
a fake systemctl and real HTTP /readyz endpoints), plus `gateway serve --port`."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiohttp import web

from tests.conftest import config_text
from tests.gateway_process import GatewayProcess
from tests.nginx_server import _gatewayctl
from tests.staging import Stage
from tests.test_rolling_restart import free_port

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is absent")


async def make(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "make", "-s", *args, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode or 0, out.decode()


def test_install_service_with_instances_lays_out_the_template_and_the_site(stage: Stage) -> None:
    """The same release-based install as one unit, with the template unit, one enabled
    instance per port, a site listing them, and a rolling restart instead of one restart."""
    run = stage.make("install-service", "INSTANCES=4", "BASE_PORT=9001")
    assert run.returncode == 0, run.stdout + run.stderr
    unit = stage.path("/etc/systemd/system/gateway@.service")
    assert unit.read_text() == (ROOT / "systemd/gateway@.service").read_text()
    assert "serve --config /etc/gateway/config.toml --port %i" in unit.read_text()
    assert not stage.path("/etc/systemd/system/gateway.service").exists()
    site = stage.path("/etc/nginx/sites-available/gateway").read_text()
    servers = re.findall(r"^    server 127\.0\.0\.1:(\d+) max_fails=0;$", site, re.MULTILINE)
    assert servers == ["9001", "9002", "9003", "9004"]
    assert "include /etc/nginx/gateway/proxy.conf;" in site  # the same settings as one unit
    proxy = stage.path("/etc/nginx/gateway/proxy.conf").read_text()
    assert "proxy_next_upstream error http_503 non_idempotent;" in proxy
    assert stage.path("/etc/nginx/sites-enabled/gateway").resolve() == stage.path(
        "/etc/nginx/sites-available/gateway"
    )
    calls = [c for c in stage.calls() if c.startswith("systemctl ")]
    enables = [c for c in calls if c.startswith("systemctl enable")]
    restarts = [c for c in calls if c.startswith("systemctl restart")]
    assert enables == [f"systemctl enable gateway@{p}" for p in range(9001, 9005)]
    assert restarts == [f"systemctl restart gateway@{p}" for p in range(9001, 9005)]
    assert calls.index(enables[-1]) < calls.index(restarts[0])


def test_the_check_refuses_an_instances_site_that_misses_an_instance(stage: Stage) -> None:
    site = ROOT / "systemd/nginx-gateway.conf"
    ctl = ROOT / "systemd/gatewayctl"
    made = subprocess.run(
        [sys.executable, str(ctl), "site", "--ports", "9001,9002"],
        input=site.read_text(), capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    written = stage.dest / "site"
    written.write_text(made)
    problems = _gatewayctl().site_problems(str(ROOT / "config.toml"), [str(written)], (9001, 9002))
    assert problems == []
    problems = _gatewayctl().site_problems(
        str(ROOT / "config.toml"), [str(written)], (9001, 9002, 9003)
    )
    assert problems == [
        "nginx sends to ports ['9001', '9002'], the instances are [9001, 9002, 9003]"
    ]


async def test_rolling_restart_waits_for_each_instance_to_be_ready_before_the_next(
    tmp_path: Path,
) -> None:
    ports = [free_port() for _ in range(3)]
    log = tmp_path / "systemctl.log"
    fake = tmp_path / "systemctl"
    fake.write_text(f'#!/bin/sh\necho "$(date +%s.%N) $*" >> {log}\n')
    fake.chmod(0o755)
    ready_at: dict[int, float] = {}

    def app(port: int) -> web.Application:
        async def readyz(request: web.Request) -> web.Response:
            # Not ready for 0.5 s after its restart: the next one must wait for this.
            restarted = [ln for ln in (log.read_text() if log.exists() else "").splitlines()
                         if ln.endswith(f"restart gateway@{port}")]  # fmt: skip
            if not restarted or time.time() - float(restarted[0].split()[0]) < 0.5:
                return web.Response(status=503)
            ready_at.setdefault(port, time.time())
            return web.Response(text="ok")

        a = web.Application()
        a.router.add_get("/readyz", readyz)
        return a

    runners = []
    for port in ports:
        runner = web.AppRunner(app(port))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
    try:
        code, out = await make(
            "rolling-restart", f"SYSTEMCTL={fake}", f"RUNNING_PORTS={' '.join(map(str, ports))}"
        )
    finally:
        for runner in runners:
            await runner.cleanup()
    assert code == 0, out
    calls = [ln.split(" ", 1) for ln in log.read_text().splitlines()]
    assert [c[1] for c in calls] == [f"restart gateway@{p}" for p in ports]
    for (at, _), prev in zip(calls[1:], ports, strict=False):
        assert float(at) >= ready_at[prev]  # the next restart only once the previous is ready


async def test_rolling_restart_stops_at_an_instance_that_never_gets_ready(tmp_path: Path) -> None:
    fake = tmp_path / "systemctl"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {tmp_path / "log"}\n')
    fake.chmod(0o755)
    ports = f"{free_port()} {free_port()}"  # nothing listens there
    code, out = await make("rolling-restart", f"SYSTEMCTL={fake}", f"RUNNING_PORTS={ports}",
                           "READY_TIMEOUT=1")  # fmt: skip
    assert code != 0 and "not ready after 1 s" in out
    assert (tmp_path / "log").read_text().splitlines() == [f"restart gateway@{ports.split()[0]}"]


async def test_serve_port_overrides_the_config_port(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(config_text("http://127.0.0.1:9/v1", server={"port": 1}))
    port = free_port()
    gw = await GatewayProcess.start(config, args=["--port", str(port)])
    try:
        assert gw.port == port
    finally:
        await gw.close()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is absent")
def test_template_unit_passes_systemd_analyze_verify_for_an_instance(tmp_path: Path) -> None:
    stand_in = tmp_path / "gateway"
    stand_in.write_text("#!/bin/sh\n")
    stand_in.chmod(0o755)
    text = (ROOT / "systemd/gateway@.service").read_text()
    unit = tmp_path / "gateway@.service"
    unit.write_text(text.replace("/opt/gateway/venv/bin/gateway", str(stand_in)))
    instance = tmp_path / "gateway@8081.service"
    instance.symlink_to(unit)
    run = subprocess.run(
        ["systemd-analyze", "verify", str(instance)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == run.stderr == "", run.stdout + run.stderr


def test_template_unit_is_the_single_unit_but_for_the_port() -> None:
    """The instances run, drain and are hardened like the single service: every line of the
    template's sections is the single unit's, except the description and the --port."""

    def settings(path: Path) -> list[str]:
        text = path.read_text()
        return [ln for ln in text[text.index("[Unit]"):].splitlines() if not ln.startswith("#")]

    single = settings(ROOT / "systemd/gateway.service")
    template = settings(ROOT / "systemd/gateway@.service")
    differ = [(a, b) for a, b in zip(single, template, strict=True) if a != b]
    assert [b for _, b in differ] == [
        "Description=gateway instance on port %i",
        "ExecStart=/opt/gateway/venv/bin/gateway serve --config /etc/gateway/config.toml"
        " --port %i",
    ]


def test_uninstall_removes_the_instances_too(stage: Stage, tmp_path: Path) -> None:
    assert stage.make("install-service", "INSTANCES=2", "BASE_PORT=9001").returncode == 0
    # A systemctl stand-in that lists the two running instances.
    listing = "\n".join(f"gateway@{p}.service loaded active running x" for p in (9001, 9002))
    (stage.bin / "systemctl").write_text(
        f'#!/bin/sh\necho "systemctl $*" >> {stage.log}\n'
        f'case "$1" in list-units) printf "%s\\n" "{listing}";; esac\n'
    )
    run = stage.make("uninstall-service")
    assert run.returncode == 0, run.stdout + run.stderr
    assert not stage.path("/etc/systemd/system/gateway@.service").exists()
    assert "systemctl disable --now gateway@9001" in stage.calls()
    assert "systemctl disable --now gateway@9002" in stage.calls()


def _listing_systemctl(stage: Stage, ports: list[int]) -> None:
    """A systemctl stand-in that records its calls and lists these instances as running."""
    listing = "\n".join(f"gateway@{p}.service loaded active running x" for p in ports)
    (stage.bin / "systemctl").write_text(
        f'#!/bin/sh\necho "systemctl $*" >> {stage.log}\n'
        f'case "$1" in list-units) printf "%s\\n" "{listing}";; esac\n'
    )


def test_fewer_instances_or_one_unit_stops_the_instances_left_over(stage: Stage) -> None:
    # Installed with 3 instances, then again with 2: gateway@9003 is in no nginx site any
    # more, so it must not keep running (and start at every boot) on its own.
    assert stage.make("install-service", "INSTANCES=3", "BASE_PORT=9001").returncode == 0
    _listing_systemctl(stage, [9001, 9002, 9003])
    run = stage.make("install-service", "INSTANCES=2", "BASE_PORT=9001")
    assert run.returncode == 0, run.stdout + run.stderr
    calls = stage.calls()
    assert "systemctl disable --now gateway@9003" in calls
    assert calls.index("systemctl reload-or-restart nginx") < calls.index(
        "systemctl disable --now gateway@9003"
    )
    assert not any(c.startswith("systemctl disable") and "@900" in c and "9003" not in c
                   for c in calls)
    # Back to the one gateway.service: every instance goes, and its template.
    _listing_systemctl(stage, [9001, 9002])
    run = stage.make("install-service")
    assert run.returncode == 0, run.stdout + run.stderr
    calls = stage.calls()
    assert "systemctl disable --now gateway@9001" in calls
    assert "systemctl disable --now gateway@9002" in calls
    # Stopped once nginx sends to the new unit, so nothing is sent to a stopped instance.
    assert calls.index("systemctl restart gateway") < calls.index(
        "systemctl reload-or-restart nginx"
    ) < calls.index("systemctl disable --now gateway@9001")
    assert not stage.path("/etc/systemd/system/gateway@.service").exists()
    assert stage.path("/etc/systemd/system/gateway.service").exists()
