"""The server's admission limits, against a real Server on 127.0.0.1 (the timers on virtual
time, on :class:`~monte_trio.testing.FaultyNetwork`).

Sockets that never complete a handshake must not keep a normal client out: handshakes in
progress have their own limit (``max_handshakes``), the oldest is evicted when a new socket
needs its slot, and a connection takes one of the ``max_conns`` slots only when its
handshake completes. Refusals are logged as one summary line per interval.

Only public behaviour is used: the Server's arguments and statistics, ``open_client``,
plain TCP sockets for the silent peers, and the log.
"""

from __future__ import annotations

import errno
import logging
import re

import pytest
import trio
import trio.testing
from helpers import LOCALHOST, echo, network_dialer, network_server, running_server

from monte_trio import ConnectionClosed, Handshake, Server, open_client
from monte_trio.testing import FaultyNetwork

TIMEOUT = 20
SILENT = 2_000
SERVE_WITHIN = 2.0


async def connect_silently(port: int, count: int, opened: list[trio.socket.SocketType]) -> None:
    """Open ``count`` TCP connections that never send a byte; the caller closes them."""
    for _ in range(count):
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        opened.append(sock)
        await sock.connect((LOCALHOST, port))


async def closed_by_server(sock: trio.socket.SocketType) -> bool:
    """Whether the server has closed ``sock`` (EOF or reset) without sending anything."""
    try:
        data = await sock.recv(1)
    except ConnectionResetError:
        return True
    return data == b""


def overload_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The server's overload summary lines."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "monte_trio" and r.levelno >= logging.WARNING and "overloaded" in r.msg
    ]


def evicted_in(line: str) -> int:
    match = re.search(r"(\d+) handshakes in progress closed", line)
    assert match, line
    return int(match[1])


def refused_in(line: str) -> int:
    match = re.search(r"(\d+) sockets closed with no connection slot free", line)
    assert match, line
    return int(match[1])


async def test_silent_connects_do_not_keep_a_fresh_client_out(
    native: Handshake, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="monte_trio")
    silent: list[trio.socket.SocketType] = []
    try:
        with trio.fail_after(TIMEOUT):
            async with running_server(echo, native) as (server, port):
                await connect_silently(port, SILENT // 2, silent)
                # A fresh client while silent sockets keep arriving...
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(connect_silently, port, SILENT - SILENT // 2, silent)
                    start = trio.current_time()
                    with trio.fail_after(SERVE_WITHIN):
                        async with open_client(LOCALHOST, port, handshake=native) as client:
                            assert await client.request(b"during") == b"during"
                    during = trio.current_time() - start
                assert len(silent) == SILENT
                # ... and one after all 2,000 are open (and kept open).
                start = trio.current_time()
                with trio.fail_after(SERVE_WITHIN):
                    async with open_client(LOCALHOST, port, handshake=native) as client:
                        assert await client.request(b"after") == b"after"
                after = trio.current_time() - start
                stats = server.statistics()
                assert stats.handshakes_in_progress <= server.max_handshakes
                assert stats.handshakes_evicted >= SILENT - server.max_handshakes
                assert stats.connections_refused == 0
                assert stats.connections_accepted == SILENT + 2
    finally:
        for sock in silent:
            sock.close()
    print(f"fresh client served in {during:.3f} s during the flood, {after:.3f} s after it")
    # One summary line when the first socket is evicted, one with the rest at shutdown:
    # not one per socket. Together they report every eviction.
    lines = overload_lines(caplog)
    assert 1 <= len(lines) <= 2, lines
    assert sum(evicted_in(line) for line in lines) == server.statistics().handshakes_evicted
    assert len([r for r in caplog.records if r.name == "monte_trio"]) < 20


async def test_one_handshake_slot_the_newest_socket_evicts_the_silent_one(
    native: Handshake,
) -> None:
    silent: list[trio.socket.SocketType] = []
    try:
        with trio.fail_after(TIMEOUT):
            async with running_server(echo, native, max_handshakes=1) as (server, port):
                await connect_silently(port, 1, silent)
                await trio.testing.wait_all_tasks_blocked()
                assert server.statistics().handshakes_in_progress == 1
                for body in (b"first", b"second"):
                    async with open_client(LOCALHOST, port, handshake=native) as client:
                        assert await client.request(body) == body
                assert await closed_by_server(silent[0])
                stats = server.statistics()
                assert stats.handshakes_evicted == 1
                assert stats.handshake_failures == 0
    finally:
        for sock in silent:
            sock.close()


async def test_completed_handshake_waits_for_a_connection_slot_and_is_not_evicted(
    native: Handshake,
) -> None:
    silent: list[trio.socket.SocketType] = []
    try:
        with trio.fail_after(TIMEOUT):
            async with running_server(
                echo, native, max_conns=1, max_handshakes=1, conn_wait_timeout=10
            ) as (server, port):
                first_served = trio.Event()
                release_first = trio.Event()

                async def first() -> None:
                    async with open_client(LOCALHOST, port, handshake=native) as client:
                        assert await client.request(b"one") == b"one"
                        first_served.set()
                        await release_first.wait()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(first)
                    await first_served.wait()
                    # The second handshake completes although max_conns is full...
                    async with open_client(LOCALHOST, port, handshake=native) as second:
                        replies: list[bytes] = []

                        async def call() -> None:
                            replies.append(await second.request(b"two"))

                        async with trio.open_nursery() as calls:
                            calls.start_soon(call)
                            await trio.testing.wait_all_tasks_blocked()
                            stats = server.statistics()
                            assert stats.connections_active == 1
                            assert stats.handshakes_in_progress == 1
                            assert not replies
                            # ... and is not evicted for a newcomer: the newcomer is closed.
                            await connect_silently(port, 1, silent)
                            assert await closed_by_server(silent[0])
                            stats = server.statistics()
                            assert (stats.handshakes_evicted, stats.connections_refused) == (0, 1)
                            # When the first connection ends, the second takes its slot.
                            release_first.set()
                        assert replies == [b"two"]
    finally:
        for sock in silent:
            sock.close()


async def test_completed_handshake_with_no_slot_in_time_is_closed(
    native: Handshake, caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    # On the faulty network, virtual time: conn_wait_timeout is the server's own timer.
    caplog.set_level(logging.INFO, logger="monte_trio")
    net = FaultyNetwork(latency=0.001)
    with trio.fail_after(TIMEOUT):
        async with (
            network_server(net, echo, native, max_conns=1, conn_wait_timeout=0.2) as server,
            open_client(handshake=native, connect=network_dialer(net)) as first,
        ):
            assert await first.request(b"one") == b"one"
            for _ in range(3):
                start = trio.current_time()
                async with open_client(handshake=native, connect=network_dialer(net)) as late:
                    with pytest.raises(ConnectionClosed):
                        await late.request(b"no slot")
                assert 0.2 <= trio.current_time() - start < 0.2 + 0.05
            assert server.statistics().connections_refused == 3
            assert await first.request(b"still served") == b"still served"
    lines = overload_lines(caplog)
    assert [refused_in(line) for line in lines] == [1, 2]  # the first at once, then 2


async def test_overload_is_reported_once_per_interval(
    native: Handshake, caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    # Over 36 virtual seconds of sockets arriving every 0.3 s, each evicting the previous
    # one: a line at the first eviction, then one every 10 s, then the rest at shutdown.
    caplog.set_level(logging.INFO, logger="monte_trio")
    net = FaultyNetwork()
    server = Server(echo, handshake=native, max_handshakes=1, handshake_timeout=60)
    streams = []
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve_listeners, [net.listen("server")])
            for _ in range(120):
                streams.append(await net.connect("server"))
                await trio.sleep(0.3)
            await server.shutdown()
    for stream in streams:
        await stream.aclose()
    lines = overload_lines(caplog)
    assert [evicted_in(line) for line in lines] == [1, 33, 33, 33, 19]
    assert server.statistics().handshakes_evicted == 119


async def test_busy_port_error_names_the_address_and_keeps_the_cause(
    native: Handshake,
) -> None:
    listeners = await trio.open_tcp_listeners(0, host=LOCALHOST)
    port = listeners[0].socket.getsockname()[1]
    try:
        with trio.fail_after(TIMEOUT), pytest.raises(OSError, match="cannot listen") as info:
            await Server(echo, handshake=native).serve(port, LOCALHOST)
    finally:
        for listener in listeners:
            await listener.aclose()
    assert info.value.errno == errno.EADDRINUSE
    assert str(info.value).startswith(
        f"cannot listen on {LOCALHOST}:{port}: [Errno {errno.EADDRINUSE}] "
    )
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.strerror is not None
    assert info.value.__cause__.strerror in str(info.value)


def test_max_handshakes_must_be_positive(native: Handshake) -> None:
    with pytest.raises(ValueError, match="max_handshakes"):
        Server(echo, handshake=native, max_handshakes=0)
