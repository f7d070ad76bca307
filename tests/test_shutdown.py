"""Closing clients and servers under load, within their grace period, losing nothing.

All over :class:`~monte_trio.testing.FaultyNetwork` (latency 5 ms) under trio's MockClock,
so durations are measured exactly with :func:`trio.current_time`.
"""

from __future__ import annotations

from collections import Counter
from contextlib import AbstractAsyncContextManager

import pytest
import trio
import trio.testing
from helpers import Recorder, is_native, network_client, network_server, no_task_left

from monte_trio import (
    Client,
    ConnectError,
    Connection,
    ConnectionClosed,
    ConnectionConfig,
    Handshake,
    HandshakeError,
    RequestNotProcessed,
    Server,
)
from monte_trio.testing import FaultyNetwork, secure_stream_pair

GRACE = 2.0
SLACK = 0.1  # seconds beyond the grace period a close may take (a few latencies)
CONFIG = ConnectionConfig(grace_period=GRACE, keepalive_interval=1, keepalive_tolerance=3)
CALLS = 100


def request_time(body: bytes) -> float:
    """Requests take 10-50 ms, by their body."""
    return 0.01 * (1 + int(body[-2:]) % 5)


def serving(
    network: FaultyNetwork, handler: Recorder, profile: Handshake
) -> AbstractAsyncContextManager[Server]:
    """Serve on the network's host "server"; shut down (if still serving) on exit."""
    return network_server(network, handler, profile, CONFIG)


def client_of(network: FaultyNetwork, profile: Handshake) -> AbstractAsyncContextManager[Client]:
    return network_client(network, profile, CONFIG, max_conns=4)


class Load:
    """CALLS staggered calls (even: requests, odd: one-way sends) and their outcomes."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.outcomes: dict[bytes, str] = {}
        self.sent: set[bytes] = set()  # one-way messages whose send() returned normally

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for i in range(CALLS):
                nursery.start_soon(self.call, i)

    async def call(self, i: int) -> None:
        body = b"call-%03d" % i
        await trio.sleep(i * 0.0005)
        try:
            with trio.fail_after(30):  # nothing may hang: far beyond any grace period
                if i % 2 == 0:
                    assert await self.client.request(body) == b"re:" + body
                else:
                    await self.client.send(body)
                    self.sent.add(body)
            self.outcomes[body] = "ok"
        except (
            ConnectError,
            ConnectionClosed,
            HandshakeError,
        ) as exc:  # RequestNotProcessed included
            # HandshakeError: the call needed a new connection, and the server closed it
            # during the handshake (it was shutting down)
            self.outcomes[body] = type(exc).__name__

    def check(self, handler: Recorder) -> Counter[str]:
        assert len(self.outcomes) == CALLS
        for body, outcome in self.outcomes.items():
            if int(body[-3:]) % 2 == 0:
                if outcome == "ok":
                    assert handler.executions[body] == 1, body
                elif outcome == "RequestNotProcessed":
                    assert handler.executions[body] == 0, body
                else:
                    assert handler.executions[body] <= 1, body
        # no message that send() reported as written was lost
        lost = sorted(self.sent - set(handler.messages))
        assert not lost, f"one-way messages written but never handled: {lost}"
        return Counter(self.outcomes.values())


async def test_client_close_under_load(
    autojump_clock: trio.testing.MockClock, profile: Handshake
) -> None:
    network = FaultyNetwork(seed=4, latency=0.005)
    handler = Recorder(delay=request_time)
    with trio.fail_after(60):
        async with no_task_left(), serving(network, handler, profile):
            async with client_of(network, profile) as client:
                load = Load(client)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(load.run)
                    await trio.sleep(0.025)  # half the calls are started, many in flight
                    start = trio.current_time()
                    await client.aclose()
                    elapsed = trio.current_time() - start
                    open_after_close = client.statistics().open_connections
                    await trio.sleep(1)
                    open_a_second_later = client.statistics().open_connections
                assert elapsed <= GRACE + SLACK
            await trio.sleep(0.1)  # the server handles what was written before EOF
            kinds = load.check(handler)
            assert kinds["ok"] > 0
            # calls made after the close: refused before they were sent (never executed,
            # which check() verified)
            assert kinds["RequestNotProcessed"] > 0
    # Client.aclose() closed the pool: dials that were in progress must not add
    # connections to a closed client (they stay open until the open_client block ends).
    assert (open_after_close, open_a_second_later) == (0, 0)


@pytest.mark.parametrize("moment", [0.005, 0.025, 0.035])
async def test_server_shutdown_under_load(
    autojump_clock: trio.testing.MockClock, profile: Handshake, moment: float
) -> None:
    """The server shuts down ``moment`` seconds into the load: while the pool dials, while
    the calls flow, or as they wind down."""
    network = FaultyNetwork(seed=5, latency=0.005)
    handler = Recorder(delay=request_time)
    with trio.fail_after(60):
        async with (
            no_task_left(),
            serving(network, handler, profile) as server,
            client_of(network, profile) as client,
        ):
            load = Load(client)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(load.run)
                await trio.sleep(moment)
                start = trio.current_time()
                await server.shutdown()
                elapsed = trio.current_time() - start
            assert elapsed <= GRACE + SLACK
            assert server.statistics().connections_active == 0
            if not is_native(profile):
                # monte-v1 has no GOAWAY: the client cannot know the server is going, so
                # one-way messages it wrote in the last latency before the server closed
                # are lost, as with Go monte. Only the requests are checked.
                load.sent.clear()
            kinds = load.check(handler)
            assert kinds["ok"] > 0
            if not is_native(profile):
                assert kinds["RequestNotProcessed"] == 0  # no GOAWAY in monte-v1


async def test_shutdown_cancels_handlers_that_overrun_the_grace_period(
    autojump_clock: trio.testing.MockClock, profile: Handshake
) -> None:
    network = FaultyNetwork(seed=6, latency=0.005)
    handler = Recorder(delay=request_time, hang=True)
    outcomes: list[str] = []
    with trio.fail_after(60):
        async with (
            no_task_left(),
            serving(network, handler, profile) as server,
            client_of(network, profile) as client,
        ):

            async def call(i: int) -> None:
                try:
                    await client.request(b"hang-%02d" % i)
                except ConnectionClosed as exc:
                    outcomes.append(type(exc).__name__)

            async with trio.open_nursery() as nursery:
                for i in range(10):
                    nursery.start_soon(call, i)
                await trio.sleep(0.1)
                assert sum(handler.executions.values()) == 10
                start = trio.current_time()
                await server.shutdown(grace_period=1.5)
                elapsed = trio.current_time() - start
            assert 1.5 <= elapsed <= 1.5 + SLACK
            assert len(handler.cancelled) == 10
    assert outcomes == ["ConnectionClosed"] * 10


async def test_errors_leave_the_context_managers_as_themselves(
    autojump_clock: trio.testing.MockClock, profile: Handshake
) -> None:
    """With trio's strict exception groups, users still see plain exceptions."""
    network = FaultyNetwork(seed=7, latency=0.005)
    handler = Recorder(delay=request_time)
    with trio.fail_after(60):
        async with no_task_left(), serving(network, handler, profile):
            # an error in the client's block, with calls in flight on its connections
            async with trio.open_nursery() as nursery:  # the test's own: outside the block

                async def error_in_client_block() -> None:
                    async with client_of(network, profile) as client:
                        nursery.start_soon(Load(client).run)
                        await trio.sleep(0.02)
                        raise KeyError("in the client block")

                with pytest.raises(KeyError) as info:
                    await error_in_client_block()
            assert type(info.value) is KeyError

            # a call's own error, raised through the client's block
            async def call_on_dropped_link() -> None:
                async with client_of(network, profile) as client:
                    network.drop("client", "server")
                    await client.request(b"call-000")

            with pytest.raises(ConnectionClosed) as closed:
                await call_on_dropped_link()
            assert type(closed.value) is ConnectionClosed

            # cancellation of the whole block, under load: nothing escapes the scope
            with trio.move_on_after(0.02) as scope:
                async with client_of(network, profile) as client:
                    await Load(client).run()
            assert scope.cancelled_caught

        # a first dial that fails: plain ConnectError, not a group
        with pytest.raises(ConnectError) as refused:
            async with client_of(network, profile):
                raise AssertionError("unreachable")  # pragma: no cover
        assert type(refused.value) is ConnectError

        # Connection's own context manager, with a request in flight
        client_stream, server_stream = await secure_stream_pair(profile)
        seen: list[type[BaseException]] = []

        async def in_flight(conn: Connection) -> None:
            try:
                await conn.request(b"call-002")
            except ConnectionClosed as exc:
                seen.append(type(exc))

        async with (
            Connection(server_stream, handler=handler, config=CONFIG) as _server,
            trio.open_nursery() as nursery,  # the test's own: outside the block
        ):

            async def error_in_connection_block() -> None:
                async with Connection(client_stream, config=CONFIG) as conn:
                    nursery.start_soon(in_flight, conn)
                    await trio.testing.wait_all_tasks_blocked()
                    raise ValueError("in the connection block")

            with pytest.raises(ValueError, match="in the connection block") as plain:
                await error_in_connection_block()
            assert type(plain.value) is ValueError
        assert seen == [ConnectionClosed]


async def test_server_shutdown_returns_plainly_and_is_idempotent_for_clients(
    autojump_clock: trio.testing.MockClock, profile: Handshake
) -> None:
    network = FaultyNetwork(seed=8, latency=0.005)
    handler = Recorder(delay=request_time)
    with trio.fail_after(60):
        async with no_task_left():
            server = Server(handler, handshake=profile, config=CONFIG)
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_listeners, [network.listen("server")])
                async with client_of(network, profile) as client:
                    assert await client.request(b"call-010") == b"re:call-010"
                    await server.shutdown()  # returns plainly while a client is connected
                    with pytest.raises((ConnectionClosed, ConnectError)) as after:
                        await client.request(b"call-012")
                    assert type(after.value) in (
                        ConnectionClosed,
                        RequestNotProcessed,
                        ConnectError,
                    )
                    await client.aclose()
                    await client.aclose()  # idempotent
                nursery.cancel_scope.cancel()


async def test_shutdown_after_serve_was_cancelled_returns_at_once(
    autojump_clock: trio.testing.MockClock, profile: Handshake
) -> None:
    # serve() cancelled by its nursery, then shutdown() from a shielded finally: the
    # pattern of a server whose process is told to stop. shutdown() must not wait for a
    # serve() that has already gone.
    network = FaultyNetwork(seed=9, latency=0.005)
    server = Server(Recorder(delay=request_time), handshake=profile, config=CONFIG)
    took: list[float] = []

    async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve_listeners, [network.listen("server")])
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True), trio.fail_after(60):
                    start = trio.current_time()
                    await server.shutdown(grace_period=0.5)
                    took.append(trio.current_time() - start)

    with trio.fail_after(120):
        async with no_task_left(), trio.open_nursery() as nursery:
            await nursery.start(run)
            async with client_of(network, profile) as client:
                assert await client.request(b"call-010") == b"re:call-010"
            nursery.cancel_scope.cancel()
    assert took == [0.0]
