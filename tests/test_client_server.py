"""Client and Server end to end, over real loopback TCP (127.0.0.1, port 0); the cases
about a timer (handshake timeouts, the wait for a connection slot) run on
:class:`~monte_trio.testing.FaultyNetwork` under trio's MockClock (autojump) instead.

Every test is bounded by ``trio.fail_after``; nothing sleeps to synchronise: tests wait on
events, on the connection_state hooks, or on the sockets themselves.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Awaitable, Callable

import attrs
import pytest
import trio
import trio.testing
from helpers import LOCALHOST, echo, network_dialer, network_server, running_server

from monte_trio import (
    Client,
    ConnectError,
    Connection,
    ConnectionClosed,
    ConnectionConfig,
    ConnectionState,
    Handshake,
    HandshakeError,
    HandshakeTimeout,
    Request,
    Server,
    open_client,
)
from monte_trio._proto._monte_v1 import MonteV1HandshakeState
from monte_trio._proto._records import RecordOpener
from monte_trio.testing import FaultyNetwork

TIMEOUT = 20
N_TASKS = 4
N_OPS = 1024


async def sync_all(client: Client) -> None:
    """A request round trip on every pooled connection: everything sent before it on that
    connection has reached the server's handler."""
    for conn in client.connections:
        assert await conn.request(b"sync") == b"synced"


# ---- ports of monte's own tests -------------------------------------------------------


@attrs.define
class Counter:
    messages: set[bytes] = attrs.Factory(set)
    count: int = 0

    async def handler(self, req: Request) -> bytes:
        if req.oneway:
            self.count += 1
            self.messages.add(req.body)
            return b""
        if req.body == b"sync":
            return b"synced"
        # a reply that depends on every byte of the request
        return hashlib.blake2b(req.body, digest_size=16).digest() + req.body[::-1]


def expected_reply(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=16).digest() + body[::-1]


async def test_parallel_send_all_arrive(profile: Handshake) -> None:
    counter = Counter()
    with trio.fail_after(TIMEOUT):
        async with (
            running_server(counter.handler, profile) as (server, port),
            open_client(LOCALHOST, port, handshake=profile) as client,
        ):

            async def sender(t: int) -> None:
                for i in range(N_OPS):
                    await client.send(b"%d:%d" % (t, i))

            async with trio.open_nursery() as nursery:
                for t in range(N_TASKS):
                    nursery.start_soon(sender, t)
            await sync_all(client)
            assert counter.count == N_TASKS * N_OPS
            assert counter.messages == {
                b"%d:%d" % (t, i) for t in range(N_TASKS) for i in range(N_OPS)
            }
            assert server.statistics().messages_received == N_TASKS * N_OPS
            assert 1 <= len(client.connections) <= 4


async def test_parallel_request_replies_byte_for_byte(profile: Handshake) -> None:
    counter = Counter()
    mismatches: list[int] = []
    with trio.fail_after(TIMEOUT):
        async with (
            running_server(counter.handler, profile) as (server, port),
            open_client(LOCALHOST, port, handshake=profile) as client,
        ):

            async def requester(t: int) -> None:
                for i in range(N_OPS):
                    body = b"%d:%d:" % (t, i) + bytes([(t * 7 + i) % 256]) * (i % 300)
                    if await client.request(body) != expected_reply(body):
                        mismatches.append(i)

            async with trio.open_nursery() as nursery:
                for t in range(N_TASKS):
                    nursery.start_soon(requester, t)
            assert server.statistics().requests_received == N_TASKS * N_OPS
    assert mismatches == []


async def test_parallel_send_nowait_all_arrive(profile: Handshake) -> None:
    counter = Counter()
    fallbacks = 0
    # a small send queue so that the WouldBlock fallback is exercised
    config = ConnectionConfig(max_send_queue=4096)
    with trio.fail_after(TIMEOUT):
        async with (
            running_server(counter.handler, profile) as (_, port),
            open_client(LOCALHOST, port, handshake=profile, config=config) as client,
        ):

            async def sender(t: int) -> None:
                nonlocal fallbacks
                for i in range(N_OPS):
                    body = b"%d:%d" % (t, i) + b"." * 100
                    try:
                        client.send_nowait(body)
                    except trio.WouldBlock:
                        fallbacks += 1
                        await client.send(body)
                    if i % 64 == 0:
                        await trio.lowlevel.checkpoint()

            async with trio.open_nursery() as nursery:
                for t in range(N_TASKS):
                    nursery.start_soon(sender, t)
            # a send() after the nowait ones flushes each connection's queue in order
            for conn in client.connections:
                await conn.send(b"flush")
            await sync_all(client)
            flushes = len(client.connections)
    assert fallbacks > 0
    assert counter.count == N_TASKS * N_OPS + flushes
    assert len(counter.messages) == N_TASKS * N_OPS + 1


# ---- handshake timeouts ---------------------------------------------------------------


async def test_silent_client_is_closed_after_handshake_timeout(
    profile: Handshake, autojump_clock: trio.testing.MockClock
) -> None:
    # On the faulty network with virtual time: the timeout is the server's own timer.
    net = FaultyNetwork(latency=0.001)
    with trio.fail_after(TIMEOUT):
        async with network_server(net, echo, profile, handshake_timeout=0.5) as server:
            silent = await net.connect("server")
            start = trio.current_time()
            async with open_client(handshake=profile, connect=network_dialer(net)) as client:
                assert await client.request(b"still served") == b"still served"
            # the server closes the silent connection after the timeout, having sent
            # nothing: the client speaks first in both profiles
            assert await _records_until_closed(silent) == []
            assert 0.5 <= trio.current_time() - start <= 0.5 + 0.01
            assert server.statistics().handshake_failures == 1
            await silent.aclose()


async def test_dialing_a_mute_server_raises_handshake_timeout(
    profile: Handshake, autojump_clock: trio.testing.MockClock
) -> None:
    # On the faulty network with virtual time: the timeout is the client's own timer.
    net = FaultyNetwork(latency=0.001)
    listener = net.listen("server")
    held: list[trio.abc.Stream] = []

    async def accept_and_hold() -> None:
        for _ in range(5):
            held.append(await listener.accept())

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept_and_hold)
            start = trio.current_time()
            with pytest.raises(HandshakeTimeout, match=r"did not complete within 0\.5 s"):
                async with open_client(
                    handshake=profile, connect=network_dialer(net), handshake_timeout=0.5
                ):
                    raise AssertionError("the handshake cannot succeed")
            assert 0.5 <= trio.current_time() - start <= 0.5 + 0.01
            nursery.cancel_scope.cancel()
    assert held  # the connection was accepted: only the handshake timed out
    for stream in held:
        await stream.aclose()
    await listener.aclose()


# ---- server shutdown ------------------------------------------------------------------


class TaskTracker(trio.abc.Instrument):
    """Records the tasks spawned below ``root`` (once set) and which have exited."""

    def __init__(self) -> None:
        self.root: trio.lowlevel.Task | None = None
        self.spawned: set[trio.lowlevel.Task] = set()
        self.exited: set[trio.lowlevel.Task] = set()

    def _below_root(self, task: trio.lowlevel.Task) -> bool:
        nursery = task.parent_nursery
        for _ in range(1000):
            if nursery is None:
                return False
            parent = nursery.parent_task
            if parent is self.root:
                return True
            nursery = parent.parent_nursery
        raise AssertionError("task tree deeper than 1000")

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        if self.root is not None and self._below_root(task):
            self.spawned.add(task)

    def task_exited(self, task: trio.lowlevel.Task) -> None:
        self.exited.add(task)


async def test_shutdown_leaves_no_task_and_finishes_in_flight_work(profile: Handshake) -> None:
    entered = trio.Event()
    finished: list[bytes] = []

    async def handler(req: Request) -> bytes:
        if req.body == b"slow":
            entered.set()
            await trio.sleep(0.2)  # work in progress, well within the grace period
            finished.append(req.body)
        return b"reply to " + req.body

    tracker = TaskTracker()
    trio.lowlevel.add_instrument(tracker)
    try:
        server = Server(handler, handshake=profile)
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as server_nursery:
                listeners = await server_nursery.start(server.serve, 0, LOCALHOST)
                port = listeners[0].socket.getsockname()[1]
                (serve_task,) = server_nursery.child_tasks
                tracker.root = serve_task
                async with open_client(LOCALHOST, port, handshake=profile, max_conns=2) as c:
                    assert await c.request(b"warm up") == b"reply to warm up"
                    async with trio.open_nursery() as nursery:
                        replies: list[bytes] = []

                        async def slow() -> None:
                            replies.append(await c.request(b"slow"))

                        nursery.start_soon(slow)
                        await entered.wait()
                        start = trio.current_time()
                        await server.shutdown(grace_period=5)
                        elapsed = trio.current_time() - start
                    assert serve_task in tracker.exited
                    assert tracker.spawned  # the server did run tasks
                    left = tracker.spawned - tracker.exited
                    assert not left, [t.name for t in left]
                    assert replies == [b"reply to slow"]
                    assert finished == [b"slow"]
                    assert elapsed < 5
                    assert server.connections == frozenset()
                    # the client's connections were closed by the server: it redials
                    with pytest.raises(ConnectError):
                        await c.request(b"after shutdown")
            assert not server_nursery.child_tasks
    finally:
        trio.lowlevel.remove_instrument(tracker)


async def test_shutdown_cancels_handlers_beyond_grace(monte_v1: Handshake) -> None:
    entered = trio.Event()
    cancelled = trio.Event()

    async def handler(req: Request) -> bytes:
        entered.set()
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()
        raise AssertionError

    with trio.fail_after(TIMEOUT):
        async with (
            running_server(handler, monte_v1) as (server, port),
            open_client(LOCALHOST, port, handshake=monte_v1) as client,
            trio.open_nursery() as nursery,
        ):

            async def call() -> None:
                with pytest.raises(ConnectionClosed):
                    await client.request(b"forever")

            nursery.start_soon(call)
            await entered.wait()
            start = trio.current_time()
            await server.shutdown(grace_period=0.3)
            assert 0.25 <= trio.current_time() - start < 3
            assert cancelled.is_set()


async def test_shutdown_stops_accepting(profile: Handshake) -> None:
    with trio.fail_after(TIMEOUT):
        async with running_server(echo, profile) as (server, port):
            await server.shutdown()
            with pytest.raises(ConnectError, match="could not connect"):
                async with open_client(LOCALHOST, port, handshake=profile):
                    raise AssertionError("the server is shut down")


# ---- calls from the server to the client ----------------------------------------------


async def test_server_calls_the_client_back(profile: Handshake) -> None:
    async def server_handler(req: Request) -> bytes:
        if req.body == b"call me":
            answer = await req.connection.request(b"question")
            await req.connection.send(b"note")
            return b"client said " + answer
        return b"?"

    notes: list[bytes] = []

    async def client_handler(req: Request) -> bytes:
        if req.oneway:
            notes.append(req.body)
            return b""
        # and the client's handler calls the server again, on the same connection
        again = await req.connection.request(b"nested")
        return b"answer+" + again

    with trio.fail_after(TIMEOUT):
        async with (
            running_server(server_handler, profile) as (_, port),
            open_client(LOCALHOST, port, handshake=profile, handler=client_handler) as client,
        ):
            replies = []
            async with trio.open_nursery() as nursery:

                async def call() -> None:
                    replies.append(await client.request(b"call me"))

                for _ in range(10):
                    nursery.start_soon(call)
            assert replies == [b"client said answer+?"] * 10
            await sync_all_echo(client)
    assert notes == [b"note"] * 10


async def sync_all_echo(client: Client) -> None:
    for conn in client.connections:
        assert await conn.request(b"x") == b"?"


# ---- failures -------------------------------------------------------------------------


async def test_broken_transport_fails_waiters_and_client_redials(profile: Handshake) -> None:
    entered = 0
    all_in = trio.Event()
    n = 20

    async def handler(req: Request) -> bytes:
        nonlocal entered
        if req.body == b"block":
            entered += 1
            if entered == n:
                all_in.set()
            await trio.sleep_forever()
        return req.body

    closed = trio.Event()

    def hook(conn: Connection, state: ConnectionState) -> None:
        if state is ConnectionState.CLOSED:
            closed.set()

    with trio.fail_after(TIMEOUT):
        async with (
            running_server(handler, profile) as (server, port),
            open_client(
                LOCALHOST, port, handshake=profile, max_conns=1, connection_state=hook
            ) as client,
        ):
            errors: list[ConnectionClosed] = []
            async with trio.open_nursery() as nursery:

                async def call() -> None:
                    try:
                        await client.request(b"block")
                    except ConnectionClosed as exc:
                        errors.append(exc)

                for _ in range(n):
                    nursery.start_soon(call)
                await all_in.wait()
                (server_conn,) = server.connections
                start = trio.current_time()
                await trio.aclose_forcefully(server_conn)  # closed at once
            assert trio.current_time() - start < 2
            assert len(errors) == n
            await closed.wait()
            assert client.connections == []
            assert await client.request(b"again") == b"again"
            assert client.statistics().dials == 2
            assert len(client.connections) == 1


async def test_handler_exception_monte_v1_other_connections_unaffected(
    monte_v1: Handshake,
) -> None:
    async def handler(req: Request) -> bytes:
        if req.body == b"boom":
            raise RuntimeError("handler bug")
        return req.body

    with trio.fail_after(TIMEOUT):
        async with (
            running_server(handler, monte_v1) as (_server, port),
            open_client(LOCALHOST, port, handshake=monte_v1, max_conns=1) as a,
            open_client(LOCALHOST, port, handshake=monte_v1, max_conns=1) as b,
        ):
            (conn_a,) = a.connections
            with pytest.raises(ConnectionClosed):
                await a.request(b"boom")
            await conn_a.wait_closed()
            assert await b.request(b"unaffected") == b"unaffected"
            assert await a.request(b"redialed") == b"redialed"


# ---- hostile records over real TCP ----------------------------------------------------


async def _raw_monte_v1(port: int) -> tuple[trio.SocketStream, MonteV1HandshakeState]:
    sock = await trio.open_tcp_stream(LOCALHOST, port)
    state = MonteV1HandshakeState(initiator=True)
    await sock.send_all(state.data_to_send())
    for _ in range(32):
        assert state.receive_data(await sock.receive_some(64)) == b""
        if state.peer_public is not None:
            break
    assert state.complete
    return sock, state


async def _records_until_closed(
    sock: trio.abc.ReceiveStream, opener: RecordOpener | None = None
) -> list[bytes]:
    """Read until the server drops the connection (EOF or a reset); return the plaintexts
    of the records it sent meanwhile."""
    got: list[bytes] = []
    for _ in range(1000):
        try:
            data = await sock.receive_some(65536)
        except trio.BrokenResourceError:
            return got
        if not data:
            return got
        assert opener is not None, f"unexpected data {data!r}"
        got += opener.receive_data(data)
    raise AssertionError("the connection was never closed")


def _seq(seq: int, body: bytes) -> bytes:
    return struct.pack(">I", seq) + body


def _tampered(sealer: Callable[[bytes], bytes]) -> bytes:
    record = bytearray(sealer(_seq(1, b"hello")))
    record[10] ^= 0x40
    return bytes(record)


@pytest.mark.parametrize(
    "attack", ["tampered", "4 GiB length", "oversized record", "truncated then EOF", "replayed"]
)
async def test_hostile_records_close_that_connection_only(
    monte_v1: Handshake, attack: str
) -> None:
    dropped = trio.Event()
    closed: list[Connection] = []

    def hook(conn: Connection, state: ConnectionState) -> None:
        if state is ConnectionState.CLOSED:
            closed.append(conn)
            dropped.set()

    with trio.fail_after(TIMEOUT):
        async with (
            running_server(echo, monte_v1, connection_state=hook) as (server, port),
            open_client(LOCALHOST, port, handshake=monte_v1) as good,
        ):
            assert await good.request(b"before") == b"before"
            sock, state = await _raw_monte_v1(port)
            sealer, opener = state.records(max_record_size=4096)
            # a valid request first: the raw client really speaks monte-v1
            valid = sealer.seal(_seq(1, b"valid"))
            await sock.send_all(valid)
            got: list[bytes] = []
            for _ in range(100):
                got += opener.receive_data(await sock.receive_some(65536))
                if got:
                    break
            assert got == [_seq(1, b"valid")]
            if attack == "tampered":
                await sock.send_all(_tampered(sealer.seal))
            elif attack == "4 GiB length":
                await sock.send_all(struct.pack(">I", 2**32 - 1) + b"\x00" * 64)
            elif attack == "oversized record":
                await sock.send_all(struct.pack(">I", 4097) + b"\x00" * 4097)
            elif attack == "truncated then EOF":
                await sock.send_all(sealer.seal(_seq(3, b"cut"))[:-5])
                await sock.send_eof()
            else:
                await sock.send_all(valid)  # the same record again: wrong nonce
            assert await _records_until_closed(sock, opener) == []
            await sock.aclose()
            await dropped.wait()
            assert len(closed) == 1
            assert closed[0].close_reason is not None
            if attack != "truncated then EOF":
                assert "broke the protocol" in closed[0].close_reason.reason
            # that connection only: the good client carries on
            assert len(server.connections) == 1
            assert await good.request(b"after") == b"after"


# ---- limits -----------------------------------------------------------------------------


async def test_server_max_conns_extra_connection_waits_then_is_closed(
    profile: Handshake, autojump_clock: trio.testing.MockClock
) -> None:
    net = FaultyNetwork(latency=0.001)  # virtual time: conn_wait_timeout is the server's timer
    with trio.fail_after(TIMEOUT):
        async with (
            network_server(net, echo, profile, max_conns=1, conn_wait_timeout=0.3) as server,
            open_client(handshake=profile, connect=network_dialer(net), max_conns=1) as first,
        ):
            assert await first.request(b"one") == b"one"
            start = trio.current_time()
            # The handshake completes (a connection takes its slot only then); the server
            # then waits conn_wait_timeout for a slot and closes the connection.
            async with open_client(
                handshake=profile, connect=network_dialer(net), handshake_timeout=5
            ) as c:
                with pytest.raises(ConnectionClosed):
                    await c.request(b"no slot should be free")
            assert 0.3 <= trio.current_time() - start < 0.3 + 0.05
            assert server.statistics().connections_refused == 1
            assert await first.request(b"still") == b"still"


async def test_server_max_conns_waiting_connection_gets_a_freed_slot(
    profile: Handshake,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with running_server(echo, profile, max_conns=1, conn_wait_timeout=5) as (
            server,
            port,
        ):
            async with trio.open_nursery() as nursery:
                first_cm = open_client(LOCALHOST, port, handshake=profile, max_conns=1)
                first = await first_cm.__aenter__()
                assert await first.request(b"one") == b"one"
                served = trio.Event()

                async def second() -> None:
                    async with open_client(LOCALHOST, port, handshake=profile) as c:
                        assert await c.request(b"two") == b"two"
                    served.set()

                nursery.start_soon(second)
                await trio.testing.wait_all_tasks_blocked(0.05)
                assert not served.is_set()
                await first_cm.__aexit__(None, None, None)
                await served.wait()
            assert server.statistics().connections_refused == 0


# ---- the client pool --------------------------------------------------------------------


async def test_pool_opens_exactly_max_conns(profile: Handshake) -> None:
    release = trio.Event()
    arrived = 0

    async def handler(req: Request) -> bytes:
        nonlocal arrived
        arrived += 1
        if arrived == 64:
            release.set()
        await release.wait()
        return req.body

    with trio.fail_after(TIMEOUT):
        async with (
            running_server(handler, profile) as (server, port),
            open_client(LOCALHOST, port, handshake=profile, max_conns=4) as client,
        ):
            replies: dict[int, bytes] = {}
            async with trio.open_nursery() as nursery:

                async def call(i: int) -> None:
                    replies[i] = await client.request(b"%d" % i)

                for i in range(64):
                    nursery.start_soon(call, i)
            assert replies == {i: b"%d" % i for i in range(64)}
            assert len(client.connections) == 4
            assert client.statistics().dials == 4
            assert server.statistics().connections_accepted == 4


async def test_pool_replaces_a_broken_connection(profile: Handshake) -> None:
    closed = trio.Event()

    def hook(conn: Connection, state: ConnectionState) -> None:
        if state is ConnectionState.CLOSED:
            closed.set()

    with trio.fail_after(TIMEOUT):
        async with (
            running_server(echo, profile) as (server, port),
            open_client(
                LOCALHOST, port, handshake=profile, max_conns=1, connection_state=hook
            ) as client,
        ):
            (conn,) = client.connections
            assert await client.request(b"a") == b"a"
            for server_conn in server.connections:
                await trio.aclose_forcefully(server_conn)  # closed at once
            await closed.wait()
            assert conn.closed
            assert await client.request(b"b") == b"b"
            (new,) = client.connections
            assert new is not conn
            assert client.statistics().dials == 2


async def test_dial_to_a_closed_port(profile: Handshake) -> None:
    listeners = await trio.open_tcp_listeners(0, host=LOCALHOST)
    port = listeners[0].socket.getsockname()[1]
    for listener in listeners:
        await listener.aclose()
    with trio.fail_after(TIMEOUT):
        with pytest.raises(ConnectError) as info:
            async with open_client(LOCALHOST, port, handshake=profile, dial_attempts=2):
                raise AssertionError("nobody listens there")
    assert not isinstance(info.value, ConnectionClosed)
    assert info.value.peer == f"{LOCALHOST}:{port}"
    message = str(info.value)
    assert f"could not connect to {LOCALHOST}:{port}" in message
    assert "2 attempt(s)" in message
    assert isinstance(info.value.__cause__, OSError)


async def test_dial_attempts_are_respected(
    profile: Handshake, autojump_clock: trio.testing.MockClock
) -> None:
    net = FaultyNetwork()
    attempts = 0

    def connector(fail_first: int) -> Callable[[], Awaitable[trio.abc.Stream]]:
        async def connect() -> trio.abc.Stream:
            nonlocal attempts
            attempts += 1
            if attempts <= fail_first:
                raise ConnectionRefusedError("refused (test)")
            return await net.connect("server")

        return connect

    server = Server(echo, handshake=profile)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve_listeners, [net.listen("server")])
            with pytest.raises(ConnectError, match="3 attempt"):
                async with open_client(handshake=profile, connect=connector(99), dial_attempts=3):
                    raise AssertionError("every attempt fails")
            assert attempts == 3
            attempts = 0
            async with open_client(
                handshake=profile, connect=connector(2), dial_attempts=3
            ) as client:
                assert await client.request(b"third time") == b"third time"
            assert attempts == 3
            await server.shutdown()


async def test_client_send_nowait_without_connection_would_block(monte_v1: Handshake) -> None:
    with trio.fail_after(TIMEOUT):
        async with running_server(echo, monte_v1) as (_server, port):
            async with open_client(LOCALHOST, port, handshake=monte_v1) as client:
                for conn in list(client.connections):
                    await conn.aclose()
                with pytest.raises(trio.WouldBlock):
                    client.send_nowait(b"x")
                await client.send(b"redials")
                assert len(client.connections) == 1
            with pytest.raises(ConnectionClosed, match="client is closed"):
                await client.request(b"x")
            with pytest.raises(ConnectionClosed, match="client is closed"):
                client.send_nowait(b"x")


SETUP_PHASES = ["accepted", "handshaking", "connection starting", "serving", "request in flight"]

# What the dialing client sees when the server shuts down at each phase: its dial fails
# with HandshakeError (the server closed the socket mid-handshake), or it got a connection
# that then ended closed; with a request in flight, the reply (the handler ends within the
# grace period).
SETUP_OUTCOMES = {
    "accepted": "HandshakeError",
    "handshaking": "HandshakeError",
    "connection starting": "closed",
    "serving": "closed",
    "request in flight": "reply",
}


class HeldAfterFirstByte(trio.abc.Stream):
    """A transport that sends the first byte at once and the rest once ``go`` is set."""

    def __init__(self, stream: trio.abc.Stream, go: trio.Event) -> None:
        self.stream = stream
        self.go = go
        self.first_sent = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if data and not self.first_sent:
            self.first_sent = True
            await self.stream.send_all(data[:1])
            await self.go.wait()
            data = data[1:]
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return bytes(await self.stream.receive_some(max_bytes))

    async def aclose(self) -> None:
        await self.stream.aclose()


@pytest.mark.parametrize("phase", SETUP_PHASES)
async def test_shutdown_at_any_point_of_connection_setup_returns(
    profile: Handshake, autojump_clock: trio.testing.MockClock, phase: str
) -> None:
    # The server shuts down while a client's connection is at ``phase`` of its setup,
    # driven there by stalling the link (accepted), by sending only the first byte of the
    # client's handshake (handshaking), by a first client holding
    # the server's only connection slot (connection starting: handshake done, no slot
    # yet), or by a handler that takes a while (request in flight); the phase is checked
    # on the server's statistics, its hook and the network's counters. Shutdown returns
    # within the grace period, the client's connection (if it got one) ends closed, and
    # the client sees only what that phase allows.
    net = FaultyNetwork()  # no latency: quiet means settled
    server_events: list[ConnectionState] = []
    handled = trio.Event()

    async def slow_echo(request: Request) -> bytes:
        handled.set()
        await trio.sleep(0.5)
        return request.body

    server = Server(
        slow_echo,
        handshake=profile,
        max_conns=1,
        connection_state=lambda _conn, event: server_events.append(event),
    )
    connected = trio.Event()
    client_conns: list[Connection] = []
    seen: list[str] = []  # what the dialing client saw

    go = trio.Event()

    async def connect() -> trio.abc.Stream:
        stream = await net.connect("server")
        if phase == "accepted":  # nothing is delivered either way
            net.stall("client", "server", link=stream.link)
            net.stall("server", "client", link=stream.link)
        elif phase == "handshaking":  # the server has the first byte, waits for more
            return HeldAfterFirstByte(stream, go)
        return stream

    async def dial() -> None:
        try:
            async with open_client(handshake=profile, connect=connect) as client:
                (conn,) = client.connections
                client_conns.append(conn)
                connected.set()
                if phase == "request in flight":
                    assert await client.request(b"x") == b"x"
                    seen.append("reply")
                await conn.wait_closed()
                if not seen:
                    seen.append("closed")
        except HandshakeError as exc:
            seen.append(type(exc).__name__)

    async def hold_the_only_slot(*, task_status: trio.TaskStatus[None]) -> None:
        async with open_client(handshake=profile, connect=lambda: net.connect("server")) as c:
            task_status.started()
            await c.connections[0].wait_closed()

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve_listeners, [net.listen("server")])
            if phase == "connection starting":
                await nursery.start(hold_the_only_slot)
            nursery.start_soon(dial)
            if phase == "request in flight":
                await handled.wait()
            elif phase in ("connection starting", "serving"):
                await connected.wait()
            await trio.testing.wait_all_tasks_blocked()
            stats = server.statistics()
            delivered = net.statistics().bytes_delivered
            others = 1 if phase == "connection starting" else 0  # the slot holder
            assert stats.connections_accepted == 1 + others
            if phase in ("accepted", "handshaking", "connection starting"):
                assert stats.handshakes_in_progress == 1
                assert stats.connections_active == others
                assert server_events == [ConnectionState.NEW] * others
                if phase == "accepted":
                    assert delivered == 0
                else:
                    assert delivered > 0
                if phase == "connection starting":
                    assert connected.is_set()  # the client's handshake is done
            else:
                assert stats.handshakes_in_progress == 0
                assert stats.connections_active == 1
                assert server_events == [ConnectionState.NEW]
                assert stats.requests_received == (phase == "request in flight")
            start = trio.current_time()
            await server.shutdown(grace_period=1)
            elapsed = trio.current_time() - start
            assert elapsed <= (0.5 if phase == "request in flight" else 0) + 0.1
            net.heal()  # let the server's close reach a stalled client
            go.set()  # and a held one send the rest
        # (the nursery waits for the client to finish)
    assert seen == [SETUP_OUTCOMES[phase]]
    for conn in client_conns:
        assert conn.closed
        assert conn.close_reason is not None
    assert len(client_conns) == (seen != ["HandshakeError"])
