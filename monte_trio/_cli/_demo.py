"""``monte-trio demo``: two peers in one process calling each other over loopback.

The client sends one-way messages and requests, the server calls the client back on the
same connection, and every exchange is checked (:class:`_Checks`): the demo doubles as a
smoke test of an installation (exit status 1 if a check fails). Its handlers and the
helpers they share (:class:`_Inbox`, :func:`_show`) live here, beside it.
"""

from __future__ import annotations

import argparse
import functools

import trio

from .._client import Client, open_client
from .._connection import Request
from .._handshake import MonteV1Handshake
from .._keys import Identity, PublicKey
from .._server import Server
from .._trust import PinnedKeys
from ._interrupt import interruptible
from ._options import NATIVE, PROFILES, Job, add_command
from ._output import format_address, say

__all__ = ["add_parser", "run"]

_DEMO_TIME_LIMIT = 5.0


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``demo`` command and its options to ``commands``."""
    demo = add_command(
        commands,
        "demo",
        summary="two peers in one process calling each other over loopback",
        description="Two peers in one process calling each other over loopback, every "
        "exchange checked. Ctrl-C stops it (exit status 130).",
        run=run,
    )
    demo.add_argument("--profile", choices=PROFILES, default=NATIVE, help="wire profile")


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Job:
    """Return the work: the demo, until done or interrupted."""
    return functools.partial(interruptible, functools.partial(_demo, args.profile))


class _Inbox:
    """One-way messages a demo peer received, and a way to wait for one."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self._changed = trio.Event()

    def add(self, body: bytes) -> None:
        self.bodies.append(body)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, body: bytes) -> None:
        while body not in self.bodies:
            await self._changed.wait()


class _Checks:
    def __init__(self) -> None:
        self.passed = 0
        self.failures: list[str] = []

    def check(self, ok: bool, what: str) -> None:
        if ok:
            self.passed += 1
        else:
            self.failures.append(what)
            say(f"  !! FAILED: {what}")


def _show(body: bytes) -> str:
    return repr(body.decode("utf-8", errors="replace"))


async def _demo(profile: str, interrupt: trio.CancelScope) -> int:
    checks = _Checks()
    server_inbox = _Inbox()
    client_inbox = _Inbox()
    requests = 0
    messages = 0
    native = profile == NATIVE
    server_id = Identity.generate() if native else None
    client_id = Identity.generate() if native else None

    def expect_peer_key(seen: PublicKey | None, want: Identity | None, who: str) -> None:
        if want is not None:
            checks.check(seen == want.public_key, f"{who} sees the pinned key of its peer")

    announced = False

    async def server_handler(request: Request) -> bytes | None:
        nonlocal requests, messages, announced
        expect_peer_key(request.peer_public_key, client_id, "the server")
        if not announced and request.peer_public_key is not None:
            announced = True
            say(f"server: the client proved it holds key {request.peer_public_key}")
        if request.oneway:
            say(f"server <- client  message {_show(request.body)}")
            server_inbox.add(request.body)
            return None
        if request.body != b"call me back":
            reply = request.body.replace(b"ping", b"pong")
            say(f"server <- client  request {_show(request.body)}, replying {_show(reply)}")
            return reply
        say(f"server <- client  request {_show(request.body)}")
        question = b"are you there?"
        say(f"server -> client  request {_show(question)} (a call back on the same connection)")
        answer = await request.connection.request(question)
        requests += 1
        checks.check(answer == b"yes, I am here", "the client answered the server's request")
        say(f"server <- client  reply {_show(answer)} (verified)")
        note = b"thanks for answering"
        say(f"server -> client  message {_show(note)}")
        await request.connection.send(note)
        messages += 1
        reply = b"called you back"
        say(f"server: replying {_show(reply)}")
        return reply

    async def client_handler(request: Request) -> bytes | None:
        expect_peer_key(request.peer_public_key, server_id, "the client")
        if request.oneway:
            say(f"client <- server  message {_show(request.body)}")
            client_inbox.add(request.body)
            return None
        reply = b"yes, I am here"
        say(f"client <- server  request {_show(request.body)}, replying {_show(reply)}")
        return reply

    if native:
        assert server_id is not None
        assert client_id is not None
        say("demo: profile native (Noise handshake; each peer pins the other's static key)")
        say(f"demo: server public key {server_id.public_key}")
        say(f"demo: client public key {client_id.public_key}")
        server = Server(
            server_handler, identity=server_id, trust=PinnedKeys([client_id.public_key])
        )
    else:
        say("demo: profile monte-v1 (Go monte's handshake: encrypted, nobody authenticated)")
        server = Server(server_handler, handshake=MonteV1Handshake())

    async def exchange(client: Client) -> None:
        nonlocal requests, messages
        conn = await client.connection()
        checks.check(conn.profile == profile, f"the connection speaks {profile}")
        if server_id is not None:
            expect_peer_key(conn.peer_public_key, server_id, "the client")
            say(
                f"client: connected over {conn.profile}; the server proved it holds "
                f"key {conn.peer_public_key}"
            )
        else:
            say(f"client: connected over {conn.profile} (no keys to verify)")
        for i in range(1, 4):
            body = f"hello {i}".encode()
            say(f"client -> server  message {_show(body)}")
            await client.send(body)
            messages += 1
            await server_inbox.wait_for(body)
            checks.check(True, f"the server received message {i}")
        for i in range(1, 4):
            body = f"ping {i}".encode()
            say(f"client -> server  request {_show(body)}")
            reply = await client.request(body)
            requests += 1
            checks.check(reply == f"pong {i}".encode(), f"the reply to ping {i}")
            say(f"client <- server  reply {_show(reply)} (verified)")
        body = b"call me back"
        say(f"client -> server  request {_show(body)}")
        reply = await client.request(body)
        requests += 1
        checks.check(reply == b"called you back", "the reply to the call-back request")
        say(f"client <- server  reply {_show(reply)} (verified)")
        await client_inbox.wait_for(b"thanks for answering")
        checks.check(True, "the client received the server's message")

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(server.serve, 0, "127.0.0.1")
        name = listeners[0].socket.getsockname()
        host, port = str(name[0]), int(name[1])
        say(f"server: listening on {format_address(host, port)}")
        # Connecting is bounded by open_client's dial and handshake timeouts.
        async with open_client(
            host,
            port,
            handshake=None if native else MonteV1Handshake(),
            identity=client_id,
            trust=PinnedKeys([server_id.public_key]) if server_id is not None else None,
            handler=client_handler,
            max_conns=1,
        ) as client:
            # Time limit and interruption apply inside the block, so the client still
            # closes gracefully either way.
            with interrupt, trio.move_on_after(_DEMO_TIME_LIMIT) as timer:
                await exchange(client)
            if timer.cancelled_caught:
                checks.check(False, f"the exchange finished within {_DEMO_TIME_LIMIT} s")
        say("client: closed its connection")
        await server.shutdown()
    if interrupt.cancel_called:
        return 130
    stats = server.statistics()
    checks.check(stats.requests_received == 4, "the server counted 4 requests")
    checks.check(stats.messages_received == 3, "the server counted 3 one-way messages")
    say("server: shut down")
    if checks.failures:
        total = checks.passed + len(checks.failures)
        say(f"demo FAILED: {len(checks.failures)} of {total} checks failed")
        return 1
    say(f"demo finished: {requests} requests, {messages} messages, all verified")
    return 0
