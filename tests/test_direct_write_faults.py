"""Direct writes (a caller writing on a quiet connection) under the faulty network.

A connection writes from the calling task only over a record-safe stream, which needs a
socket's ``send``; :func:`monte_trio.testing.socket_stream` makes each end of a
:class:`~monte_trio.testing.FaultyNetwork` link such a socket stream, so drops, delays,
resets mid-write and cancelled writers all hit the direct-write path, under the autojump
clock. Callers must see the documented errors (:class:`~monte_trio.ConnectionClosed`, or
its subclass :class:`~monte_trio.RequestNotProcessed`), never a cut record, never a hang.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio
import trio.testing
from helpers import (
    WriterSteps,
    assert_calls_written_by_callers,
    is_native,
    network_connection_pair,
)

from monte_trio import ConnectionClosed, ConnectionConfig, Handshake, Request
from monte_trio.testing import ChaosConfig, FaultyNetwork, secure_stream_pair, socket_stream

TIMEOUT = 60  # virtual seconds
BIG = bytes(range(256)) * 512  # 128 KiB: far more than the link buffer holds


def config_for(profile: Handshake) -> ConnectionConfig:
    # keepalive off: nothing but the test's own calls is written; monte-v1 sends a message
    # as one record, which must be allowed to be that large; no compression: BIG must
    # fill the link as it is.
    record = None if is_native(profile) else 1024 * 1024
    return ConnectionConfig(
        keepalive_interval=None,
        max_message_size=1024 * 1024,
        max_record_size=record,
        compression=(),
    )


def small_buffers() -> FaultyNetwork:
    return FaultyNetwork(seed=1, latency=0.001, buffer_size=4096, max_segment=1024)


async def test_socket_streams_over_the_network_are_record_safe(profile: Handshake) -> None:
    net = FaultyNetwork()
    listener = net.listen("server")
    plain = (await net.connect("server"), await listener.accept())
    sockets = (socket_stream(await net.connect("server")), socket_stream(await listener.accept()))
    with trio.fail_after(TIMEOUT):
        for transports, safe in ((plain, False), (sockets, True)):
            client, server = await secure_stream_pair(profile, transports=transports)
            assert (client.record_safe, server.record_safe) == (safe, safe)
            await client.send_all(b"hello")
            assert await server.receive_some() == b"hello"
            await client.aclose()
            assert await server.receive_some() == b""
            await server.aclose()


async def test_calls_on_a_quiet_connection_are_written_by_their_callers(
    profile: Handshake, autojump_clock: trio.testing.MockClock
) -> None:
    # Delays (latency, jitter, random segment sizes) do not stop the direct path, and
    # every call is answered. The writer runs only for native credit sent alone (at most
    # one wake-up per 5 ms per connection, three steps each).
    chaos = ChaosConfig(delay_probability=0.3, max_delay=0.01, fragment=True)
    net = FaultyNetwork(seed=2, latency=0.002, jitter=0.001, chaos=chaos)
    got: list[bytes] = []

    async def handler(request: Request) -> bytes:
        got.append(request.body)
        await trio.lowlevel.checkpoint()
        return request.body[::-1]

    with trio.fail_after(TIMEOUT):
        async with network_connection_pair(
            profile, net, sockets=True, server_handler=handler, config=config_for(profile)
        ) as (client, server):
            assert await client.request(b"warm up") == b"pu mraw"
            await assert_calls_written_by_callers(client, profile, 30)
            assert server.statistics().messages_received == 30
    assert len(got) == 61


Fault = Callable[[FaultyNetwork], object]

FAULTS: dict[str, Fault] = {
    "drop": lambda net: net.drop("client", "server"),
    "reset mid-write": lambda net: net.cut("client", "server", after=100),
    "server host down": lambda net: net.shutdown_host("server"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_a_fault_during_a_direct_write_fails_its_caller_and_every_waiter(
    profile: Handshake, autojump_clock: trio.testing.MockClock, fault: str
) -> None:
    net = small_buffers()
    release = trio.Event()

    async def handler(request: Request) -> bytes:
        await release.wait()
        return request.body

    outcomes: dict[str, BaseException | bytes | None] = {}

    async def record(name: str, call: Callable[[], object]) -> None:
        try:
            outcomes[name] = await call()  # type: ignore[misc]
        except ConnectionClosed as exc:
            outcomes[name] = exc

    steps = WriterSteps()
    with trio.fail_after(TIMEOUT):
        async with network_connection_pair(
            profile, net, sockets=True, server_handler=handler, config=config_for(profile)
        ) as (client, server):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(record, "waiting", lambda: client.request(b"waiting"))
                await trio.testing.wait_all_tasks_blocked()  # in the server's handler
                net.stall("client", "server")  # the big write blocks part-way
                trio.lowlevel.add_instrument(steps)
                nursery.start_soon(record, "big", lambda: client.send(BIG))
                await trio.testing.wait_all_tasks_blocked()
                trio.lowlevel.remove_instrument(steps)
                assert steps.steps == 0  # the caller itself is writing, not the writer
                assert "big" not in outcomes  # blocked in its write
                start = trio.current_time()
                FAULTS[fault](net)
                net.heal()
            assert trio.current_time() - start < 1.0  # promptly: no timer was involved
            assert set(outcomes) == {"waiting", "big"}
            for name, outcome in outcomes.items():
                assert isinstance(outcome, ConnectionClosed), (name, outcome)
            assert client.closed
            with pytest.raises(ConnectionClosed):
                await client.request(b"after")
            await client.wait_closed()
            release.set()
            await server.wait_closed()


async def test_a_cancelled_direct_write_is_finished_whole_by_the_writer(
    profile: Handshake, autojump_clock: trio.testing.MockClock
) -> None:
    net = small_buffers()
    got: list[bytes] = []

    async def handler(request: Request) -> bytes | None:
        got.append(request.body)
        await trio.lowlevel.checkpoint()
        return None if request.oneway else b"ok"

    steps = WriterSteps()
    with trio.fail_after(TIMEOUT):
        async with network_connection_pair(
            profile, net, sockets=True, server_handler=handler, config=config_for(profile)
        ) as (client, server):
            assert await client.request(b"warm up") == b"ok"
            await trio.testing.wait_all_tasks_blocked()
            net.stall("client", "server")
            trio.lowlevel.add_instrument(steps)
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client.send, BIG)
                    await trio.testing.wait_all_tasks_blocked()  # blocked part-way
                    assert steps.steps == 0  # written by its caller
                    scope.cancel()
            trio.lowlevel.remove_instrument(steps)
            assert scope.cancelled_caught
            net.heal()
            # The record the caller began goes out whole (the writer sends the rest),
            # then the connection goes on.
            assert await client.request(b"after") == b"ok"
            assert not client.closed
            assert not server.closed
    assert got[0] == b"warm up"
    assert got[-1] == b"after"
    assert got[1:-1] in ([], [BIG])  # the cancelled message, whole or (cancelled early) not
