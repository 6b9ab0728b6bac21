"""`make profile`: where a stream's and a request's CPU goes, the gateway beside the bare relay.

`make bench` says how much CPU each target spends; this says on what. For S1 (20-chunk
streams) and S4 (JSON requests), 64 at once as `make bench` drives them with h2load, py-spy
samples each target (`py-spy record --format raw`), and each sample's innermost frame is put
in a component: the framework (aiohttp with multidict and yarl), the event loop, asyncio,
each module of the gateway. The samples are scaled to the CPU the target used, so the table
reads in µs per stream (S1) or per request (S4), gateway beside bare relay: what the
framework costs more for the gateway's shape, and what the gateway's own features cost.

    python -m tests.bench.profile [--only S1,S4] [--requests 12000]
        [--targets gateway,aiohttp,gateway+otel] [--keep DIR]

The targets run one after another, so the machine's drift (10-20% over minutes here) is in
the comparison, and sampling weighs on each target a little: for the figures and ratios
themselves, `make bench`, which runs the targets in rounds with no profiler attached. With
tracing on, the loop thread's samples include its waits for the GIL while the export thread
holds it (in `print`, say, after a write): that column's shares lean towards what waits.

`--keep DIR` leaves the raw samples there (one line per stack: frames, then a count), for a
flame graph or a closer look. py-spy needs ptrace: run as root, or allow it
(`kernel.yama.ptrace_scope = 0`).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from . import procs
from .procs import Proxy
from .run import CHAT, CHAT_JSON, headers
from .upstream import raise_nofile

SCENARIOS = {"S1": (CHAT, "µs per stream"), "S4": (CHAT_JSON, "µs per request")}
TARGETS = ("gateway", "aiohttp", "gateway+otel")
RATE = 500  # samples a second: enough samples per run, little weight on the target
# A sample with no Python frame: py-spy (without --native, C time counts under the Python
# frame that called it) read a stack while it was changing.
NATIVE = "(no stack read)"
# Rows with fewer samples than this in every column are left out: noise, not cost.
MIN_SAMPLES = 3
# Libraries (directories in site-packages or the standard library) grouped with the one
# whose cost they are.
_GROUPS = (
    (
        ("aiohttp/", "multidict/", "yarl/", "aiosignal/", "aiohappyeyeballs/", "propcache/"),
        "aiohttp (with multidict, yarl)",
    ),
    (("uvloop/", "asyncio/runners.py"), "event loop (uvloop)"),
    (("asyncio/",), "asyncio (tasks, timeouts)"),
    (("structlog/",), "structlog"),
    (("prometheus_client/",), "prometheus_client"),
    (
        ("opentelemetry/", "google/protobuf/", "urllib3/", "http/client.py"),
        "trace export (opentelemetry, protobuf, urllib3)",
    ),
    (("orjson/", "json/"), "json"),
)


def component(frame: str, root: Path = procs.ROOT) -> str:
    """The component of a frame as py-spy prints it with --full-filenames: `name (path:line)`."""
    _, _, where = frame.rpartition(" (")
    path = where.removesuffix(")").rpartition(":")[0] or where
    own = f"{root}/gateway/"
    if path.startswith(own):
        return "gateway: " + path.removeprefix(own).removesuffix(".py")
    if path == f"{root}/tests/bench/floor.py":
        return "bare relay's handler"
    for needles, name in _GROUPS:
        if any("/" + n in path for n in needles):
            return name
    return "other: " + path.rsplit("/", 1)[-1]


def components(lines: Iterable[str]) -> collections.Counter[str]:
    """Samples per component, from py-spy's raw format (`frame;frame;... count`, the first
    frame a thread's name when it ran with --threads)."""
    counts: collections.Counter[str] = collections.Counter()
    for line in lines:
        stack, _, n = line.rstrip().rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = [f for f in stack.split(";") if f and not f.startswith(("thread (", "process "))]
        counts[component(frames[-1]) if frames else NATIVE] += int(n)
    return counts


def profile(
    proxy: Proxy, body: bytes, n: int, tmp: Path, out: Path, sink: int | None = None
) -> tuple[float, Path]:
    """Drive `proxy` with h2load under py-spy: (CPU µs per request, the raw samples)."""
    body_file = tmp / "body.json"
    body_file.write_bytes(body)
    url = f"http://127.0.0.1:{proxy.port}/v1/chat/completions"
    cmd = ["h2load", "--h1", "-c", "64", "-m", "1", "-d", str(body_file)]
    for k, v in headers(20, 0).items():
        cmd += ["-H", f"{k}: {v}"]
    _load(cmd, 640, url)  # warm-up
    procs.settle(proxy, sink)
    out.unlink(missing_ok=True)  # never a previous run's samples
    log = tmp / "py-spy.log"
    with open(log, "wb") as err:
        spy = subprocess.Popen(
            [
                _py_spy(),
                "record",
                "--pid",
                str(proxy.pids[0]),
                "--format",
                "raw",
                "--rate",
                str(RATE),
                "--threads",
                "--nonblocking",
                "--full-filenames",
                "-o",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        time.sleep(1.0)
        if spy.poll() is not None:
            raise SystemExit(f"py-spy did not attach: {log.read_text().strip()[-500:]}")
        cpu0 = proxy.cpu()
        _load(cmd, n, url)
        cpu = procs.settle(proxy, sink) - cpu0  # a traced gateway's export counts too
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(60)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()
    if not out.exists():
        raise SystemExit(f"py-spy recorded nothing: {log.read_text().strip()[-500:]}")
    return cpu / n * 1e6, out


def _load(cmd: list[str], n: int, url: str) -> None:
    """One h2load run of `n` requests; every one must be answered 2xx."""
    out = subprocess.run([*cmd, "-n", str(n), url], capture_output=True, text=True, timeout=600)
    ok = procs.h2load_2xx(out.stdout)
    if ok != n:
        raise SystemExit(f"h2load: {ok} of {n} requests answered 2xx\n{out.stdout[-800:]}")


def _py_spy() -> str:
    """py-spy beside this interpreter (the venv's), else on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy") or "py-spy"


def table(title: str, unit: str, results: dict[str, tuple[float, collections.Counter[str]]]) -> str:
    """Samples scaled to each target's measured CPU per request; the sample counts last."""
    names = list(results)
    scaled = {}
    for name, (per_request, counts) in results.items():
        total = sum(counts.values()) or 1
        scaled[name] = {k: v * per_request / total for k, v in counts.items()}
    rows = sorted(
        {k for _, counts in results.values() for k, v in counts.items() if v >= MIN_SAMPLES},
        key=lambda k: -max(s.get(k, 0.0) for s in scaled.values()),
    )
    width = max([len(r) for r in rows] + [len("samples (rows: >= 3 in a column)")])
    out = [f"{title} ({unit})", f"  {'component':{width}s} " + " ".join(f"{n:>12s}" for n in names)]
    for row in rows:
        values = [scaled[n].get(row, 0.0) for n in names]
        out.append(f"  {row:{width}s} " + " ".join(f"{v:12.1f}" for v in values))
    totals = [results[n][0] for n in names]
    out.append(f"  {'total (measured CPU)':{width}s} " + " ".join(f"{v:12.1f}" for v in totals))
    samples = [sum(results[n][1].values()) for n in names]
    label = f"samples (rows: >= {MIN_SAMPLES} in a column)"
    out.append(f"  {label:{width}s} " + " ".join(f"{v:12d}" for v in samples))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--only", default="S1,S4", help="comma-separated: S1,S4")
    ap.add_argument("--requests", type=int, default=12000)
    ap.add_argument(
        "--targets",
        default="gateway,aiohttp",
        help="comma-separated, from gateway,aiohttp,gateway+otel",
    )
    ap.add_argument("--keep", type=Path, help="leave the raw samples in this directory")
    args = ap.parse_args(argv)
    scenarios = [s for s in args.only.split(",") if s]
    targets = [t for t in args.targets.split(",") if t]
    unknown = [x for x in scenarios if x not in SCENARIOS] + [
        t for t in targets if t not in TARGETS
    ]
    if unknown:
        print(
            f"unknown: {', '.join(unknown)} (scenarios: S1, S4; targets: {', '.join(TARGETS)})",
            file=sys.stderr,
        )
        return 2
    if args.requests < 64:
        print("--requests: at least 64 (one per h2load connection)", file=sys.stderr)
        return 2
    if shutil.which(_py_spy()) is None:
        print("py-spy is missing: make install (it is in the dev extra)", file=sys.stderr)
        return 2
    procs.ensure_tools()
    raise_nofile()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        keep = args.keep or tmp
        keep.mkdir(parents=True, exist_ok=True)
        upstream, port = procs.start_upstream(tmp)
        sink, sink_port = procs.start_upstream(tmp, "tests.bench.otlp_sink")
        try:
            for scenario in scenarios:
                body, unit = SCENARIOS[scenario]
                results = {}
                for target in targets:
                    if target == "aiohttp":
                        proxy = procs.start_floor(port)
                    else:
                        traces = ""
                        if target == "gateway+otel":
                            traces = f"http://127.0.0.1:{sink_port}/v1/traces"
                        proxy = procs.start_gateway(tmp, port, target, traces=traces, name=target)
                    try:
                        raw = keep / f"{scenario}-{target}.raw"
                        per_request, raw = profile(
                            proxy, body, args.requests, tmp, raw, sink=sink.pid
                        )
                        results[target] = (per_request, components(raw.read_text().splitlines()))
                    finally:
                        proxy.close()
                print(table(scenario, unit, results), flush=True)
                print()
        finally:
            procs.stop(upstream)
            procs.stop(sink)
    return 0


if __name__ == "__main__":
    sys.exit(main())
