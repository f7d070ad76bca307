"""The documentation's programs run as written, its names exist, and its pages fit.

A program in a page is a ``.. code-block::`` preceded by a comment ``.. test: NAME``.
Programs that define ``main()`` and guard ``trio.run(main)`` with ``__name__`` run
in-process; the quick start's scripts and the SIGTERM recipe run as real subprocesses on
127.0.0.1, each bounded by ``trio.fail_after`` and killed on the way out.
"""

from __future__ import annotations

import ast
import logging
import re
import signal
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from helpers import running_server, spawn_process

import monte_trio
import monte_trio.testing

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PACKAGE = ROOT / "monte_trio"
# The pages whose programs and names this file checks.
PAGES = ("quickstart.rst", "recipes.rst", "logging.rst", "streams.rst")
TIMEOUT = 20
WIDTH = 90  # the widest line a code block or table may have and still fit the page


# -- reading the pages -------------------------------------------------------------------


def _directive_body(lines: list[str], start: int) -> tuple[str, int]:
    """The indented body of the directive on ``lines[start]`` (options skipped), and the
    index of the first line after it."""
    index = start + 1
    while index < len(lines) and lines[index].strip().startswith(":"):
        index += 1
    body: list[str] = []
    while index < len(lines) and (not lines[index].strip() or lines[index].startswith(" ")):
        body.append(lines[index])
        index += 1
    return textwrap.dedent("\n".join(body)).strip("\n") + "\n", index


def named_blocks(page: str) -> dict[str, str]:
    """The code blocks of ``page`` marked ``.. test: NAME``, by name."""
    lines = (DOCS / page).read_text(encoding="utf-8").splitlines()
    blocks: dict[str, str] = {}
    for number, line in enumerate(lines):
        marker = re.fullmatch(r"\.\. test: ([\w-]+)", line.strip())
        if marker is None:
            continue
        following = next(i for i in range(number + 1, len(lines)) if lines[i].strip())
        assert lines[following].startswith(".. code-block::"), (
            f"{page}:{number + 1}: the marker {line!r} is not followed by a code block"
        )
        name = marker.group(1)
        assert name not in blocks, f"{page}: two blocks are named {name!r}"
        blocks[name] = _directive_body(lines, following)[0]
    return blocks


def code_blocks(page: str) -> Iterator[tuple[int, str, str]]:
    """Every code block of ``page``: (line number, language, code)."""
    lines = (DOCS / page).read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines):
        directive = re.fullmatch(r"\.\. code-block:: (\w+)", line.strip())
        if directive is not None:
            yield number + 1, directive.group(1), _directive_body(lines, number)[0]


def program(page: str, name: str) -> str:
    blocks = named_blocks(page)
    assert name in blocks, f"{page} has no block marked '.. test: {name}'"
    return blocks[name]


async def run_in_process(page: str, name: str) -> dict[str, Any]:
    """Run a program's ``main()`` in this trio run; return its namespace."""
    code = compile(program(page, name), f"docs/{page}:{name}", "exec")
    namespace: dict[str, Any] = {"__name__": f"docs_{name.replace('-', '_')}"}
    exec(code, namespace)
    with trio.fail_after(TIMEOUT):
        await namespace["main"]()
    return namespace


def in_dir(cwd: Path, *argv: str) -> list[str]:
    """``argv`` run with ``cwd`` as its working directory (the shell execs it, so
    signals reach the program itself)."""
    return ["sh", "-c", 'cd "$0" && exec "$@"', str(cwd), *argv]


async def run_command(argv: list[str]) -> str:
    """Run ``argv`` to completion; return its output (it must succeed)."""
    async with spawn_process(argv) as proc:
        status, out, err = await proc.finish()
    assert status == 0, f"{argv} exited with {status}: {err}"
    return out


def public_key_line(text: str) -> str:
    match = re.search(r"^public key: (\S+)$", text, flags=re.MULTILINE)
    assert match is not None, f"no 'public key: KEY' line in {text!r}"
    return match.group(1)


# -- the quick start -----------------------------------------------------------------------


async def test_quickstart_runs_as_written(tmp_path: Path) -> None:
    """The keys, then the server, then the client, as the page says; the server's key
    travels from keygen's output to the client's command line."""
    keygens = [
        line.removeprefix("$ ").split()
        for line in program("quickstart.rst", "quickstart-keys").splitlines()
        if line.startswith("$ ")
    ]
    assert [argv[-1] for argv in keygens] == ["server.key", "client.key"]
    for script in ("server", "client"):
        (tmp_path / f"{script}.py").write_text(program("quickstart.rst", f"quickstart-{script}"))
    python = sys.executable
    with trio.fail_after(TIMEOUT):
        outputs: list[str] = []
        for argv in keygens:
            assert argv[:3] == ["python", "-m", "monte_trio"]
            outputs.append(await run_command(in_dir(tmp_path, python, *argv[1:])))
        shown = program("quickstart.rst", "quickstart-keys").splitlines()[1:3]
        assert outputs[0].splitlines()[0] == shown[0]  # "wrote private key to ..."
        key_from_keygen = public_key_line(outputs[0])
        assert public_key_line(shown[1]) != key_from_keygen  # the page shows an example
        client_key = public_key_line(outputs[1])
        async with spawn_process(in_dir(tmp_path, python, "server.py", "0")) as server:
            listening = await server.expect("listening on 127.0.0.1:")
            port = listening.rsplit(":", 1)[1]
            argv = in_dir(tmp_path, python, "client.py", key_from_keygen, port)
            client_out = await run_command(argv)
            assert client_out == "reply: HELLO\n"  # the method's result, through the proxy
        learned = (tmp_path / "known_clients").read_text()
        assert client_key in learned


async def test_quickstart_client_refuses_another_server(tmp_path: Path) -> None:
    """The client pins the key it is given: a server with another key is refused."""
    monte_trio.Identity.generate().save(tmp_path / "client.key")
    (tmp_path / "client.py").write_text(program("quickstart.rst", "quickstart-client"))
    impostor = monte_trio.NativeHandshake(
        identity=monte_trio.Identity.generate(), trust=monte_trio.AcceptAnyKey()
    )
    pinned = str(monte_trio.Identity.generate().public_key)
    with trio.fail_after(TIMEOUT):
        async with running_server(monte_trio.inline(lambda request: b"no"), impostor) as (
            _,
            port,
        ):
            argv = in_dir(tmp_path, sys.executable, "client.py", pinned, str(port))
            async with spawn_process(argv) as client:
                status, out, err = await client.finish()
    assert status != 0
    assert "reply:" not in out
    assert "PeerRejected" in err


# -- the recipes ---------------------------------------------------------------------------


async def test_recipe_methods(capsys: pytest.CaptureFixture[str]) -> None:
    await run_in_process("recipes.rst", "recipe-methods")
    assert capsys.readouterr().out.splitlines() == [
        "b'HELLO'",
        "b'5'",
        "refused: LookupError: no method 'divide'",
    ]


async def test_recipe_authorise(capsys: pytest.CaptureFixture[str]) -> None:
    namespace = await run_in_process("recipes.rst", "recipe-authorise")
    reader = namespace["READER"].public_key
    assert capsys.readouterr().out.splitlines() == [
        f"refused: PermissionError: {reader} may not set values",
        "b'done'",
        "b'welcome'",
    ]


async def test_recipe_authorise_refuses_an_unknown_key() -> None:
    """The trust policy keeps out a key that is neither pinned client."""
    namespace: dict[str, Any] = {"__name__": "docs_recipe_authorise"}
    exec(
        compile(program("recipes.rst", "recipe-authorise"), "recipe-authorise", "exec"), namespace
    )
    clients = monte_trio.PinnedKeys([namespace["ADMIN"].public_key])
    server = monte_trio.Server(namespace["handle"], identity=namespace["SERVER"], trust=clients)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(server.serve, 0, "127.0.0.1")
            port = listeners[0].socket.getsockname()[1]
            with pytest.raises(monte_trio.PeerRejected):
                await namespace["call"](namespace["READER"], port, b"get motd")
            await server.shutdown()


async def test_recipe_two_servers(capsys: pytest.CaptureFixture[str]) -> None:
    await run_in_process("recipes.rst", "recipe-two-servers")
    assert capsys.readouterr().out.splitlines() == [
        "b'hello from the native server'",
        "b'hello from the monte-v1 server'",
    ]


async def test_recipe_sigterm_finishes_the_request_in_flight(tmp_path: Path) -> None:
    """SIGTERM while a handler runs: its caller gets the reply, the program exits 0."""
    (tmp_path / "service.py").write_text(program("recipes.rst", "recipe-sigterm"))
    monte_trio.Identity.generate().save(tmp_path / "server.key")
    replies: list[bytes] = []
    with trio.fail_after(TIMEOUT):
        async with spawn_process(in_dir(tmp_path, sys.executable, "service.py", "0")) as service:
            port = int((await service.expect("listening on 127.0.0.1:")).rsplit(":", 1)[1])
            server_key = public_key_line(await service.expect("public key: "))
            async with (
                monte_trio.open_client(
                    "127.0.0.1", port, trust=monte_trio.PinnedKeys([server_key])
                ) as client,
                trio.open_nursery() as nursery,
            ):

                async def slow_call() -> None:
                    replies.append(await client.request(b"slow"))

                nursery.start_soon(slow_call)
                await service.expect("working on a slow request")
                service.process.send_signal(signal.SIGTERM)
                assert await service.expect("SIGTERM") == "SIGTERM: shutting down"
            status, out, err = await service.finish()
    assert replies == [b"slow"]
    assert status == 0, err
    assert out == "stopped after 1 requests\n"


# -- names and layout ----------------------------------------------------------------------


def _resolve(dotted: str) -> object:
    """The object a dotted ``monte_trio.`` name refers to (AttributeError if none)."""
    parts = dotted.split(".")
    obj: object = monte_trio
    start = 1
    if parts[1:2] == ["testing"]:
        obj, start = monte_trio.testing, 2
    for index, part in enumerate(parts[start:]):
        if index == 0:
            module = monte_trio.testing if obj is monte_trio.testing else monte_trio
            assert part in module.__all__, f"{module.__name__}.{part} is not public"
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize(
    "page", [*(f"docs/{page}" for page in PAGES), "docs/index.rst", "README.md"]
)
def test_every_name_is_public(page: str) -> None:
    """Each ``monte_trio.X[.attr]`` a page mentions (code and cross-references) exists."""
    text = (ROOT / page).read_text(encoding="utf-8")
    names = set(re.findall(r"(?<![\w.])monte_trio(?:\.[A-Za-z_]\w*)+", text))
    assert names or page == "docs/logging.rst"
    missing = []
    for name in sorted(names):
        try:
            _resolve(name)
        except (AttributeError, AssertionError) as exc:
            missing.append(f"{name}: {exc}")
    assert not missing, f"{page} names what does not exist: {missing}"


@pytest.mark.parametrize("page", PAGES)
def test_python_blocks_compile(page: str) -> None:
    """Fragments too: every Python block is valid Python (top-level await allowed)."""
    for number, language, code in code_blocks(page):
        if language == "python":
            compile(code, f"{page}:{number}", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


@pytest.mark.parametrize("page", PAGES)
def test_code_and_tables_fit_the_page(page: str) -> None:
    too_wide = [
        f"{page}:{number}: {len(line)} characters"
        for number, _, code in code_blocks(page)
        for line in code.splitlines()
        if len(line) > WIDTH
    ]
    table_rule = re.compile(r"^\s*[=+-][=+ -]*$")
    for number, line in enumerate((DOCS / page).read_text(encoding="utf-8").splitlines()):
        if table_rule.match(line) and " " in line.strip() and len(line) > WIDTH:
            too_wide.append(f"{page}:{number + 1}: a table {len(line)} characters wide")
    assert not too_wide


def test_pages_are_in_the_toctree() -> None:
    index = (DOCS / "index.rst").read_text(encoding="utf-8")
    toctree = index.split(".. toctree::", 1)[1]
    entries = {line.strip() for line in toctree.splitlines() if line.startswith("   ")}
    assert {"quickstart", "recipes", "logging"} <= entries


# -- the logging page ----------------------------------------------------------------------


def _logger_names(tree: ast.Module, module: str) -> dict[str, str]:
    """Module-level ``x = logging.getLogger(...)``: variable -> logger name."""
    names: dict[str, str] = {}
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Attribute)
            and node.value.func.attr == "getLogger"
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
        ):
            argument = node.value.args[0]
            if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                names[node.targets[0].id] = argument.value
            elif isinstance(argument, ast.Name) and argument.id == "__name__":
                names[node.targets[0].id] = module
    return names


def log_calls() -> list[tuple[str, str, str, str]]:
    """Every ``logger.<level>("format", ...)`` in the package: (logger, LEVEL, format,
    where)."""
    levels = {"debug", "info", "warning", "error", "exception", "critical"}
    calls = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        module = module.removesuffix(".__init__")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        loggers = _logger_names(tree, module)
        for node in ast.walk(tree):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in levels
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id in loggers
            ):
                continue
            fmt = node.args[0]
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            assert isinstance(fmt, ast.Constant), f"{where}: the message is not a literal"
            assert isinstance(fmt.value, str), f"{where}: the message is not a string"
            level = "ERROR" if node.func.attr == "exception" else node.func.attr.upper()
            calls.append((loggers[node.func.value.id], level, fmt.value, where))
    return calls


def table_rows(page: str) -> list[list[str]]:
    """The rows of the ``list-table`` directives of ``page``, each cell on one line."""
    rows: list[list[str]] = []
    for line in (DOCS / page).read_text(encoding="utf-8").splitlines():
        if line.startswith("   * - "):
            rows.append([line[len("   * - ") :].strip()])
        elif line.startswith("     - ") and rows:
            rows[-1].append(line[len("     - ") :].strip())
        elif line.startswith("       ") and rows and line.strip():
            rows[-1][-1] += " " + line.strip()
    return rows


def _literal_parts(fmt: str) -> list[str]:
    """The text of a %-format between its placeholders (the parts worth matching)."""
    parts = re.split(r"%(?:\.\d+)?[sdrf]", fmt)
    return [" ".join(part.split()) for part in parts if len(part.strip(" :;,()")) >= 4]


def test_logging_table_lists_every_log_call() -> None:
    """Each logger call of the library has its row: logger, level and the message's
    text; and each row of the table matches a call (no row for a message that is gone)."""
    rows = [row for row in table_rows("logging.rst") if row[0] != "logger"]
    calls = log_calls()
    assert len(calls) >= 10
    unmatched_calls = []
    matched_rows: set[int] = set()
    for logger, level, fmt, where in calls:
        found = [
            index
            for index, row in enumerate(rows)
            if row[0] == f"``{logger}``"
            and row[1] == level
            and all(part in " ".join(row[2].split()) for part in _literal_parts(fmt))
        ]
        if not found:
            unmatched_calls.append(f"{where}: {logger} {level} {fmt!r}")
        matched_rows.update(found)
    assert not unmatched_calls, f"logging.rst has no row for: {unmatched_calls}"
    stale = [rows[index] for index in range(len(rows)) if index not in matched_rows]
    assert not stale, f"logging.rst has rows that match no log call: {stale}"


def test_logging_page_names_the_loggers() -> None:
    text = (DOCS / "logging.rst").read_text(encoding="utf-8")
    for logger in {call[0] for call in log_calls()}:
        assert f"``{logger}``" in text
        assert logger == "monte_trio"


async def test_basic_config_shows_the_libraries_info_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What the page promises at INFO: a handler's exception is one line naming it."""
    caplog.set_level(logging.INFO, logger="monte_trio")

    async def broken(request: monte_trio.Request) -> bytes:
        raise ValueError("no such thing")

    async with monte_trio.testing.open_connection_pair(
        monte_trio.NativeHandshake(
            identity=monte_trio.Identity.generate(), trust=monte_trio.AcceptAnyKey()
        ),
        server_handler=broken,
    ) as (client, _):
        with trio.fail_after(TIMEOUT), pytest.raises(monte_trio.RemoteError):
            await client.request(b"x")
    records = [r for r in caplog.records if r.name == "monte_trio" and r.levelname == "INFO"]
    assert any("no such thing" in r.getMessage() for r in records)


async def test_recipe_secure_stream(capsys: pytest.CaptureFixture[str]) -> None:
    await run_in_process("recipes.rst", "recipe-secure-stream")
    assert capsys.readouterr().out.splitlines() == [
        "alice received b'HELLO, BOB'",
        "alice's call returned b'PING'",
    ]


async def test_recipe_secure_stream_refuses_a_key_it_does_not_pin() -> None:
    """The recipe's handshake is authenticated: a third key is refused on both ends."""
    namespace: dict[str, Any] = {"__name__": "docs_recipe_secure_stream"}
    code = compile(program("recipes.rst", "recipe-secure-stream"), "recipe-secure-stream", "exec")
    exec(code, namespace)
    mallory = monte_trio.Identity.generate()
    left, right = trio.socket.socketpair()
    failures: list[BaseException] = []

    async def end(stream: trio.abc.Stream, me: Any, peer: Any, initiator: bool) -> None:
        async with stream:
            try:
                await namespace["secure"](stream, me, peer, initiator)
            except monte_trio.HandshakeError as exc:
                failures.append(exc)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                end, trio.SocketStream(left), mallory, namespace["BOB"].public_key, True
            )
            nursery.start_soon(
                end,
                trio.SocketStream(right),
                namespace["BOB"],
                namespace["ALICE"].public_key,
                False,
            )
    assert any(isinstance(exc, monte_trio.PeerRejected) for exc in failures)


def test_readme_quick_start_is_the_docs_quick_start() -> None:
    """README's quick start shows the very programs the docs' quick start runs."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    fenced = re.findall(r"^```(\w+)\n(.*?)^```$", section, flags=re.MULTILINE | re.DOTALL)
    assert fenced[:3] == [
        ("console", program("quickstart.rst", "quickstart-keys")),
        ("python", program("quickstart.rst", "quickstart-server")),
        ("python", program("quickstart.rst", "quickstart-client")),
    ]
