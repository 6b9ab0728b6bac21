"""Soak driver: mixed traffic at steady concurrency against a gateway subprocess, then checks.

    python -m tests.soak.driver --seconds 600 [--concurrency 24] [--seed 9]

Traffic (seeded): streams read to the end, JSON answers, streams the client drops after two
events, detached streams (POST /v1/streams then EventSource-style GETs, some resumed with
Last-Event-ID) when the gateway has them, /v1/models, bad requests, and ~5% upstream faults
injected through the bundled mock's x-mock-* headers (503, a stream cut mid-body, a first
byte later than the timeout).

Afterwards, checked and printed as one JSON summary (exit 1 if any check fails):
- every request the driver sent has exactly one access-log line, with the expected outcome;
- /metrics (when the gateway serves it) counts at least every request sent;
- no asyncio task more than before the load (probe: tests/soak/serve_probe.py, SIGUSR1);
- no upstream connection in use (the mock has no open stream) and none beyond the pool's
  idle ones (counted from /proc/PID/fd and /proc/PID/net/tcp); none in CLOSE_WAIT;
- RSS growth under 10% from the end of the warm-up to the end of the run.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from gateway.mock_upstream import MOCK_STATE, MockSettings, create_mock_app

KEY = "gw-soak-key-" + "s" * 40
UPSTREAM_KEY = "sk-soak-upstream-0123456789abcdef"
ROOT = Path(__file__).resolve().parents[2]

# kind -> (weight, expected outcomes in the access log)
KINDS: dict[str, tuple[float, set[str]]] = {
    "stream": (40, {"completed"}),
    "json": (20, {"completed"}),
    "disconnect": (10, {"client_disconnected", "completed"}),
    "detached": (10, {"completed"}),
    "models": (5, {"completed"}),
    "bad_request": (10, {"rejected"}),
    "fault_503": (5 / 3, {"upstream_error"}),
    "fault_cut": (5 / 3, {"upstream_error"}),
    "fault_slow": (5 / 3, {"timeout"}),
    "detached_get": (0, {"completed", "client_disconnected"}),  # sent by "detached"
}
FAULTS = {"fault_503", "fault_cut", "fault_slow"}


@dataclass
class Run:
    sent: dict[str, str] = field(default_factory=dict)  # request id -> kind
    kinds: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # driver-side surprises
    detached: bool = False
    n: int = 0

    def rid(self, kind: str) -> str:
        self.n += 1
        rid = f"soak-{self.n}"
        self.sent[rid] = kind
        self.kinds[kind] += 1
        return rid


def chat(stream: bool, words: str = "soak test") -> dict[str, Any]:
    return {"model": "mock-gpt", "stream": stream, "messages": [{"role": "user", "content": words}]}


async def one(http: aiohttp.ClientSession, base: str, run: Run, kind: str) -> int:
    auth = {"Authorization": f"Bearer {KEY}"}
    h = {**auth, "X-Request-ID": run.rid(kind)}
    url = f"{base}/v1/chat/completions"
    if kind == "stream":
        async with http.post(url, json=chat(True), headers=h) as r:
            body = await r.read()
            if not body.endswith(b"data: [DONE]\n\n"):
                run.errors["stream_without_done"] += 1
    elif kind == "json":
        async with http.post(url, json=chat(False), headers=h) as r:
            await r.json()
    elif kind == "disconnect":
        r = await http.post(url, json=chat(True), headers={**h, "x-mock-delay": "0.05"})
        await r.content.readuntil(b"\n\n")
        await r.content.readuntil(b"\n\n")
        r.close()  # drop the connection mid-stream
    elif kind == "detached":
        return await detached(http, base, run, h)
    elif kind == "models":
        async with http.get(f"{base}/v1/models", headers=h) as r:
            await r.read()
    elif kind == "bad_request":
        bad = {**h, "Content-Type": "application/json"}
        async with http.post(url, data=b'{"model": "x", "messages": []}', headers=bad) as r:
            await r.read()
    elif kind == "fault_503":
        async with http.post(url, json=chat(False), headers={**h, "x-mock-status": "503"}) as r:
            await r.read()
    elif kind == "fault_cut":
        async with http.post(url, json=chat(True), headers={**h, "x-mock-fail-after": "3"}) as r:
            await r.read()
    elif kind == "fault_slow":
        async with http.post(
            url, json=chat(True), headers={**h, "x-mock-first-byte-delay": "3"}
        ) as r:
            await r.read()
    return r.status


async def detached(http: aiohttp.ClientSession, base: str, run: Run, h: dict[str, str]) -> int:
    """POST /v1/streams, then read it as EventSource would; half the time drop and resume."""
    async with http.post(f"{base}/v1/streams", json=chat(True), headers=h) as r:
        created = await r.json()
        if r.status != 201:
            return r.status
    last = None
    resumes = 0
    while True:
        gh = {"X-Request-ID": run.rid("detached_get"), "Accept": "text/event-stream"}
        if last is not None:
            gh["Last-Event-ID"] = last
        async with http.get(base + created["url"], headers=gh) as r:
            if r.status == 204:
                return 201
            drop = resumes == 0 and random.random() < 0.5
            while line := await r.content.readline():
                if line.startswith(b"id: "):
                    last = line[4:].strip().decode()
                if line.startswith(b"event: ") and line[7:].strip() in (b"done", b"fail"):
                    await r.content.readline()
                    return 201
                if drop and last is not None:
                    break
            resumes += 1
            if resumes > 3:
                run.errors["detached_never_finished"] += 1
                return 201


async def worker(
    http: aiohttp.ClientSession, base: str, run: Run, until: float, rng: random.Random
) -> None:
    kinds = [k for k in KINDS if run.detached or k != "detached"]
    weights = [KINDS[k][0] for k in kinds]
    while time.monotonic() < until:
        kind = rng.choices(kinds, weights)[0]
        try:
            run.statuses[await one(http, base, run, kind)] += 1
        except (TimeoutError, aiohttp.ClientError) as exc:
            if kind != "disconnect":
                run.errors[f"{kind}:{type(exc).__name__}"] += 1


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def sockets(pid: int, port: int, *, remote: bool) -> Counter[str]:
    """States of `pid`'s TCP sockets whose remote (or local) port is `port`."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if m := re.fullmatch(r"socket:\[(\d+)\]", target):
            inodes.add(m.group(1))
    states = {"01": "ESTABLISHED", "06": "TIME_WAIT", "08": "CLOSE_WAIT", "0A": "LISTEN"}
    out: Counter[str] = Counter()
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for row in path.read_text().splitlines()[1:]:
            f = row.split()
            local, peer, state, inode = f[1], f[2], f[3], f[9]
            p = int((peer if remote else local).rsplit(":", 1)[1], 16)
            if inode in inodes and p == port:
                out[states.get(state, state)] += 1
    return out


async def probe_tasks(proc: asyncio.subprocess.Process, err_path: Path) -> dict[str, Any]:
    before = err_path.read_text().count('"probe"')
    proc.send_signal(signal.SIGUSR1)
    for _ in range(100):
        await asyncio.sleep(0.05)
        lines = [x for x in err_path.read_text().splitlines() if '"probe"' in x]
        if len(lines) > before:
            found: dict[str, Any] = json.loads(lines[-1])
            return found
    return {"count": -1, "names": {}}


async def wait_port(path: Path, proc: asyncio.subprocess.Process) -> int:
    for _ in range(400):
        for line in path.read_text().splitlines():
            if '"listening"' in line:
                return int(json.loads(line)["port"])
        if proc.returncode is not None:
            break
        await asyncio.sleep(0.05)
    raise RuntimeError("gateway did not start: " + path.read_text()[-2000:])


def config_text(upstream: str) -> str:
    sha = hashlib.sha256(KEY.encode()).hexdigest()
    return f"""
[server]
host = "127.0.0.1"
port = 0
shutdown_grace = 2
[sse]
heartbeat_interval = 5.0
# Ended detached streams stay replayable for resume_ttl (600 s by default): memory held by
# design, growing for that long. A short ttl reaches that steady state within the warm-up,
# so RSS growth after it measures leaks, not retention.
resume_ttl = 5
[auth]
mode = "keys"
[[auth.keys]]
client = "soak"
sha256 = "{sha}"
rpm = 0
max_concurrent = 0
[limits]
per_ip_rpm = 0
[[upstreams]]
name = "mock"
base_url = "{upstream}"
api_key = "${{SOAK_UPSTREAM_KEY}}"
first_byte_timeout = 2.0
idle_timeout = 5.0
pass_headers = ["x-mock-*"]
[retry]
attempts = 2
backoff_initial = 0.05
backoff_max = 0.2
[breaker]
failure_threshold = 100000
cooldown = 1.0
[logging]
level = "info"
format = "json"
"""


async def soak(
    seconds: float, concurrency: int, seed: int, warmup: float | None = None
) -> dict[str, Any]:
    random.seed(seed)
    mock = create_mock_app(MockSettings(chunks=8, delay=0.005, api_key=UPSTREAM_KEY))
    runner = web.AppRunner(mock, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    mock_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    work = Path(tempfile.mkdtemp(prefix="gateway-soak-"))
    (work / "config.toml").write_text(config_text(f"http://127.0.0.1:{mock_port}/v1"))
    out_path, err_path = work / "stdout.log", work / "stderr.log"
    env = {**os.environ, "SOAK_UPSTREAM_KEY": UPSTREAM_KEY, "PYTHONUNBUFFERED": "1"}
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.soak.serve_probe",
            "--config",
            str(work / "config.toml"),
            stdout=out,
            stderr=err,
            env=env,
            cwd=ROOT,
        )
    summary: dict[str, Any] = {
        "seconds": seconds,
        "concurrency": concurrency,
        "seed": seed,
        "logs": str(work),
    }
    try:
        port = await wait_port(out_path, proc)
        base = f"http://127.0.0.1:{port}"
        run = Run()
        connector = aiohttp.TCPConnector(limit=concurrency * 2)
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=30)
        ) as http:
            async with http.post(
                f"{base}/v1/streams", json=chat(True), headers={"Authorization": f"Bearer {KEY}"}
            ) as r:
                run.detached = r.status == 201
                if run.detached:  # read it to its end so it does not linger
                    url = (await r.json())["url"]
                    async with http.get(base + url) as g:
                        await g.read()
            tasks0 = await probe_tasks(proc, err_path)
            warm = min(60.0, seconds * 0.25) if warmup is None else warmup
            t0 = time.monotonic()
            rng = random.Random(seed)
            workers = [
                asyncio.create_task(
                    worker(http, base, run, t0 + seconds, random.Random(rng.random()))
                )
                for _ in range(concurrency)
            ]
            await asyncio.sleep(warm)
            rss_warm = rss(proc.pid)
            peak = rss_warm
            while not all(w.done() for w in workers):
                await asyncio.sleep(1)
                peak = max(peak, rss(proc.pid))
            await asyncio.gather(*workers)
            rss_end = rss(proc.pid)
        await asyncio.sleep(1.5)  # let cancelled streams and closed connections settle
        tasks1 = await probe_tasks(proc, err_path)
        upstream_socks = sockets(proc.pid, mock_port, remote=True)
        client_socks = sockets(proc.pid, port, remote=False)
        metrics: Counter[str] | None = None  # requests_total by status, as scraped
        async with aiohttp.ClientSession() as http, http.get(f"{base}/metrics") as r:
            if r.status == 200:
                metrics = Counter()
                pattern = r'^gateway_requests_total\{.*status="(\d+)".*\} ([0-9.e+]+)$'
                for m in re.finditer(pattern, await r.text(), re.MULTILINE):
                    metrics[m.group(1)] += int(float(m.group(2)))
        state = mock[MOCK_STATE]
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 30)
        await runner.cleanup()

    access = [json.loads(x) for x in out_path.read_text().splitlines() if '"access"' in x]
    by_rid: dict[str, list[dict[str, Any]]] = {}
    for line in access:
        by_rid.setdefault(line.get("request_id", ""), []).append(line)
    missing = [rid for rid in run.sent if rid not in by_rid]
    doubled = [rid for rid in run.sent if len(by_rid.get(rid, [])) > 1]
    wrong: Counter[str] = Counter()
    for rid, kind in run.sent.items():
        expected = KINDS.get(kind, (0, {"completed"}))[1]
        for line in by_rid.get(rid, []):
            if line.get("outcome") not in expected:
                wrong[f"{kind}->{line.get('outcome')}/{line.get('status')}"] += 1
    outcomes = Counter(line.get("outcome") for line in access)
    growth = (rss_end - rss_warm) / rss_warm if rss_warm else 0.0
    idle_limit = concurrency * 2
    leaks = {
        "tasks": max(0, tasks1["count"] - tasks0["count"]),
        "upstream_in_use": state.open_streams,
        "upstream_close_wait": upstream_socks.get("CLOSE_WAIT", 0),
        "upstream_beyond_idle": max(0, upstream_socks.get("ESTABLISHED", 0) - idle_limit),
        "client_sockets_left": client_socks.get("ESTABLISHED", 0)
        + client_socks.get("CLOSE_WAIT", 0),
    }
    summary.update(
        requests=len(run.sent),
        by_kind=dict(run.kinds),
        faults_injected=sum(run.kinds[k] for k in FAULTS),
        statuses={str(k): v for k, v in sorted(run.statuses.items())},
        outcomes=dict(outcomes),
        access_lines=len(access),
        missing_access=len(missing),
        duplicate_access=len(doubled),
        unexpected_outcomes=dict(wrong),
        driver_errors=dict(run.errors),
        detached_streams=run.detached,
        metrics_requests_total=None if metrics is None else sum(metrics.values()),
        tasks_before=tasks0,
        tasks_after=tasks1,
        upstream_sockets=dict(upstream_socks),
        rss_warm_mb=round(rss_warm / 2**20, 1),
        rss_peak_mb=round(peak / 2**20, 1),
        rss_end_mb=round(rss_end / 2**20, 1),
        rss_growth_pct=round(growth * 100, 2),
        leaks=leaks,
        exit_code=proc.returncode,
    )
    failures = []
    if missing or doubled:
        failures.append(
            f"access log: {len(missing)} missing, {len(doubled)} doubled"
            f" (e.g. {(missing or doubled)[:3]})"
        )
    if wrong:
        failures.append(f"unexpected outcomes {dict(wrong)}")
    if run.errors:
        failures.append(f"driver saw errors {dict(run.errors)}")
    # Every access line before the scrape is in /metrics, with the same status.
    logged = Counter(str(line.get("status")) for line in access if line.get("path") != "/metrics")
    if metrics is not None and metrics != logged:
        failures.append(f"/metrics by status {dict(metrics)} != access log {dict(logged)}")
    if any(leaks.values()):
        failures.append(f"leaks {leaks}")
    if growth >= 0.10:
        failures.append(f"RSS grew {growth:.1%} after warm-up")
    if proc.returncode != 0:
        failures.append(f"gateway exited {proc.returncode}")
    summary["failures"] = failures
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", "600"))
    )
    parser.add_argument(
        "--concurrency", type=int, default=int(os.environ.get("SOAK_CONCURRENCY", "24"))
    )
    parser.add_argument("--seed", type=int, default=9)
    args = parser.parse_args(argv)
    summary = asyncio.run(soak(args.seconds, args.concurrency, args.seed))
    print(json.dumps(summary, indent=2))
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
