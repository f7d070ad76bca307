"""Hostile peers against a server, in both wire profiles.

Every case ends with a well-behaved client that must still be served: one hostile socket
may cost the server that socket, never the service.

Timing attacks (a slow-loris handshake, a flood of silent connections) run on
:class:`~monte_trio.testing.FaultyNetwork` under trio's MockClock (autojump), so the
server's handshake timeout is checked to the virtual millisecond without waiting for it;
one real-socket case of each remains, on loopback, where the real socket is the point.

Waiting on loopback: the server reacts to real socket events (EOF, RST, a timer on its
side), which no trio primitive of this test can observe, so the few waits for the
*server's* state use bounded polling (:func:`poll_until`, a short ``trio.sleep`` per step,
always under ``trio.fail_after``). Everything the test itself drives is synchronised
without sleeping.
"""

from __future__ import annotations

import os
import resource
import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from helpers import LOCALHOST, echo, is_native, network_dialer, network_server, running_server

import monte_trio
from monte_trio import (
    ConnectionConfig,
    Handshake,
    SecureStream,
    Server,
)
from monte_trio._handshake import SessionFacts
from monte_trio._proto._frames import FrameKind, MonteV1Codec
from monte_trio._proto._monte_v1 import MONTE_V1_DEFAULT_MAX_RECORD, MonteV1HandshakeState
from monte_trio._proto._wire2 import HEADER, Kind
from monte_trio.testing import FaultyNetwork

_U32 = struct.Struct(">I")


@attrs.frozen
class Served:
    server: Server
    port: int
    handshake: Handshake


@asynccontextmanager
async def serving(profile: Handshake, **kwargs: Any) -> AsyncIterator[Served]:
    """A real server on 127.0.0.1 (free port), shut down when the block ends."""
    async with running_server(echo, profile, **kwargs) as (server, port):
        yield Served(server, port, profile)


async def assert_served_on(net: FaultyNetwork, profile: Handshake, body: bytes) -> None:
    """A well-behaved client on the faulty network completes a request round trip."""
    with trio.fail_after(5):
        async with monte_trio.open_client(
            handshake=profile, connect=network_dialer(net)
        ) as client:
            assert await client.request(body) == body


async def poll_until(predicate: Callable[[], bool], *, within: float = 5.0) -> None:
    """Wait for the server to react to a socket event: bounded polling (see module doc)."""
    with trio.fail_after(within):
        for _ in range(100_000):
            if predicate():
                return
            await trio.sleep(0.005)
    raise AssertionError(f"never became true: {predicate}")  # pragma: no cover


async def assert_served(s: Served, body: bytes = b"still served") -> None:
    """A well-behaved client completes a request round trip."""
    with trio.fail_after(5):
        async with monte_trio.open_client(LOCALHOST, s.port, handshake=s.handshake) as client:
            assert await client.request(body) == body


async def wait_dropped(stream: trio.abc.Stream) -> int:
    """Read until the server drops the socket (EOF or RST); return the bytes read."""
    total = 0
    for _ in range(1_000_000):  # bounded; callers also wrap this in trio.fail_after
        try:
            data = await stream.receive_some(65536)
        except trio.BrokenResourceError:  # RST: the server closed with our bytes unread
            return total
        if not data:
            return total
        total += len(data)
    raise AssertionError("the server never dropped the socket")  # pragma: no cover


async def raw_secure(profile: Handshake, port: int, *, rcvbuf: int | None = None) -> SecureStream:
    """A hand-driven client: completes the handshake and nothing else."""
    stream = await trio.open_tcp_stream(LOCALHOST, port)
    if rcvbuf is not None:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if is_native(profile):
        return await profile.handshake(
            stream, initiator=True, peer=f"{LOCALHOST}:{port}", config=ConnectionConfig()
        )
    state = MonteV1HandshakeState(initiator=True)
    await stream.send_all(state.data_to_send())
    rest = b""
    for _ in range(64):  # 32 bytes to read: at most 32 non-empty reads
        if state.peer_public is not None:
            break
        rest = state.receive_data(await stream.receive_some(4096))
    assert state.complete
    sealer, opener = state.records(max_record_size=MONTE_V1_DEFAULT_MAX_RECORD)
    return SecureStream(
        stream,
        sealer,
        opener,
        facts=SessionFacts(
            profile="monte-v1",
            initiator=True,
            max_record_size=MONTE_V1_DEFAULT_MAX_RECORD,
            max_message_size=MONTE_V1_DEFAULT_MAX_RECORD - 20,
        ),
        initial_records=opener.receive_data(rest) if rest else [],
    )


def count_tasks(nursery: trio.Nursery) -> int:
    """Tasks in ``nursery``'s subtree."""
    count = 0
    stack = [nursery]
    while stack:
        for task in stack.pop().child_tasks:
            count += 1
            stack.extend(task.child_nurseries)
    return count


def count_all_tasks() -> int:
    root = trio.lowlevel.current_root_task()
    assert root is not None
    count = 1
    for nursery in root.child_nurseries:
        count += count_tasks(nursery)
    return count


# ---------------------------------------------------------------------------------------
# Garbage instead of a handshake, and after one
# ---------------------------------------------------------------------------------------


async def test_random_bytes_instead_of_a_handshake(profile: Handshake) -> None:
    with trio.fail_after(20):
        async with serving(profile, handshake_timeout=2.0) as s:
            stream = await trio.open_tcp_stream(LOCALHOST, s.port)
            # One write: the server's first read sees well over a monte-v1 key, so the
            # random "record" that follows the key is judged during the handshake.
            await stream.send_all(os.urandom(10 * 1024))
            start = trio.current_time()
            with trio.fail_after(2.0 + 1.0):
                await wait_dropped(stream)
            # Refused on the bytes themselves, not by the handshake timeout.
            assert trio.current_time() - start < 1.5
            await stream.aclose()
            # The server counts the failure before it closes the socket.
            stats = s.server.statistics()
            assert stats.handshake_failures == 1
            assert stats.connections_active == 0
            await assert_served(s)
            assert s.server.statistics().handshake_failures == 1


GARBAGE = {
    "random": lambda: os.urandom(1024),
    "bad_tag": lambda: _U32.pack(200) + os.urandom(200),
    "short_record": lambda: _U32.pack(8) + bytes(8),
    "zero_length": lambda: _U32.pack(0) * 4,
}


@pytest.mark.parametrize("garbage", sorted(GARBAGE))
async def test_garbage_after_a_valid_handshake(profile: Handshake, garbage: str) -> None:
    with trio.fail_after(20):
        async with serving(profile) as s:
            secure = await raw_secure(profile, s.port)
            await poll_until(lambda: s.server.statistics().connections_active == 1)
            await secure.transport.send_all(GARBAGE[garbage]())
            with trio.fail_after(3):
                await wait_dropped(secure.transport)
            await secure.aclose()
            await poll_until(lambda: s.server.statistics().connections_active == 0)
            assert s.server.statistics().handshake_failures == 0
            await assert_served(s)


@pytest.mark.parametrize("prefix", [0xFFFFFFFF, 0x80000000, 0x10000])
async def test_huge_length_prefix_is_refused_at_once(profile: Handshake, prefix: int) -> None:
    with trio.fail_after(20):
        async with serving(profile) as s:
            secure = await raw_secure(profile, s.port)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
            # Only the 4 bytes of the prefix: if the server waited for (or reserved) the
            # body, nothing else could close this socket (no idle timeout, keepalive
            # tolerance 45 s).
            await secure.transport.send_all(_U32.pack(prefix))
            with trio.fail_after(2):
                await wait_dropped(secure.transport)
            grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
            assert grown_kib < 64 * 1024, f"peak RSS grew by {grown_kib} KiB"
            await secure.aclose()
            await poll_until(lambda: s.server.statistics().connections_active == 0)
            await assert_served(s)


# ---------------------------------------------------------------------------------------
# A peer that stops reading
# ---------------------------------------------------------------------------------------


async def test_peer_that_stops_reading_is_not_buffered_without_bound(profile: Handshake) -> None:
    max_send_queue = 64 * 1024
    max_handlers = 16
    # (native: 30 KiB bodies, so that 128 replies outgrow the socket buffers)
    body = os.urandom(1024 if not is_native(profile) else 30 * 1024)
    # monte-v1: a flood that TCP holds back once the server stops reading. Native (wire
    # v2): the server never stops reading; the flood it accepts is its call slots (128,
    # the default max_calls: one more would be a protocol violation) and the replies
    # beyond the send queue wait in the handlers.
    requests = 10_000 if not is_native(profile) else 128
    config = ConnectionConfig(max_send_queue=max_send_queue, max_concurrent_handlers=max_handlers)
    with trio.fail_after(60):
        async with serving(profile, config=config) as s:
            # A small receive buffer so the replies back up quickly.
            secure = await raw_secure(profile, s.port, rcvbuf=16 * 1024)
            await poll_until(lambda: s.server.statistics().connections_active == 1)
            (stalled,) = s.server.connections
            one_reply = len(_request_records(secure, 2, body)[0])  # same size as a reply
            sent = 0

            async def flood() -> None:
                # Blocks for good once the server stops reading; cancelled below.
                nonlocal sent
                for first in range(0, requests, 100):
                    batch: list[bytes | None] = []
                    for i in range(first, min(first + 100, requests)):
                        batch.extend(_request_records(secure, 2 * i + 1, body))
                    await secure.send_records(batch)
                    sent = min(first + 100, requests)

            peak_queued = 0
            peak_handlers = 0

            def sample() -> bool:
                nonlocal peak_queued, peak_handlers
                stats = stalled.statistics()
                peak_queued = max(peak_queued, stats.queued_bytes)
                peak_handlers = max(peak_handlers, stats.running_handlers)
                return stats.running_handlers == max_handlers and (
                    stats.queued_bytes >= max_send_queue
                )

            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood)
                # The backlog builds as kernel buffers fill: poll the server's state.
                await poll_until(sample, within=20)
                # Served meanwhile, on the same server.
                await assert_served(s)
                sample()
                assert peak_queued <= max_send_queue + one_reply
                assert peak_handlers <= max_handlers
                assert stalled.close_reason is None  # still open, merely held back
                nursery.cancel_scope.cancel()
            handled = stalled.statistics().requests_received
            if not is_native(profile):
                # The server stopped taking requests: TCP held the flood back.
                assert handled < requests, f"{handled} handled of {sent} sent"
            else:
                assert handled <= requests
            # Closing with unread replies resets the connection; the server's blocked
            # writer fails and the connection ends.
            await secure.aclose()
            await poll_until(lambda: s.server.statistics().connections_active == 0)
            assert stalled.closed
            await assert_served(s)


def _request_records(secure: SecureStream, ident: int, body: bytes) -> list[bytes]:
    if secure.facts.profile == "native":  # one wire v2 REQUEST frame per record
        return [HEADER.pack(Kind.REQUEST, 0, len(body), ident) + body]
    out: list[bytes | None] = []
    MonteV1Codec(initiator=True, max_record_size=MONTE_V1_DEFAULT_MAX_RECORD).encode(
        FrameKind.REQUEST, ident, body, out
    )
    return [record for record in out if record is not None]


# ---------------------------------------------------------------------------------------
# Slow and silent peers
# ---------------------------------------------------------------------------------------


def slow_loris_prefix(profile: Handshake) -> bytes:
    """A plausible start of a handshake (native: a valid preamble and a msg1 length), far
    longer than what 1 s of dribbling at one byte per 0.2 s delivers."""
    if is_native(profile):
        return b"MNTRIO\x01\x00" + struct.pack(">H", 32) + bytes(32)
    return os.urandom(32)


async def dribble(stream: trio.abc.Stream, prefix: bytes) -> None:
    """Send ``prefix`` one byte per 0.2 s, until the server drops the socket."""
    for i in range(len(prefix)):
        try:
            await stream.send_all(prefix[i : i + 1])
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        await trio.sleep(0.2)


async def test_slow_loris_handshake_is_cut_by_the_handshake_timeout(
    profile: Handshake, autojump_clock: trio.testing.MockClock
) -> None:
    net = FaultyNetwork(seed=5, latency=0.001)
    with trio.fail_after(20):
        async with network_server(net, echo, profile, handshake_timeout=1.0) as server:
            stream = await net.connect("server")
            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(dribble, stream, slow_loris_prefix(profile))
                with trio.fail_after(3):
                    await wait_dropped(stream)
                elapsed = trio.current_time() - start
                nursery.cancel_scope.cancel()
            await stream.aclose()
            # Virtual time: the handshake timeout itself (from the accept, one link latency
            # after the connect), plus the latency of the close on its way back.
            assert 1.0 <= elapsed <= 1.0 + 0.01, f"closed after {elapsed:.4f} s"
            assert server.statistics().handshake_failures == 1
            await assert_served_on(net, profile, b"still served")
            assert server.statistics().handshake_failures == 1


async def test_slow_loris_handshake_on_a_real_socket(native: Handshake) -> None:
    # Real time on purpose: the server's timer against a real socket that a peer dribbles
    # into (the faulty-network case above covers both profiles on virtual time).
    with trio.fail_after(20):
        async with serving(native, handshake_timeout=0.5) as s:
            stream = await trio.open_tcp_stream(LOCALHOST, s.port)
            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(dribble, stream, slow_loris_prefix(native))
                with trio.fail_after(3):
                    await wait_dropped(stream)
                elapsed = trio.current_time() - start
                nursery.cancel_scope.cancel()
            await stream.aclose()
            assert 0.45 <= elapsed <= 1.5, f"closed after {elapsed:.2f} s"
            assert s.server.statistics().handshake_failures == 1
            await assert_served(s)


def _raise_nofile_limit(needed: int) -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {needed} descriptors needed")
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return soft, hard


async def test_silent_connections_are_closed_and_others_served_meanwhile(
    profile: Handshake, autojump_clock: trio.testing.MockClock
) -> None:
    silent = 500
    timeout = 0.6
    latency = 0.001
    net = FaultyNetwork(seed=6, latency=latency)
    with trio.fail_after(30):
        # max_handshakes above the flood: this test is about the handshake timeout
        # (eviction is tests/test_server_limits.py's).
        async with network_server(
            net, echo, profile, handshake_timeout=timeout, max_handshakes=2 * silent
        ) as server:
            dropped_at: list[float] = []
            start = trio.current_time()
            streams: list[trio.abc.Stream] = []

            async def connect() -> None:
                streams.append(await net.connect("server"))

            async with trio.open_nursery() as connecting:  # all at once, on virtual time
                for _ in range(silent):
                    connecting.start_soon(connect)
            connected = trio.current_time()

            async def watch(stream: trio.abc.Stream) -> None:
                await wait_dropped(stream)
                dropped_at.append(trio.current_time())

            # The nursery ends when every silent connection has been dropped.
            with trio.fail_after((connected - start) + timeout + 2.0):
                async with trio.open_nursery() as nursery:
                    for stream in streams:
                        nursery.start_soon(watch, stream)
                    # A normal client while the silent ones are still open.
                    await assert_served_on(net, profile, b"meanwhile")
                    served = trio.current_time()
                    dropped_while_serving = len(dropped_at)
            assert dropped_while_serving == 0
            assert len(dropped_at) == silent
            # Each closed by its own handshake timeout, counted from its accept: on virtual
            # time, within the link latencies of that instant.
            assert min(dropped_at) - start >= timeout
            assert max(dropped_at) - connected <= timeout + 4 * latency, (
                f"connecting took {connected - start:.3f} s, last closed after "
                f"{max(dropped_at) - start:.3f} s"
            )
            assert served - connected < timeout
            for stream in streams:
                await stream.aclose()
            stats = server.statistics()
            assert stats.handshake_failures == silent
            assert stats.connections_active == 0
            await assert_served_on(net, profile, b"still served")


async def test_silent_sockets_are_closed_and_others_served_meanwhile(native: Handshake) -> None:
    # Real sockets on purpose: hundreds of real descriptors, accepted and timed out by the
    # server on the real clock (the faulty-network case above covers both profiles).
    silent = 500
    timeout = 0.6
    old = _raise_nofile_limit(2 * silent + 200)  # both ends live in this process
    try:
        with trio.fail_after(30):
            async with serving(native, handshake_timeout=timeout, max_handshakes=2 * silent) as s:
                dropped_at: list[float] = []
                start = trio.current_time()
                streams = [await trio.open_tcp_stream(LOCALHOST, s.port) for _ in range(silent)]
                connected = trio.current_time()

                async def watch(stream: trio.abc.Stream) -> None:
                    await wait_dropped(stream)
                    dropped_at.append(trio.current_time())

                # The nursery ends when every silent socket has been dropped.
                with trio.fail_after((connected - start) + timeout + 2.0):
                    async with trio.open_nursery() as nursery:
                        for stream in streams:
                            nursery.start_soon(watch, stream)
                        # A normal client while the silent ones are still open.
                        await assert_served(s, b"meanwhile")
                        served = trio.current_time()
                        dropped_while_serving = len(dropped_at)
                assert dropped_while_serving < silent
                assert len(dropped_at) == silent
                # Each closed by its own handshake timeout (from its accept), plus slack.
                assert max(dropped_at) - start <= (connected - start) + timeout + 1.0, (
                    f"connecting took {connected - start:.2f} s, last closed after "
                    f"{max(dropped_at) - start:.2f} s"
                )
                assert min(dropped_at) - start >= timeout * 0.9
                assert served - connected < timeout
                for stream in streams:
                    await stream.aclose()
                stats = s.server.statistics()
                assert stats.handshake_failures == silent
                await poll_until(lambda: s.server.statistics().connections_active == 0)
                await assert_served(s)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


# ---------------------------------------------------------------------------------------
# Churn
# ---------------------------------------------------------------------------------------


async def test_connect_disconnect_churn_leaks_nothing(profile: Handshake) -> None:
    cycles = 1000
    with trio.fail_after(60):
        async with serving(profile) as s:
            await trio.testing.wait_all_tasks_blocked()
            all_tasks = count_all_tasks()
            for _ in range(cycles):
                stream = await trio.open_tcp_stream(LOCALHOST, s.port)
                await stream.aclose()
            # Each handshake fails on the server when it reads our FIN.
            await poll_until(lambda: s.server.statistics().handshake_failures == cycles)
            await assert_served(s)
            await poll_until(lambda: s.server.statistics().connections_active == 0)
            stats = s.server.statistics()
            assert stats.connections_accepted == cycles + 1
            assert stats.handshake_failures == cycles
            await trio.testing.wait_all_tasks_blocked()
            assert count_all_tasks() == all_tasks


async def test_client_open_close_churn_leaks_nothing(profile: Handshake) -> None:
    cycles = 200
    handshake = profile
    with trio.fail_after(60):
        async with serving(profile) as s:
            await trio.testing.wait_all_tasks_blocked()
            all_tasks = count_all_tasks()
            for i in range(cycles):
                async with monte_trio.open_client(
                    LOCALHOST, s.port, handshake=handshake
                ) as client:
                    body = b"cycle %d" % i
                    assert await client.request(body) == body
            await poll_until(lambda: s.server.statistics().connections_active == 0)
            stats = s.server.statistics()
            assert stats.connections_accepted == cycles
            assert stats.handshake_failures == 0
            assert stats.requests_received == cycles
            await assert_served(s)
            await poll_until(lambda: s.server.statistics().connections_active == 0)
            await trio.testing.wait_all_tasks_blocked()
            assert count_all_tasks() == all_tasks
