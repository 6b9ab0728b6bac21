"""`make install-service` / `uninstall-service`, the Makefile run for real and staged under
DESTDIR with stand-ins for systemctl, nginx, useradd, chgrp and pip (tests/staging.py)."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from .staging import DEBIAN_NGINX_CONF, Stage, stand_ins

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is absent")



def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _live(stage: Stage) -> Path:
    """The release the `venv` symlink points at."""
    venv = stage.path("/opt/gateway/venv")
    assert venv.is_symlink()
    return venv.resolve()


def test_install_service_lays_out_a_release_unit_site_and_private_files(stage: Stage) -> None:
    run = stage.make("install-service")
    assert run.returncode == 0, run.stderr
    release = _live(stage)
    assert release.parent == stage.path("/opt/gateway/releases")
    assert (release / "pyvenv.cfg").is_file()
    unit = stage.path("/etc/systemd/system/gateway.service")
    assert unit.read_text() == (ROOT / "systemd/gateway.service").read_text()
    site = stage.path("/etc/nginx/sites-available/gateway")
    assert site.read_text() == (ROOT / "systemd/nginx-gateway.conf").read_text()
    assert stage.path("/etc/nginx/gateway/proxy.conf").read_text() == (
        ROOT / "systemd/nginx-proxy.conf"
    ).read_text()
    assert stage.path("/etc/nginx/gateway/local.conf").read_text() == (
        ROOT / "systemd/nginx-local.conf"
    ).read_text()
    enabled = stage.path("/etc/nginx/sites-enabled/gateway")
    assert enabled.is_symlink() and enabled.resolve() == site.resolve()
    config = stage.path("/etc/gateway/config.toml")
    assert config.read_text() == (ROOT / "config.toml").read_text()
    # Point 6: secrets and key hashes are the service's group's business, no one else's.
    assert _mode(config) == 0o640
    assert _mode(stage.path("/etc/gateway/gateway.env")) == 0o600
    assert _mode(stage.path("/etc/gateway")) == 0o750
    calls = stage.calls()
    assert (
        "useradd --system --user-group --no-create-home --home-dir /nonexistent "
        "--shell /usr/sbin/nologin gateway"
    ) in calls
    assert f"chgrp gateway {config}" in calls
    assert f"chgrp gateway {stage.path('/etc/gateway')}" in calls
    # Point 2: checked (nginx -t) before the switch, then restarted (systemd drains the old
    # instance on the way), nginx reloaded last.
    live = [c for c in calls if c.startswith(("nginx", "systemctl"))]
    assert live == [
        "nginx -t",
        "systemctl daemon-reload",
        "systemctl enable gateway",
        "systemctl restart gateway",
        "systemctl reload-or-restart nginx",
        # gateway@ instances left from an INSTANCES=N install: stopped (none here).
        "systemctl list-units --plain --no-legend --state=active gateway@*.service",
    ]


def test_an_upgrade_keeps_the_operators_config_secrets_and_nginx_local_conf(
    stage: Stage,
) -> None:
    assert stage.make("install-service").returncode == 0
    env = stage.path("/etc/gateway/gateway.env")
    env.write_text("OPENAI_API_KEY=sk-mine\n")
    config = stage.path("/etc/gateway/config.toml")
    config.write_text((ROOT / "config.toml").read_text() + "# mine\n")
    config.chmod(0o600)  # tightened by the operator
    local = stage.path("/etc/nginx/gateway/local.conf")
    local.write_text("# my TLS server, my certificate paths\n")
    site = stage.path("/etc/nginx/sites-available/gateway")
    site.write_text("# an old version of the site\n")
    run = stage.make("install-service")
    assert run.returncode == 0, run.stderr
    assert env.read_text() == "OPENAI_API_KEY=sk-mine\n"
    assert config.read_text().endswith("# mine\n")
    assert _mode(config) == 0o600  # never loosened
    assert local.read_text() == "# my TLS server, my certificate paths\n"
    assert site.read_text() == (ROOT / "systemd/nginx-gateway.conf").read_text()  # ours: new


def test_an_upgrade_tightens_a_world_readable_config_from_an_older_install(stage: Stage) -> None:
    etc = stage.path("/etc/gateway")
    etc.mkdir(parents=True, mode=0o755)
    etc.chmod(0o755)
    config = etc / "config.toml"
    config.write_text((ROOT / "config.toml").read_text())
    config.chmod(0o644)
    assert stage.make("install-service").returncode == 0
    assert _mode(config) == 0o640
    assert _mode(etc) == 0o750
    assert f"chgrp gateway {config}" in stage.calls()


def test_debians_default_site_stays_unless_asked_and_uninstall_restores_it(stage: Stage) -> None:
    default = stage.path("/etc/nginx/sites-enabled/default")
    assert stage.make("install-service").returncode == 0
    assert default.is_symlink()
    assert stage.make("install-service", "DISABLE_DEFAULT_SITE=yes").returncode == 0
    assert not default.is_symlink()
    assert stage.make("uninstall-service").returncode == 0
    assert os.readlink(default) == "/etc/nginx/sites-available/default"


def test_a_failed_pip_run_leaves_the_running_release_alone(stage: Stage) -> None:
    assert stage.make("install-service").returncode == 0
    before = _live(stage)
    run = stage.make("install-service", pip="failing-pip")
    assert run.returncode != 0
    assert "pip failed" in run.stderr and "unchanged" in run.stderr
    assert _live(stage) == before
    assert [p.name for p in stage.path("/opt/gateway/releases").iterdir()] == [before.name]
    assert not any(c.startswith("systemctl") for c in stage.calls())


def test_a_config_the_new_release_refuses_stops_the_upgrade_before_the_switch(
    stage: Stage,
) -> None:
    assert stage.make("install-service").returncode == 0
    before = _live(stage)
    stage.path("/etc/gateway/config.toml").write_text("[server]\nprot = 1\n")
    run = stage.make("install-service")
    assert run.returncode != 0
    assert "server.prot: unknown key" in run.stderr
    assert _live(stage) == before
    assert not any(c.startswith("systemctl") for c in stage.calls())


def test_a_site_nginx_refuses_is_put_back_and_nothing_restarts(stage: Stage) -> None:
    assert stage.make("install-service").returncode == 0
    before = _live(stage)
    site = stage.path("/etc/nginx/sites-available/gateway")
    site.write_text("# the site that works\n")
    run = stage.make("install-service", "FAIL_NGINX=1")
    assert run.returncode != 0
    assert "nginx -t failed" in run.stderr
    assert site.read_text() == "# the site that works\n"
    assert not list(site.parent.glob("*.gateway-old"))
    assert _live(stage) == before
    assert not any(c.startswith("systemctl") for c in stage.calls())


def test_pip_builds_from_a_copy_outside_the_checkout_and_nothing_is_left(stage: Stage) -> None:
    assert stage.make("install-service").returncode == 0
    [src] = [c.split(" ", 1)[1] for c in stage.calls() if c.startswith("pip ")]
    assert not Path(src).resolve().is_relative_to(ROOT)  # root-owned build/ never lands here
    assert (Path(src) / "gateway" / "cli.py").exists() is False  # the copy is removed too


def test_only_two_releases_are_kept(stage: Stage) -> None:
    for _ in range(3):
        assert stage.make("install-service").returncode == 0
    releases = list(stage.path("/opt/gateway/releases").iterdir())
    assert len(releases) == 2 and _live(stage) in releases


def test_nginx_gets_room_for_streams_once_and_uninstall_puts_it_back(stage: Stage) -> None:
    conf = stage.path("/etc/nginx/nginx.conf")
    assert stage.make("install-service").returncode == 0
    assert stage.make("install-service").returncode == 0  # idempotent
    text = conf.read_text()
    assert text.count("worker_connections") == 1
    assert "\tworker_connections 8192; # gateway: was 768\n" in text
    limits = stage.path("/etc/nginx/modules-enabled/90-gateway-limits.conf")
    assert "worker_rlimit_nofile 65536;" in limits.read_text()
    assert stage.make("uninstall-service").returncode == 0
    assert conf.read_text() == DEBIAN_NGINX_CONF
    assert not limits.exists()


def test_uninstall_removes_exactly_what_install_made(stage: Stage) -> None:
    # PREFIX=/usr/local: the old `rm -rf $(PREFIX)` took everything else there with it.
    other = stage.path("/usr/local/bin/something-else")
    other.parent.mkdir(parents=True)
    other.write_text("keep me\n")
    assert stage.make("install-service", "PREFIX=/usr/local").returncode == 0
    dropin = stage.path("/etc/systemd/system/gateway.service.d/override.conf")
    dropin.parent.mkdir()
    dropin.write_text("[Service]\nTimeoutStopSec=90\n")
    run = stage.make("uninstall-service", "PREFIX=/usr/local")
    assert run.returncode == 0, run.stderr
    assert other.read_text() == "keep me\n"
    assert not stage.path("/usr/local/venv").exists()
    assert not stage.path("/usr/local/releases").exists()
    assert not stage.path("/etc/systemd/system/gateway.service").exists()
    assert not dropin.parent.exists()
    assert not stage.path("/etc/nginx/sites-enabled/gateway").exists()
    assert not stage.path("/etc/nginx/sites-available/gateway").exists()
    assert not stage.path("/etc/nginx/gateway/proxy.conf").exists()
    # The operator's: kept, and said so.
    assert stage.path("/etc/gateway/gateway.env").exists()
    assert stage.path("/etc/nginx/gateway/local.conf").exists()
    assert "Kept" in run.stdout
    assert stage.calls() == [
        # which gateway@ instances run (none here: the stand-in answers nothing)
        "systemctl list-units --plain --no-legend --state=active gateway@*.service",
        "systemctl disable --now gateway",
        "systemctl daemon-reload",
        "systemctl reset-failed gateway gateway@*",
        "systemctl reload nginx",
    ]


def test_uninstall_of_an_old_style_venv_directory(stage: Stage) -> None:
    venv = stage.path("/opt/gateway/venv")
    venv.mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    assert stage.make("uninstall-service").returncode == 0
    assert not stage.path("/opt/gateway").exists()


def test_an_old_style_venv_directory_becomes_a_release_on_upgrade(stage: Stage) -> None:
    venv = stage.path("/opt/gateway/venv")
    venv.mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    run = stage.make("install-service")
    assert run.returncode == 0, run.stderr
    assert venv.is_symlink()
    legacy = [p for p in stage.path("/opt/gateway/releases").iterdir() if p != _live(stage)]
    assert [p.name.startswith("legacy-") for p in legacy] == [True]
    assert (legacy[0] / "pyvenv.cfg").read_text() == "home = /usr/bin\n"


@pytest.mark.skipif(
    not Path("/etc/nginx/nginx.conf").is_file() or shutil.which("nginx") is None,
    reason="needs Debian's nginx",
)
def test_the_installed_site_passes_nginx_t_in_debians_layout(tmp_path: Path) -> None:
    # Debian's own /etc/nginx, copied and staged; the install done for real into it; then
    # the real `nginx -t` with every /etc/nginx path pointing into the stage.
    dest = tmp_path / "root"
    shutil.copytree("/etc/nginx", dest / "etc/nginx", symlinks=True)
    stage = Stage(dest, tmp_path / "bin", tmp_path / "calls.log")
    stand_ins(stage.bin, stage.log)
    run = stage.make("install-service")
    assert run.returncode == 0, run.stderr
    etc = dest / "etc/nginx"
    files = {etc / "nginx.conf", *etc.rglob("*.conf"), etc / "sites-available/gateway"}
    for real in sorted(files):
        if real.is_file() and not real.is_symlink():
            text = real.read_text().replace("/etc/nginx/", f"{etc}/")
            text = re.sub(r"(?m)^pid .*;$", f"pid {tmp_path}/nginx.pid;", text)
            real.write_text(text)
    for link in (etc / "sites-enabled").iterdir():
        target = os.readlink(link)
        if target.startswith("/etc/nginx/"):
            link.unlink()
            link.symlink_to(target.replace("/etc/nginx/", f"{etc}/"))
    conf = (etc / "nginx.conf").read_text()
    assert re.search(r"(?m)^\s*worker_connections 8192; # gateway: was 768$", conf)
    check = subprocess.run(
        [shutil.which("nginx") or "nginx", "-t", "-c", str(etc / "nginx.conf"),
         "-e", str(tmp_path / "error.log")],
        capture_output=True, text=True, timeout=60,
    )
    assert check.returncode == 0, check.stderr
    assert "worker_rlimit_nofile" in (etc / "modules-enabled/90-gateway-limits.conf").read_text()


def test_a_first_install_nginx_refuses_leaves_nginx_as_it_was(stage: Stage) -> None:
    # Everything the install put into /etc/nginx before `nginx -t` (site, link, main-context
    # snippet, worker_connections, the default site's link) is undone when it fails: a
    # config nginx refuses would otherwise break the operator's next `systemctl reload nginx`.
    nginx = stage.path("/etc/nginx")
    before = {
        p.relative_to(nginx): (os.readlink(p) if p.is_symlink() else p.read_text())
        for p in sorted(nginx.rglob("*")) if p.is_file() or p.is_symlink()
    }
    run = stage.make("install-service", "FAIL_NGINX=1", "DISABLE_DEFAULT_SITE=yes")
    assert run.returncode != 0
    assert "nginx -t failed" in run.stderr
    after = {
        p.relative_to(nginx): (os.readlink(p) if p.is_symlink() else p.read_text())
        for p in sorted(nginx.rglob("*")) if p.is_file() or p.is_symlink()
    }
    assert after == before
    assert not stage.path("/opt/gateway/venv").exists()
    assert not any(c.startswith("systemctl") for c in stage.calls())


def test_an_upgrade_nginx_refuses_keeps_the_previous_nginx_files(stage: Stage) -> None:
    assert stage.make("install-service").returncode == 0
    nginx = stage.path("/etc/nginx")
    limits = nginx / "modules-enabled/90-gateway-limits.conf"
    limits.write_text("# the snippet that works\n")
    before = {
        p.relative_to(nginx): (os.readlink(p) if p.is_symlink() else p.read_text())
        for p in sorted(nginx.rglob("*")) if p.is_file() or p.is_symlink()
    }
    run = stage.make("install-service", "FAIL_NGINX=1", "DISABLE_DEFAULT_SITE=yes")
    assert run.returncode != 0
    after = {
        p.relative_to(nginx): (os.readlink(p) if p.is_symlink() else p.read_text())
        for p in sorted(nginx.rglob("*")) if p.is_file() or p.is_symlink()
    }
    assert after == before
