"""`.ci/run` on a "bare machine": dpkg-query, dpkg, apt-get and make are stand-ins on PATH
that record their calls; dpkg-query reports each package as a status line given here."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAKEFILE_NEEDS = ("make", "python3", "python3-venv")


def _run_ci(tmp: Path, status: dict[str, str], default: str) -> list[str]:
    bin_ = tmp / "bin"
    bin_.mkdir()
    log = tmp / "calls.log"
    log.write_text("")
    table = "\n".join(f"{name}) echo -n '{line}' ;;" for name, line in status.items())
    tools = {
        # dpkg-query -W -f='${Status}' NAME
        "dpkg-query": f'eval "name=\\${{$#}}"\ncase "$name" in\n{table}\n'
                      f"*) echo -n '{default}' ;;\nesac\n",
        # `dpkg -s` exits 0 for any package dpkg still has a status entry for.
        "dpkg": "exit 0\n",
        "apt-get": f'echo "apt-get $*" >> {log}\n',
        "make": f'echo "make $*" >> {log}\n',
    }
    for name, body in tools.items():
        (bin_ / name).write_text("#!/bin/bash\n" + body)
        (bin_ / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(ROOT / ".ci/run")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return log.read_text().splitlines()


def test_ci_installs_what_the_makefile_needs_on_a_bare_machine(tmp_path: Path) -> None:
    calls = _run_ci(tmp_path, {}, default="")  # dpkg knows of nothing
    [install] = [c for c in calls if c.startswith("apt-get install")]
    wanted = install.split()
    for package in (*MAKEFILE_NEEDS, "nginx", "redis-server", "chromium", "systemd", "openssl"):
        assert package in wanted, package
    assert calls[-1] == "make test"


def test_ci_counts_a_removed_not_purged_package_as_missing(tmp_path: Path) -> None:
    installed = "install ok installed"
    status = {p: installed for p in (*MAKEFILE_NEEDS, "redis-server", "chromium", "systemd",
                                     "openssl", "iproute2", "util-linux")}
    status["nginx"] = "deinstall ok config-files"  # `apt-get remove nginx`: conffiles stay
    calls = _run_ci(tmp_path, status, default=installed)
    [install] = [c for c in calls if c.startswith("apt-get install")]
    assert install.split()[-1:] == ["nginx"]


def test_ci_installs_nothing_when_everything_is_there(tmp_path: Path) -> None:
    calls = _run_ci(tmp_path, {}, default="install ok installed")
    assert calls == ["make test"]
