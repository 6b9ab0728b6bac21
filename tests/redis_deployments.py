"""Redis as people deploy it, started by the test session from Debian's binaries.

- `tls_redis`: one `redis-server` listening only on TLS (`--port 0 --tls-port P`), client
  certificates required, an ACL user with a password; the CA, server and client certificates
  are made with `openssl` in a temp dir.
- `sentinel_group`: a master, one replica and three `redis-sentinel`s watching it with short
  timeouts, so a killed master is replaced in a few seconds.
- `redis_cluster`: three masters with `--cluster-enabled yes`, joined by
  `redis-cli --cluster create`.

Each waits until the deployment answers as a client would see it; the tests are skipped only
when the binaries are missing (CI installs redis-server and redis-sentinel).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.redis_server import REDIS_SERVER, _free_port

REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
REDIS_SENTINEL = shutil.which("redis-sentinel") or "/usr/bin/redis-sentinel"
OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"


def _need(*paths: str) -> None:
    for p in paths:
        if not Path(p).exists():
            pytest.skip(f"{p} is not installed (apt-get install redis-server redis-sentinel)")


def _wait(pred: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not reached in {timeout} s")
        time.sleep(0.05)


@dataclass
class Proc:
    """One redis-server or redis-sentinel process and its log."""

    port: int
    dir: Path
    args: list[str]
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            self.args,
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def alive(self) -> bool:
        """Running; a process that exited at start raises with its log."""
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"{self.args[0]} on port {self.port} exited:\n{self.log()}")
        return True

    def log(self) -> str:
        p = self.dir / "log"
        return p.read_text(errors="replace")[-3000:] if p.exists() else ""


def cli(port: int, *args: str, tls: list[str] | None = None) -> str:
    """One redis-cli command; its output (stderr too: a failed ping is an answer)."""
    out = subprocess.run(
        [REDIS_CLI, "-h", "127.0.0.1", "-p", str(port), *(tls or []), *args],
        capture_output=True,
        timeout=10,
        check=False,
    )
    return (out.stdout + out.stderr).decode(errors="replace").strip()


def _server(port: int, d: Path, *extra: str) -> Proc:
    args = [
        REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d),
        "--save", "", "--appendonly", "no", "--protected-mode", "no",
        "--loglevel", "notice", "--logfile", str(d / "log"), *extra,
    ]  # fmt: skip
    return Proc(port, d, args)


# ------------------------------------------------------------------------------------ TLS


@dataclass
class TLSRedis:
    port: int
    ca: Path
    cert: Path
    key: Path
    user: str
    password: str
    proc: Proc

    def cli_args(self) -> list[str]:
        """redis-cli's arguments to reach it."""
        return ["--tls", "--cacert", str(self.ca), "--cert", str(self.cert), "--key",
                str(self.key), "--user", self.user, "--pass", self.password,
                "--no-auth-warning"]  # fmt: skip

    @property
    def url(self) -> str:
        return f"rediss://{self.user}:{self.password}@127.0.0.1:{self.port}/0"


def make_certs(d: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it."""

    def run(*args: str) -> None:
        subprocess.run([OPENSSL, *args], cwd=d, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test CA",
        "-keyout", "ca.key", "-out", "ca.crt")  # fmt: skip
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for who in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={who}",
            "-keyout", f"{who}.key", "-out", f"{who}.csr")  # fmt: skip
        run("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{who}.ext",
            "-out", f"{who}.crt")  # fmt: skip
    return {n: d / n for n in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


@pytest.fixture(scope="module")
def tls_redis() -> Iterator[TLSRedis]:
    """A TLS-only Redis asking for client certificates, with an ACL user and password."""
    _need(REDIS_SERVER, REDIS_CLI, OPENSSL)
    with tempfile.TemporaryDirectory(prefix="gw-redis-tls-") as tmp:
        d = Path(tmp)
        c = make_certs(d)
        port = _free_port()
        proc = _server(
            0, d / "data",
            "--port", "0", "--tls-port", str(port),
            "--tls-cert-file", str(c["server.crt"]), "--tls-key-file", str(c["server.key"]),
            "--tls-ca-cert-file", str(c["ca.crt"]), "--tls-auth-clients", "yes",
            "--user", "default", "off",
            "--user", "gw", "on", ">s3cret-pw", "~*", "&*", "+@all",
        )  # fmt: skip
        proc.start()
        server = TLSRedis(port, c["ca.crt"], c["client.crt"], c["client.key"], "gw", "s3cret-pw",
                          proc)  # fmt: skip
        tls = server.cli_args()
        try:
            _wait(lambda: cli(port, "PING", tls=tls) == "PONG", "TLS redis ping")
            yield server
        finally:
            proc.kill()


# ------------------------------------------------------------------------------- Sentinel


@dataclass
class SentinelGroup:
    master: Proc
    replica: Proc
    sentinels: list[Proc]
    name: str = "mymaster"

    @property
    def sentinel_addrs(self) -> list[str]:
        return [f"127.0.0.1:{s.port}" for s in self.sentinels]

    def master_port(self) -> int | None:
        """The master's port as the sentinels say (the first that answers)."""
        for s in self.sentinels:
            out = cli(s.port, "SENTINEL", "get-master-addr-by-name", self.name).split()
            if len(out) == 2 and out[1].isdigit():
                return int(out[1])
        return None

    def ready(self) -> bool:
        """Every sentinel knows the replica and the two other sentinels."""
        for s in self.sentinels:
            if "name" not in cli(s.port, "SENTINEL", "replicas", self.name):
                return False
            if cli(s.port, "SENTINEL", "sentinels", self.name).count("runid") < 2:
                return False
        return "master_link_status:up" in cli(self.replica.port, "INFO", "replication")


@pytest.fixture
def sentinel_group() -> Iterator[SentinelGroup]:
    """One master, one replica, three sentinels; failover in a few seconds."""
    _need(REDIS_SERVER, REDIS_SENTINEL, REDIS_CLI)
    with tempfile.TemporaryDirectory(prefix="gw-sentinel-") as tmp:
        d = Path(tmp)
        mport, rport = _free_port(), _free_port()
        master = _server(mport, d / "master")
        replica = _server(rport, d / "replica", "--replicaof", "127.0.0.1", str(mport))
        sentinels = []
        for i in range(3):
            port = _free_port()
            sd = d / f"sentinel{i}"
            sd.mkdir()
            conf = sd / "sentinel.conf"  # sentinel rewrites its config: one file each
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {sd}\n"
                f"logfile {sd / 'log'}\n"
                f"sentinel monitor mymaster 127.0.0.1 {mport} 2\n"
                "sentinel down-after-milliseconds mymaster 1000\n"
                "sentinel failover-timeout mymaster 4000\n"
                "sentinel parallel-syncs mymaster 1\n"
            )
            sentinels.append(Proc(port, sd, [REDIS_SENTINEL, str(conf)]))
        group = SentinelGroup(master, replica, sentinels)
        procs = [master, replica, *sentinels]
        try:
            for p in procs:
                p.start()
            _wait(group.ready, "sentinel group discovery", timeout=30)
            yield group
        finally:
            for p in procs:
                p.kill()


# -------------------------------------------------------------------------------- Cluster


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is a free port too."""
    while True:
        port = _free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


@dataclass
class Cluster:
    nodes: list[Proc] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def ok(self) -> bool:
        return all("cluster_state:ok" in cli(n.port, "CLUSTER", "INFO") for n in self.nodes)

    def flush(self) -> None:
        for n in self.nodes:
            cli(n.port, "FLUSHALL")


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[Cluster]:
    """Three masters sharing the 16384 slots, no replicas."""
    _need(REDIS_SERVER, REDIS_CLI)
    with tempfile.TemporaryDirectory(prefix="gw-cluster-") as tmp:
        d = Path(tmp)
        cluster = Cluster()
        for i in range(3):
            port = _cluster_port()
            cluster.nodes.append(_server(
                port, d / f"node{i}", "--cluster-enabled", "yes",
                "--cluster-config-file", str(d / f"node{i}" / "nodes.conf"),
                "--cluster-node-timeout", "2000",
            ))  # fmt: skip
        try:
            for n in cluster.nodes:
                n.start()
            for n in cluster.nodes:
                _wait(lambda n=n: n.alive() and cli(n.port, "PING") == "PONG", "node ping")
            out = subprocess.run(
                [REDIS_CLI, "--cluster", "create",
                 *(f"127.0.0.1:{n.port}" for n in cluster.nodes),
                 "--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True, timeout=60, check=False,
            )  # fmt: skip
            assert out.returncode == 0, out.stdout.decode() + out.stderr.decode()
            _wait(cluster.ok, "cluster_state:ok", timeout=30)
            yield cluster
        finally:
            for n in cluster.nodes:
                n.kill()
