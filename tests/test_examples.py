"""The programs under examples/, run as real subprocesses on loopback.

Every subprocess is bounded by ``trio.fail_after`` and killed (and reaped) on the way out.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import trio
from helpers import Proc, spawn_process

import monte_trio
from monte_trio import Identity, PublicKey

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def spawn(script: str, *args: str) -> AbstractAsyncContextManager[Proc]:
    """An example program as a subprocess (killed and reaped on the way out)."""
    return spawn_process([sys.executable, str(EXAMPLES / script), *args], stdin=subprocess.PIPE)


def free_ports(count: int) -> list[int]:
    """Ports free right now on 127.0.0.1 (bound to port 0, then released)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.mark.parametrize("wire", ["monte-v1", "native", "tofu"])
async def test_chat(tmp_path: Path, wire: str) -> None:
    port_a, port_b = free_ports(2)
    options_a = ["--listen", str(port_a), "--peer", f"127.0.0.1:{port_b}"]
    options_b = ["--listen", str(port_b), "--peer", f"127.0.0.1:{port_a}"]
    if wire == "monte-v1":
        options_a += ["--profile", "monte-v1"]
        options_b += ["--profile", "monte-v1"]
    elif wire == "tofu":  # trust on first use, each peer with its own known-keys file
        options_a += ["--trust", f"tofu:{tmp_path / 'a.known'}"]
        options_b += ["--trust", f"tofu:{tmp_path / 'b.known'}"]
    else:  # the documented authenticated set-up: each peer pins the other's key
        alice, bob = Identity.generate(), Identity.generate()
        alice.save(tmp_path / "alice.key")
        bob.save(tmp_path / "bob.key")
        options_a += [
            "--identity",
            str(tmp_path / "alice.key"),
            "--trust",
            f"pin:{bob.public_key}",
        ]
        options_b += [
            "--identity",
            str(tmp_path / "bob.key"),
            "--trust",
            f"pin:{alice.public_key}",
        ]

    with trio.fail_after(10):
        async with spawn("chat.py", *options_a) as a, spawn("chat.py", *options_b) as b:
            await a.expect("chat: connected to")
            await b.expect("chat: connected to")
            await a.type_line("hello from A")
            assert await b.expect(f"127.0.0.1:{port_a}:") == f"127.0.0.1:{port_a}: hello from A"
            await b.type_line("hi from B, with ünïcode and \x1b[2J")
            assert await a.expect(f"127.0.0.1:{port_b}:") == (
                f"127.0.0.1:{port_b}: hi from B, with ünïcode and \\x1b[2J"  # escaped
            )
            await a.close_stdin()
            code_a, rest_a, err_a = await a.finish()
            assert code_a == 0, (rest_a, err_a)
            assert "chat: bye" in rest_a
            await b.close_stdin()
            code_b, rest_b, err_b = await b.finish()
            assert code_b == 0, (rest_b, err_b)
            assert "chat: bye" in rest_b
    for stderr in (err_a, err_b):
        assert "Traceback" not in stderr
        assert ("not authenticated" in stderr) == (wire == "monte-v1")
    if wire == "tofu":  # each peer learned the other's key
        assert (tmp_path / "a.known").read_text().strip()
        assert (tmp_path / "b.known").read_text().strip()


async def test_chat_native_needs_an_explicit_trust_policy() -> None:
    port_a, port_b = free_ports(2)
    with trio.fail_after(10):
        async with spawn("chat.py", "--listen", str(port_a), "--peer", f"127.0.0.1:{port_b}") as a:
            code, rest, stderr = await a.finish()
    assert code == 2, (rest, stderr)
    assert "needs --trust" in stderr
    assert "Traceback" not in stderr


def any_peer(listen: int, peer: int) -> list[str]:
    return ["--listen", str(listen), "--peer", f"127.0.0.1:{peer}", "--trust", "any"]


@pytest.mark.parametrize("state", ["dialing", "connected"])
async def test_ctrl_c_ends_chat_quietly_with_status_130(state: str) -> None:
    port_a, port_b = free_ports(2)
    with trio.fail_after(10):
        async with AsyncExitStack() as stack:
            a = await stack.enter_async_context(spawn("chat.py", *any_peer(port_a, port_b)))
            if state == "dialing":  # the peer is not up: a is retrying with backoff
                await a.expect("chat: my public key:")
                peers = [a]
            else:
                b = await stack.enter_async_context(spawn("chat.py", *any_peer(port_b, port_a)))
                await a.expect("chat: connected to")
                await b.expect("chat: connected to")
                peers = [a, b]
            for peer in peers:
                peer.process.send_signal(signal.SIGINT)
                code, rest, stderr = await peer.finish()
                assert code == 130, (rest, stderr)
                assert "Traceback" not in stderr
                assert "chat: interrupted" in stderr


async def test_chat_gives_up_when_the_peer_never_comes() -> None:
    port_a, port_b = free_ports(2)
    with trio.fail_after(10):
        async with spawn(
            "chat.py", "--listen", str(port_a), "--peer", f"127.0.0.1:{port_b}",
            "--profile", "monte-v1", "--connect-timeout", "0.1",
        ) as a:  # fmt: skip
            code, rest, stderr = await a.finish()
    assert code == 1, (rest, stderr)
    assert "chat: error: could not connect" in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("wire", ["monte-v1", "native"])
async def test_echo_server_and_client(wire: str) -> None:
    flags = ["--monte-v1"] if wire == "monte-v1" else []
    with trio.fail_after(10):
        async with spawn("echo_server.py", "--port", "0", *flags) as server:
            first = await server.readline()
            assert first.startswith("listening on 127.0.0.1:")
            address = first.split()[-1]
            pin: list[str] = []
            if wire == "native":
                key = (await server.readline()).removeprefix("public key: ")
                PublicKey.parse(key)
                pin = [f"--server-key={key}"]  # "=": a key may start with "-"
            async with spawn("echo_client.py", address, *flags, *pin, "hello", "wörld") as client:
                await client.close_stdin()
                code, rest, stderr = await client.finish()
            assert code == 0, (rest, stderr)
            assert rest.splitlines() == ["reply: hello", "reply: wörld"]

            if wire == "native":  # pinning the wrong key is refused, cleanly
                wrong = str(Identity.generate().public_key)
                async with spawn("echo_client.py", address, f"--server-key={wrong}", "x") as bad:
                    await bad.close_stdin()
                    code, rest, stderr = await bad.finish()
                assert code == 1, (rest, stderr)
                assert stderr.startswith("error: ")
                assert "pinned" in stderr

            server.process.send_signal(signal.SIGINT)  # Ctrl-C: a graceful stop, status 130
            await server.close_stdin()
            code, rest, stderr = await server.finish()
    assert code == 130, (rest, stderr)
    assert "Traceback" not in stderr
    assert "served 2 requests" in rest


async def test_echo_server_stops_on_sigterm_with_status_0() -> None:
    with trio.fail_after(10):
        async with spawn("echo_server.py", "--port", "0") as server:
            assert (await server.readline()).startswith("listening on 127.0.0.1:")
            server.process.send_signal(signal.SIGTERM)
            await server.close_stdin()
            code, rest, stderr = await server.finish()
    assert code == 0, (rest, stderr)
    assert "warning: no --client-key" in stderr
    assert "served 0 requests" in rest


async def test_echo_server_pins_client_keys() -> None:
    client = Identity.generate()
    with trio.fail_after(10):
        async with spawn(
            "echo_server.py", "--port", "0", f"--client-key={Identity.generate().public_key}"
        ) as server:
            first = await server.readline()
            host, port = first.split()[-1].rsplit(":", 1)
            with pytest.raises(monte_trio.HandshakeError):
                async with monte_trio.open_client(
                    host, int(port), identity=client, trust=monte_trio.AcceptAnyKey()
                ):
                    pass  # pragma: no cover
            server.process.send_signal(signal.SIGTERM)
            await server.close_stdin()
            code, rest, stderr = await server.finish()
    assert code == 0, (rest, stderr)
    assert "warning" not in stderr


async def test_ctrl_c_ends_echo_client_quietly_with_status_130() -> None:
    async def slow_echo(request: monte_trio.Request) -> bytes:
        if request.body == b"block":
            await trio.sleep_forever()
        return request.body

    server = monte_trio.Server(slow_echo, trust=monte_trio.AcceptAnyKey())
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(server.serve, 0, "127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(10):
            async with spawn("echo_client.py", f"127.0.0.1:{port}", "hello", "block") as client:
                assert await client.readline() == "reply: hello"  # now waiting on "block"
                client.process.send_signal(signal.SIGINT)
                await client.close_stdin()
                code, rest, stderr = await client.finish()
        nursery.cancel_scope.cancel()
    assert code == 130, (rest, stderr)
    assert "Traceback" not in stderr


async def test_kv_server_and_client() -> None:
    with trio.fail_after(15):
        async with spawn("kv_server.py", "--port", "0") as server:
            address = (await server.readline()).split()[-1]
            key = (await server.readline()).removeprefix("public key: ")
            operations = ["put", "colour", "blue", "get", "colour", "keys"]
            operations += ["delete", "colour", "get", "colour"]
            async with spawn(
                "kv_client.py", address, f"--server-key={key}", "--watch", "", *operations
            ) as client:
                await client.close_stdin()
                code, rest, stderr = await client.finish()
            assert code == 1, (rest, stderr)  # a key was not found
            assert rest.splitlines() == [
                "watching '' (1 watching)",
                "changed: colour = blue",  # the server called the client back...
                "put colour",  # ...before it acknowledged the put
                "colour = blue",
                "keys: colour",
                "changed: colour deleted",
                "deleted colour",
                "not found: colour",  # NotFound raised as itself, with its details
            ]
            assert "Traceback" not in stderr

            wrong = str(Identity.generate().public_key)  # another server key: refused
            async with spawn("kv_client.py", address, f"--server-key={wrong}", "keys") as bad:
                await bad.close_stdin()
                code, rest, stderr = await bad.finish()
            assert code == 1, (rest, stderr)
            assert stderr.startswith("error: ")

            server.process.send_signal(signal.SIGINT)
            await server.close_stdin()
            code, rest, stderr = await server.finish()
    assert code == 130, (rest, stderr)
    assert "Traceback" not in stderr
    assert rest.splitlines() == [  # the router's statistics, per method
        "kv.delete: 1 calls, 0 errors",
        "kv.get: 2 calls, 1 errors",
        "kv.keys: 1 calls, 0 errors",
        "kv.put: 1 calls, 0 errors",
        "kv.watch: 1 calls, 0 errors",
    ]


async def test_kv_client_refuses_an_unknown_operation() -> None:
    with trio.fail_after(10):
        async with spawn("kv_client.py", "127.0.0.1:1", "fetch", "x") as client:
            await client.close_stdin()
            code, rest, stderr = await client.finish()
    assert code == 2, (rest, stderr)
    assert "unknown operation 'fetch'" in stderr


async def test_tracing_prints_linked_spans_from_both_sides() -> None:
    with trio.fail_after(15):
        async with spawn("tracing.py") as program:
            await program.close_stdin()
            code, rest, stderr = await program.finish()
    assert code == 0, (rest, stderr)
    assert "skipped: no 'pie' here" in rest
    assert "total: 7.50" in rest
    spans = [
        dict(part.split("=", 1) for part in line.split() if "=" in part) | {"line": line}
        for line in rest.splitlines()
        if line.startswith("span ")
    ]
    kinds = [line["line"].split()[4:6] for line in spans]
    assert kinds.count(["client", "price"]) == kinds.count(["server", "price"]) == 3
    (root,) = [span for span in spans if " internal checkout " in span["line"]]
    assert root["parent"] == "-"
    assert {span["trace"] for span in spans} == {root["trace"]}  # one trace
    assert len(root["trace"]) == 32
    by_id = {span["id"]: span for span in spans}
    for span in spans:
        if " server price " in span["line"]:  # child of a client span, across the wire
            parent = by_id[span["parent"]]
            assert " client price " in parent["line"]
            assert by_id[parent["parent"]] is root
            assert parent["outcome"] == span["outcome"]
            assert parent["peer"] != span["peer"]  # each side names the other's key
    outcomes = sorted(span["outcome"] for span in spans if "outcome" in span)
    assert outcomes == ["error:OutOfStock"] * 2 + ["ok"] * 4


async def test_readme_methods_run_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    """README's Methods section: the Protocol, the server's lines and the client's lines,
    run together in-process on 127.0.0.1."""
    readme = (EXAMPLES.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Methods\n", 1)[1].split("\n## ", 1)[0]
    protocol, server_part, client_part = re.findall(r"```python\n(.*?)```", section, re.S)
    namespace: dict[str, Any] = {
        "identity": Identity.generate(),
        "trust": monte_trio.AcceptAnyKey(),
        "__name__": "readme_methods",
    }
    exec(compile(protocol + server_part, "README.md:methods", "exec"), namespace)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(namespace["server"].serve, 0, "127.0.0.1")
            port = listeners[0].socket.getsockname()[1]
            assert '"127.0.0.1", 4000' in client_part
            client_part = client_part.replace("4000", str(port))
            client_code = "async def client_side():\n" + textwrap.indent(client_part, "    ")
            exec(compile(client_code, "README.md:methods-client", "exec"), namespace)
            await namespace["client_side"]()
            nursery.cancel_scope.cancel()
    assert capsys.readouterr().out == "hello, world\n"


def load_example(name: str) -> Any:
    """An example program as a module (its ``main`` not run)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- file_transfer.py ------------------------------------------------------------------------


async def test_file_transfer_demo_resumes_and_verifies() -> None:
    with trio.fail_after(30):
        async with spawn("file_transfer.py") as program:
            await program.close_stdin()
            code, rest, stderr = await program.finish()
    assert code == 0, (rest, stderr)
    assert "Traceback" not in stderr
    lines = rest.splitlines()
    assert lines[:5] == [
        "client: sending example.bin (3,158,073 bytes)",
        "client: stopping after 1,048,576 bytes",
        "server: example.bin: incomplete, kept 1,048,576 of 3,158,073 bytes",
        "client: the server already has 1,048,576 bytes; sending the remaining 2,109,497",
        "server: example.bin: complete, 3,158,073 bytes, SHA-256 verified",
    ]
    assert re.fullmatch(
        r"client: example\.bin: the server holds it, SHA-256 [0-9a-f]{64}", lines[5]
    )
    assert lines[6:] == ["demo: the received file is identical"]


async def test_file_transfer_serve_and_send_resume_across_processes(tmp_path: Path) -> None:
    content = os.urandom(2_000_000)
    source = tmp_path / "photo.raw"
    source.write_bytes(content)
    sha256 = hashlib.sha256(content).hexdigest()
    inbox = tmp_path / "inbox"
    (inbox / ".partial").mkdir(parents=True)
    (inbox / ".partial" / sha256).write_bytes(content[:700_000])  # an earlier attempt's part
    with trio.fail_after(30):
        async with spawn("file_transfer.py", "serve", str(inbox), "--port", "0") as server:
            address = (await server.readline()).removeprefix("listening on ")
            key = (await server.readline()).removeprefix("public key: ")
            async with spawn(
                "file_transfer.py", "send", address, str(source), f"--server-key={key}"
            ) as client:
                await client.close_stdin()
                code, rest, stderr = await client.finish()
            assert code == 0, (rest, stderr)
            assert rest.splitlines() == [
                "client: the server already has 700,000 bytes; sending the remaining 1,300,000",
                f"client: photo.raw: the server holds it, SHA-256 {sha256}",
            ]
            assert (inbox / "photo.raw").read_bytes() == content
            assert not (inbox / ".partial" / sha256).exists()

            # A part that is not a prefix of the file: the check fails, nothing is kept...
            (inbox / ".partial" / sha256).write_bytes(b"not the start of the file")
            (inbox / "photo.raw").unlink()
            async with spawn(
                "file_transfer.py", "send", address, str(source), f"--server-key={key}"
            ) as client:
                await client.close_stdin()
                code, rest, stderr = await client.finish()
            assert code == 1, (rest, stderr)
            assert "error: the server did not confirm photo.raw: the SHA-256 differs" in stderr
            assert not (inbox / "photo.raw").exists()
            assert not (inbox / ".partial" / sha256).exists()
            # ...and the next attempt sends the whole file.
            async with spawn(
                "file_transfer.py", "send", address, str(source), f"--server-key={key}"
            ) as client:
                await client.close_stdin()
                code, rest, stderr = await client.finish()
            assert code == 0, (rest, stderr)
            assert "already has" not in rest
            assert (inbox / "photo.raw").read_bytes() == content

            server.process.send_signal(signal.SIGTERM)
            await server.close_stdin()
            code, rest, stderr = await server.finish()
    assert code == 0, (rest, stderr)
    assert "Traceback" not in stderr
    assert rest.count("complete, 2,000,000 bytes, SHA-256 verified") == 2


@pytest.mark.parametrize("name", ["../escape.txt", "/tmp/escape.txt", ".hidden", ""])
async def test_file_transfer_refuses_names_that_are_not_plain(tmp_path: Path, name: str) -> None:
    example = load_example("file_transfer")
    inbox = tmp_path / "inbox" / "deeper"
    trust = monte_trio.AcceptAnyKey()
    server = monte_trio.Server(None, stream_handler=example.FileReceiver(inbox), trust=trust)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(server.serve, 0, "127.0.0.1")
            port = listeners[0].socket.getsockname()[1]
            async with monte_trio.open_client("127.0.0.1", port, trust=trust) as client:
                stream = await client.open_stream()
                offer = {"name": name, "size": 3, "sha256": hashlib.sha256(b"abc").hexdigest()}
                await example.send_header(stream, offer)
                with pytest.raises(monte_trio.StreamReset):
                    await example.receive_header(stream)
                await stream.aclose()
            nursery.cancel_scope.cancel()
    written = [p for p in await trio.Path(tmp_path).rglob("*") if await p.is_file()]
    assert written == []


# -- download.py -----------------------------------------------------------------------------


async def test_download_demo() -> None:
    with trio.fail_after(30):
        async with spawn("download.py") as program:
            await program.close_stdin()
            code, rest, stderr = await program.finish()
    assert code == 0, (rest, stderr)
    assert "Traceback" not in stderr
    lines = rest.splitlines()
    assert len(lines) == 4, lines
    assert re.fullmatch(
        r"client: data\.bin: 8,388,608 bytes, SHA-256 [0-9a-f]{16}\.\.\., identical", lines[0]
    )
    assert re.fullmatch(
        r"client: notes\.txt: 32,000 bytes, SHA-256 [0-9a-f]{16}\.\.\., identical", lines[1]
    )
    assert lines[2:] == [
        "client: some calls answered meanwhile",
        "client: missing.txt: no file named 'missing.txt'",
    ]


async def test_log_search_streams_its_results() -> None:
    """A download-style streaming call: one request, the matching lines as messages."""
    with trio.fail_after(30):
        async with spawn("log_search.py") as program:
            await program.close_stdin()
            code, rest, stderr = await program.finish()
    assert code == 0, (rest, stderr)
    assert "Traceback" not in stderr
    assert rest.splitlines() == [
        "client: 16,666 lines hold ERROR, the first: 000005 ERROR request 5 took 185 ms",
        "client: 200 requests took 499 ms",
        "client: no line holds 'no such thing'",
        "client: an empty term was refused: ValueError: an empty search term matches "
        "everything: ask for less",
    ]


async def test_download_serve_and_get(tmp_path: Path) -> None:
    served = tmp_path / "served"
    served.mkdir()
    content = os.urandom(1_500_000)
    (served / "report.pdf").write_bytes(content)
    (tmp_path / "secret.txt").write_text("outside the served directory")
    with trio.fail_after(30):
        async with spawn("download.py", "serve", str(served), "--port", "0") as server:
            address = (await server.readline()).removeprefix("listening on ")
            key = (await server.readline()).removeprefix("public key: ")
            out = tmp_path / "copy.pdf"
            async with spawn(
                "download.py", "get", address, "report.pdf", "--out", str(out),
                f"--server-key={key}",
            ) as client:  # fmt: skip
                await client.close_stdin()
                code, rest, stderr = await client.finish()
            assert code == 0, (rest, stderr)
            sha256 = hashlib.sha256(content).hexdigest()
            assert rest.splitlines() == [f"report.pdf: 1,500,000 bytes, SHA-256 {sha256}"]
            assert out.read_bytes() == content

            for name in ["missing.pdf", "../secret.txt"]:
                out = tmp_path / "nothing"
                async with spawn(
                    "download.py", "get", address, name, "--out", str(out), f"--server-key={key}"
                ) as client:
                    await client.close_stdin()
                    code, rest, stderr = await client.finish()
                assert code == 1, (rest, stderr)
                assert f"error: {name}: no file named {name!r}" in stderr
                assert not out.exists()
                assert not await trio.Path(f"{out}.part").exists()

            server.process.send_signal(signal.SIGINT)
            await server.close_stdin()
            code, rest, stderr = await server.finish()
    assert code == 130, (rest, stderr)
    assert "Traceback" not in stderr
