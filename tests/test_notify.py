"""sd_notify over $NOTIFY_SOCKET, with sockets the tests bind (a path and an abstract name)."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.process import notify


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


@pytest.fixture
def abstract_socket() -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"gateway-test-{os.getpid()}-{secrets.token_hex(6)}"
    sock.bind("\0" + name)
    sock.settimeout(5)
    yield sock, "@" + name
    sock.close()


def test_notify_sends_one_datagram_to_a_path_socket(path_socket: tuple[socket.socket, str]) -> None:
    sock, path = path_socket
    assert notify.notify("READY=1\nSTATUS=listening", env={"NOTIFY_SOCKET": path})
    assert sock.recv(4096) == b"READY=1\nSTATUS=listening"


def test_notify_reaches_an_abstract_socket_named_with_at(
    abstract_socket: tuple[socket.socket, str],
) -> None:
    sock, name = abstract_socket
    assert notify.notify("STOPPING=1", env={"NOTIFY_SOCKET": name})
    assert sock.recv(4096) == b"STOPPING=1"


def test_notify_without_notify_socket_is_a_no_op() -> None:
    assert notify.notify("READY=1", env={}) is False


def test_notify_to_a_missing_socket_does_not_raise(tmp_path: Path) -> None:
    assert notify.notify("READY=1", env={"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}) is False


def test_notify_ignores_unsupported_addresses() -> None:
    assert notify.socket_address("vsock:2:1234") is None
    assert notify.notify("READY=1", env={"NOTIFY_SOCKET": "vsock:2:1234"}) is False


def test_ready_and_stopping_use_the_environment(
    monkeypatch: pytest.MonkeyPatch, path_socket: tuple[socket.socket, str]
) -> None:
    sock, path = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert notify.ready("listening on 127.0.0.1:8080")
    assert sock.recv(4096) == b"READY=1\nSTATUS=listening on 127.0.0.1:8080"
    assert notify.stopping()
    assert sock.recv(4096).split(b"\n")[0] == b"STOPPING=1"
