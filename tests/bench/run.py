"""`make bench`: the gateway side by side with nginx (the floor) and with going direct.

One bench upstream (tests/bench/upstream.py), then for each scenario the gateway (real
configuration: auth, limits, JSON access log, metrics), nginx (one worker, the shipped site
config), a bare aiohttp relay (tests/bench/floor.py: what the framework alone costs, for S5,
S1, S4 and S2) and the upstream directly, on 127.0.0.1. The machine's cores are shared by load
generator, upstream and proxy, so the headline is the proxy's own CPU seconds (user+sys from
/proc/PID/stat) per 1000 streams, as a ratio to nginx's in the same run.

The gateway runs twice: as configured for production without tracing ("gateway"), and with
every request traced and exported to a local OTLP/HTTP sink ("gateway+otel", sample ratio 1,
tests/bench/otlp_sink.py); a second table sets the two side by side.

    python -m tests.bench.run [--quick | --tiny] [--only S1,S5] [--targets gateway,gateway+otel]
        [--out build/bench.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import procs
from .procs import BENCH_KEY, Proxy
from .sseclient import Stats, build_request, run_streams
from .upstream import raise_nofile

CHAT = b'{"model":"bench","messages":[{"role":"user","content":"Say hello"}],"stream":true}'
CHAT_JSON = b'{"model":"bench","messages":[{"role":"user","content":"Say hello"}]}'


# What the bench runs: "gateway+otel" is the gateway with every request traced and exported.
TARGETS_RUN = ("gateway", "gateway+otel", "nginx", "aiohttp", "direct")


@dataclass(frozen=True)
class Plan:
    s5_streams: int
    s1_streams: int
    s4_requests: int
    s2_streams: int  # per connection wave of 500
    s3_events: int
    s6_streams: int
    s6_events: int


FULL = Plan(
    s5_streams=2000,
    s1_streams=20000,
    s4_requests=20000,
    s2_streams=1000,
    s3_events=12,
    s6_streams=8000,
    s6_events=30,
)
# A smoke run of the harness itself (not a measurement).
TINY = Plan(
    s5_streams=30,
    s1_streams=300,
    s4_requests=300,
    s2_streams=50,
    s3_events=2,
    s6_streams=200,
    s6_events=2,
)
# S6 keeps its 8,000 streams; they last long enough (14 s) for most of them to overlap.
QUICK = Plan(
    s5_streams=300,
    s1_streams=3000,
    s4_requests=3000,
    s2_streams=500,
    s3_events=4,
    s6_streams=8000,
    s6_events=14,
)


def pct(values: Any, q: float) -> float | None:
    data: list[float] = sorted(values)
    if not data:
        return None
    return data[min(len(data) - 1, int(q * len(data)))]


def headers(chunks: int, delay: float) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "Authorization": f"Bearer {BENCH_KEY}",
        "x-mock-chunks": str(chunks),
        "x-mock-delay": str(delay),
    }


class Bench:
    def __init__(
        self, plan: Plan, tmp: Path, only: set[str] | None, targets: tuple[str, ...] = TARGETS_RUN
    ) -> None:
        self.plan = plan
        self.tmp = tmp
        self.only = only
        self.targets = targets
        self.sink_proc: subprocess.Popen[bytes] | None = None
        self.sink_port = 0
        self.results: dict[str, dict[str, Any]] = {}
        self.upstream_proc, self.upstream_port = procs.start_upstream(tmp)
        self.nginx_source = ""
        self.starts = 0

    def want(self, scenario: str) -> bool:
        return self.only is None or scenario in self.only

    # -------------------------------------------------------------- targets

    def fresh(self, name: str) -> Proxy:
        self.starts += 1
        if name == "gateway":
            return procs.start_gateway(self.tmp, self.upstream_port, str(self.starts))
        if name == "gateway+otel":
            if self.sink_proc is None:
                self.sink_proc, self.sink_port = procs.start_upstream(
                    self.tmp, "tests.bench.otlp_sink"
                )
            return procs.start_gateway(
                self.tmp,
                self.upstream_port,
                str(self.starts),
                traces=f"http://127.0.0.1:{self.sink_port}/v1/traces",
                name=name,
            )
        if name == "nginx":
            proxy, self.nginx_source = procs.start_nginx(self.tmp, self.upstream_port)
            return proxy
        if name == "aiohttp":
            return procs.start_floor(self.upstream_port)
        return Proxy("direct", self.upstream_port)

    def record(self, scenario: str, target: str, **values: Any) -> None:
        self.results.setdefault(scenario, {})[target] = values
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in values.items() if not isinstance(v, dict))
        print(f"  {scenario} {target:8s} {shown}", flush=True)

    def settle(self, proxy: Proxy) -> float:
        """Wait for `proxy` to go quiet after a run, and return its CPU seconds then.

        With every target up at once, work a target does after its load ended (the traced
        gateway exports its spans once a second, and the sink decodes them) must count as
        its own, and must not run while the next target is measured.
        """
        sink = self.sink_proc.pid if self.sink_proc is not None else None
        return procs.settle(proxy, sink)

    # -------------------------------------------------------------- load

    def streams(
        self,
        proxy: Proxy,
        *,
        chunks: int,
        delay: float,
        concurrency: int,
        total: int,
        deadline: float,
        gaps: bool = False,
        body: bytes = CHAT,
        during: Callable[[Stats], Any] | None = None,
    ) -> Stats:
        request = build_request(
            "127.0.0.1", proxy.port, "/v1/chat/completions", body, headers(chunks, delay)
        )

        async def go() -> Stats:
            stats = Stats()
            task = asyncio.ensure_future(
                run_streams(
                    "127.0.0.1",
                    proxy.port,
                    request,
                    concurrency=concurrency,
                    total=total,
                    deadline=deadline,
                    record_gaps=gaps,
                    stats=stats,
                )
            )
            while during is not None and not task.done():
                await asyncio.wait([task], timeout=0.25)
                during(stats)
            return await task

        import uvloop

        return uvloop.run(go())

    def h2load(self, proxy: Proxy, body: bytes, n: int, chunks: int) -> dict[str, Any]:
        body_file = self.tmp / "body.json"
        body_file.write_bytes(body)
        url = f"http://127.0.0.1:{proxy.port}/v1/chat/completions"
        cmd = ["h2load", "--h1", "-n", str(n), "-c", "64", "-m", "1", "-d", str(body_file)]
        for k, v in headers(chunks, 0).items():
            cmd += ["-H", f"{k}: {v}"]
        cpu0, t0 = proxy.cpu(), time.perf_counter()
        out = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=300).stdout
        wall = time.perf_counter() - t0
        cpu = self.settle(proxy) - cpu0
        ok = procs.h2load_2xx(out)
        errors = n - ok
        return {
            "requests": n,
            "ok": ok,
            "errors": errors,
            "wall_s": round(wall, 2),
            "rps": round(n / wall),
            "cpu_s": round(cpu, 3),
            "cpu_s_per_1000": round(cpu * 1000 / n, 4) if proxy.proc else None,
        }

    # -------------------------------------------------------------- scenarios

    def run(self) -> None:
        # "aiohttp" is the bare aiohttp relay (tests/bench/floor.py): the framework's own
        # cost, so the table shows how much of the gateway's figure is aiohttp's.
        targets = self.targets
        proxies = {name: self.fresh(name) for name in targets}
        try:
            for proxy in proxies.values():
                # One short stream first: imports, pools and caches warm, like any live server.
                self.streams(proxy, chunks=20, delay=0, concurrency=8, total=200, deadline=30)
            if self.want("S5"):
                self.s5(proxies)
            # S1: 20-chunk streams, no delay, 64 at once (h2load): CPU per 1000 streams.
            # S4: non-stream JSON, 64 at once (h2load): CPU per 1000 requests.
            # Both in rounds, every target once per round: a machine whose speed drifts
            # over minutes (a shared host's does) moves every target alike, and the medians
            # of the rounds make the ratios the targets are about.
            for scenario, body, total in (
                ("S1", CHAT, self.plan.s1_streams),
                ("S4", CHAT_JSON, self.plan.s4_requests),
            ):
                if self.want(scenario):
                    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
                    for _ in range(ROUNDS):
                        for name, proxy in proxies.items():
                            # At least one request per h2load client (-c 64).
                            per_round = max(total // ROUNDS, 64)
                            rounds[name].append(self.h2load(proxy, body, per_round, 20))
                    for name in targets:
                        self.record(scenario, name, **_median_round(rounds[name]))
            if self.want("S2"):
                self.s2(proxies)
        finally:
            for proxy in proxies.values():
                proxy.close()
        # S6 runs the bare relay too: the reconnect storm's targets are ratios to it.
        for name in [t for t in targets if t in ("gateway", "nginx", "aiohttp")]:
            if self.want("S3") and name != "aiohttp":
                proxy = self.fresh(name)
                try:
                    self.s3(proxy)
                finally:
                    proxy.close()
            if self.want("S6"):
                proxy = self.fresh(name)
                try:
                    self.s6(proxy)
                finally:
                    proxy.close()

    def s5(self, proxies: dict[str, Proxy]) -> None:
        """One stream at a time, 20 chunks, no delay: time to first event (in rounds, every
        target once per round, like S1 and S4; the percentiles are over all rounds)."""
        stats = {name: Stats() for name in proxies}
        for _ in range(ROUNDS):
            for name, proxy in proxies.items():
                st = self.streams(
                    proxy,
                    chunks=20,
                    delay=0,
                    concurrency=1,
                    total=self.plan.s5_streams // ROUNDS,
                    deadline=60,
                )
                stats[name].add(st)
        for name, st in stats.items():
            self.record(
                "S5",
                name,
                streams=st.completed,
                errors=st.error_count,
                ttfe_p50_ms=_ms(pct(st.ttfe, 0.5)),
                ttfe_p99_ms=_ms(pct(st.ttfe, 0.99)),
                ttfe_mean_ms=_ms(statistics.fmean(st.ttfe)) if st.ttfe else None,
            )

    def s2(self, proxies: dict[str, Proxy]) -> None:
        """500 concurrent streams of 200 chunks every 20 ms: gap p99, CPU and errors; in
        waves of 500, every target once per wave (as the rounds of S1 and S4)."""
        waves = max(1, self.plan.s2_streams // 500)
        stats = {name: Stats() for name in proxies}
        cpu = dict.fromkeys(proxies, 0.0)
        for _ in range(waves):
            for name, proxy in proxies.items():
                cpu0 = proxy.cpu()
                st = self.streams(
                    proxy,
                    chunks=200,
                    delay=0.02,
                    concurrency=500,
                    total=self.plan.s2_streams // waves,
                    deadline=120,
                    gaps=True,
                )
                cpu[name] += self.settle(proxy) - cpu0
                stats[name].add(st)
        for name, st in stats.items():
            self.record(
                "S2",
                name,
                streams=st.completed,
                errors=st.error_count,
                gap_p50_ms=_ms(pct(st.gaps, 0.5)),
                gap_p99_ms=_ms(pct(st.gaps, 0.99)),
                gap_max_ms=_ms(max(st.gaps, default=0.0)),
                events=st.events,
                cpu_s=round(cpu[name], 2) if proxies[name].proc else None,
                error_kinds=dict(st.errors),
            )

    def s3(self, proxy: Proxy) -> None:
        """2000 concurrent streams at one event a second, fresh process: RSS per stream."""
        n = 2000
        self.streams(proxy, chunks=2, delay=0, concurrency=4, total=20, deadline=30)
        time.sleep(0.5)
        base = proxy.rss()
        peak = [base]
        held = [0.0]

        def sample(st: Stats) -> None:
            peak[0] = max(peak[0], proxy.rss())
            if st.first_events >= n and not held[0]:
                held[0] = time.perf_counter()

        st = self.streams(
            proxy,
            chunks=self.plan.s3_events,
            delay=1.0,
            concurrency=n,
            total=n,
            deadline=self.plan.s3_events + 60,
            during=sample,
        )
        self.record(
            "S3",
            proxy.name,
            streams=st.completed,
            errors=st.error_count,
            rss_base_mb=round(base / 2**20, 1),
            rss_peak_mb=round(peak[0] / 2**20, 1),
            rss_per_stream_kb=round((peak[0] - base) / n / 1024, 1),
            error_kinds=dict(st.errors),
        )

    def s6(self, proxy: Proxy) -> None:
        """8,000 concurrent slow streams on one process: all complete."""
        n = self.plan.s6_streams
        peak = [0]
        base = proxy.rss()
        rss_peak = [base]

        def sample(st: Stats) -> None:
            peak[0] = max(peak[0], st.first_events - st.completed - st.error_count)
            rss_peak[0] = max(rss_peak[0], proxy.rss())

        cpu0 = proxy.cpu()
        st = self.streams(
            proxy,
            chunks=self.plan.s6_events,
            delay=1.0,
            concurrency=n,
            total=n,
            deadline=self.plan.s6_events + 120,
            during=sample,
        )
        self.record(
            "S6",
            proxy.name,
            streams=st.completed,
            errors=st.error_count,
            peak_concurrent=peak[0],
            ttfe_p99_ms=_ms(pct(st.ttfe, 0.99)),
            wall_s=round(st.wall, 1),
            rss_peak_mb=round(rss_peak[0] / 2**20, 1) if proxy.proc else None,
            rss_per_stream_kb=(
                round((rss_peak[0] - base) / peak[0] / 1024, 1) if proxy.proc and peak[0] else None
            ),
            cpu_s=round(proxy.cpu() - cpu0, 2),
            error_kinds=dict(st.errors),
        )


# S1 and S4 rounds per target (each round a 1/ROUNDS share of the plan's requests).
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))


def _median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One target's S1 or S4 rounds as one record: the counts summed, the rates and the
    CPU per 1000 the rounds' medians."""
    out = dict(rounds[0])
    for key in ("requests", "ok", "errors", "wall_s", "cpu_s"):
        out[key] = round(sum(r[key] for r in rounds), 3)
    for key in ("rps", "cpu_s_per_1000"):
        values = [r[key] for r in rounds if r[key] is not None]
        out[key] = statistics.median(values) if values else None
    out["cpu_s_per_1000_rounds"] = [r["cpu_s_per_1000"] for r in rounds]
    return out


def spans_received(port: int) -> int | None:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/spans", timeout=5) as r:
            return int(r.read())
    except OSError:
        return None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


# ------------------------------------------------------------------ the table

TARGETS: list[tuple[str, str, str, str, float]] = [
    # scenario, metric, label, how the target reads, bound
    ("S1", "cpu_s_per_1000", "CPU s / 1000 streams", "ratio", 10.0),
    ("S4", "cpu_s_per_1000", "CPU s / 1000 requests", "ratio", 10.0),
    ("S5", "ttfe_p50_ms", "added TTFE p50 ms", "added", 0.3),
    ("S2", "gap_p99_ms", "gap p99 ms", "ratio", 1.5),
    ("S2", "errors", "errors", "zero", 0),
    ("S3", "rss_per_stream_kb", "RSS KiB / stream", "ratio", 2.0),
    ("S6", "streams", "streams completed", "info", 0),
    ("S6", "errors", "errors", "zero", 0),
]
TARGET_NAMES = ("gateway", "nginx", "aiohttp", "direct")
# Tracing on (sample ratio 1, exported) beside tracing off: what a traced stream costs.
TRACING: list[tuple[str, str, str, float | None]] = [
    ("S1", "cpu_s_per_1000", "CPU s / 1000 streams", 1.25),
    ("S4", "cpu_s_per_1000", "CPU s / 1000 requests", None),
    ("S5", "ttfe_p50_ms", "TTFE p50 ms", None),
    ("S2", "cpu_s", "CPU s for the run", None),
]


# The gateway (every feature on) against the bare aiohttp relay in the same run: what the
# gateway itself costs on top of the framework. kind "ratio": gateway / bare relay at most
# `bound`; "added": gateway at most bare relay + `bound` (ms); "nginx": gateway / nginx.
FRAMEWORK: list[tuple[str, str, str, str, float]] = [
    ("S1", "cpu_s_per_1000", "CPU s / 1000 streams", "ratio", 1.5),
    ("S4", "cpu_s_per_1000", "CPU s / 1000 requests", "ratio", 1.5),
    ("S5", "ttfe_p50_ms", "TTFE p50 ms", "added", 0.2),
    ("S6", "ttfe_p99_ms", "TTFE p99 ms (reconnect storm)", "ratio", 2.0),
    ("S6", "rss_per_stream_kb", "RSS KiB / open stream", "ratio", 1.2),
    ("S2", "cpu_s", "CPU s for the run", "ratio", 1.1),
    ("S2", "gap_p99_ms", "gap p99 ms", "nginx", 1.5),
]


def framework_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for scenario, metric, label, kind, bound in FRAMEWORK:
        r = results.get(scenario, {})
        gw, bare = r.get("gateway", {}).get(metric), r.get("aiohttp", {}).get(metric)
        ratio = _ratio(gw, bare)
        met: bool | None = None
        if kind == "ratio":
            target = f"<= {bound:g}x bare"
            met = None if ratio is None else ratio <= bound
        elif kind == "added":
            target = f"<= bare + {bound:g} ms"
            met = None if gw is None or bare is None else gw <= bare + bound
        else:
            target = f"<= {bound:g}x nginx"
            nginx_ratio = _ratio(gw, r.get("nginx", {}).get(metric))
            met = None if nginx_ratio is None else nginx_ratio <= bound
        rows.append(
            {
                "scenario": scenario,
                "metric": label,
                "gateway": gw,
                "aiohttp": bare,
                "ratio": ratio,
                "target": target,
                "met": met,
            }
        )
    return rows


def framework_table(rows: list[dict[str, Any]]) -> str:
    head = ["", "metric", "gateway", "bare relay", "gateway / bare relay", "target", "met"]
    body = [
        [
            r["scenario"],
            r["metric"],
            "-" if r["gateway"] is None else f"{r['gateway']:.3g}",
            "-" if r["aiohttp"] is None else f"{r['aiohttp']:.3g}",
            _versus(r),
            r["target"],
            {True: "yes", False: "NO", None: ""}[r["met"]],
        ]
        for r in rows
    ]
    return render(head, body)


def render(head: list[str], body: list[list[str]]) -> str:
    """Columns padded to their widest cell, a rule under the head."""
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in [head, *body]
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _versus(row: dict[str, Any]) -> str:
    """The ratio, and for an added-time target the milliseconds added too."""
    if row["ratio"] is None:
        return "-"
    if row["target"].startswith("<= bare +"):
        return f"{row['ratio']:.2f}x (+{row['gateway'] - row['aiohttp']:.3f} ms)"
    return f"{row['ratio']:.2f}x"


def tracing_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for scenario, metric, label, bound in TRACING:
        r = results.get(scenario, {})
        off = r.get("gateway", {}).get(metric)
        on = r.get("gateway+otel", {}).get(metric)
        ratio = _ratio(on, off)
        rows.append(
            {
                "scenario": scenario,
                "metric": label,
                "off": off,
                "on": on,
                "ratio": ratio,
                "target": f"<= {bound:g}x off" if bound else "",
                "met": (ratio is not None and ratio <= bound) if bound else None,
            }
        )
    return rows


def tracing_table(rows: list[dict[str, Any]]) -> str:
    head = ["", "metric", "tracing off", "tracing on", "on/off", "target", "met"]
    body = [
        [
            r["scenario"],
            r["metric"],
            "-" if r["off"] is None else f"{r['off']:.3g}",
            "-" if r["on"] is None else f"{r['on']:.3g}",
            "-" if r["ratio"] is None else f"{r['ratio']:.2f}x",
            r["target"],
            {True: "yes", False: "NO", None: ""}[r["met"]],
        ]
        for r in rows
    ]
    return render(head, body)
INFO: list[tuple[str, str, str]] = [
    ("S1", "rps", "streams/s (shared cores)"),
    ("S4", "rps", "requests/s (shared cores)"),
    ("S5", "ttfe_p50_ms", "TTFE p50 ms"),
    ("S5", "ttfe_p99_ms", "TTFE p99 ms"),
    ("S2", "gap_p50_ms", "gap p50 ms"),
    ("S2", "cpu_s", "CPU s for the run"),
    ("S3", "rss_peak_mb", "RSS peak MiB"),
    # nginx runs one worker (worker_processes 1): its figure is what one worker carried.
    ("S6", "peak_concurrent", "peak concurrent streams (nginx: one worker)"),
    ("S6", "ttfe_p99_ms", "TTFE p99 ms"),
    ("S6", "rss_per_stream_kb", "RSS KiB / open stream"),
    ("S6", "cpu_s", "CPU s for the run"),
]


def _ratio(a: Any, b: Any) -> float | None:
    ok = isinstance(a, (int, float)) and isinstance(b, (int, float)) and b
    return a / b if ok else None


def verdicts(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for scenario, metric, label, kind, bound in TARGETS:
        r = results.get(scenario, {})
        gw, ng, fl, dr = (r.get(t, {}).get(metric) for t in TARGET_NAMES)
        row: dict[str, Any] = {
            "scenario": scenario,
            "metric": label,
            "gateway": gw,
            "nginx": ng,
            "aiohttp": fl,
            "direct": dr,
        }
        ratio = (
            gw / ng
            if isinstance(gw, (int, float)) and isinstance(ng, (int, float)) and ng
            else None
        )
        row["ratio"] = ratio
        row["floor_ratio"] = _ratio(fl, ng)
        if kind == "ratio":
            row["target"] = f"<= {bound:g}x nginx"
            row["met"] = ratio is not None and ratio <= bound
        elif kind == "added":
            added = gw - dr if gw is not None and dr is not None else None
            row["added"] = added
            row["nginx_added"] = ng - dr if ng is not None and dr is not None else None
            row["aiohttp_added"] = fl - dr if fl is not None and dr is not None else None
            row["target"] = f"added <= {bound:g} ms"
            row["met"] = added is not None and added <= bound
        elif kind == "zero":
            row["target"] = "0"
            row["met"] = gw == 0
        else:
            row["target"] = "-"
            row["met"] = None
        if scenario == "S6" and metric == "streams":
            want = results.get("S6", {}).get("_n")
            row["target"] = f"all {want}" if want else "all"
            row["met"] = gw == want if want else None
        rows.append(row)
    for scenario, metric, label in INFO:
        r = results.get(scenario, {})
        gw, ng, fl, dr = (r.get(t, {}).get(metric) for t in TARGET_NAMES)
        ratio = (
            gw / ng
            if isinstance(gw, (int, float)) and isinstance(ng, (int, float)) and ng
            else None
        )
        rows.append(
            {
                "scenario": scenario,
                "metric": label,
                "gateway": gw,
                "nginx": ng,
                "aiohttp": fl,
                "direct": dr,
                "ratio": ratio,
                "floor_ratio": _ratio(fl, ng),
                "target": "",
                "met": None,
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    head = ["", "metric", "gateway", "nginx", "aiohttp", "direct", "gw/nginx", "aiohttp/nginx"]
    head += ["target", "met"]
    body = []
    for r in rows:
        ratio, floor = r.get("ratio"), r.get("floor_ratio")
        extra = ""
        if "added" in r and r["added"] is not None:
            extra = f" (+{r['added']:.3f} vs direct; nginx +{r['nginx_added']:.3f}"
            if r.get("aiohttp_added") is not None:
                extra += f", aiohttp +{r['aiohttp_added']:.3f}"
            extra += ")"
        met = {True: "yes", False: "NO", None: ""}[r["met"]]
        body.append(
            [
                r["scenario"],
                r["metric"],
                cell(r["gateway"]),
                cell(r["nginx"]),
                cell(r.get("aiohttp")),
                cell(r["direct"]),
                (f"{ratio:.2f}x" if ratio is not None else "-"),
                (f"{floor:.2f}x" if floor is not None else "-"),
                r["target"] + extra,
                met,
            ]
        )
    return render(head, body)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (under two minutes)")
    parser.add_argument("--tiny", action="store_true", help="a smoke run of the harness")
    parser.add_argument("--only", help="comma-separated scenarios, e.g. S1,S5")
    parser.add_argument(
        "--targets", help=f"comma-separated, from {','.join(TARGETS_RUN)} (default: all)"
    )
    parser.add_argument("--out", default=str(procs.ROOT / "build" / "bench.json"))
    args = parser.parse_args()
    procs.ensure_tools()
    raise_nofile()
    plan = TINY if args.tiny else QUICK if args.quick else FULL
    only = set(args.only.upper().split(",")) if args.only else None
    targets = tuple(args.targets.split(",")) if args.targets else TARGETS_RUN
    if unknown := set(targets) - set(TARGETS_RUN):
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        bench = Bench(plan, Path(tmp), only, targets)
        try:
            bench.run()
            spans = spans_received(bench.sink_port) if bench.sink_proc else None
        finally:
            procs.stop(bench.upstream_proc)
            procs.stop(bench.sink_proc)
        results = bench.results
        if "S6" in results:
            results["S6"]["_n"] = plan.s6_streams
        rows = verdicts(results)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "plan": "tiny" if args.tiny else "quick" if args.quick else "full",
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "kernel": platform.release(),
                "load_avg": os.getloadavg(),
            },
            "nginx_site": bench.nginx_source,
            "seconds": round(time.perf_counter() - t0, 1),
            "results": results,
            "table": rows,
            "framework": framework_rows(results),
            "tracing": {"spans_received_by_sink": spans, "table": tracing_rows(results)},
        }
        out.write_text(json.dumps(doc, indent=2, default=str))
    print()
    print(
        f"gateway vs nginx ({bench.nginx_source}) vs a bare aiohttp relay vs direct; "
        f"{os.cpu_count()} cores shared; {doc['seconds']} s; load avg {os.getloadavg()[0]:.1f}"
    )
    print(table(rows))
    if "aiohttp" in targets and "gateway" in targets:
        print("\ngateway (every feature on) vs the bare aiohttp relay (tests/bench/floor.py)")
        print(framework_table(doc["framework"]))
    if "gateway+otel" in targets:
        print(f"\ntracing off vs on (sample ratio 1, {spans} spans reached the local sink)")
        print(tracing_table(tracing_rows(results)))
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
