"""The programs under examples/, run as real subprocesses on loopback.

Every subprocess is bounded by ``trio.fail_after`` and killed (and reaped) on the way out.
"""

from __future__ import annotations

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
