"""The client pool: a call whose connection starts closing before any of it was sent moves
to another connection (bounded), the hook events, and how a Client is made."""

from __future__ import annotations

import enum

import pytest
import trio
import trio.testing
from helpers import network_client, network_server

from monte_trio import (
    Client,
    Connection,
    ConnectionConfig,
    ConnectionState,
    Handshake,
    Request,
    RequestNotProcessed,
    Server,
    open_client,
)
from monte_trio.testing import FaultyNetwork

TIMEOUT = 60  # virtual seconds (autojump clock)


class Gate:
    """A handler that holds every request until opened, and notes which connection
    served it."""

    def __init__(self) -> None:
        self.open = trio.Event()
        self.served: list[tuple[Connection, bytes]] = []
        self.held = 0
        self._changed = trio.Event()

    async def wait_held(self, count: int) -> None:
        """Wait until ``count`` requests have reached the handler."""
        while self.held < count:
            await self._changed.wait()

    async def __call__(self, request: Request) -> bytes:
        self.held += 1
        self._changed.set()
        self._changed = trio.Event()
        await self.open.wait()
        self.served.append((request.connection, request.body))
        return b"re:" + request.body


async def test_callers_waiting_for_slots_move_when_the_server_sends_goaway(
    native: Handshake, autojump_clock: trio.testing.MockClock
) -> None:
    # Two call slots per connection: two calls run, six wait for a slot on the same
    # connection; the server then closes that connection (GOAWAY). The waiting callers
    # move to a new connection instead of failing.
    net = FaultyNetwork(latency=0.001)
    gate = Gate()
    server_config = ConnectionConfig(max_calls=2, grace_period=10)
    replies: list[bytes] = []
    with trio.fail_after(TIMEOUT):
        async with (
            network_server(net, gate, native, server_config) as server,
            network_client(net, native, ConnectionConfig(), max_conns=1) as client,
        ):
            (first,) = client.connections

            async def call(body: bytes) -> None:
                replies.append(await client.request(body))

            async with trio.open_nursery() as nursery:
                for i in range(8):
                    nursery.start_soon(call, b"%d" % i)
                await gate.wait_held(2)
                await trio.testing.wait_all_tasks_blocked()
                assert first.statistics().requests_sent == 2  # the others wait for a slot
                (served_conn,) = server.connections
                nursery.start_soon(served_conn.aclose)  # GOAWAY; the two running finish
                await gate.wait_held(4)  # two of the callers that moved, on a new connection
                assert first.closed
                (second,) = client.connections  # dialed for the callers that moved
                assert second is not first
                gate.open.set()
            assert sorted(replies) == sorted(b"re:%d" % i for i in range(8))
            assert first.statistics().requests_sent == 2
            assert second.statistics().requests_sent == 6
            assert client.statistics().dials == 2
            connections = [conn for conn, _ in gate.served]
            assert connections.count(served_conn) == 2


async def test_callers_waiting_for_room_move_when_their_connection_closes(
    profile: Handshake, autojump_clock: trio.testing.MockClock
) -> None:
    # The same with the pending-request limit (monte-v1 has no credit): callers waiting
    # for room on a connection that starts closing move to another one.
    net = FaultyNetwork(latency=0.001)
    gate = Gate()
    config = ConnectionConfig(max_pending_requests=2, grace_period=10)
    replies: list[bytes] = []
    with trio.fail_after(TIMEOUT):
        async with (
            network_server(net, gate, profile, config),
            network_client(net, profile, config, max_conns=1) as client,
        ):
            (first,) = client.connections

            async def call(body: bytes) -> None:
                replies.append(await client.request(body))

            async with trio.open_nursery() as nursery:
                for i in range(6):
                    nursery.start_soon(call, b"%d" % i)
                await gate.wait_held(2)
                await trio.testing.wait_all_tasks_blocked()
                assert first.statistics().requests_sent == 2  # the others wait for room
                nursery.start_soon(first.aclose)  # the pending two finish within grace
                await gate.wait_held(4)  # two of the callers that moved, on a new connection
                assert len(client.connections) == 1
                assert client.connections[0] is not first
                gate.open.set()
            assert sorted(replies) == sorted(b"re:%d" % i for i in range(6))
            assert first.statistics().requests_sent == 2
            assert client.statistics().dials == 2


async def test_reassignment_is_bounded(
    native: Handshake, autojump_clock: trio.testing.MockClock
) -> None:
    # A server that sends GOAWAY on every connection as soon as it is established: each
    # call is refused, moved three times (three new dials), then its error is raised.
    net = FaultyNetwork(latency=0.001)
    served: list[bytes] = []

    async def handler(request: Request) -> bytes:
        served.append(request.body)
        return request.body

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:

            def close_at_once(conn: Connection, event: ConnectionState) -> None:
                if event is ConnectionState.NEW:
                    nursery.start_soon(conn.aclose)

            server = Server(handler, handshake=native, connection_state=close_at_once)
            await nursery.start(server.serve_listeners, [net.listen("server")])
            first_closed = trio.Event()

            def note_closed(conn: Connection, event: ConnectionState) -> None:
                if event is ConnectionState.CLOSED:
                    first_closed.set()

            async with open_client(
                handshake=native,
                connect=lambda: net.connect("server"),
                max_conns=1,
                connection_state=note_closed,
            ) as client:
                await first_closed.wait()
                with pytest.raises(RequestNotProcessed):
                    await client.request(b"never served")
                # open_client's dial, then one for the call and one per move (three)
                assert client.statistics().dials == 5
            assert served == []
            nursery.cancel_scope.cancel()


async def test_hooks_get_connection_state_events(
    profile: Handshake, autojump_clock: trio.testing.MockClock
) -> None:
    assert issubclass(ConnectionState, enum.Enum)
    assert [e.name for e in ConnectionState] == ["NEW", "CLOSED"]
    net = FaultyNetwork(latency=0.001)
    client_events: list[ConnectionState] = []
    server_events: list[ConnectionState] = []

    async def echo(request: Request) -> bytes:
        return request.body

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            server = Server(
                echo,
                handshake=profile,
                connection_state=lambda conn, event: server_events.append(event),
            )
            await nursery.start(server.serve_listeners, [net.listen("server")])
            async with open_client(
                handshake=profile,
                connect=lambda: net.connect("server"),
                connection_state=lambda conn, event: client_events.append(event),
            ) as client:
                assert await client.request(b"x") == b"x"
            await server.shutdown()
    assert client_events == [ConnectionState.NEW, ConnectionState.CLOSED]
    assert server_events == [ConnectionState.NEW, ConnectionState.CLOSED]


def test_a_client_is_made_by_open_client_only() -> None:
    with pytest.raises(TypeError, match=r"no public constructor.*open_client"):
        Client()  # type: ignore[call-arg]
    assert not hasattr(Connection, "load")  # the pool's measure is private
