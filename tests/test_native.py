"""The native profile end to end: authentication, record integrity, cancellation, liveness."""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
import trio
import trio.testing
from helpers import echo, running_server

import monte_trio
from monte_trio import (
    AcceptAnyKey,
    ConnectionClosed,
    ConnectionConfig,
    HandshakeError,
    Identity,
    KnownKeysFile,
    NativeHandshake,
    PeerRejected,
    PinnedKeys,
    Request,
    RequestNotProcessed,
)
from monte_trio.testing import FaultyNetwork, open_connection_pair

_U32 = struct.Struct(">I")


def split_records(data: bytes) -> list[bytes]:
    records = []
    pos = 0
    while pos < len(data):
        (length,) = _U32.unpack_from(data, pos)
        records.append(data[pos : pos + 4 + length])
        pos += 4 + length
    return records


class Tap(trio.abc.Stream):
    """A TCP stream whose writes and reads can be watched and altered (an active attacker)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.sent: list[bytes] = []
        self.received = bytearray()
        self.mutate: Callable[[bytes], bytes] | None = None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        data = bytes(data)
        if self.mutate is not None:
            mutate, self.mutate = self.mutate, None
            data = mutate(data)
        self.sent.append(data)
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = bytes(await self.inner.receive_some(max_bytes))
        self.received += data
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_pinned_keys_both_ways_and_peer_key_available() -> None:
    server_id, client_id = Identity.generate(), Identity.generate()
    seen: list[monte_trio.PublicKey | None] = []

    async def whoami(request: Request) -> bytes:
        seen.append(request.peer_public_key)
        return b"ok"

    with trio.fail_after(10):
        async with (
            running_server(
                whoami, identity=server_id, trust=PinnedKeys([client_id.public_key])
            ) as (_, port),
            monte_trio.open_client(
                "127.0.0.1", port, identity=client_id, trust=PinnedKeys([server_id.public_key])
            ) as client,
        ):
            assert await client.request(b"?") == b"ok"
            assert client.connections[0].peer_public_key == server_id.public_key
            assert client.connections[0].profile == "native"
    assert seen == [client_id.public_key]


async def test_active_man_in_the_middle_is_refused_under_pinning() -> None:
    server_id, client_id, mitm_id = (Identity.generate() for _ in range(3))
    relayed: list[bytes] = []
    async with running_server(
        echo, identity=server_id, trust=PinnedKeys([client_id.public_key])
    ) as (
        real_server,
        real_port,
    ):
        # The attacker terminates the client's handshake with its own key and relays the
        # calls to the real server, on which it presents its own key too.
        async def relay(request: Request) -> bytes:
            relayed.append(request.body)
            async with monte_trio.open_client(
                "127.0.0.1", real_port, identity=mitm_id, trust=AcceptAnyKey()
            ) as upstream:
                return await upstream.request(request.body)

        async with running_server(relay, identity=mitm_id, trust=AcceptAnyKey()) as (_, mitm_port):
            with trio.fail_after(10), pytest.raises(PeerRejected, match="not one of the 1 pinned"):
                async with monte_trio.open_client(
                    "127.0.0.1",
                    mitm_port,
                    identity=client_id,
                    trust=PinnedKeys([server_id.public_key]),
                ):
                    pass  # pragma: no cover
            # And the real server refuses the attacker's own key.
            with trio.fail_after(10), pytest.raises(PeerRejected, match="server refused our key"):
                async with monte_trio.open_client(
                    "127.0.0.1", real_port, identity=mitm_id, trust=AcceptAnyKey()
                ):
                    pass  # pragma: no cover
        assert relayed == []
        assert real_server.statistics().handshake_failures == 1


async def test_locked_down_known_keys_refuse_a_new_key(tmp_path: Path) -> None:
    server_id, client_id, mitm_id = (Identity.generate() for _ in range(3))
    server_file = tmp_path / "known_client_keys"
    server_file.write_text(f"{client_id.public_key} *\n")
    async with running_server(echo, identity=server_id, trust=KnownKeysFile(server_file)) as (
        _,
        port,
    ):
        client_file = tmp_path / "known_server_keys"
        client_file.write_text(f"{server_id.public_key} 127.0.0.1:{port}\n")
        for path in (server_file, client_file):
            path.chmod(stat.S_IRUSR | stat.S_IRGRP)  # read-only: lockdown
        with trio.fail_after(10):
            async with monte_trio.open_client(
                "127.0.0.1", port, identity=client_id, trust=KnownKeysFile(client_file)
            ) as client:
                assert await client.request(b"known") == b"known"
            # An unknown client key is refused by the locked-down server.
            with pytest.raises(PeerRejected, match="server refused our key"):
                async with monte_trio.open_client(
                    "127.0.0.1", port, identity=mitm_id, trust=KnownKeysFile(client_file)
                ):
                    pass  # pragma: no cover
    # A man in the middle at the server's address, with its own key, is refused by the
    # client's locked-down file (the file pins this address to the real server's key).
    async with running_server(echo, identity=mitm_id, trust=AcceptAnyKey()) as (_, mitm_port):
        os.chmod(client_file, 0o600)
        client_file.write_text(f"{server_id.public_key} 127.0.0.1:{mitm_port}\n")
        client_file.chmod(stat.S_IRUSR)
        with trio.fail_after(10), pytest.raises(PeerRejected):
            async with monte_trio.open_client(
                "127.0.0.1", mitm_port, identity=client_id, trust=KnownKeysFile(client_file)
            ):
                pass  # pragma: no cover
    assert server_file.read_text().count("\n") == 1  # nothing was learned


async def test_psk_must_match() -> None:
    psk = bytes(range(32))
    async with running_server(echo, trust=AcceptAnyKey(), psk=psk) as (server, port):
        with trio.fail_after(10):
            async with monte_trio.open_client(
                "127.0.0.1", port, trust=AcceptAnyKey(), psk=psk
            ) as client:
                assert await client.request(b"psk") == b"psk"
            with pytest.raises(HandshakeError):
                async with monte_trio.open_client(
                    "127.0.0.1", port, trust=AcceptAnyKey(), psk=bytes(32)
                ):
                    pass  # pragma: no cover
            with pytest.raises(HandshakeError, match="requires a pre-shared key"):
                async with monte_trio.open_client("127.0.0.1", port, trust=AcceptAnyKey()):
                    pass  # pragma: no cover
        assert server.statistics().handshake_failures == 2


async def test_monte_v1_client_is_refused_clearly_not_hung() -> None:
    async with running_server(echo, trust=AcceptAnyKey()) as (_, port):
        with trio.fail_after(5), pytest.raises(HandshakeError, match="another profile"):
            async with monte_trio.open_client(
                "127.0.0.1", port, handshake=monte_trio.MonteV1Handshake()
            ):
                pass  # pragma: no cover


async def test_native_client_to_monte_v1_server_is_refused_clearly() -> None:
    async with running_server(echo, handshake=monte_trio.MonteV1Handshake()) as (_, port):
        with trio.fail_after(5), pytest.raises(HandshakeError, match="monte-v1"):
            async with monte_trio.open_client("127.0.0.1", port, trust=AcceptAnyKey()):
                pass  # pragma: no cover


def _flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


def _swap_first_two_records(data: bytes) -> bytes:
    records = split_records(data)
    assert len(records) >= 2, "the writer should have batched both records"
    return records[1] + records[0] + b"".join(records[2:])


@pytest.mark.parametrize("attack", ["tampered", "replayed", "reordered", "truncated", "reflected"])
async def test_bad_record_closes_that_connection_only(attack: str) -> None:
    taps: list[Tap] = []
    closed: list[monte_trio.Connection] = []
    one_closed = trio.Event()
    both_closed = trio.Event()

    def track(conn: monte_trio.Connection, state: monte_trio.ConnectionState) -> None:
        if state == monte_trio.ConnectionState.CLOSED:
            closed.append(conn)
            one_closed.set()
            if len(closed) == 2:
                both_closed.set()

    async with running_server(echo, trust=AcceptAnyKey(), connection_state=track) as (
        server,
        port,
    ):

        async def tapped() -> trio.abc.Stream:
            tap = Tap(await trio.open_tcp_stream("127.0.0.1", port))
            taps.append(tap)
            return tap

        with trio.fail_after(10):
            async with (
                monte_trio.open_client(
                    "127.0.0.1", port, trust=AcceptAnyKey(), connect=tapped, max_conns=1
                ) as victim,
                monte_trio.open_client("127.0.0.1", port, trust=AcceptAnyKey()) as bystander,
            ):
                assert await victim.request(b"before") == b"before"
                (tap,) = taps
                if attack == "tampered":
                    tap.mutate = _flip_last_byte
                elif attack == "replayed":
                    tap.mutate = lambda data: data + tap.sent[-1]
                elif attack == "reordered":
                    tap.mutate = _swap_first_two_records
                elif attack == "truncated":
                    tap.mutate = lambda data: data[: len(data) // 2]
                elif attack == "reflected":
                    # The record the server sent us as a reply, sent back to it.
                    start = len(tap.received)
                    assert await victim.request(b"mark") == b"mark"
                    (reply_record,) = split_records(bytes(tap.received[start:]))
                    tap.mutate = lambda data: reply_record + data

                conn = victim.connections[0]
                if attack == "truncated":
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(_expect_closed, conn, b"after")
                        await trio.testing.wait_all_tasks_blocked()
                        # Half a record was written; now the stream ends.
                        assert isinstance(tap.inner, trio.SocketStream)
                        await tap.inner.send_eof()
                elif attack == "reordered":
                    async with trio.open_nursery() as nursery:
                        # Two requests queued together, written in one batch, then swapped
                        # (40 kB each: two records, since a record packs several frames;
                        # random bytes, which no compression shrinks).
                        for body in (os.urandom(40_000), os.urandom(40_000)):
                            nursery.start_soon(_expect_closed, victim.connections[0], body)
                else:
                    with pytest.raises(ConnectionClosed):
                        await conn.request(b"after")
                await conn.wait_closed()
                # Every other connection carries on.
                assert await bystander.request(b"still here") == b"still here"
                with trio.fail_after(5):
                    await one_closed.wait()
                (victim_on_server,) = closed
                reason = victim_on_server.close_reason
                assert reason is not None
                expected = (
                    "middle of a record" if attack == "truncated" else "failed authentication"
                )
                assert expected in reason.reason, reason.reason
        # The bystander's connection ends on the server once its client has left.
        with trio.fail_after(5):
            await both_closed.wait()
        assert server.statistics().connections_active == 0


async def _expect_closed(conn: monte_trio.Connection, body: bytes) -> None:
    with pytest.raises(ConnectionClosed):
        await conn.request(body)


async def test_remote_cancellation_reaches_the_handler(
    autojump_clock: trio.testing.MockClock,
) -> None:
    started = trio.Event()
    cancelled = trio.Event()

    async def slow(request: Request) -> bytes:
        started.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.set()
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    with trio.fail_after(60):
        async with open_connection_pair(
            NativeHandshake(trust=AcceptAnyKey()), server_handler=slow
        ) as (client, server):
            with trio.move_on_after(5) as scope:
                await client.request(b"slow")
            assert scope.cancelled_caught
            assert started.is_set()
            await cancelled.wait()  # the handler's own cancel scope was cancelled
            assert server.statistics().running_handlers == 0
            # The connection is still usable in both directions afterwards.
            assert not client.closed


def one_worker_pair(
    handler: monte_trio.Handler,
) -> AbstractAsyncContextManager[tuple[monte_trio.Connection, monte_trio.Connection]]:
    """A connection pair whose server side runs ``handler`` in one handler worker."""
    config = ConnectionConfig(max_concurrent_handlers=1)
    return open_connection_pair(
        NativeHandshake(trust=AcceptAnyKey()), server_handler=handler, config=config
    )


async def test_one_handler_worker_serves_on_after_remote_cancellations(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # One worker: each call it serves after a cancelled one runs where the cancelled one
    # ran. A call cancelled while it waits behind a busy worker is answered unrun.
    started: list[bytes] = []
    cancelled: list[trio.Event] = []

    async def handler(request: Request) -> bytes:
        started.append(request.body)
        if request.body.startswith(b"slow"):
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                cancelled[-1].set()
                raise
        await trio.sleep(1)  # a checkpoint: a spent cancel scope would stop it here
        return b"done " + request.body

    with trio.fail_after(60):
        async with one_worker_pair(handler) as (client, server):
            for round_ in range(5):
                cancelled.append(trio.Event())
                async with trio.open_nursery() as nursery:

                    async def queued(body: bytes) -> None:
                        with trio.move_on_after(2) as scope:
                            await client.request(body)
                        assert scope.cancelled_caught, "the queued call was answered"

                    with trio.move_on_after(5):
                        nursery.start_soon(queued, b"queued %d" % round_)
                        await client.request(b"slow %d" % round_)
                await cancelled[-1].wait()
                assert await client.request(b"next %d" % round_) == b"done next %d" % round_
                assert server.statistics().running_handlers == 0
            # The queued calls were cancelled unrun; every other call ran once.
            assert started == [b for r in range(5) for b in (b"slow %d" % r, b"next %d" % r)]


async def test_a_handler_that_outlives_its_remote_cancellation_leaves_the_next_calls_alone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    finished: list[bytes] = []

    async def handler(request: Request) -> bytes:
        if request.body == b"stubborn":
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                pass  # it ignores the cancellation and answers anyway
        else:
            await trio.sleep(1)
        finished.append(request.body)
        return b"done " + request.body

    with trio.fail_after(60):
        async with one_worker_pair(handler) as (client, server):
            for round_ in range(3):
                with trio.move_on_after(5) as scope:
                    await client.request(b"stubborn")
                assert scope.cancelled_caught  # its late reply is dropped
                assert await client.request(b"after %d" % round_) == b"done after %d" % round_
            assert finished == [b for r in range(3) for b in (b"stubborn", b"after %d" % r)]
            assert server.statistics().running_handlers == 0
            assert not client.closed


async def test_keepalive_measures_rtt_and_detects_a_silent_peer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = FaultyNetwork(seed=1, latency=0.01)
    listener = network.listen("server")
    config = ConnectionConfig(keepalive_interval=1.0, keepalive_tolerance=3.5)
    handshake = NativeHandshake(trust=AcceptAnyKey())
    release = trio.Event()

    async def blocked(request: Request) -> bytes:
        await release.wait()
        return b"late"

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:

            async def serve_one() -> None:
                raw = await listener.accept()
                secure = await handshake.handshake(raw, initiator=False, peer=None, config=config)
                async with monte_trio.Connection(secure, handler=blocked, config=config) as conn:
                    await conn.wait_closed()

            nursery.start_soon(serve_one)
            raw = await network.connect("server")
            secure = await handshake.handshake(raw, initiator=True, peer="server", config=config)
            async with monte_trio.Connection(secure, config=config) as client:
                await trio.sleep(2.5)
                rtt = client.statistics().rtt
                assert rtt is not None
                assert rtt == pytest.approx(0.02, abs=0.005)  # two 10 ms hops
                network.stall("server", "client")
                start = trio.current_time()
                with pytest.raises(ConnectionClosed, match="silent"):
                    await client.request(b"will never be answered")
                assert 3.0 <= trio.current_time() - start <= 5.0
            network.heal()
            release.set()
            nursery.cancel_scope.cancel()


async def test_goaway_says_which_requests_are_safe_to_retry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    release = trio.Event()

    async def slow(request: Request) -> bytes:
        await release.wait()
        return b"done:" + request.body

    results: dict[bytes, object] = {}
    with trio.fail_after(60):
        async with open_connection_pair(
            NativeHandshake(trust=AcceptAnyKey()),
            server_handler=slow,
            # Two call slots (wire v2 credit): C waits at the client for a slot.
            server_config=ConnectionConfig(
                max_concurrent_handlers=1, max_calls=2, grace_period=30
            ),
        ) as (client, server):

            async def call(body: bytes) -> None:
                try:
                    results[body] = await client.request(body)
                except ConnectionClosed as exc:
                    results[body] = exc

            async with trio.open_nursery() as nursery:
                for body in (b"A", b"B", b"C"):
                    nursery.start_soon(call, body)
                    await trio.testing.wait_all_tasks_blocked()
                # A runs; B waits in the server's inbox (accepted); C waits at the
                # client for a call slot, so it was never sent.
                nursery.start_soon(server.aclose)
                await trio.testing.wait_all_tasks_blocked()
                assert isinstance(results[b"C"], RequestNotProcessed)
                assert "safe to retry" in str(results[b"C"])
                release.set()
    assert results[b"A"] == b"done:A"
    assert results[b"B"] == b"done:B"


async def test_large_messages_are_split_and_limits_are_agreed() -> None:
    async with open_connection_pair(
        NativeHandshake(trust=AcceptAnyKey()),
        server_handler=echo,
        server_config=ConnectionConfig(max_message_size=300_000),
    ) as (client, _):
        body = os.urandom(250_000)
        with trio.fail_after(10):
            assert await client.request(body) == body
        # The server announced its limit in its hello: the client refuses before sending.
        with pytest.raises(monte_trio.LocalProtocolError, match="peer's maximum"):
            await client.request(bytes(300_001))
        assert await client.request(b"still fine") == b"still fine"


async def test_handler_error_is_a_remote_error_and_the_connection_lives() -> None:
    async def fails(request: Request) -> bytes:
        raise KeyError("no such thing")

    async with open_connection_pair(
        NativeHandshake(trust=AcceptAnyKey()), server_handler=fails
    ) as (client, _):
        with trio.fail_after(10):
            with pytest.raises(monte_trio.RemoteError, match="KeyError") as info:
                await client.request(b"x")
            assert "Traceback" not in info.value.message
            with pytest.raises(monte_trio.RemoteError):
                await client.request(b"y")
        assert not client.closed


def test_message_size_must_fit_the_hello() -> None:
    with pytest.raises(ValueError, match="max_message_size"):
        ConnectionConfig(max_message_size=2**32)


async def test_refusal_reason_reaches_a_client_with_small_records() -> None:
    stranger = Identity.generate()
    async with running_server(echo, trust=PinnedKeys([stranger.public_key])) as (_, port):
        with trio.fail_after(10), pytest.raises(PeerRejected, match="server refused our key"):
            async with monte_trio.open_client(
                "127.0.0.1",
                port,
                trust=AcceptAnyKey(),
                config=ConnectionConfig(max_record_size=1024),  # wire v2's floor
            ):
                pass  # pragma: no cover


class _Recording(monte_trio.TrustPolicy):
    def __init__(self) -> None:
        self.seen: list[monte_trio.PublicKey] = []

    async def verify(self, key: monte_trio.PublicKey, *, peer: str | None) -> None:
        self.seen.append(key)


async def test_a_refusing_client_does_not_reveal_its_key() -> None:
    recorder = _Recording()
    client_side = NativeHandshake(trust=PinnedKeys([Identity.generate().public_key]))
    server_side = NativeHandshake(trust=recorder)
    client_raw, server_raw = trio.testing.memory_stream_pair()
    errors: dict[str, BaseException] = {}

    async def run(name: str, hs: NativeHandshake, raw: trio.abc.Stream) -> None:
        try:
            await hs.handshake(
                raw, initiator=name == "client", peer="server:1", config=ConnectionConfig()
            )
        except PeerRejected as exc:
            errors[name] = exc

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "client", client_side, client_raw)
            nursery.start_soon(run, "server", server_side, server_raw)
    assert "not one of the 1 pinned" in str(errors["client"])
    assert "client refused this server's key" in str(errors["server"])
    assert recorder.seen == []  # the server never learned who the client was
