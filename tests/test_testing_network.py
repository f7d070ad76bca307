"""Tests of monte_trio.testing's fault-injecting in-memory network (FaultyNetwork)."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from monte_trio.testing import (
    ChaosConfig,
    FaultEvent,
    FaultKind,
    FaultyNetwork,
    Link,
    NetworkListener,
    NetworkStream,
)

TIMEOUT = 60  # virtual seconds under the autojump clock


async def pair(
    net: FaultyNetwork, host: str = "server", source: str = "client"
) -> tuple[NetworkStream, NetworkStream]:
    """Connect ``source`` to ``host`` (listening just for this) and return both ends."""
    listener = net.listen(host)
    try:
        client = await net.connect(host, source=source)
        server = await listener.accept()
    finally:
        await listener.aclose()
    return client, server


async def receive_exactly(stream: trio.abc.ReceiveStream, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = await stream.receive_some(count - len(data))
        assert chunk, "unexpected EOF"
        data += chunk
    return bytes(data)


async def receive_until_error(stream: trio.abc.ReceiveStream) -> tuple[bytes, BaseException]:
    data = bytearray()
    try:
        while True:
            chunk = await stream.receive_some()
            if not chunk:
                return bytes(data), EOFError()
            data += chunk
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        return bytes(data), exc


# ---- the stream contract -------------------------------------------------------------


@pytest.mark.parametrize(("latency", "jitter"), [(0.0, 0.0), (0.05, 0.01)])
async def test_check_half_closeable_stream(
    autojump_clock: trio.testing.MockClock, latency: float, jitter: float
) -> None:
    async def maker() -> tuple[NetworkStream, NetworkStream]:
        return await pair(FaultyNetwork(latency=latency, jitter=jitter))

    async def clogged_maker() -> tuple[NetworkStream, NetworkStream]:
        net = FaultyNetwork(latency=latency, jitter=jitter, buffer_size=1000)
        a, b = await pair(net)
        await a.send_all(b"x" * 1000)
        await b.send_all(b"x" * 1000)
        return a, b

    with trio.fail_after(TIMEOUT):
        await trio.testing.check_half_closeable_stream(maker, clogged_maker)


async def test_check_two_way_stream_with_chaos_delays(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Delays, stalls and fragmentation must not change the bytes.
    chaos = ChaosConfig(stall_probability=0.01, delay_probability=0.1, fragment=True)

    async def maker() -> tuple[NetworkStream, NetworkStream]:
        return await pair(FaultyNetwork(seed=7, latency=0.01, chaos=chaos))

    with trio.fail_after(TIMEOUT * 10):
        await trio.testing.check_two_way_stream(maker, None)


async def test_short_reads_and_max_bytes(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(TIMEOUT):
        net = FaultyNetwork(max_segment=10)
        a, b = await pair(net)
        await a.send_all(bytes(range(25)))
        assert await b.receive_some() == bytes(range(10))  # one segment at most
        assert await b.receive_some(3) == bytes(range(10, 13))
        assert await receive_exactly(b, 12) == bytes(range(13, 25))
        assert isinstance(a, trio.abc.HalfCloseableStream)
        assert a.local_host == "client"
        assert a.remote_host == "server"
        assert b.local_host == "server"
        assert a.link == b.link


async def test_concurrent_use_is_busy(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(TIMEOUT):
        a, _b = await pair(FaultyNetwork(buffer_size=10))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.receive_some, 1)  # blocks: b sends nothing
            nursery.start_soon(a.send_all, b"x" * 20)  # blocks: the buffer holds 10
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await a.receive_some(1)
            with pytest.raises(trio.BusyResourceError):
                await a.send_all(b"y")
            with pytest.raises(trio.BusyResourceError):
                await a.send_eof()
            nursery.cancel_scope.cancel()


# ---- listen / connect ----------------------------------------------------------------


async def test_listen_connect_refused(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(TIMEOUT):
        net = FaultyNetwork()
        with pytest.raises(ConnectionRefusedError, match="nobody listens"):
            await net.connect("server")

        listener = net.listen("server")
        assert isinstance(listener, NetworkListener)
        assert isinstance(listener, trio.abc.Listener)
        with pytest.raises(OSError, match="already listening"):
            net.listen("server")

        client = await net.connect("server", source="alice")
        server = await listener.accept()
        assert net.links() == [Link(id=0, source="alice", host="server", index=0)]
        await client.send_all(b"ping")
        assert await server.receive_some() == b"ping"
        await server.send_all(b"pong")
        assert await client.receive_some() == b"pong"

        # Connections not yet accepted are closed with the listener.
        pending = await net.connect("server", source="alice")
        assert [link.index for link in net.links()] == [0, 1]
        await listener.aclose()
        await listener.aclose()  # idempotent
        assert await pending.receive_some() == b""
        with pytest.raises(trio.ClosedResourceError):
            await listener.accept()
        with pytest.raises(ConnectionRefusedError):
            await net.connect("server")

        # The host name can be listened on again.
        listener2 = net.listen("server")
        await listener2.aclose()

        await client.aclose()
        await server.aclose()
        await pending.aclose()
        stats = net.statistics()
        assert stats.open_links == 0
        assert stats.connects == 2
        assert stats.refused == 2
        assert stats.bytes_sent == stats.bytes_delivered == 8


async def test_accept_waits_and_close_wakes_it(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(TIMEOUT):
        net = FaultyNetwork(latency=0.5)
        listener = net.listen("server")
        accepted: list[NetworkStream] = []

        async def acceptor() -> None:
            accepted.append(await listener.accept())
            with pytest.raises(trio.ClosedResourceError):
                await listener.accept()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(acceptor)
            await trio.testing.wait_all_tasks_blocked()
            start = trio.current_time()
            client = await net.connect("server")
            assert trio.current_time() - start == pytest.approx(1.0)  # one round trip
            await trio.testing.wait_all_tasks_blocked()
            assert len(accepted) == 1
            await listener.aclose()
        assert accepted[0].link == client.link


# ---- faults --------------------------------------------------------------------------


async def test_drop(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(TIMEOUT):
        net = FaultyNetwork()
        a, b = await pair(net)
        c, d = await pair(net, host="other")
        await a.send_all(b"in flight")
        assert net.drop("client", "server") == 1
        assert net.drop("client", "server") == 0  # already broken
        # Nothing more is delivered, even bytes already sent.
        with pytest.raises(trio.BrokenResourceError):
            await b.receive_some()
        with pytest.raises(trio.BrokenResourceError):
            await a.receive_some()
        with pytest.raises(trio.BrokenResourceError):
            await a.send_all(b"x")
        with pytest.raises(trio.BrokenResourceError):
            await b.send_all(b"x")
        # The other link is untouched.
        await c.send_all(b"ok")
        assert await d.receive_some() == b"ok"
        # A blocked receiver is woken by the drop.
        async with trio.open_nursery() as nursery:

            async def blocked() -> None:
                with pytest.raises(trio.BrokenResourceError):
                    await d.receive_some()

            nursery.start_soon(blocked)
            await trio.testing.wait_all_tasks_blocked()
            assert net.drop(c.link) == 1
        assert [e.kind for e in net.log] == [FaultKind.DROP, FaultKind.DROP]
        assert net.log[0].link == a.link
        for stream in (a, b, c, d):
            await stream.aclose()


async def test_stall_and_heal(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(TIMEOUT):
        net = FaultyNetwork(buffer_size=100)
        a, b = await pair(net)
        assert net.stall("client", "server") == 1
        await a.send_all(b"x" * 100)  # buffered
        got = b""

        async def reader() -> None:
            nonlocal got
            got = await receive_exactly(b, 150)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            nursery.start_soon(a.send_all, b"y" * 50)  # the buffer is full: it waits
            await trio.sleep(30)
            assert got == b""
            # The other direction still works.
            await b.send_all(b"back")
            assert await a.receive_some() == b"back"
            net.heal()
        assert got == b"x" * 100 + b"y" * 50
        assert [e.kind for e in net.log] == [FaultKind.STALL, FaultKind.HEAL]
        await a.aclose()
        await b.aclose()


async def test_cut_after_n_bytes(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(TIMEOUT):
        net = FaultyNetwork()
        a, b = await pair(net)
        await a.send_all(b"0123")
        assert net.cut("client", "server", after=10) == 1
        with pytest.raises(trio.BrokenResourceError):
            await a.send_all(b"456789abcdef")  # the cut happens within this write
        data, exc = await receive_until_error(b)
        assert data == b"0123456789"
        assert isinstance(exc, trio.BrokenResourceError)
        with pytest.raises(trio.BrokenResourceError):
            await b.send_all(b"x")
        (event,) = net.log
        assert event.kind is FaultKind.CUT
        assert (event.src, event.dst, event.link) == ("client", "server", a.link)
        assert "byte 10" in event.detail

        # Bytes already in flight count: the cut fires at once.
        c, d = await pair(net, host="other")
        await c.send_all(b"abcdef")
        net.cut("client", "other", after=2)
        with pytest.raises(trio.BrokenResourceError):
            await c.send_all(b"x")
        data, exc = await receive_until_error(d)
        assert data == b"ab"
        assert isinstance(exc, trio.BrokenResourceError)


async def test_corrupt_flips_exactly_one_bit(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(TIMEOUT):
        net = FaultyNetwork(seed=3)
        a, b = await pair(net)
        payload = bytes(random.Random(1).randbytes(1000))
        assert net.corrupt("client", "server") == 1
        await a.send_all(payload)
        got = await receive_exactly(b, 1000)
        diff = int.from_bytes(got, "big") ^ int.from_bytes(payload, "big")
        assert diff.bit_count() == 1
        # Only the next chunk: later ones arrive intact.
        await a.send_all(payload)
        assert await receive_exactly(b, 1000) == payload
        (event,) = net.log
        assert event.kind is FaultKind.CORRUPT
        assert not event.chaos
        assert net.statistics().faults == {"corrupt": 1}


async def test_partition(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(TIMEOUT):
        net = FaultyNetwork()
        a, b = await pair(net)
        listener = net.listen("server")
        assert net.partition(["server"]) == 1  # isolates the server from everyone
        with pytest.raises(ConnectionRefusedError, match="partitioned"):
            await net.connect("server")
        other = net.listen("other")
        other_client = await net.connect("other")  # the other side still works
        await other_client.aclose()
        await other.aclose()

        await a.send_all(b"held")
        with trio.move_on_after(10) as scope:
            await b.receive_some()
        assert scope.cancelled_caught
        net.heal()
        assert await b.receive_some() == b"held"
        client = await net.connect("server")
        await client.aclose()
        await (await listener.accept()).aclose()

        # With drop=True, existing links break.
        assert net.partition({"client"}, {"server"}, drop=True) == 1
        with pytest.raises(trio.BrokenResourceError):
            await b.receive_some()
        net.heal()
        await listener.aclose()
        kinds = [e.kind for e in net.log]
        assert kinds == [
            FaultKind.PARTITION,
            FaultKind.STALL,
            FaultKind.HEAL,
            FaultKind.PARTITION,
            FaultKind.DROP,
            FaultKind.HEAL,
        ]


async def test_shutdown_host(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(TIMEOUT):
        net = FaultyNetwork()
        listener = net.listen("server")
        a = await net.connect("server")
        b = await listener.accept()
        waiting = await net.connect("server")  # still in the backlog
        assert net.shutdown_host("server") == 2
        with pytest.raises(trio.BrokenResourceError):
            await a.send_all(b"x")
        with pytest.raises(trio.BrokenResourceError):
            await b.receive_some()
        with pytest.raises(trio.BrokenResourceError):
            await waiting.receive_some()
        with pytest.raises(ConnectionRefusedError, match="shut down"):
            await net.connect("server")
        net.restart_host("server")
        c = await net.connect("server")
        d = await listener.accept()  # the discarded backlog entry is not returned
        assert d.link == c.link
        await c.send_all(b"back")
        assert await d.receive_some() == b"back"
        kinds = [e.kind for e in net.log]
        assert kinds == [FaultKind.SHUTDOWN, FaultKind.DROP, FaultKind.DROP, FaultKind.RESTART]
        await listener.aclose()


# ---- back-pressure, latency ----------------------------------------------------------


async def test_back_pressure(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(TIMEOUT):
        net = FaultyNetwork(buffer_size=1000)
        a, b = await pair(net)
        done = trio.Event()

        async def sender() -> None:
            await a.send_all(b"z" * 2500)
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set()  # parked: the peer does not read
            assert net.statistics().bytes_sent == 1000
            with trio.move_on_after(30):  # no busy-waiting: time can jump far ahead
                await done.wait()
            assert not done.is_set()
            assert await receive_exactly(b, 2500) == b"z" * 2500
            await done.wait()


async def test_latency_on_mock_clock(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(TIMEOUT):
        net = FaultyNetwork(latency=0.25)
        a, b = await pair(net)
        start = trio.current_time()
        await a.send_all(b"hello")
        assert trio.current_time() == start  # sending does not wait
        assert await b.receive_some() == b"hello"
        assert trio.current_time() - start == pytest.approx(0.25)
        await a.send_eof()
        assert await b.receive_some() == b""
        assert trio.current_time() - start == pytest.approx(0.5)


# ---- chaos and determinism -----------------------------------------------------------


async def echo_scenario(
    seed: int, latency: float = 0.01
) -> tuple[list[FaultEvent], list[bytes], float]:
    """Three clients at once stream data through echo servers under chaos.

    Returns the log, what each client received, and the time it took.
    """
    chaos = ChaosConfig(
        drop_probability=0.002,
        corrupt_probability=0.05,
        stall_probability=0.02,
        stall_duration=0.5,
        delay_probability=0.1,
        max_delay=0.2,
        fragment=True,
    )
    start = trio.current_time()
    net = FaultyNetwork(
        seed=seed, latency=latency, jitter=latency / 2, max_segment=512, chaos=chaos
    )
    listener = net.listen("server")
    received = [bytearray() for _ in range(3)]

    async def echo(stream: NetworkStream) -> None:
        try:
            while data := await stream.receive_some():
                await stream.send_all(data)
            await stream.send_eof()
        except trio.BrokenResourceError:
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def client(stream: NetworkStream, number: int) -> None:
        rng = random.Random(number)

        async def send() -> None:
            try:
                for _ in range(200):
                    await stream.send_all(rng.randbytes(rng.randint(1, 2000)))
                await stream.send_eof()
            except trio.BrokenResourceError:
                pass

        async def receive() -> None:
            data, _exc = await receive_until_error(stream)
            received[number].extend(data)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            nursery.start_soon(receive)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        for number in range(3):
            stream = await net.connect("server")
            nursery.start_soon(echo, await listener.accept())
            nursery.start_soon(client, stream, number)
    await listener.aclose()
    assert net.statistics().open_links == 0
    return net.log, [bytes(data) for data in received], trio.current_time() - start


async def test_determinism(autojump_clock: trio.testing.MockClock) -> None:
    # (With zero latency, tasks of different hosts act at the same instants and trio runs
    # them in a random order, so only latency > 0 gives exact replays: see FaultyNetwork.)
    with trio.fail_after(TIMEOUT * 100):
        first = await echo_scenario(seed=1)
        second = await echo_scenario(seed=1)
        other = await echo_scenario(seed=2)
    log, data, _ = first
    assert {FaultKind.CORRUPT, FaultKind.STALL, FaultKind.DELAY} <= {e.kind for e in log}
    assert all(e.chaos for e in log)
    assert all(data)
    assert first == second  # same events, same bytes, same duration
    assert other[0] != log
    assert other[1] != data


def test_log_times_and_str() -> None:
    # A network can be created outside trio; the log's clock starts at first use.
    net = FaultyNetwork(seed=5)

    async def main() -> None:
        await trio.sleep(3)
        a, b = await pair(net)
        await trio.sleep(2)
        net.drop(a.link)
        await a.aclose()
        await b.aclose()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    (event,) = net.log
    assert event.time == pytest.approx(2.0)
    assert str(event) == "t=2.000000 drop link#0 client->server: dropped"


def test_validation() -> None:
    with pytest.raises(ValueError, match="drop_probability"):
        ChaosConfig(drop_probability=1.5)
    with pytest.raises(ValueError, match="latency"):
        FaultyNetwork(latency=-1)
    with pytest.raises(ValueError, match="buffer_size"):
        FaultyNetwork(buffer_size=0)
    net = FaultyNetwork()
    with pytest.raises(ValueError, match="two groups"):
        net.partition(["a", "b"], ["b"])
    with pytest.raises(ValueError, match="after"):
        net.cut("a", "b", after=-1)


async def test_no_task_left_behind(autojump_clock: trio.testing.MockClock) -> None:
    # The network starts no task of its own: during and after a scenario with latency,
    # stalls and faults, the only living task is the test's.
    with trio.fail_after(TIMEOUT):
        before = trio.lowlevel.current_statistics().tasks_living
        net = FaultyNetwork(latency=0.1, chaos=ChaosConfig(delay_probability=0.5))
        a, b = await pair(net)
        net.stall("server", "client")
        await a.send_all(b"x" * 10)
        await b.send_all(b"y" * 10)
        assert await receive_exactly(b, 10) == b"x" * 10
        assert trio.lowlevel.current_statistics().tasks_living == before
        net.drop("client")
        await a.aclose()
        await b.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert trio.lowlevel.current_statistics().tasks_living == before
        assert net.statistics().open_links == 0
