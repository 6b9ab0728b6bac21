"""Installs staged under DESTDIR: the Makefile run for real with stand-ins for the system's
tools (there is no systemd as PID 1 here). SYSTEMCTL, NGINX, USERADD and CHGRP are stand-ins
that record their calls (one line each in calls.log); pip is a stand-in that puts a `gateway`
command into the new release's venv which runs this checkout's package, so the config check
the install makes is the real `gateway check-config`. The `stage` fixture is in conftest."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Debian 12's /etc/nginx/nginx.conf, the parts the install edits.
DEBIAN_NGINX_CONF = """user www-data;
worker_processes auto;
pid /run/nginx.pid;
include /etc/nginx/modules-enabled/*.conf;

events {
\tworker_connections 768;
\t# multi_accept on;
}

http {
\tinclude /etc/nginx/conf.d/*.conf;
\tinclude /etc/nginx/sites-enabled/*;
}
"""


def _tool(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


@dataclass
class Stage:
    dest: Path
    bin: Path
    log: Path

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def path(self, rel: str) -> Path:
        return self.dest / rel.lstrip("/")

    def make(self, target: str, *extra: str, pip: str = "pip") -> subprocess.CompletedProcess[str]:
        self.log.write_text("")
        tools = {
            "SYSTEMCTL": "systemctl", "NGINX": "nginx", "USERADD": "useradd", "CHGRP": "chgrp",
        }
        return subprocess.run(
            [
                "make", "-s", target, f"DESTDIR={self.dest}",
                f"SERVICE_VENV={sys.executable} -m venv --without-pip",
                f"SERVICE_PIP={self.bin / pip}",
                *(f"{var}={self.bin / name}" for var, name in tools.items()),
                *extra,
            ],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )


def stand_ins(tools: Path, log: Path) -> None:
    tools.mkdir()
    for name in ("systemctl", "useradd", "chgrp"):
        _tool(tools / name, f'echo "{name} $*" >> {log}\n')
    _tool(tools / "nginx", f'echo "nginx $*" >> {log}\nexit ${{FAIL_NGINX:-0}}\n')
    # The stand-in for pip: records the source directory it was given, leaves there what
    # setuptools leaves (build/, *.egg-info), and gives the venv a working `gateway`.
    _tool(
        tools / "pip",
        f'echo "pip $1" >> {log}\n'
        'mkdir -p "$1/build/lib" "$1/gateway.egg-info"\n'
        'mkdir -p "$NEW/bin"\n'
        f"printf '#!/bin/sh\\nPYTHONPATH={ROOT} exec {sys.executable} -m gateway \"$@\"\\n'"
        ' > "$NEW/bin/gateway"\n'
        'chmod 755 "$NEW/bin/gateway"\n',
    )
    _tool(tools / "failing-pip", f'echo "pip $1" >> {log}\nexit 1\n')


def make_stage(tmp_path: Path) -> Stage:
    dest, tools = tmp_path / "root", tmp_path / "bin"
    dest.mkdir()
    log = tmp_path / "calls.log"
    stand_ins(tools, log)
    nginx = dest / "etc/nginx"
    (nginx / "sites-available").mkdir(parents=True)
    (nginx / "sites-enabled").mkdir()
    (nginx / "sites-available/default").write_text("server { listen 80 default_server; }\n")
    (nginx / "sites-enabled/default").symlink_to("/etc/nginx/sites-available/default")
    (nginx / "nginx.conf").write_text(DEBIAN_NGINX_CONF)
    return Stage(dest, tools, log)
