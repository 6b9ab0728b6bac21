"""A real nginx (Debian's package) in front of the gateway, run by the tests.

It serves the shipped site, `systemd/nginx-gateway.conf`, with only its ports (and, for the
TLS block, its certificate paths) rewritten, from a temp dir, as a foreground process
(`daemon off`) that the fixture stops.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "systemd" / "nginx-gateway.conf"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


@dataclass
class TLS:
    cert: Path
    key: Path
    port: int


def _sub(pattern: str, repl: str, text: str) -> str:
    out, n = re.subn(pattern, repl, text, flags=re.MULTILINE)
    if not n:  # the shipped file changed shape: say so rather than test something else
        raise AssertionError(f"{SITE.name}: {pattern!r} not found")
    return out


def site_config(gateway_port: int, listen_port: int, tls: TLS | None = None) -> str:
    """The shipped site with the test's ports (IPv4 loopback only)."""
    text = SITE.read_text()
    text = _sub(r"server 127\.0\.0\.1:8080;", f"server 127.0.0.1:{gateway_port};", text)
    text = _sub(r"^    listen 80;$", f"    listen 127.0.0.1:{listen_port};", text)
    text = _sub(r"^    listen \[::\]:80;\n", "", text)
    if tls is not None:
        block = re.search(r"^# BEGIN TLS\n(.*?)^# END TLS$", text, re.MULTILINE | re.DOTALL)
        assert block, "no TLS block to fill in"
        filled = re.sub(r"^#", "", block.group(1), flags=re.MULTILINE)
        filled = _sub(
            r"^    listen 443 ssl http2;$", f"    listen 127.0.0.1:{tls.port} ssl http2;", filled
        )
        filled = _sub(r"^    listen \[::\]:443 ssl http2;\n", "", filled)
        filled = _sub(r"ssl_certificate .*;", f"ssl_certificate {tls.cert};", filled)
        filled = _sub(r"ssl_certificate_key .*;", f"ssl_certificate_key {tls.key};", filled)
        text = text[: block.start()] + filled + text[block.end():]
    return text


INSTANCES_SITE = ROOT / "systemd" / "nginx-gateway-instances.conf"


def instances_site_config(gateway_ports: list[int], listen_port: int) -> str:
    """The shipped several-instances site with the test's ports (IPv4 loopback only)."""
    text = INSTANCES_SITE.read_text()
    servers = re.findall(r"^    server 127\.0\.0\.1:\d+ (.*);$", text, re.MULTILINE)
    if not servers:
        raise AssertionError(f"{INSTANCES_SITE.name}: no server lines")
    lines = "".join(f"    server 127.0.0.1:{p} {servers[0]};\n" for p in gateway_ports)
    text = re.sub(r"(^    server 127\.0\.0\.1:\d+ .*;\n)+", lambda _: lines, text, count=1,
                  flags=re.MULTILINE)  # fmt: skip
    text = _sub(r"^    listen 80;$", f"    listen 127.0.0.1:{listen_port};", text)
    return _sub(r"^    listen \[::\]:80;\n", "", text)


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
        site_text: str | None = None,
    ) -> None:
        self.tmp = tmp
        self.port = port
        self.tls = tls
        site = tmp / "gateway-site.conf"
        if site_text is None:
            site_text = site_config(gateway_port, port, tls)
        site.write_text(site_text)
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
