"""`make reload` / `make restart` through systemd/gatewayctl, against a real gateway process.

No systemd here: SYSTEMCTL is a stand-in whose `show -p MainPID` names the real gateway
process and whose `reload` sends it SIGHUP, as ExecReload does; JOURNALCTL is a stand-in that
serves the gateway's own stdout (its JSON log lines) as journal records of that PID written
after the reload, as `journalctl -u gateway -o json` would."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from .conftest import config_text

ROOT = Path(__file__).resolve().parent.parent
CTL = ROOT / "systemd" / "gatewayctl"
UPSTREAM = "http://127.0.0.1:9/v1"  # never called: no request goes through


def _load_ctl() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("gatewayctl", str(CTL))
    spec = importlib.util.spec_from_loader("gatewayctl", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


ctl = _load_ctl()


def _tool(path: Path, body: str, shebang: str = "/bin/sh") -> Path:
    path.write_text(f"#!{shebang}\n" + body)
    path.chmod(0o755)
    return path


@dataclass
class Service:
    """The installed layout (ETC, PREFIX) and the running process, under tmp."""

    tmp: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def etc(self) -> Path:
        return self.tmp / "etc"

    @property
    def calls(self) -> list[str]:
        path = self.tmp / "calls.log"
        return path.read_text().splitlines() if path.exists() else []

    def start(self, env: dict[str, str] | None = None) -> None:
        log = (self.tmp / "gateway.log").open("wb")
        full = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        full.update({"PYTHONPATH": str(ROOT), **(env or {})})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(self.etc / "config.toml")],
            stdout=log, stderr=subprocess.STDOUT, env=full, cwd=ROOT,
        )
        log.close()
        (self.tmp / "mainpid").write_text(f"{self.proc.pid}\n")
        # Wait for "listening" (bounded): the reload below must reach a running server.
        for _ in range(600):
            if b'"listening"' in (self.tmp / "gateway.log").read_bytes():
                return
            assert self.proc.poll() is None, (self.tmp / "gateway.log").read_text()
            try:
                self.proc.wait(0.05)
            except subprocess.TimeoutExpired:
                pass
        raise AssertionError("the gateway did not start")

    def make(self, target: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "make", "-s", target, f"ETC={self.etc}", f"PREFIX={self.tmp / 'opt'}",
                f"SYSTEMCTL={self.tmp / 'bin/systemctl'}",
                f"JOURNALCTL={self.tmp / 'bin/journalctl'}",
                f"NGINX_DIR={self.tmp / 'nginx'}",
                "CHECK_USER=",  # these tests run as whoever runs them; see the user test
            ],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    svc = Service(tmp_path)
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/config.toml").write_text(config_text(UPSTREAM))
    (tmp_path / "etc/gateway.env").write_text("")
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    calls = tmp_path / "calls.log"
    _tool(
        bin_ / "systemctl",
        f'echo "systemctl $*" >> {calls}\n'
        'case "$1" in\n'
        f'  show) cat {tmp_path}/mainpid ;;\n'
        f'  reload) wc -c < {tmp_path}/gateway.log > {tmp_path}/offset;'
        f' kill -HUP "$(cat {tmp_path}/mainpid)" ;;\n'
        "esac\n",
    )
    _tool(
        bin_ / "journalctl",
        "import json, pathlib, time\n"
        f"tmp = pathlib.Path({str(tmp_path)!r})\n"
        "offset = int((tmp / 'offset').read_text()) if (tmp / 'offset').exists() else 0\n"
        "pid = int((tmp / 'mainpid').read_text())\n"
        "data = (tmp / 'gateway.log').read_bytes()[offset:]\n"
        "for line in data.decode().splitlines():\n"
        "    print(json.dumps({'_PID': str(pid), 'MESSAGE': line,\n"
        "                      '__REALTIME_TIMESTAMP': str(time.time_ns() // 1000)}))\n",
        shebang=sys.executable,
    )
    venv_bin = tmp_path / "opt/venv/bin"
    venv_bin.mkdir(parents=True)
    _tool(venv_bin / "gateway", f'PYTHONPATH={ROOT} exec {sys.executable} -m gateway "$@"\n')
    yield svc
    if svc.proc is not None:
        svc.proc.terminate()
        try:
            svc.proc.wait(15)
        except subprocess.TimeoutExpired:
            svc.proc.kill()
            svc.proc.wait()


def test_make_reload_waits_for_the_gateways_reloaded_line(service: Service) -> None:
    service.start()
    cfg = service.etc / "config.toml"
    cfg.write_text(cfg.read_text().replace("[server]", "[server]\n# edited", 1))
    run = service.make("reload")
    assert run.returncode == 0, run.stderr
    assert "reloaded" in run.stdout
    assert b'"reloaded"' in (service.tmp / "gateway.log").read_bytes()
    assert "systemctl reload gateway" in service.calls


def test_make_reload_fails_when_the_gateway_refuses_what_the_check_accepted(
    service: Service,
) -> None:
    # The classic: a new secret added to the env file and used in the config. The check
    # reads the env file and passes; the running service still has the environment it
    # started with (the env file is read at start), so the gateway refuses the reload.
    service.start()
    (service.etc / "gateway.env").write_text("NEW_UPSTREAM_KEY=sk-new\n")
    cfg = service.etc / "config.toml"
    cfg.write_text(re.sub(r'(?m)^api_key = ".*"$', 'api_key = "${NEW_UPSTREAM_KEY}"',
                          cfg.read_text()))
    assert "${NEW_UPSTREAM_KEY}" in cfg.read_text()
    run = service.make("reload")
    assert run.returncode != 0, run.stdout
    assert "reload refused" in run.stderr
    assert b'"reload_failed"' in (service.tmp / "gateway.log").read_bytes()
    assert "sk-new" not in run.stdout + run.stderr


def test_make_reload_never_runs_the_env_file_through_a_shell(service: Service) -> None:
    marker = service.tmp / "pwned"
    # As bash reads it, $(...) and backticks run (as root) and `;` ends the assignment.
    (service.etc / "gateway.env").write_text(
        f"OPENAI_API_KEY=sk-$(touch {marker})`touch {marker}`;touch {marker}\n"
    )
    run = service.make("reload")  # nothing running: the reload itself is refused after
    assert not marker.exists()
    assert "not running" in run.stderr


def test_make_restart_refuses_a_config_that_would_not_start(service: Service) -> None:
    cfg = service.etc / "config.toml"
    good = cfg.read_text()
    cfg.write_text(good + "\n[server.typo]\n")
    run = service.make("restart")
    assert run.returncode != 0
    assert "not restarting" in run.stderr
    assert not any(c.startswith("systemctl restart") for c in service.calls)
    cfg.write_text(good)
    run = service.make("restart")
    assert run.returncode == 0, run.stderr
    assert "systemctl restart gateway" in service.calls


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to check as another user")
def test_the_check_runs_as_the_services_user(service: Service, tmp_path: Path) -> None:
    # A config only root can read: root's check would pass, the service could not start.
    for d in (tmp_path, service.etc):
        d.chmod(0o755)
    cfg = service.etc / "config.toml"
    cfg.chmod(0o600)
    args = ["check", "--config", str(cfg), "--env-file", str(service.etc / "gateway.env"),
            "--gateway", str(tmp_path / "opt/venv/bin/gateway")]
    assert subprocess.run([sys.executable, str(CTL), *args, "--user", ""]).returncode == 0
    as_nobody = subprocess.run(
        [sys.executable, str(CTL), *args, "--user", "nobody"], capture_output=True, text=True
    )
    assert as_nobody.returncode == 1
    assert "as user nobody" in as_nobody.stderr


def test_env_file_is_read_as_systemd_reads_it() -> None:
    text = (
        "# a comment\n"
        "; another\n"
        "\n"
        "PLAIN=a$b`c`;d\n"
        "SPACED =  value with  inner spaces  \n"
        'DQ="x \\"y\\" \\$z \\n"\n'
        "SQ='$HOME \\n'\n"
        "CONT=one\\\n two\n"
        "HASH=v # not a comment\n"
        'MID=a"b"\n'
    )
    assert ctl.parse_env_file(text) == {
        "PLAIN": "a$b`c`;d",
        "SPACED": "value with  inner spaces",
        "DQ": 'x "y" $z \\n',
        "SQ": "$HOME \\n",
        "CONT": "one two",
        "HASH": "v # not a comment",
        "MID": 'a"b"',
    }
    for bad in ("no equals sign\n", "1BAD=x\n", 'Q="open\n'):
        with pytest.raises(ctl.EnvFileError):
            ctl.parse_env_file(bad)


def test_the_check_refuses_a_site_that_disagrees_with_the_config(tmp_path: Path) -> None:
    site = [str(ROOT / "systemd/nginx-gateway.conf"), str(ROOT / "systemd/nginx-proxy.conf")]
    shipped = (ROOT / "config.toml").read_text()
    cfg = tmp_path / "config.toml"
    cfg.write_text(shipped)
    assert ctl.site_problems(str(cfg), site) == []
    cfg.write_text(shipped.replace("port = 8080", "port = 8081"))
    assert ctl.site_problems(str(cfg), site) == ["nginx sends to port 8080, [server].port is 8081"]
    cfg.write_text(shipped.replace("max_body_bytes = 1048576", "max_body_bytes = 4194304"))
    assert ctl.site_problems(str(cfg), site) == [
        "nginx client_max_body_size 2m is below [server].max_body_bytes 4194304"
    ]
