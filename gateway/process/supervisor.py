"""`[server].workers = N`: N worker processes sharing the port, supervised by this one.

Each worker is `gateway serve --config PATH --worker`: a whole gateway that binds the port
with SO_REUSEPORT, so the kernel spreads new connections among the workers. This process
only supervises:

- a worker that dies is started again (with backoff; one that keeps dying before it was
  ever ready makes the supervisor give up, exit 1, and leave the restart to systemd);
- SIGTERM/SIGINT are forwarded and the supervisor exits 0 once every worker has exited 0
  (a slot waiting out a restart back-off just ends); a worker started while stopping is
  stopped at once;
- SIGHUP is forwarded (each worker reloads its own config); to a worker still starting once
  it is ready (before that a HUP would find no handler); ignored, with a log line, once
  stopping;
- workers report READY=1 to a socket of ours (their $NOTIFY_SOCKET); once all N listen we
  send READY=1 to systemd, since systemd only listens to the main process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import struct
import sys

import structlog

from ..config import Config
from . import notify

log = structlog.get_logger("gateway.supervisor")

GIVE_UP_AFTER = 5  # consecutive starts that died before READY=1
BACKOFF_MAX = 10.0
_UCRED = struct.Struct("3i")  # pid, uid, gid of SCM_CREDENTIALS
_STOPPED_EARLY = frozenset({-signal.SIGTERM, -signal.SIGINT})  # returncodes: killed by them


class Supervisor:
    def __init__(self, cfg: Config) -> None:
        self.n = cfg.server.workers
        self.argv = [sys.executable, "-m", "gateway", "serve", "--config", cfg.source, "--worker"]
        if cfg.port_override is not None:
            self.argv += ["--port", str(cfg.port_override)]
        self.procs: dict[int, asyncio.subprocess.Process] = {}  # slot -> current process
        self.ready: set[int] = set()  # pids that sent READY=1
        self.reload_when_ready: set[int] = set()  # pids that missed a HUP while starting
        self.stopping = asyncio.Event()
        self.all_ready = False
        self.failed = False
        # An abstract socket (no file to clean up); SO_PASSCRED tells us which pid spoke.
        self.notify_name = f"@gateway-supervisor-{os.getpid()}-{secrets.token_hex(8)}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + self.notify_name[1:])
        self.sock.setblocking(False)

    def _on_notify(self) -> None:
        try:
            data, anc, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
        except (BlockingIOError, InterruptedError):
            return
        pid = next(
            (_UCRED.unpack(d[: _UCRED.size])[0] for lvl, typ, d in anc
             if lvl == socket.SOL_SOCKET and typ == socket.SCM_CREDENTIALS),
            0,
        )
        if b"READY=1" in data.split(b"\n"):
            self.ready.add(pid)
            log.info("worker_ready", pid=pid)
            if pid in self.reload_when_ready and not self.stopping.is_set():
                self.reload_when_ready.discard(pid)
                self._send(pid, signal.SIGHUP)
            live = {p.pid for p in self.procs.values() if p.returncode is None}
            if not self.all_ready and len(self.procs) == self.n and live <= self.ready:
                self.all_ready = True
                log.info("workers_ready", pids=sorted(live))
                notify.ready(f"{self.n} workers listening")

    def _send(self, pid: int, sig: signal.Signals) -> None:
        for proc in self.procs.values():
            if proc.pid == pid and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    def _reload(self) -> None:
        if self.stopping.is_set():
            log.info("reload_ignored", reason="stopping", pid=os.getpid())
            return
        log.info("reloading_workers")
        for proc in self.procs.values():
            if proc.returncode is not None:
                continue
            if proc.pid in self.ready:
                self._send(proc.pid, signal.SIGHUP)
            else:
                self.reload_when_ready.add(proc.pid)

    def _stop(self) -> None:
        if not self.stopping.is_set():
            log.info("stopping_workers", workers=len(self.procs))
            notify.stopping()
            self.stopping.set()
        for proc in self.procs.values():
            self._send(proc.pid, signal.SIGTERM)

    async def run_slot(self, slot: int) -> int:
        env = {**os.environ, "NOTIFY_SOCKET": self.notify_name}
        backoff, early_deaths = 0.5, 0
        while True:
            proc = await asyncio.create_subprocess_exec(*self.argv, env=env)
            self.procs[slot] = proc
            log.info("worker_started", slot=slot, pid=proc.pid)
            if self.stopping.is_set():  # TERM came while it was being spawned
                self._send(proc.pid, signal.SIGTERM)
            code = await proc.wait()
            if self.stopping.is_set():
                # A worker stopped before its interpreter installed its handlers dies of the
                # TERM itself (or of the terminal's Ctrl-C): it served nothing, a clean stop.
                return 0 if code in _STOPPED_EARLY else code
            was_ready = proc.pid in self.ready
            self.ready.discard(proc.pid)
            early_deaths = 0 if was_ready else early_deaths + 1
            if early_deaths >= GIVE_UP_AFTER:
                log.error("worker_keeps_failing", slot=slot, code=code, starts=early_deaths)
                self.failed = True
                self._stop()
                return code
            backoff = 0.5 if was_ready else min(backoff * 2, BACKOFF_MAX)
            log.error("worker_exited", slot=slot, pid=proc.pid, code=code, restart_in=backoff)
            try:
                async with asyncio.timeout(backoff):
                    await self.stopping.wait()
                return 0  # stopped while waiting: nothing of this slot is running
            except TimeoutError:
                pass

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.sock.fileno(), self._on_notify)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        log.info("supervising", workers=self.n, pid=os.getpid())
        try:
            codes = await asyncio.gather(*(self.run_slot(i) for i in range(self.n)))
        finally:
            loop.remove_reader(self.sock.fileno())
            self.sock.close()
        log.info("workers_stopped", codes=codes)
        return 1 if self.failed or any(codes) else 0


def supervise(cfg: Config) -> int:
    """Run `cfg.server.workers` workers until SIGTERM; 0 when they all exited cleanly."""
    return asyncio.run(Supervisor(cfg).run())
