"""sd_notify(3) with the standard library: tell systemd (`Type=notify`) how we are doing.

The protocol is one datagram of `KEY=value` lines to the AF_UNIX socket named in
$NOTIFY_SOCKET: a path, or an abstract name written with a leading `@`. Without the variable
(not under systemd) every call is a no-op, so the server calls these unconditionally.
https://www.freedesktop.org/software/systemd/man/latest/sd_notify.html
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger("gateway.notify")


def socket_address(value: str) -> str | None:
    """$NOTIFY_SOCKET as an address `socket.connect` takes, or None when unusable."""
    if value.startswith("@"):
        return "\0" + value[1:]  # Linux abstract namespace
    if value.startswith("/"):
        return value
    return None  # vsock:... and other forms are not for us


def notify(message: str, env: Mapping[str, str] | None = None) -> bool:
    """Send `message` (e.g. "READY=1") to systemd; True when it was sent."""
    value = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if not value:
        return False
    address = socket_address(value)
    if address is None:
        log.warning("notify_socket_unsupported", notify_socket=value)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        # systemd went away or the socket is not ours: serving matters more than telling.
        log.warning("notify_failed", message=message, error=str(exc))
        return False
    return True


def ready(status: str = "") -> bool:
    """READY=1: the port is listening (systemd then starts units ordered after us)."""
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def stopping() -> bool:
    """STOPPING=1: shutdown has begun."""
    return notify("STOPPING=1\nSTATUS=draining")


def status(text: str) -> bool:
    """STATUS=...: the line `systemctl status` shows."""
    return notify(f"STATUS={text}")
