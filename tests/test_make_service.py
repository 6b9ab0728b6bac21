"""`make install-service` / `uninstall-service`, staged under DESTDIR (no systemd, no nginx)."""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is absent")


def _make(target: str, dest: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "make", "-s", target, f"DESTDIR={dest}",
            f"SERVICE_VENV={sys.executable} -m venv --without-pip",
            "SERVICE_PIP=true",  # building the package is pip's job, not under test here
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_install_service_lays_out_venv_unit_site_and_a_private_env_file(tmp_path: Path) -> None:
    run = _make("install-service", tmp_path)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "opt/gateway/venv/pyvenv.cfg").is_file()
    unit = tmp_path / "etc/systemd/system/gateway.service"
    assert unit.read_text() == (ROOT / "systemd/gateway.service").read_text()
    site = tmp_path / "etc/nginx/sites-available/gateway"
    assert site.read_text() == (ROOT / "systemd/nginx-gateway.conf").read_text()
    enabled = tmp_path / "etc/nginx/sites-enabled/gateway"
    assert enabled.is_symlink() and enabled.resolve() == site.resolve()
    env = tmp_path / "etc/gateway/gateway.env"
    assert _mode(env) == 0o600  # secrets: root only (systemd reads it before dropping privileges)
    assert _mode(tmp_path / "etc/gateway") == 0o755
    config = tmp_path / "etc/gateway/config.toml"
    assert config.read_text() == (ROOT / "config.toml").read_text()


def test_install_service_keeps_the_operators_config_and_secrets(tmp_path: Path) -> None:
    assert _make("install-service", tmp_path).returncode == 0
    env = tmp_path / "etc/gateway/gateway.env"
    env.write_text("OPENAI_API_KEY=sk-mine\n")
    (tmp_path / "etc/gateway/config.toml").write_text("# mine\n")
    assert _make("install-service", tmp_path).returncode == 0
    assert env.read_text() == "OPENAI_API_KEY=sk-mine\n"
    assert (tmp_path / "etc/gateway/config.toml").read_text() == "# mine\n"


def test_uninstall_service_removes_what_install_put_but_the_config(tmp_path: Path) -> None:
    assert _make("install-service", tmp_path).returncode == 0
    run = _make("uninstall-service", tmp_path)
    assert run.returncode == 0, run.stderr
    assert not (tmp_path / "opt/gateway").exists()
    assert not (tmp_path / "etc/systemd/system/gateway.service").exists()
    assert not (tmp_path / "etc/nginx/sites-enabled/gateway").exists()
    assert not (tmp_path / "etc/nginx/sites-available/gateway").exists()
    assert (tmp_path / "etc/gateway/gateway.env").exists()
