"""The documentation in docs/ stays true to the code: keys, metrics, error codes, the tour.

Nothing here lists what the code holds: the config keys come from walking the schema's
dataclasses, the metrics from scraping a running app, the error codes from the error tree and
a scan of the package's source. Adding a key, a metric or a code without documenting it fails.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib
import os
import pkgutil
import re
import subprocess
import sys
import tomllib
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import gateway
from gateway import config
from gateway.errors import GatewayError
from gateway.process import reload

from .conftest import TEST_KEY, Gateway, chat_body
from .test_serve import free_port, wait_listening

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# ---------------------------------------------------------------------------- markdown


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table_rows(lines: list[str]) -> Iterator[list[str]]:
    """Body rows of the Markdown tables in `lines` (header and separator rows skipped)."""
    previous = ""
    for line in lines:
        if line.startswith("|") and not re.fullmatch(r"\|[\s|:-]+\|?", line.strip()):
            if previous.startswith("|"):
                yield _cells(line)
        previous = line if line.startswith("|") else ""
    return


def _section(text: str, title: str) -> list[str]:
    """The lines under the `## title` heading, up to the next heading of that level."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == f"## {title}")
    end = next(
        (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
    )
    return lines[start + 1 : end]


def _code(cell: str) -> str | None:
    m = re.fullmatch(r"`([^`]*)`", cell)
    return m.group(1) if m else None


# ---------------------------------------------------------------------------- configuration


def _schema(cls: type[Any] = config.Config, path: str = "") -> Iterator[tuple[str, dataclasses.Field[Any], Any]]:  # noqa: E501
    """(section, field, type hint) for every scalar key the loader accepts, from the dataclasses."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        hint = hints[f.name]
        sub = f"{path}.{f.name}" if path else f.name
        if dataclasses.is_dataclass(hint):
            yield from _schema(typing.cast(type[Any], hint), sub)
        elif typing.get_origin(hint) is tuple and dataclasses.is_dataclass(
            typing.get_args(hint)[0]
        ):
            yield from _schema(typing.get_args(hint)[0], sub)
        else:
            yield path, f, hint


def _documented_config() -> dict[tuple[str, str], list[str]]:
    """(section, key) -> table row, for every key in docs/configuration.md's section tables."""
    out: dict[tuple[str, str], list[str]] = {}
    section: str | None = None
    rows: list[str] = []

    def flush() -> None:
        for row in _table_rows(rows):
            key = _code(row[0])
            if section is not None and key is not None:
                assert (section, key) not in out, f"{section}.{key} documented twice"
                out[section, key] = row

    for line in (DOCS / "configuration.md").read_text().splitlines():
        if line.startswith("#"):
            flush()
            rows = []
            m = re.fullmatch(r"#+ `\[\[?([A-Za-z0-9_.]+)\]\]?`", line.strip())
            section = m.group(1) if m else None
        else:
            rows.append(line)
    flush()
    return out


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _parse_documented(cell: str, f: dataclasses.Field[Any], hint: Any) -> Any:
    """A documented default (a TOML value in backticks) as the loader would store it."""
    literal = _code(cell)
    assert literal is not None, f"default {cell!r} is not a `TOML value`"
    value = tomllib.loads(f"v = {literal}")["v"]
    if hint is float and isinstance(value, int):
        value = float(value)
    check = f.metadata.get("check")
    return check(value) if check is not None else value


def _restart_only(section: str, key: str) -> bool:
    path = f"{section}.{key}"
    return any(path == p or path.startswith(p + ".") for p in reload.RESTART_ONLY)


def test_every_config_key_is_documented_with_its_default() -> None:
    documented = _documented_config()
    problems = []
    for section, f, hint in _schema():
        row = documented.get((section, f.name))
        if row is None:
            problems.append(f"{section}.{f.name}: not in docs/configuration.md")
            continue
        default = _default(f)
        if default is dataclasses.MISSING:
            if row[2].lower() != "required":
                problems.append(f"{section}.{f.name}: required, documented default {row[2]!r}")
        elif _parse_documented(row[2], f, hint) != default:
            problems.append(f"{section}.{f.name}: default is {default!r}, documented {row[2]!r}")
        expected = "restart" if _restart_only(section, f.name) else "SIGHUP"
        if row[4] != expected:
            problems.append(f"{section}.{f.name}: takes {expected}, documented {row[4]!r}")
    assert not problems, "\n".join(problems)


def test_every_documented_config_key_is_accepted() -> None:
    accepted = {(section, f.name) for section, f, _ in _schema()}
    documented = _documented_config()
    assert len(documented) > 50  # the tables were found at all
    unknown = sorted(f"{s}.{k}" for s, k in documented if (s, k) not in accepted)
    assert not unknown, f"documented but not accepted by the loader: {unknown}"


def test_a_config_made_of_the_documented_defaults_loads() -> None:
    """The loader itself accepts every documented key with its documented default."""
    documented = _documented_config()
    tables: dict[str, list[str]] = {}
    for (section, key), row in documented.items():
        if row[2] != "required":
            tables.setdefault(section, []).append(f"{key} = {_code(row[2])}")
    arrays = {"upstreams": ['name = "a"', 'base_url = "http://127.0.0.1:1/v1"'],
              "auth.keys": ['client = "c"', 'sha256 = ""']}
    text = []
    for section, lines in tables.items():
        if section in arrays:
            text += [f"[[{section}]]", *arrays[section], *lines]
        else:
            text += [f"[{section}]", *lines]
    cfg = config.parse("\n".join(text), env={})
    assert cfg.upstreams[0].name == "a"


# ---------------------------------------------------------------------------- metrics


async def test_every_exposed_metric_is_documented(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    # One request through, so the labelled series have samples to read labels from.
    async with http.post(f"{gateway.url}/v1/chat/completions", json=chat_body(),
                         headers={"Authorization": f"Bearer {TEST_KEY}"}) as resp:
        assert resp.status == 200
        await resp.read()
    async with http.get(f"{gateway.url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    families = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    assert families, "no metric exposed"
    doc = "\n".join(_section((DOCS / "operations.md").read_text(), "Metrics"))
    rows = {_code(r[0]): r for r in _table_rows(doc.splitlines()) if _code(r[0])}
    problems = []
    for name, kind in families.items():
        base = name.removesuffix("_created")
        if name != base and kind == "gauge" and (base in families or base + "_total" in families):
            continue  # prometheus_client's companion series of a counter or histogram
        row = rows.get(name)
        if row is None:
            problems.append(f"{name}: not in the metrics table of docs/operations.md")
            continue
        labels = set()
        for sample in re.findall(rf"^{re.escape(name)}(?:_bucket|_count|_sum)?\{{([^}}]*)\}}", text, re.M):  # noqa: E501
            labels |= {kv.split("=")[0] for kv in sample.split(",")} - {"le"}
        missing = [label for label in labels if f"`{label}`" not in row[2]]
        if missing:
            problems.append(f"{name}: labels {missing} not documented")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------- error codes

# The bundled fake upstream is not the gateway: its codes are an upstream's.
_NOT_GATEWAY = {"mock_upstream.py"}


def _source_files() -> list[Path]:
    return [p for p in Path(gateway.__file__).parent.rglob("*.py") if p.name not in _NOT_GATEWAY]


def _codes_in_source() -> set[str]:
    """Literal codes: `code="..."` keywords, and string arguments in the position of a
    parameter named `code` of any function the package defines (error_body(m, t, code)...)."""
    trees = [ast.parse(p.read_text()) for p in _source_files()]
    positions: dict[str, int] = {}
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                names = [a.arg for a in node.args.posonlyargs + node.args.args]
                if names[:1] in (["self"], ["cls"]):
                    names = names[1:]
                if "code" in names:
                    positions[node.name] = names.index("code")
    codes = set()
    for tree in trees:
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            for kw in node.keywords:
                if kw.arg == "code" and isinstance(kw.value, ast.Constant):
                    if isinstance(kw.value.value, str):
                        codes.add(kw.value.value)
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            i = positions.get(name) if name else None
            if i is not None and i < len(node.args):
                arg = node.args[i]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    codes.add(arg.value)
    return codes


def _error_classes() -> set[type[GatewayError]]:
    for info in pkgutil.walk_packages(gateway.__path__, "gateway."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    found: set[type[GatewayError]] = set()
    todo = [GatewayError]
    while todo:
        cls = todo.pop()
        found.add(cls)
        todo.extend(cls.__subclasses__())
    return found


def _error_table() -> list[list[str]]:
    return list(_table_rows(_section((DOCS / "api.md").read_text(), "Errors")))


def test_every_error_code_is_in_the_error_table() -> None:
    table = _error_table()
    documented = {_code(r[2]) for r in table}
    codes = _codes_in_source() | {c.default_code for c in _error_classes() if c.default_code}
    assert {"invalid_json", "rate_limit_exceeded", "stream_owner_lost"} <= codes  # the scan works
    missing = sorted(codes - documented)
    assert not missing, f"error codes missing from the error table of docs/api.md: {missing}"
    stale = sorted(c for c in documented - codes if c is not None)
    assert not stale, f"codes in docs/api.md the gateway never produces: {stale}"


def test_every_error_class_status_and_type_is_in_the_error_table() -> None:
    rows = {(r[0], _code(r[1])) for r in _error_table()}
    missing = sorted(
        f"{c.__name__}: {c.status} {c.type}"
        for c in _error_classes()
        if (str(c.status), c.type) not in rows
    )
    assert not missing, f"error classes missing from docs/api.md: {missing}"


# ---------------------------------------------------------------------------- no outside paths


def test_nothing_points_outside_the_repository() -> None:
    try:
        tracked = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
        ).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: the source tree
        skip = {".git", ".venv", "build", "local", "__pycache__", ".mypy_cache", ".ruff_cache"}
        tracked = [
            str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
            if p.is_file() and not skip & set(p.relative_to(ROOT).parts)
            and ".egg-info" not in str(p)
        ]
    needles = ("../" + "shared", "CONTRACT" + ".md")  # split so this file does not match
    hits = []
    for name in filter(None, tracked):
        path = ROOT / name
        if not path.is_file():
            continue
        text = path.read_bytes().decode("utf-8", "replace")
        hits += [f"{name}: {n}" for n in needles if n in text]
    assert not hits, hits


def test_the_readme_links_into_docs() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in ("configuration.md", "api.md", "operations.md"):
        assert f"(docs/{name})" in readme
        assert (DOCS / name).is_file()


# ---------------------------------------------------------------------------- the README tour

DEMO_KEY = "gw-readme-tour-key-abcdefghijklmnopqrstuvwxyz012"


def _tour_blocks() -> list[tuple[str, str]]:
    """(language, code) of the fenced sh and python blocks of the README's tour."""
    tour = "\n".join(_section((ROOT / "README.md").read_text(), "A five-minute tour"))
    return re.findall(r"^```(sh|python)\n(.*?)^```$", tour, re.M | re.S)


@pytest.fixture
def make_run(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """`make run`'s two processes on free ports: the mock upstream and the gateway serving the
    shipped config.toml with a demo key; a working directory holding local/demo.key."""
    mock_port, gw_port = free_port(), free_port()
    env = {
        **os.environ,
        "GATEWAY_DEMO_KEY_SHA256": hashlib.sha256(DEMO_KEY.encode()).hexdigest(),
        "UPSTREAM_URL": f"http://127.0.0.1:{mock_port}/v1",
    }
    env.pop("OPENAI_API_KEY", None)
    cfg = tmp_path / "config.toml"
    cfg.write_text((ROOT / "config.toml").read_text().replace("port = 8080", f"port = {gw_port}"))
    work = tmp_path / "work"
    (work / "local").mkdir(parents=True)
    (work / "local" / "demo.key").write_text(DEMO_KEY + "\n")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "gateway", "mock-upstream", "--port", str(mock_port)],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(cfg)],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ),
    ]
    try:
        wait_listening(mock_port, procs[0])
        wait_listening(gw_port, procs[1])
        yield gw_port, work
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _run(lang: str, code: str, port: int, work: Path) -> str:
    code = code.replace("127.0.0.1:8080", f"127.0.0.1:{port}")
    argv = ["bash", "-euo", "pipefail", "-c", code] if lang == "sh" else [sys.executable, "-c", code]  # noqa: E501
    done = subprocess.run(argv, cwd=work, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{lang} block failed:\n{code}\n{done.stdout}\n{done.stderr}"
    assert '"error"' not in done.stdout and "Traceback" not in done.stderr, done.stdout
    return done.stdout


def test_the_readme_tour_runs_against_make_runs_gateway(make_run) -> None:
    port, work = make_run
    blocks = _tour_blocks()
    # Each block's expected output below; a block added to the tour needs its own.
    assert [lang for lang, _ in blocks] == ["sh", "python", "sh", "python"]
    # The shell blocks run in one shell, as a reader's terminal does (the first sets $KEY).
    mark = "@@ next block @@"
    shell = _run("sh", f"\necho '{mark}'\n".join(c for lang, c in blocks if lang == "sh"),
                 port, work)
    chat, streams = shell.split(mark + "\n")
    # Likewise the Python blocks in one interpreter (the second uses the first's `client`).
    python = _run(
        "python",
        f"\nprint('{mark}')\n".join(c for lang, c in blocks if lang == "python"),
        port,
        work,
    )
    sdk, background = python.split(mark + "\n")

    # Streamed: SSE chunks, then [DONE]; not streamed: one completion; then the model list.
    assert chat.count("data: {") > 2 and "data: [DONE]" in chat
    assert '"object":"chat.completion"' in chat.replace(" ", "")
    assert '"object":"list"' in chat.replace(" ", "")
    assert "You said: Say hello" in "".join(re.findall(r'"content":\s*"([^"]*)"', chat))

    assert sdk.startswith("You said: Say hello")
    # The background response resumed after sequence number 5, then retrieved: completed.
    assert background.rstrip().endswith("completed")
    assert len(background.strip()) > len("completed")  # the deltas after the cursor

    # The detached stream from event 1 to done, then replayed after event 3 only.
    ids = [int(i) for i in re.findall(r"^id: (\d+)$", streams, re.M)]
    assert "retry: 3000" in streams and streams.count("event: done") == 2
    last = max(ids)
    assert last > 3
    assert ids == list(range(1, last + 1)) + list(range(4, last + 1))
