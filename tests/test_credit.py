"""The connection as a driver of the v2 session, checked end to end.

* The reader never stops reading: while every handler is busy and the peer's callers do
  not take their replies, the peer's ping and a call made back to it are answered.
* Nested calls: 128 callbacks each way at full call slots; the 10 MiB chain; a callback
  cancelled before its task started is never run.
* The memory budget: clients that flood requests and never read their replies make the
  server hold at most the stated budget each (RSS of a server in a subprocess).

The hostile peer is the sans-IO :class:`~monte_trio._proto._session.Session` driven by
hand over a real handshake (public behaviour: bytes on the wire); everything else is the
public API over real loopback TCP.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio
import trio.testing
from helpers import socket_connection_pair

import monte_trio
from monte_trio import (
    AcceptAnyKey,
    Connection,
    ConnectionConfig,
    NativeHandshake,
    Request,
    SecureStream,
    Server,
)
from monte_trio._proto._session import EV_PONG, EV_REPLY, EV_REQUEST, OPEN, Session
from monte_trio.testing import secure_stream_pair

LOCALHOST = "127.0.0.1"
MIB = 1024 * 1024


class SessionPeer:
    """A peer that reads its socket but whose callers never take their replies: its
    session never returns reply-window credit. It answers calls made to it."""

    def __init__(self, secure: SecureStream, session: Session) -> None:
        self.secure = secure
        self.session = session
        self.replies: list[int] = []
        self.pong_at: float | None = None
        self.requests_answered = 0
        self._changed = trio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait (each wake-up is a batch this peer read) until ``predicate()`` holds."""
        while not predicate():
            await self._changed.wait()

    @classmethod
    async def connect(cls, port: int, config: ConnectionConfig) -> SessionPeer:
        stream = await trio.open_tcp_stream(LOCALHOST, port)
        secure = await NativeHandshake(trust=AcceptAnyKey()).handshake(
            stream, initiator=True, peer=f"{LOCALHOST}:{port}", config=config
        )
        session = secure.facts.new_session(config, trio.current_time())
        assert isinstance(session, Session)
        return cls(secure, session)

    async def flush(self) -> None:
        while self.session.wants_write:
            plaintexts = self.session.records_to_send(self.secure.max_plaintext)
            if not plaintexts:
                return
            await self.secure.send_records(plaintexts)  # type: ignore[arg-type]

    async def run(self) -> None:
        """Read for ever: answer requests (and pings, by the session), keep replies."""
        while True:
            try:
                records = await self.secure.receive_records()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not records:
                return
            for kind, ident, _a, _b in self.session.receive_records(records):
                if kind == EV_REPLY:
                    self.replies.append(ident)  # never delivered(): W_r stays spent
                elif kind == EV_REQUEST:
                    self.session.consumed(ident)
                    self.session.send_reply(ident, b"answered by the peer")
                    self.requests_answered += 1
                elif kind == EV_PONG:
                    self.pong_at = trio.current_time()
            await self.flush()
            self._changed.set()
            self._changed = trio.Event()


async def test_ping_and_callback_answered_while_handlers_are_busy_and_replies_untaken() -> None:
    """Every handler busy, the peer not taking its replies (its socket
    still read): the peer's ping and a call the server makes back to it are answered
    within 100 ms."""
    release = trio.Event()
    all_started = trio.Event()
    connections: list[Connection] = []

    async def handler(request: Request) -> bytes:
        connections.append(request.connection)
        if len(connections) == 6:
            all_started.set()
        if request.body == b"big":
            return bytes(MIB)  # fills the peer's reply window (M + 64) at once
        await release.wait()  # "busy"
        return b"done"

    config = ConnectionConfig(
        max_message_size=MIB, keepalive_interval=None, max_concurrent_handlers=4
    )
    server = Server(handler, trust=AcceptAnyKey(), config=config)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(server.serve, 0, LOCALHOST)
            port = listeners[0].socket.getsockname()[1]
            peer_config = ConnectionConfig(max_message_size=MIB, keepalive_interval=1.0)
            peer = await SessionPeer.connect(port, peer_config)
            nursery.start_soon(peer.run)
            session = peer.session
            for body in (b"big", b"big", b"busy", b"busy", b"busy", b"busy"):
                assert session.send_request(body) is not None
            await peer.flush()
            with trio.fail_after(5):
                await all_started.wait()
                await peer.wait_until(lambda: len(peer.replies) >= 1)
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            # The second big reply waits in the server's session for reply-window credit
            # that never comes; four handlers are busy (the handler cap).
            assert len(peer.replies) == 1
            assert server.statistics().connections_active == 1

            # The peer's keepalive ping (its clock says a tick is due, nothing heard).
            start = trio.current_time()
            session.handle_timer(start + 1.0)
            session.handle_timer(start + 2.0)  # heard nothing since: ping
            await peer.flush()
            with trio.fail_after(1):
                await peer.wait_until(lambda: peer.pong_at is not None)
            assert peer.pong_at is not None
            assert peer.pong_at - start < 0.1

            # A call the server makes back to the peer (not nested: from outside a
            # handler), answered within 100 ms.
            start = trio.current_time()
            with trio.fail_after(1):
                reply = await connections[0].request(b"are you there?")
            assert reply == b"answered by the peer"
            assert trio.current_time() - start < 0.1
            release.set()
            await peer.secure.aclose()
            await server.shutdown(grace_period=0.5)
            nursery.cancel_scope.cancel()


async def test_credit_held_below_the_floor_still_reaches_the_peer() -> None:
    """Credit returned in amounts below the floor (1/64 of the smaller window) does not
    ride on every record; with nothing else to write it still goes out on its own, so a
    peer that spent its window is never left waiting."""
    window = 64 * 1024  # floor: 1 KiB
    received = 0

    def count(request: Request) -> None:
        nonlocal received
        received += 1

    config = ConnectionConfig(
        max_message_size=16 * 1024,
        request_window=window,
        reply_window=window,
        keepalive_interval=None,
    )
    server = Server(monte_trio.inline(count), trust=AcceptAnyKey(), config=config)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(server.serve, 0, LOCALHOST)
            port = listeners[0].socket.getsockname()[1]
            peer = await SessionPeer.connect(port, ConnectionConfig(keepalive_interval=None))
            nursery.start_soon(peer.run)
            session = peer.session
            for _ in range(13):  # 13 x (10 + 64) = 962 bytes: under the floor
                assert session.send_oneway(bytes(10))
            await peer.flush()
            assert session.credit["request_window"] == window - 962
            with trio.fail_after(1):
                await peer.wait_until(lambda: session.credit["request_window"] == window)
            assert received == 13
            # A window's worth and more, in small messages: it all goes through.
            sent = 0
            while sent < 3 * window:
                if session.send_oneway(bytes(10)):
                    sent += 74
                    continue
                await peer.flush()
                before = session.credit["request_window"]
                await peer.wait_until(lambda: session.credit["request_window"] > before)  # noqa: B023
            await peer.flush()
            with trio.fail_after(1):
                await peer.wait_until(lambda: session.credit["request_window"] == window)
            assert received == 13 + sent // 74
            await peer.secure.aclose()
            await server.shutdown(grace_period=0.5)
            nursery.cancel_scope.cancel()


async def test_128_nested_callbacks_each_way_at_full_slots() -> None:
    """128 calls each way (every call slot, every handler), each handler calling the peer
    back over the same connection: the callbacks are nested (outside the slots and the
    handler cap), so nothing deadlocks."""
    calls = 128
    config = ConnectionConfig(max_calls=calls, max_concurrent_handlers=calls)
    both_full = trio.Event()
    running = 0

    async def handler(request: Request) -> bytes:
        nonlocal running
        if request.body.startswith(b"callback"):
            return b"cb:" + request.body
        running += 1
        if running == 2 * calls:
            both_full.set()
        await both_full.wait()  # every slot of both sides is taken now
        reply = await request.connection.request(b"callback " + request.body)
        return reply.upper()

    with trio.fail_after(30):
        async with socket_connection_pair(
            NativeHandshake(trust=AcceptAnyKey()),
            config=config,
            client_handler=handler,
            server_handler=handler,
        ) as (client, server):
            results: dict[bytes, bytes] = {}

            async def call(conn: Connection, body: bytes) -> None:
                results[body] = await conn.request(body)

            async with trio.open_nursery() as nursery:
                for i in range(calls):
                    nursery.start_soon(call, client, b"c%d" % i)
                    nursery.start_soon(call, server, b"s%d" % i)
    assert len(results) == 2 * calls
    assert results[b"c7"] == b"CB:CALLBACK C7"
    assert results[b"s127"] == b"CB:CALLBACK S127"


async def test_the_10_mib_chain_completes_with_the_default_windows() -> None:
    """R1 (10 MiB) -> its handler calls back Q -> Q's handler sends R2 (10 MiB): the
    request window's reserve (W = 2 x (M + 64)) lets the nested R2 in while R1 is held."""
    size = 10 * MIB
    config = ConnectionConfig(max_message_size=size)  # windows at their defaults (floors)
    assert config.request_window is None

    async def server_handler(request: Request) -> bytes:
        if len(request.body) == size and request.body[:2] == b"R1":
            answer = await request.connection.request(b"Q")
            return b"R1 done after " + answer
        return b"R2 of %d bytes" % len(request.body)

    async def client_handler(request: Request) -> bytes:
        assert request.body == b"Q"
        return await request.connection.request(b"R2" + bytes(size - 2))

    with trio.fail_after(30):
        async with socket_connection_pair(
            NativeHandshake(trust=AcceptAnyKey()),
            config=config,
            client_handler=client_handler,
            server_handler=server_handler,
        ) as (client, _):
            reply = await client.request(b"R1" + bytes(size - 2))
    assert reply == b"R1 done after R2 of %d bytes" % size


# ---------------------------------------------------------------------------------------
# The memory budget, measured
# ---------------------------------------------------------------------------------------

M = 16 * 1024
BUDGET_CONFIG = {"max_message_size": M, "max_calls": 8, "max_send_queue": 64 * 1024}


def connection_budget(
    *, m: int, calls: int, send_queue: int, record: int = 65535, receive: int = 256 * 1024
) -> int:
    """docs/reliability.rst, "Memory budget": R + W + W_r + Q + S x (M_out + 1 KiB)."""
    w = 2 * (m + 64)
    w_r = m + 64
    return receive + record + w + w_r + send_queue + calls * (m + 1024)


SERVER_SCRIPT = textwrap.dedent(
    """
    import sys, trio, monte_trio
    from monte_trio import AcceptAnyKey, ConnectionConfig, Server, inline

    def rss_kib():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])

    async def main():
        config = ConnectionConfig(**eval(sys.argv[1]))
        server = Server(inline(lambda req: req.body), trust=AcceptAnyKey(), config=config)
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(server.serve, 0, "127.0.0.1")
            print(listeners[0].socket.getsockname()[1], flush=True)
            stdin = trio.lowlevel.FdStream(0)
            buffer = b""
            while True:
                data = await stdin.receive_some()
                if not data:
                    break
                buffer += data
                while b"\\n" in buffer:
                    _, buffer = buffer.split(b"\\n", 1)
                    stats = server.statistics()
                    print(rss_kib(), stats.connections_active, flush=True)
            nursery.cancel_scope.cancel()

    trio.run(main)
    """
)


@asynccontextmanager
async def server_process(config: dict[str, int]) -> AsyncIterator[tuple[int, trio.Process]]:
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", SERVER_SCRIPT, repr(config)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.stdout is not None
    try:
        line = await _readline(proc.stdout)
        yield int(line), proc
    finally:
        proc.kill()
        await proc.wait()


async def _readline(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    for _ in range(1000):
        if data.endswith(b"\n"):
            return data
        chunk = await stream.receive_some(1)
        if not chunk:
            break
        data += chunk
    return data


async def _server_rss(proc: trio.Process) -> tuple[int, int]:
    assert proc.stdin is not None
    assert proc.stdout is not None
    await proc.stdin.send_all(b"rss\n")
    rss, active = (await _readline(proc.stdout)).split()
    return int(rss), int(active)


async def _settled_rss(proc: trio.Process, connections: int) -> tuple[int, int]:
    """The server's RSS once it has all ``connections`` and its RSS stopped moving
    (bounded polling of another process: it has no event to wait on)."""
    last = (0, 0)
    for _ in range(200):
        now = await _server_rss(proc)
        if now[1] == connections and abs(now[0] - last[0]) < 64:
            return now
        last = now
        await trio.sleep(0.05)
    raise AssertionError(f"the server never settled: {last}")  # pragma: no cover


async def flood_without_reading(port: int, config: ConnectionConfig) -> SessionPeer:
    """Open calls until the credit is spent (M-byte bodies), then never read again."""
    peer = await SessionPeer.connect(port, config)
    session = peer.session
    for _ in range(10_000):
        if session.send_request(bytes(M)) is None:
            break
    await peer.flush()
    return peer


async def test_flooding_clients_stay_within_the_stated_budget() -> None:
    budget = connection_budget(m=M, calls=8, send_queue=64 * 1024)
    clients = 100
    client_config = ConnectionConfig(max_message_size=M)
    with trio.fail_after(60):
        async with server_process(BUDGET_CONFIG) as (port, proc):
            # Warm up: one connection's fixed costs (imports, first allocations).
            warm = await flood_without_reading(port, client_config)
            before, _ = await _settled_rss(proc, 1)
            peers = [await flood_without_reading(port, client_config) for _ in range(clients)]
            # Once the server has taken every request and answered what it can.
            after, active = await _settled_rss(proc, clients + 1)
            assert active == clients + 1
            grown = (after - before) * 1024
            assert grown <= clients * budget, (
                f"the server grew by {grown / MIB:.1f} MiB for {clients} flooding clients; "
                f"the stated budget is {clients * budget / MIB:.1f} MiB"
            )
            # A well-behaved client is still served.
            async with monte_trio.open_client(LOCALHOST, port, trust=AcceptAnyKey()) as client:
                assert await client.request(b"still served") == b"still served"
            for peer in [warm, *peers]:
                await peer.secure.aclose()


async def test_a_nested_call_cancelled_before_its_task_started_is_not_run() -> None:
    """The peer's handler calls back (a nested call) and cancels it in the next record of
    the same write: the server answers it (ERROR CANCELLED, which the peer's session
    takes silently: a second answer would be a protocol error there) and never runs it."""
    ran: list[bytes] = []

    async def handler(request: Request) -> bytes:
        ran.append(request.body)
        if request.body == b"outer":
            return await request.connection.request(b"callback")  # the peer calls back
        return b"ran"

    config = ConnectionConfig(keepalive_interval=None)
    client, server = await secure_stream_pair(
        NativeHandshake(trust=AcceptAnyKey()), client_config=config, server_config=config
    )
    session = client.facts.new_session(config, trio.current_time())
    assert isinstance(session, Session)

    async def events() -> list[tuple[int, int, object, object]]:
        return list(session.receive_records(await client.receive_records()))

    with trio.fail_after(10):
        async with monte_trio.Connection(server, handler=handler, config=config) as conn:
            outer = session.send_request(b"outer")
            assert outer is not None
            await client.send_records(session.records_to_send(client.max_plaintext))  # type: ignore[arg-type]
            callback = None
            while callback is None:
                for kind, ident, _, parent in await events():
                    if kind == EV_REQUEST:
                        assert parent == outer
                        callback = ident
            # Serving the callback: a nested call, then its CANCEL in a second record,
            # both in one write (so the server reads them in one batch).
            nested = session.send_request(b"nested", parent=callback)
            assert nested is not None
            records = session.records_to_send(client.max_plaintext)
            session.cancel(nested)
            records += session.records_to_send(client.max_plaintext)
            assert len(records) == 2
            await client.send_records(records)  # type: ignore[arg-type]
            # The callback's reply ends the outer call.
            session.consumed(callback)
            session.send_reply(callback, b"from the peer")
            await client.send_records(session.records_to_send(client.max_plaintext))  # type: ignore[arg-type]
            replies: list[object] = []
            while not replies:
                replies += [
                    body for k, i, body, _ in await events() if k == EV_REPLY and i == outer
                ]
            assert replies == [b"from the peer"]
            await trio.testing.wait_all_tasks_blocked()
            assert ran == [b"outer"]  # the nested call never ran
            stats = conn.statistics()
            assert (stats.requests_received, stats.running_handlers) == (2, 0)
            assert session.state == OPEN  # no second answer to the nested call
            await client.aclose()  # the peer leaves: the connection ends at once


async def test_a_cancelled_handler_with_a_nursery_is_answered() -> None:
    """The peer's CANCEL stops a handler whose nursery then raises a group of Cancelled:
    the call is still answered (the peer's session frees the call's slot only on that
    answer), and the one handler worker serves the next call."""
    started = trio.Event()

    async def handler(request: Request) -> bytes:
        if request.body == b"fan out":
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.sleep_forever)
                nursery.start_soon(trio.sleep_forever)
                started.set()
        return b"done " + request.body

    config = ConnectionConfig(keepalive_interval=None, max_concurrent_handlers=1)
    client, server = await secure_stream_pair(
        NativeHandshake(trust=AcceptAnyKey()), client_config=config, server_config=config
    )
    session = client.facts.new_session(config, trio.current_time())
    assert isinstance(session, Session)

    async def send() -> None:
        await client.send_records(session.records_to_send(client.max_plaintext))  # type: ignore[arg-type]

    with trio.fail_after(10):
        async with monte_trio.Connection(server, handler=handler, config=config) as conn:
            for _ in range(3):
                started = trio.Event()
                ident = session.send_request(b"fan out")
                assert ident is not None
                await send()
                await started.wait()
                session.cancel(ident)
                await send()
                while session.calls_open != (0, 0):  # until the answer frees the slot
                    session.receive_records(await client.receive_records())
                after = session.send_request(b"next")
                assert after is not None
                await send()
                replies: list[object] = []
                while not replies:
                    events = session.receive_records(await client.receive_records())
                    replies += [body for k, i, body, _ in events if k == EV_REPLY and i == after]
                assert replies == [b"done next"]
                session.delivered(after)
            assert conn.statistics().running_handlers == 0
            await client.aclose()
