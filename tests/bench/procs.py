"""The processes a benchmark run starts (upstream, gateway, nginx) and what /proc says of them."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SITE_CONFIG = ROOT / "systemd" / "nginx-gateway.conf"
PROXY_CONFIG = ROOT / "systemd" / "nginx-proxy.conf"


def shipped_site() -> str:
    """The shipped site with its proxy.conf inlined and the operator's local.conf (TLS,
    public listeners) left out: what serves on loopback once installed."""
    text = SITE_CONFIG.read_text()
    text = text.replace("include /etc/nginx/gateway/proxy.conf;", PROXY_CONFIG.read_text())
    return text.replace("include /etc/nginx/gateway/local.conf;", "")
CLK_TCK = os.sysconf("SC_CLK_TCK")
BENCH_KEY = "gw-bench-0123456789abcdefghijklmnopqrstuvwxyzABCD"
UPSTREAM_KEY = "sk-bench-upstream-0123456789abcdef"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process (all its threads), from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                out.append(int(entry))
    return out


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout} s")


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


@dataclass
class Proxy:
    """A running proxy under test: where it listens and the pids whose CPU and RSS count."""

    name: str
    port: int
    proc: subprocess.Popen[bytes] | None = None
    pids: list[int] = field(default_factory=list)

    def cpu(self) -> float:
        return sum(cpu_seconds(p) for p in self.pids)

    def rss(self) -> int:
        return sum(rss_bytes(p) for p in self.pids)

    def close(self) -> None:
        stop(self.proc)


def settle(proxy: Proxy, sink: int | None = None) -> float:
    """Wait for `proxy` to go quiet after a run; its CPU seconds then.

    The traced gateway ("gateway+otel") exports its spans once a second after the load, and
    the OTLP sink (pid `sink`) decodes them: that is its work too, so it waits over a whole
    export period (and then some) with no CPU used by either.
    """
    busy = [proxy.cpu]
    if proxy.name == "gateway+otel" and sink is not None:
        busy.append(lambda: cpu_seconds(sink))
    window = 1.2 if proxy.name == "gateway+otel" else 0.2
    deadline = time.monotonic() + 10
    before = [f() for f in busy]
    while time.monotonic() < deadline:
        time.sleep(window)
        now = [f() for f in busy]
        if now == before:
            break
        before = now
    return proxy.cpu()


_H2LOAD_CODES = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")


def h2load_2xx(out: str) -> int:
    """How many of an h2load run's requests were answered 2xx (0 when it printed none)."""
    codes = _H2LOAD_CODES.search(out)
    return int(codes.group(1)) if codes else 0


def start_upstream(
    tmp: Path, module: str = "tests.bench.upstream"
) -> tuple[subprocess.Popen[bytes], int]:
    """The bench upstream (or another helper server `module` taking --port/--port-file)."""
    port_file = tmp / f"{module.rsplit('.', 1)[-1]}.port"
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "--port", "0", "--port-file", str(port_file)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 15
    while not port_file.exists() or not port_file.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"{module} did not start")
        time.sleep(0.05)
    return proc, int(port_file.read_text())


def gateway_config(upstream_port: int, port: int, traces: str = "") -> str:
    """The real configuration: auth on (one key), limits on but high, JSON access log, metrics;
    with `traces` (an OTLP/HTTP URL), every request traced (sample ratio 1) and exported."""
    sha = hashlib.sha256(BENCH_KEY.encode()).hexdigest()
    return f"""\
[server]
host = "127.0.0.1"
port = {port}
shutdown_grace = 2

[auth]
mode = "keys"

[[auth.keys]]
client = "bench"
sha256 = "{sha}"
rpm = 60000000
tpm = 0
max_concurrent = 20000
models = ["*"]

[limits]
backend = "memory"
per_ip_rpm = 60000000

[[upstreams]]
name = "bench"
base_url = "http://127.0.0.1:{upstream_port}/v1"
api_key = "${{BENCH_UPSTREAM_KEY}}"
max_connections = 20000
idle_timeout = 120.0
pass_headers = ["x-mock-*"]

[logging]
level = "info"
format = "json"

[metrics]
path = "/metrics"
allow = ["127.0.0.1/32"]

[tracing]
endpoint = "{traces}"
sample_ratio = 1.0
"""


def start_gateway(
    tmp: Path,
    upstream_port: int,
    tag: str,
    *,
    traces: str = "",
    name: str = "gateway",
) -> Proxy:
    """`gateway serve` on an OS-chosen port; its JSON log (access lines too) goes to a file."""
    cfg = tmp / "gateway.toml"
    port = free_port()
    cfg.write_text(gateway_config(upstream_port, port, traces))
    log_path = tmp / f"gateway-{tag}.log"
    env = {**os.environ, "BENCH_UPSTREAM_KEY": UPSTREAM_KEY}
    cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(cfg)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env
        )
    try:
        wait_port(port, proc, timeout=20)
    except RuntimeError as exc:
        stop(proc)
        raise RuntimeError(f"the gateway did not start ({exc}); see {log_path}") from None
    return Proxy(name, port, proc, [proc.pid])


def start_floor(upstream_port: int) -> Proxy:
    """The bare aiohttp relay (tests/bench/floor.py): what the framework alone costs."""
    port = free_port()
    cmd = [sys.executable, "-m", "tests.bench.floor", "--port", str(port)]
    cmd += ["--upstream", f"http://127.0.0.1:{upstream_port}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
    except RuntimeError:
        stop(proc)
        raise
    return Proxy("aiohttp", port, proc, [proc.pid])


_NGINX_MAIN = """\
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 20000;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 20000; }}
http {{
    access_log {tmp}/nginx-access.log;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {tmp}/site.conf;
}}
"""

# An SSE reverse proxy the way the gateway's own site config sets one up; used until
# systemd/nginx-gateway.conf exists (or when it cannot be adapted).
_NGINX_SITE = """\
upstream bench_upstream {{
    server 127.0.0.1:{upstream};
    keepalive 512;
}}
server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
        proxy_pass http://bench_upstream;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_buffering off;
        proxy_cache off;
        proxy_read_timeout 3600s;
    }}
}}
"""


def adapt_site(text: str, tmp: Path, port: int, upstream: int) -> str:
    """The shipped site config pointed at the bench upstream: upstream servers, one plain
    listener on `port`, logs in `tmp`; TLS listeners and certificates dropped."""
    text = re.sub(r"(?m)^\s*#.*$", "", text)
    text = re.sub(r"(?m)^(\s*server\s+)[^;{]+;", rf"\g<1>127.0.0.1:{upstream};", text)
    text = re.sub(r"(?m)^\s*ssl_[a-z_]+\s[^;]*;", "", text)
    text = re.sub(r"(?m)^\s*listen\s[^;]*(ssl|443|\[::\])[^;]*;", "", text)
    text = re.sub(
        r"(?m)^(\s*)listen\s[^;]*;", rf"\g<1>listen 127.0.0.1:{port} backlog=4096;", text, count=1
    )
    text = re.sub(r"(?m)^\s*listen\s[^;]*;(?=[\s\S]*listen 127)", "", text)
    text = re.sub(r"(access_log|error_log)\s+[^\s;]+", rf"\1 {tmp}/nginx-\1.log", text)
    return text


def start_nginx(tmp: Path, upstream_port: int) -> tuple[Proxy, str]:
    """nginx as a foreground process with one worker; returns it and which site config it runs."""
    ntmp = tmp / "nginx"
    ntmp.mkdir(exist_ok=True)
    os.chmod(tmp, 0o755)
    os.chmod(ntmp, 0o755)
    port = free_port()
    (ntmp / "nginx.conf").write_text(_NGINX_MAIN.format(tmp=ntmp))
    source = "generated minimal SSE proxy config"
    site = _NGINX_SITE.format(upstream=upstream_port, port=port)
    if SITE_CONFIG.exists():
        (ntmp / "site.conf").write_text(
            adapt_site(shipped_site(), ntmp, port, upstream_port)
        )
        check = subprocess.run(
            [
                NGINX,
                "-t",
                "-q",
                "-p",
                str(ntmp),
                "-c",
                str(ntmp / "nginx.conf"),
                "-e",
                str(ntmp / "nginx-error.log"),
            ],
            capture_output=True,
        )
        if check.returncode == 0:
            site, source = (
                (ntmp / "site.conf").read_text(),
                f"{SITE_CONFIG.relative_to(ROOT)} (adapted)",
            )
        else:
            print(
                f"note: {SITE_CONFIG} could not be adapted ({check.stderr.decode().strip()}); "
                "using a generated config",
                flush=True,
            )
    (ntmp / "site.conf").write_text(site)
    proc = subprocess.Popen(
        [
            NGINX,
            "-p",
            str(ntmp),
            "-c",
            str(ntmp / "nginx.conf"),
            "-e",
            str(ntmp / "nginx-error.log"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(port, proc)
    time.sleep(0.2)
    workers = children(proc.pid)
    return Proxy("nginx", port, proc, [proc.pid, *workers]), source


def ensure_tools() -> None:
    """h2load (nghttp2-client) and nginx, installed with apt-get when missing."""
    missing = [
        pkg
        for tool, pkg in (("h2load", "nghttp2-client"), ("nginx", "nginx"))
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists()
    ]
    if not missing:
        return
    print(
        f"bench: {' and '.join(missing)} missing; installing with apt-get "
        "(h2load drives the load, nginx is the floor we compare against)",
        flush=True,
    )
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        [*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
        check=True,
        env=env,
    )
    # Debian starts the packaged nginx service on install; the bench runs its own.
    subprocess.run(
        [*sudo, "systemctl", "disable", "--now", "nginx"],
        check=False,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
