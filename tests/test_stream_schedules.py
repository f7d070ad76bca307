"""Seeded schedules of streams and streaming calls on a faulty network: no deadlock.

Each schedule (:func:`run_schedule`) draws everything from its seed: the network's latency,
jitter, buffer and segment sizes and random delays and stalls, each side's windows (a
stream window of 1-4 KiB, a connection data window of 2-4 times it, a send queue of
16 KiB-1 MiB, the smallest message size), keepalive timers, whether the ends are socket
streams (so that direct writes and record-safe sends run), and one of two mixes. (The
keepalive tolerance is at least 2 s and the link carries at least 50 KB/s: a pong written
behind a burst of records arrives after them, so a tolerance shorter than the time the
link takes to carry that burst closes the connection, rightly, as silent.)

* ``"read"``: both sides open streams and write more than a window on each while the other
  side reads in another task (readers may start late); a bidirectional streaming call
  both ways, an upload and a download likewise; small unary calls from both sides; and
  on each side a call cancelled with a cancel scope (while waiting to receive, or while
  blocked sending). Every transfer must finish with the exact bytes and messages
  (SHA-256 on both ends), every small call is answered, and every cancelled call's
  handler is cancelled in turn.
* ``"unread"``: nobody reads. Both sides write more than a window on streams and calls
  whose other end never reads, and handlers send to callers that never read. The
  senders must block (checked once every task is blocked, and again after the keepalive
  tolerance has passed), the receivers must hold no more than their windows, keepalive
  pings must be answered (the connection outlives its keepalive tolerance several times
  over, and has a round-trip time), unary calls both ways must be answered promptly; then
  one cancel scope cancels every blocked sender, and the cancellation must complete at
  once, the peers' handlers must be cancelled, and the connection must work on.

Every schedule runs under trio's MockClock (autojump) inside ``trio.fail_after``, so it
ends within bounded virtual time whatever happens, and must leave no task running.

The default run takes :data:`SEEDS` seeds (50); ``MONTE_SCHEDULE_SEEDS=1000`` takes 1,000
(``nox -s soak`` does, as the tests are marked ``soak``). Seeds are ``0 .. N-1``, so every
pytest-xdist worker sees the same parametrization.
"""

from __future__ import annotations

import hashlib
import os
import random
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import attrs
import pytest
import trio
import trio.testing
from helpers import make_handshake, no_task_left

from monte_trio import (
    CallShape,
    Connection,
    ConnectionConfig,
    IncomingCall,
    Request,
    Stream,
)
from monte_trio.testing import ChaosConfig, FaultyNetwork, open_connection_pair, socket_stream

SEEDS = int(os.environ.get("MONTE_SCHEDULE_SEEDS", "50"))
"""How many seeded schedules the test runs (seeds 0 to SEEDS - 1)."""

SCHEDULE_TIMEOUT = 120.0
"""Virtual seconds a whole schedule may take (a few is typical)."""

CALL_TIMEOUT = 5.0
"""Virtual seconds a small unary call may take, whatever else the connection carries: a
few round trips plus the longest random stall, far below the schedule's bound."""

MESSAGE_COST = 64
"""What a streaming call's message costs in its window besides its bytes
(docs/wire-native.rst)."""

HEADER = struct.Struct("!BIII")
"""What the opener of a stream or call sends first: kind, tag, then two sizes (bytes the
opener sends, bytes the handler sends back)."""

EXCHANGE, SINK, HANG, FLOOD = 1, 2, 3, 4
"""Kinds: both ends send and read; the handler never reads (a stream); the handler never
reads (a call); the handler sends until cancelled (a download)."""


def payload(seed: int, name: str, size: int) -> bytes:
    """The bytes called ``name`` in schedule ``seed``, as both ends compute them."""
    return random.Random(f"{seed}:{name}").randbytes(size)


def messages(seed: int, name: str, total: int, limit: int) -> list[bytes]:
    """Messages of 0 to ``limit`` bytes costing at least ``total`` bytes of window."""
    rng = random.Random(f"{seed}:{name}")
    out: list[bytes] = []
    cost = 0
    while cost < total:
        size = rng.choice([0, 1, limit, rng.randint(0, limit)])
        out.append(rng.randbytes(size))
        cost += size + MESSAGE_COST
    return out


def digest(parts: list[bytes]) -> str:
    """A digest of a sequence of messages (or one byte string), boundaries included."""
    h = hashlib.sha256()
    for part in parts:
        h.update(struct.pack("!I", len(part)))
        h.update(part)
    return h.hexdigest()


async def read_exactly(stream: Stream, size: int) -> bytes:
    got = bytearray()
    while len(got) < size:
        data = await stream.receive_some(size - len(got))
        if not data:
            raise AssertionError(f"end of stream after {len(got)} of {size} bytes")
        got += data
    return bytes(got)


async def read_all(stream: Stream, rng: random.Random) -> bytes:
    got = bytearray()
    while data := await stream.receive_some(rng.choice([1, 100, 1024, 65536])):
        got += data
    return bytes(got)


async def write_in_pieces(stream: Stream, data: bytes, rng: random.Random) -> None:
    """``data`` in random pieces (some larger than any window), then the end."""
    offset = 0
    while offset < len(data):
        size = rng.choice([1, 700, 5000, len(data)])
        await stream.send_all(data[offset : offset + size])
        offset += size
    await stream.send_eof()


# -- a schedule's parameters -----------------------------------------------------------------


@attrs.frozen
class Plan:
    """Everything a schedule draws from its seed (its repr names a failing schedule)."""

    seed: int
    mix: str
    sockets: bool
    latency: float
    jitter: float
    buffer_size: int
    max_segment: int
    delay_probability: float
    stall_probability: float
    stall_duration: float
    client_config: ConnectionConfig = attrs.field(repr=False)
    server_config: ConnectionConfig = attrs.field(repr=False)
    streams_per_side: int
    upload: bool
    download: bool
    requests_per_side: int

    @property
    def window(self) -> int:
        """The larger of the two stream windows: every transfer is longer."""
        return max(self.client_config.stream_window, self.server_config.stream_window)

    @property
    def message_limit(self) -> int:
        """The largest message of a streaming call either side may send."""
        return min(
            min(c.max_message_size, c.stream_window // 2 - MESSAGE_COST)
            for c in (self.client_config, self.server_config)
        )

    @property
    def tolerance(self) -> float:
        return max(c.keepalive_tolerance for c in (self.client_config, self.server_config))


def draw_config(rng: random.Random, keepalive: float) -> ConnectionConfig:
    stream_window = rng.choice([1024, 1536, 2048, 3072, 4096])
    return ConnectionConfig(
        max_message_size=rng.choice([1024, 2048]),
        stream_window=stream_window,
        data_window=stream_window * rng.choice([2, 3, 4]),
        stream_window_max=stream_window * rng.choice([1, 4]),
        max_send_queue=rng.choice([16 * 1024, 64 * 1024, 1024 * 1024]),
        max_streams=rng.choice([2, 4, 100]),
        keepalive_interval=keepalive,
        keepalive_tolerance=max(8 * keepalive, 2.0),
        grace_period=1.0,
    )


def draw_plan(seed: int) -> Plan:
    rng = random.Random(f"schedule:{seed}")
    keepalive = rng.uniform(0.1, 0.3)
    latency = rng.uniform(0.0005, 0.02)
    return Plan(
        seed=seed,
        mix=rng.choice(["read", "unread"]),
        sockets=rng.random() < 0.5,
        latency=latency,
        jitter=rng.uniform(0.0, latency),
        # At least 50 KB/s (2 KiB per latency of at most 40 ms): a keepalive pong waits
        # behind the records already written, and the tolerance (2 s at least) must
        # outlast the largest burst of them (tens of KiB here) on the slowest link.
        buffer_size=rng.choice([2048, 8192, 65536]),
        max_segment=rng.choice([100, 1400, 16384]),
        delay_probability=rng.choice([0.0, 0.01, 0.1]),
        stall_probability=rng.choice([0.0, 0.001, 0.01]),
        stall_duration=rng.uniform(0.01, 0.2),
        client_config=draw_config(rng, keepalive),
        server_config=draw_config(rng, keepalive),
        streams_per_side=rng.randint(1, 3),
        upload=rng.random() < 0.5,
        download=rng.random() < 0.5,
        requests_per_side=rng.randint(2, 6),
    )


# -- what both sides serve -------------------------------------------------------------------


@attrs.define
class Ledger:
    """What a schedule expects and what happened, shared by both sides' tasks."""

    seed: int
    limit: int
    expected: dict[str, str] = attrs.Factory(dict)
    received: dict[str, str] = attrs.Factory(dict)
    errors: list[str] = attrs.Factory(list)
    started: dict[int, trio.Event] = attrs.Factory(dict)
    cancelled: dict[int, trio.Event] = attrs.Factory(dict)
    sinks: dict[int, Stream] = attrs.Factory(dict)
    flooded: dict[int, int] = attrs.Factory(dict)
    served: dict[int, trio.Event] = attrs.Factory(dict)
    release: trio.Event = attrs.Factory(trio.Event)

    def expect(self, name: str, parts: list[bytes]) -> None:
        self.expected[name] = digest(parts)

    def got(self, name: str, parts: list[bytes]) -> None:
        assert name not in self.received, f"{name} received twice"
        self.received[name] = digest(parts)

    def event(self, table: dict[int, trio.Event], tag: int) -> trio.Event:
        return table.setdefault(tag, trio.Event())


def handlers(
    ledger: Ledger, side: str
) -> tuple[
    Callable[[Request], Awaitable[bytes]],
    Callable[[Stream], Awaitable[None]],
    Callable[[IncomingCall], Awaitable[bytes | None]],
]:
    """The unary, stream and call handlers of ``side`` ("client" or "server")."""
    seed = ledger.seed

    async def unary(request: Request) -> bytes:
        await trio.lowlevel.checkpoint()
        return b"re:" + request.body

    async def on_stream(stream: Stream) -> None:
        kind, tag, _, size_out = HEADER.unpack(await read_exactly(stream, HEADER.size))
        rng = random.Random(f"{seed}:{side}:stream:{tag}")
        if kind == SINK:
            ledger.sinks[tag] = stream
            await ledger.release.wait()  # never reads
            return
        assert kind == EXCHANGE, kind
        try:
            async with trio.open_nursery() as nursery:
                data = payload(seed, f"stream-{tag}-back", size_out)
                nursery.start_soon(write_in_pieces, stream, data, rng)
                await trio.sleep(rng.choice([0.0, 0.0, 0.05, 0.2]))  # a late reader
                got = await read_all(stream, rng)
            ledger.got(f"stream-{tag}-out", [got])
        except Exception as exc:
            ledger.errors.append(f"{side} stream {tag}: {exc!r}")
        finally:
            ledger.event(ledger.served, tag).set()

    async def on_call(call: IncomingCall) -> bytes | None:
        kind, tag, _, size_out = HEADER.unpack(await call.receive())
        rng = random.Random(f"{seed}:{side}:call:{tag}")
        if kind == HANG:
            ledger.event(ledger.started, tag).set()
            try:
                await trio.sleep_forever()  # never reads
            finally:
                ledger.event(ledger.cancelled, tag).set()
        if kind == FLOOD:
            ledger.flooded[tag] = 0
            try:
                for _ in range(100_000):  # bounded; the caller never reads
                    await call.send(b"f" * ledger.limit)
                    ledger.flooded[tag] += 1
            finally:
                ledger.event(ledger.cancelled, tag).set()
            ledger.errors.append(f"{side} flood {tag} never blocked")
            return None
        assert kind == EXCHANGE, kind
        try:
            if call.shape == CallShape.UPLOAD:
                parts = [part async for part in call]
                ledger.got(f"upload-{tag}-out", parts)
                return digest(parts).encode()
            out = messages(seed, f"call-{tag}-back", size_out, ledger.limit)
            if call.shape == CallShape.DOWNLOAD:
                for part in out:
                    await call.send(part)
                return None
            async with trio.open_nursery() as nursery:

                async def send_all() -> None:
                    for part in out:
                        await call.send(part)
                    await call.send_eof()

                nursery.start_soon(send_all)
                await trio.sleep(rng.choice([0.0, 0.0, 0.05, 0.2]))  # a late reader
                ledger.got(f"call-{tag}-out", [part async for part in call])
        except Exception as exc:
            ledger.errors.append(f"{side} call {tag}: {exc!r}")
        finally:
            ledger.event(ledger.served, tag).set()
        return None

    return unary, on_stream, on_call


@asynccontextmanager
async def connection_pair(
    plan: Plan, ledger: Ledger
) -> AsyncIterator[tuple[Connection, Connection]]:
    """The plan's network, and two connections over one of its links."""
    network = FaultyNetwork(
        seed=plan.seed,
        latency=plan.latency,
        jitter=plan.jitter,
        buffer_size=plan.buffer_size,
        max_segment=plan.max_segment,
        chaos=ChaosConfig(
            delay_probability=plan.delay_probability,
            max_delay=0.05,
            stall_probability=plan.stall_probability,
            stall_duration=plan.stall_duration,
            fragment=True,
        ),
    )
    listener = network.listen("server")
    try:
        raw_client = await network.connect("server")
        raw_server = await listener.accept()
    finally:
        await listener.aclose()
    transports: tuple[trio.abc.Stream, trio.abc.Stream] = (raw_client, raw_server)
    if plan.sockets:
        transports = (socket_stream(raw_client), socket_stream(raw_server))
    client_unary, client_streams, client_calls = handlers(ledger, "client")
    server_unary, server_streams, server_calls = handlers(ledger, "server")
    async with open_connection_pair(
        make_handshake("native"),
        client_handler=client_unary,
        server_handler=server_unary,
        client_stream_handler=client_streams,
        server_stream_handler=server_streams,
        client_call_handler=client_calls,
        server_call_handler=server_calls,
        client_config=plan.client_config,
        server_config=plan.server_config,
        transports=transports,
    ) as pair:
        yield pair


# -- what each side does -------------------------------------------------------------------


async def small_calls(conn: Connection, tag: int, count: int, seed: int) -> int:
    """``count`` small unary calls at random moments, each answered within CALL_TIMEOUT."""
    rng = random.Random(f"{seed}:requests:{tag}")
    for i in range(count):
        await trio.sleep(rng.uniform(0.0, 0.3))
        body = b"small-%d-%d" % (tag, i)
        with trio.fail_after(CALL_TIMEOUT):
            assert await conn.request(body) == b"re:" + body
    return count


async def stream_exchange(conn: Connection, ledger: Ledger, tag: int, size: int) -> None:
    """Open a stream, write ``size`` bytes while reading the peer's ``size`` in another
    task (one of the two starting late); check both."""
    ledger.event(ledger.served, tag)  # the handler sets it when done
    seed = ledger.seed
    rng = random.Random(f"{seed}:opener:stream:{tag}")
    out = payload(seed, f"stream-{tag}-out", size)
    ledger.expect(f"stream-{tag}-out", [out])
    ledger.expect(f"stream-{tag}-back", [payload(seed, f"stream-{tag}-back", size)])
    stream = await conn.open_stream()
    await stream.send_all(HEADER.pack(EXCHANGE, tag, size, size))

    async def write() -> None:
        await trio.sleep(rng.choice([0.0, 0.0, 0.05, 0.2]))
        await write_in_pieces(stream, out, rng)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write)
        got = await read_all(stream, rng)
    ledger.got(f"stream-{tag}-back", [got])
    await stream.aclose()


async def call_exchange(conn: Connection, ledger: Ledger, tag: int, total: int) -> None:
    """A bidirectional call: send messages worth ``total`` bytes of window while reading
    the handler's in another task; check both."""
    ledger.event(ledger.served, tag)  # the handler sets it when done
    seed, limit = ledger.seed, ledger.limit
    out = messages(seed, f"call-{tag}-out", total, limit)
    ledger.expect(f"call-{tag}-out", out)
    ledger.expect(f"call-{tag}-back", messages(seed, f"call-{tag}-back", total, limit))
    async with conn.open_call(HEADER.pack(EXCHANGE, tag, total, total)) as call:

        async def send_all() -> None:
            for part in out:
                await call.send(part)
            await call.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_all)
            ledger.got(f"call-{tag}-back", [part async for part in call])


async def upload(conn: Connection, ledger: Ledger, tag: int, total: int) -> None:
    ledger.event(ledger.served, tag)  # the handler sets it when done
    out = messages(ledger.seed, f"upload-{tag}-out", total, ledger.limit)
    ledger.expect(f"upload-{tag}-out", out)
    ledger.expect(f"upload-{tag}-reply", [digest(out).encode()])
    async with conn.upload() as call:
        await call.send(HEADER.pack(EXCHANGE, tag, total, 0))
        for part in out:
            await call.send(part)
        ledger.got(f"upload-{tag}-reply", [await call.finish()])


async def download(conn: Connection, ledger: Ledger, tag: int, total: int) -> None:
    ledger.event(ledger.served, tag)  # the handler sets it when done
    ledger.expect(
        f"download-{tag}", messages(ledger.seed, f"call-{tag}-back", total, ledger.limit)
    )
    async with conn.download(HEADER.pack(EXCHANGE, tag, 0, total)) as replies:
        ledger.got(f"download-{tag}", [part async for part in replies])


async def cancelled_call(conn: Connection, ledger: Ledger, tag: int, sending: bool) -> None:
    """A call to a handler that never reads, cancelled by a cancel scope once the handler
    runs: while this side waits to receive, or while it is blocked sending more than the
    window; the handler must then be cancelled in turn."""
    rng = random.Random(f"{ledger.seed}:cancel:{tag}")
    await trio.sleep(rng.uniform(0.0, 0.3))
    with trio.CancelScope() as scope:
        async with conn.open_call(HEADER.pack(HANG, tag, 0, 0)) as call:
            await ledger.event(ledger.started, tag).wait()
            scope.deadline = trio.current_time() + rng.choice([0.0, 0.01, 0.1])
            if sending:
                for _ in range(100_000):  # bounded: the window stops it long before
                    await call.send(b"c" * ledger.limit)
                raise AssertionError("a call nobody reads never blocked its sender")
            await call.receive()
            raise AssertionError("a handler that sends nothing sent something")
    assert scope.cancelled_caught
    with trio.fail_after(CALL_TIMEOUT):
        await ledger.event(ledger.cancelled, tag).wait()


# -- the two mixes ---------------------------------------------------------------------------


async def mix_read(plan: Plan, ledger: Ledger, client: Connection, server: Connection) -> None:
    window = plan.window
    rng = random.Random(f"{plan.seed}:sizes")
    answered: list[int] = []

    async def requests(conn: Connection, tag: int) -> None:
        answered.append(await small_calls(conn, tag, plan.requests_per_side, plan.seed))

    async with trio.open_nursery() as nursery:
        for side, conn in enumerate((client, server)):
            base = 1000 * (side + 1)
            for k in range(plan.streams_per_side):
                size = int(window * rng.uniform(1.5, 4.0))
                nursery.start_soon(stream_exchange, conn, ledger, base + k, size)
            total = int(window * rng.uniform(1.5, 4.0))
            nursery.start_soon(call_exchange, conn, ledger, base + 100, total)
            if plan.upload:
                nursery.start_soon(upload, conn, ledger, base + 200, total)
            if plan.download:
                nursery.start_soon(download, conn, ledger, base + 300, total)
            nursery.start_soon(requests, conn, base + 400)
            nursery.start_soon(cancelled_call, conn, ledger, base + 500, rng.random() < 0.5)
    # The handlers finish too (the last bytes they read may still be on the way).
    with trio.fail_after(CALL_TIMEOUT):
        for tag in sorted(ledger.served):
            await ledger.served[tag].wait()
    # Every transfer finished, with the exact bytes and messages, at both ends.
    assert ledger.received == ledger.expected
    assert answered == [plan.requests_per_side] * 2


async def mix_unread(plan: Plan, ledger: Ledger, client: Connection, server: Connection) -> None:
    window = plan.window
    finished: list[str] = []
    cancelled: list[str] = []
    opened: list[Stream] = []

    async def blocked(
        name: str, work: Callable[[Connection, int], Awaitable[None]], tag: int
    ) -> None:
        conn = client if tag < 2000 else server
        try:
            await work(conn, tag)
        except trio.Cancelled:
            cancelled.append(name)
            raise
        finished.append(name)

    async def stream_sink(conn: Connection, tag: int) -> None:
        stream = await conn.open_stream()
        opened.append(stream)
        await stream.send_all(HEADER.pack(SINK, tag, 0, 0) + b"s" * (3 * window))

    async def call_sink(conn: Connection, tag: int) -> None:
        async with conn.open_call(HEADER.pack(HANG, tag, 0, 0)) as call:
            for _ in range(3 * window // (ledger.limit + MESSAGE_COST) + 2):
                await call.send(b"h" * ledger.limit)

    async def unread_download(conn: Connection, tag: int) -> None:
        async with conn.download(HEADER.pack(FLOOD, tag, 0, 0)):
            await trio.sleep_forever()  # never reads

    sides = ((client, 1000), (server, 2000))
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            for _, base in sides:
                for k in range(plan.streams_per_side):
                    nursery.start_soon(blocked, f"stream {base + k}", stream_sink, base + k)
                nursery.start_soon(blocked, f"call {base + 100}", call_sink, base + 100)
                nursery.start_soon(blocked, f"download {base + 200}", unread_download, base + 200)
            # Senders block: once every task is blocked, and still after the keepalive
            # tolerance has passed 1.5 times over, three times, with no other traffic than
            # pings (unanswered, they would close the connection) and small calls between.
            for rounds in range(3):
                await trio.testing.wait_all_tasks_blocked()
                assert finished == [], finished
                for conn, base in sides:
                    # Unary calls proceed both ways meanwhile.
                    await small_calls(conn, base + 400 + rounds, plan.requests_per_side, plan.seed)
                await trio.sleep(1.5 * plan.tolerance)
            await trio.testing.wait_all_tasks_blocked()
            assert finished == [], finished
            configs = (plan.client_config, plan.server_config)
            for (conn, base), own, peers in zip(sides, configs, configs[::-1], strict=True):
                assert not conn.closed
                assert conn.statistics().rtt is not None  # pings were answered
                # As many streams and calls as the peer's max_streams allows have
                # started (the others wait for a slot, as blocked as the rest).
                tags = [base + k for k in range(plan.streams_per_side)] + [base + 100, base + 200]
                running = [
                    tag
                    for tag in tags
                    if tag in ledger.sinks or tag in ledger.flooded or tag in ledger.started
                ]
                assert len(running) == min(len(tags), peers.max_streams), running
                # The handlers that never read hold what their windows allow, no more.
                for tag in running:
                    if tag in ledger.sinks:
                        assert ledger.sinks[tag].buffered <= peers.stream_window
                # A handler sending to a caller that never reads stopped at its window.
                if base + 200 in ledger.flooded:
                    bound = own.stream_window // (ledger.limit + MESSAGE_COST)
                    assert 0 < ledger.flooded[base + 200] <= bound
            cancel_at = trio.current_time()
            scope.cancel()
    # The cancellation completes at once (no network wait), and cancels every sender.
    assert scope.cancelled_caught
    assert trio.current_time() == cancel_at
    assert finished == []
    assert len(cancelled) == 2 * (plan.streams_per_side + 2)
    # The handlers of the calls that started are cancelled in turn.
    with trio.fail_after(CALL_TIMEOUT):
        for _, base in sides:
            for tag in (base + 100, base + 200):
                if tag in ledger.started or tag in ledger.flooded:
                    await ledger.event(ledger.cancelled, tag).wait()
    for stream in opened:
        await stream.aclose()
    ledger.release.set()
    for conn, base in sides:
        await small_calls(conn, base + 900, 1, plan.seed)


async def run_schedule(seed: int) -> Plan:
    """Run the schedule of ``seed``; return its plan. Raises on a failure (a deadlock is
    :class:`trio.TooSlowError` from the schedule's bound)."""
    plan = draw_plan(seed)
    ledger = Ledger(seed=seed, limit=plan.message_limit)
    start = trio.current_time()
    with trio.fail_after(SCHEDULE_TIMEOUT):
        async with no_task_left(), AsyncExitStack() as stack:
            client, server = await stack.enter_async_context(connection_pair(plan, ledger))
            if plan.mix == "read":
                await mix_read(plan, ledger, client, server)
            else:
                await mix_unread(plan, ledger, client, server)
            assert ledger.errors == []
            # Every stream and call has ended at both ends: their slots are free.
            for _ in range(1000):  # bounded; a few round trips are enough
                if client.statistics().open_streams == server.statistics().open_streams == 0:
                    break
                await trio.sleep(plan.latency)
            assert client.statistics().open_streams == 0
            assert server.statistics().open_streams == 0
            ledger.release.set()
    assert trio.current_time() - start < SCHEDULE_TIMEOUT
    return plan


# -- the tests -------------------------------------------------------------------------------


def test_the_seeds_cover_both_mixes_and_both_transports() -> None:
    plans = [draw_plan(seed) for seed in range(min(SEEDS, 50))]
    assert {plan.mix for plan in plans} == {"read", "unread"}
    assert {plan.sockets for plan in plans} == {False, True}
    assert draw_plan(7) == draw_plan(7)  # the same schedule in every pytest-xdist worker


@pytest.mark.soak
@pytest.mark.parametrize("seed", range(SEEDS))
async def test_schedule_ends_without_deadlock(
    autojump_clock: trio.testing.MockClock, seed: int
) -> None:
    await run_schedule(seed)


# -- empty messages ------------------------------------------------------------------------


async def echo_messages(call: IncomingCall) -> bytes | None:
    """Upload: an empty reply; download: the request's repr; bidirectional: each message
    back."""
    if call.shape == CallShape.UPLOAD:
        async for _ in call:
            pass
        return b""
    if call.shape == CallShape.DOWNLOAD:
        await call.send(repr(await call.receive()).encode())
        return None
    async for message in call:
        await call.send(message)
    return None


@pytest.mark.parametrize("case", ["last-before-end", "download-request", "upload-reply"])
async def test_an_empty_message_arrives_as_sent(
    autojump_clock: trio.testing.MockClock, case: str
) -> None:
    async with open_connection_pair(
        make_handshake("native"), server_call_handler=echo_messages
    ) as (client, _):
        with trio.fail_after(10):
            if case == "last-before-end":
                for sent in ([b""], [b"a", b""], [b"", b""]):
                    async with client.open_call() as call:
                        for message in sent:
                            await call.send(message)
                        await call.send_eof()
                        assert [m async for m in call] == sent
            elif case == "download-request":
                async with client.download(b"") as replies:
                    assert [m async for m in replies] == [b"b''"]
            else:
                async with client.upload() as upload:
                    await upload.send(b"part")
                    assert await upload.finish() == b""
