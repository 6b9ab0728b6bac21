"""A real nginx (Debian's package) in front of the gateway, run by the tests.

It serves the shipped site, `systemd/nginx-gateway.conf` with the `proxy.conf` and `local.conf`
it includes, with only their ports and paths rewritten (and, for TLS, the template in
local.conf filled in as an operator would), from a temp dir, as a foreground process
(`daemon off`) that the fixture stops.
"""

from __future__ import annotations

import asyncio
import importlib.machinery
import importlib.util
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "systemd" / "nginx-gateway.conf"
PROXY = ROOT / "systemd" / "nginx-proxy.conf"
LOCAL = ROOT / "systemd" / "nginx-local.conf"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
INSTALLED = "/etc/nginx/gateway/"


@dataclass
class TLS:
    cert: Path
    key: Path
    port: int
    # The plain-HTTP server of the template (port 80 on every interface, redirecting).
    redirect_port: int = 0


def _sub(pattern: str, repl: str, text: str, name: str = SITE.name) -> str:
    out, n = re.subn(pattern, repl, text, flags=re.MULTILINE)
    if not n:  # the shipped file changed shape: say so rather than test something else
        raise AssertionError(f"{name}: {pattern!r} not found")
    return out


def local_config(tls: TLS | None) -> str:
    """The operator's local.conf: as shipped (all commented out), or with the TLS template
    filled in as the operator would (listeners on the test's ports, loopback only)."""
    text = LOCAL.read_text()
    if tls is None:
        return text
    block = re.search(r"^# BEGIN TLS\n(.*?)^# END TLS$", text, re.MULTILINE | re.DOTALL)
    assert block, "no TLS block to fill in"
    filled = re.sub(r"^#", "", block.group(1), flags=re.MULTILINE)
    name = LOCAL.name
    filled = _sub(r"^    listen 443 ssl http2;$",
                  f"    listen 127.0.0.1:{tls.port} ssl http2;", filled, name)
    filled = _sub(r"^    listen \[::\]:443 ssl http2;\n", "", filled, name)
    filled = _sub(r"^    listen 80;$", f"    listen 127.0.0.1:{tls.redirect_port};", filled, name)
    filled = _sub(r"^    listen \[::\]:80;\n", "", filled, name)
    filled = _sub(r"ssl_certificate .*;", f"ssl_certificate {tls.cert};", filled, name)
    filled = _sub(r"ssl_certificate_key .*;", f"ssl_certificate_key {tls.key};", filled, name)
    return text[: block.start()] + filled + text[block.end():]


def site_config(gateway_port: int, listen_port: int, includes: Path) -> str:
    """The shipped site with the test's ports (IPv4 loopback only) and its includes in
    `includes` instead of /etc/nginx/gateway/."""
    text = SITE.read_text()
    text = _sub(r"server 127\.0\.0\.1:8080;", f"server 127.0.0.1:{gateway_port};", text)
    text = _sub(r"^    listen 127\.0\.0\.1:80;$", f"    listen 127.0.0.1:{listen_port};", text)
    text = _sub(r"^    listen \[::1\]:80;\n", "", text)
    return text.replace(INSTALLED, f"{includes}/")


def write_site(
    tmp: Path,
    gateway_port: int,
    listen_port: int,
    tls: TLS | None,
    instance_ports: Sequence[int] = (),
) -> Path:
    """The site, proxy.conf and local.conf as installed, under tmp; returns the site. With
    `instance_ports`, the several-instances site `gatewayctl site --ports` makes."""
    includes = tmp / "gateway"
    includes.mkdir()
    (includes / "proxy.conf").write_text(PROXY.read_text())
    (includes / "local.conf").write_text(local_config(tls).replace(INSTALLED, f"{includes}/"))
    site = tmp / "gateway-site.conf"
    text = site_config(gateway_port, listen_port, includes)
    if instance_ports:
        text = _gatewayctl().instances_site(text, list(instance_ports))
    site.write_text(text)
    return site


def _gatewayctl() -> Any:
    """systemd/gatewayctl (a script, not a module) loaded as one."""
    loader = importlib.machinery.SourceFileLoader("gatewayctl", str(ROOT / "systemd/gatewayctl"))
    spec = importlib.util.spec_from_loader("gatewayctl", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def main_config(tmp: Path, site: Path) -> str:
    # Workers run as the master's user when it is root (the temp dir is private to us).
    user = "user root;\n" if os.geteuid() == 0 else ""
    temps = "".join(
        f"    {name}_temp_path {tmp / name};\n"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        f"{user}worker_processes 1;\n"
        f"pid {tmp / 'nginx.pid'};\n"
        f"error_log {tmp / 'error.log'} info;\n"
        "events { worker_connections 512; }\n"
        "http {\n"
        f"    access_log {tmp / 'access.log'};\n"
        f"{temps}"
        f"    include {site};\n"
        "}\n"
    )


class Nginx:
    def __init__(
        self, tmp: Path, gateway_port: int, port: int, tls: TLS | None = None,
        instance_ports: Sequence[int] = (),
    ) -> None:
        self.tmp = tmp
        self.port = port
        self.tls = tls
        site = write_site(tmp, gateway_port, port, tls, instance_ports)
        self.conf = tmp / "nginx.conf"
        self.conf.write_text(main_config(tmp, site))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def access_log(self) -> str:
        return (self.tmp / "access.log").read_text()

    def _argv(self, *extra: str) -> list[str]:
        return [NGINX, "-e", str(self.tmp / "error.log"), "-p", str(self.tmp), "-c", str(self.conf),
                *extra]

    async def start(self) -> None:
        check = subprocess.run(self._argv("-t"), capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        self.proc = subprocess.Popen(self._argv("-g", "daemon off;"))
        async with asyncio.timeout(10):  # nothing announces the listener: poll it
            while True:
                assert self.proc.poll() is None, (self.tmp / "error.log").read_text()
                try:
                    _, w = await asyncio.open_connection("127.0.0.1", self.port)
                except OSError:
                    await asyncio.sleep(0.02)
                    continue
                w.close()
                await w.wait_closed()
                return

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
