"""`gateway serve | check-config | keygen | mock-upstream`."""

from __future__ import annotations

import argparse
import hashlib
import secrets
import sys
from collections.abc import Sequence

from . import config


def _load_or_exit(path: str) -> config.Config | None:
    try:
        return config.load(path)
    except config.ConfigError as exc:
        for problem in exc.problems:
            print(f"{path}: {problem}", file=sys.stderr)
        return None


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = _load_or_exit(args.config)
    if cfg is None:
        return 2
    try:
        cfg = config.with_port(cfg, args.port)
    except ValueError as exc:
        print(f"--port: {exc}", file=sys.stderr)
        return 2
    from .process.server import serve

    return serve(cfg, worker=args.worker)


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load_or_exit(args.config)
    if cfg is None:
        return 2
    for warning in cfg.warnings:
        print(f"{args.config}: warning: {warning}", file=sys.stderr)
    print(f"{args.config}: ok")
    return 0


def new_key() -> str:
    """A fresh client key: `gw-` and 43 url-safe characters (256 random bits)."""
    return "gw-" + secrets.token_urlsafe(32)


def toml_string(text: str) -> str:
    """`text` as a TOML basic string: quotes and backslashes escaped."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def client_name_problem(client: str) -> str | None:
    """Why `client` cannot be a client name in the printed block (None: it can)."""
    if not client.strip():
        return "the client name is empty"
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in client):
        return "the client name has a control character (a newline, a tab, ...)"
    if "${" in client:
        return "the client name has '${', which the config would read as a variable"
    return None


def key_block(client: str, key: str) -> str:
    digest = hashlib.sha256(key.encode()).hexdigest()
    return (
        "[[auth.keys]]\n"
        f"client = {toml_string(client)}\n"
        f'sha256 = "{digest}"\n'
        "rpm = 600\n"
        "max_concurrent = 8\n"
        'models = ["*"]\n'
    )


def cmd_keygen(args: argparse.Namespace) -> int:
    problem = client_name_problem(args.client)
    if problem is not None:
        print(f"keygen: {problem}: no key made", file=sys.stderr)
        return 2
    key = new_key()
    print(key)
    print()
    print("# Paste into config.toml (only the key's SHA-256 is stored):")
    print(key_block(args.client, key), end="")
    return 0


def cmd_mock_upstream(args: argparse.Namespace) -> int:
    from . import mock_upstream

    return mock_upstream.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="serve the gateway")
    p.add_argument("--config", default=config.default_path(), help="config.toml path")
    # A systemd template unit (gateway@8081.service) runs one instance per port from one file.
    p.add_argument(
        "--port", type=int, default=None, help="listen on this port instead of [server].port"
    )
    # Set by the supervisor for the processes it starts (`[server].workers > 1`).
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check-config", help="validate a config file")
    p.add_argument("--config", default=config.default_path(), help="config.toml path")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("keygen", help="make a client key and its config block")
    p.add_argument("--client", required=True, help="client name")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("mock-upstream", help="run the bundled fake OpenAI-compatible upstream")
    from . import mock_upstream

    mock_upstream.build_parser_args(p)
    p.set_defaults(func=cmd_mock_upstream)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
