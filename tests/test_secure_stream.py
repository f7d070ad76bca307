"""SecureStream: the trio Stream contract, the record API, and hostile input."""

from __future__ import annotations

import socket
import struct
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

import monte_trio
from monte_trio import (
    AcceptAnyKey,
    DecryptionError,
    Handshake,
    MonteV1Handshake,
    NativeHandshake,
    RemoteProtocolError,
    SecureStream,
)
from monte_trio._config import ConnectionConfig
from monte_trio._proto._monte_v1 import MonteV1HandshakeState
from monte_trio._proto._records import RecordSealer
from monte_trio.testing import secure_stream_pair

TIMEOUT = 10


async def _handshake_over(
    handshake: Handshake, a: trio.abc.Stream, b: trio.abc.Stream
) -> tuple[SecureStream, SecureStream]:
    results: dict[bool, SecureStream] = {}

    async def run(initiator: bool, raw: trio.abc.Stream) -> None:
        results[initiator] = await handshake.handshake(
            raw,
            initiator=initiator,
            peer="memory:0" if initiator else None,
            config=ConnectionConfig(),
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, True, a)
        nursery.start_soon(run, False, b)
    return results[True], results[False]


async def test_check_two_way_stream(profile: Handshake) -> None:
    async def stream_maker() -> tuple[SecureStream, SecureStream]:
        return await secure_stream_pair(profile)

    async def clogged_stream_maker() -> tuple[SecureStream, SecureStream]:
        a, b = trio.testing.lockstep_stream_pair()
        return await _handshake_over(profile, a, b)

    with trio.fail_after(60):
        await trio.testing.check_two_way_stream(stream_maker, clogged_stream_maker)


async def test_pair_attributes(monte_v1: Handshake) -> None:
    with trio.fail_after(TIMEOUT):
        client, server = await secure_stream_pair(monte_v1)
    assert client.facts.initiator
    assert not server.facts.initiator
    assert client.facts.profile == server.facts.profile == "monte-v1"
    assert client.facts.peer_public_key is None
    assert client.max_plaintext == 4096 - 16


async def test_send_records_batches_into_one_write_and_skips_none(monte_v1: Handshake) -> None:
    with trio.fail_after(TIMEOUT):
        client, server = await secure_stream_pair(monte_v1)
        await client.send_records([b"one", None, b"two", b"", b"three"])
        got: list[bytes] = []
        for _ in range(10):
            got += await server.receive_records()
            if len(got) >= 4:
                break
        assert got == [b"one", b"two", b"", b"three"]


async def test_byte_stream_splits_large_writes_into_records(monte_v1: Handshake) -> None:
    data = bytes(range(256)) * 100  # 25,600 bytes: seven 4,080-byte records
    with trio.fail_after(TIMEOUT):
        client, server = await secure_stream_pair(monte_v1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, data)
            received = bytearray()
            for _ in range(100):
                chunk = await server.receive_some(1000)
                assert 0 < len(chunk) <= 1000
                received += chunk
                if len(received) >= len(data):
                    break
    assert received == data


async def test_concurrent_send_records_is_busy(monte_v1: Handshake) -> None:
    # An unbuffered transport keeps the first send_all blocked while the second starts.
    a, b = trio.testing.lockstep_stream_pair()
    with trio.fail_after(TIMEOUT):
        client, server = await _handshake_over(monte_v1, a, b)
        async with trio.open_nursery() as nursery:
            first: list[bytes | None] = [b"first"]
            nursery.start_soon(client.send_records, first)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await client.send_records([b"second"])
            assert await server.receive_records() == [b"first"]


async def test_receive_after_close_raises_closed(monte_v1: Handshake) -> None:
    with trio.fail_after(TIMEOUT):
        client, server = await secure_stream_pair(monte_v1)
        await server.aclose()
        await server.aclose()  # idempotent
        with pytest.raises(trio.ClosedResourceError):
            await server.receive_records()
        with pytest.raises(trio.ClosedResourceError):
            await server.send_records([b"x"])
        # the peer sees a clean end of stream
        assert await client.receive_records() == []
        assert await client.receive_some() == b""


# ---- hostile input: a raw transport under our control on the other side ---------------


async def _v1_server_with_raw_client(
    max_record_size: int | None = None,
) -> tuple[SecureStream, trio.abc.Stream, RecordSealer]:
    raw_client, raw_server = trio.testing.memory_stream_pair()
    state = MonteV1HandshakeState(initiator=True)
    config = ConnectionConfig(max_record_size=max_record_size)
    async with trio.open_nursery() as nursery:
        result: list[SecureStream] = []

        async def serve() -> None:
            result.append(
                await monte_trio.MonteV1Handshake().handshake(
                    raw_server, initiator=False, peer=None, config=config
                )
            )

        nursery.start_soon(serve)
        await raw_client.send_all(state.data_to_send())
        rest = b""
        for _ in range(10):
            rest = state.receive_data(bytes(await raw_client.receive_some(64)))
            if state.peer_public is not None:
                break
        assert rest == b""
        assert state.data_to_send() == b""
    sealer, _opener = state.records(max_record_size=max_record_size or 4096)
    return result[0], raw_client, sealer


async def test_tampered_record_raises_decryption_error_and_stays_broken() -> None:
    with trio.fail_after(TIMEOUT):
        server, raw, sealer = await _v1_server_with_raw_client()
        good = sealer.seal(b"\x00\x00\x00\x00hello")
        await raw.send_all(good)
        assert await server.receive_records() == [b"\x00\x00\x00\x00hello"]
        bad = bytearray(sealer.seal(b"\x00\x00\x00\x00world"))
        bad[-1] ^= 1
        await raw.send_all(bytes(bad))
        with pytest.raises(DecryptionError):
            await server.receive_records()
        # Broken for good, as trio.SSLStream: even a valid record later is refused, and
        # every operation says so with trio's exception.
        await raw.send_all(sealer.seal(b"\x00\x00\x00\x00again"))
        with pytest.raises(trio.BrokenResourceError, match="invalid record"):
            await server.receive_records()
        with pytest.raises(trio.BrokenResourceError):
            await server.send_all(b"x")
        await server.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await server.receive_records()


async def test_oversized_length_prefix_is_refused_before_buffering() -> None:
    with trio.fail_after(TIMEOUT):
        server, raw, _sealer = await _v1_server_with_raw_client()
        await raw.send_all(struct.pack(">I", 2**32 - 1))
        with pytest.raises(RemoteProtocolError, match="outside the allowed range"):
            await server.receive_records()


async def test_record_just_over_the_limit_is_refused() -> None:
    with trio.fail_after(TIMEOUT):
        server, raw, _sealer = await _v1_server_with_raw_client(max_record_size=128)
        await raw.send_all(struct.pack(">I", 129) + bytes(129))
        with pytest.raises(RemoteProtocolError, match="outside the allowed range"):
            await server.receive_records()


async def test_eof_in_the_middle_of_a_record() -> None:
    with trio.fail_after(TIMEOUT):
        server, raw, sealer = await _v1_server_with_raw_client()
        record = sealer.seal(b"\x00\x00\x00\x00truncated")
        await raw.send_all(record[:-3])
        await raw.aclose()
        with pytest.raises(RemoteProtocolError, match="middle of a record"):
            await server.receive_records()
        with pytest.raises(trio.BrokenResourceError):
            await server.receive_some()


async def test_records_split_across_reads_are_reassembled() -> None:
    with trio.fail_after(TIMEOUT):
        server, raw, sealer = await _v1_server_with_raw_client()
        data = sealer.seal_many([b"\x00\x00\x00\x00a", b"\x00\x00\x00\x00bb"])
        got: list[bytes] = []
        for i in range(len(data)):
            await raw.send_all(data[i : i + 1])
        for _ in range(len(data)):
            got += await server.receive_records()
            if len(got) == 2:
                break
        assert got == [b"\x00\x00\x00\x00a", b"\x00\x00\x00\x00bb"]


# ---- over your own stream, as one would use trio.SSLStream -------------------------------


def _handshakes() -> list[Handshake]:
    return [NativeHandshake(trust=AcceptAnyKey()), MonteV1Handshake()]


async def _wrap_both(
    handshake: Handshake, a: trio.abc.Stream, b: trio.abc.Stream
) -> tuple[SecureStream, SecureStream]:
    """Both ends of ``a``/``b`` wrapped with the public call only (no config, no peer)."""
    results: dict[bool, SecureStream] = {}

    async def run(initiator: bool, raw: trio.abc.Stream) -> None:
        results[initiator] = await handshake.handshake(raw, initiator=initiator)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, True, a)
        nursery.start_soon(run, False, b)
    return results[True], results[False]


async def _exchange(client: SecureStream, server: SecureStream) -> None:
    data = bytes(range(256)) * 400  # 102,400 bytes: several records
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, data)
        received = bytearray()
        for _ in range(1000):
            received += await server.receive_some()
            if len(received) >= len(data):
                break
    assert received == data
    await server.send_all(b"and back")
    assert await client.receive_some() == b"and back"
    await client.aclose()
    assert await server.receive_some() == b""
    await server.aclose()


@pytest.mark.parametrize("handshake", _handshakes(), ids=lambda h: h.profile)
async def test_secure_stream_over_a_memory_stream_pair(handshake: Handshake) -> None:
    a, b = trio.testing.memory_stream_pair()
    with trio.fail_after(TIMEOUT):
        client, server = await _wrap_both(handshake, a, b)
        assert client.transport is a
        assert not client.record_safe
        if handshake.profile == "native":
            assert isinstance(handshake, NativeHandshake)
            assert client.facts.peer_public_key == handshake.public_key
        await _exchange(client, server)


@pytest.mark.parametrize("handshake", _handshakes(), ids=lambda h: h.profile)
async def test_secure_stream_over_a_socket_pair(handshake: Handshake) -> None:
    left, right = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a, b = trio.SocketStream(left), trio.SocketStream(right)
    with trio.fail_after(TIMEOUT):
        client, server = await _wrap_both(handshake, a, b)
        assert client.record_safe
        assert client.facts.initiator
        assert not server.facts.initiator
        await _exchange(client, server)


def test_handshake_is_not_an_extension_point() -> None:
    with pytest.raises(TypeError, match="not an extension point"):

        class Mine(Handshake):  # pragma: no cover - the class statement itself fails
            profile = "mine"

    # What is public is calling it; the method a subclass would implement is private.
    assert not getattr(Handshake.handshake, "__isabstractmethod__", False)


# ---- the state: open, broken, closed -----------------------------------------------------


class ControlledStream(trio.abc.Stream):
    """A memory stream whose operations can be made to fail on demand."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.send_error: BaseException | None = None
        self.receive_error: BaseException | None = None
        self.close_error: BaseException | None = None
        self.close_blocks = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.send_error is not None:
            raise self.send_error
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        if self.send_error is not None:
            raise self.send_error
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self.receive_error is not None:
            raise self.receive_error
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()
        if self.close_blocks:
            await trio.sleep_forever()
        if self.close_error is not None:
            raise self.close_error


async def _controlled_pair() -> tuple[SecureStream, SecureStream, ControlledStream]:
    a, b = trio.testing.memory_stream_pair()
    controlled = ControlledStream(a)
    client, server = await _wrap_both(MonteV1Handshake(), controlled, b)
    return client, server, controlled


Operation = Callable[[SecureStream], Awaitable[object]]
OPERATIONS: dict[str, Operation] = {
    "send_all": lambda s: s.send_all(b"x"),
    "send_records": lambda s: s.send_records([b"x"]),
    "wait_send_all_might_not_block": lambda s: s.wait_send_all_might_not_block(),
    "receive_some": lambda s: s.receive_some(),
    "receive_records": lambda s: s.receive_records(),
}


async def _make_state(state: str) -> tuple[SecureStream, SecureStream]:
    client, server, controlled = await _controlled_pair()
    await server.send_all(b"data for the receive operations")
    if state == "broken":
        controlled.send_error = trio.BrokenResourceError("the cable was cut")
        with pytest.raises(trio.BrokenResourceError):
            await client.send_all(b"lost")
        controlled.send_error = None  # the transport recovered: the stream stays broken
    elif state == "closed":
        await client.aclose()
    return client, server


@pytest.mark.parametrize("operation", list(OPERATIONS))
@pytest.mark.parametrize(
    ("state", "error"),
    [("open", None), ("broken", trio.BrokenResourceError), ("closed", trio.ClosedResourceError)],
)
async def test_each_operation_in_each_state(
    operation: str, state: str, error: type[Exception] | None
) -> None:
    with trio.fail_after(TIMEOUT):
        client, server = await _make_state(state)
        if error is None:
            await OPERATIONS[operation](client)
        else:
            with pytest.raises(error):
                await OPERATIONS[operation](client)
            # and again: the state does not change by being reported
            with pytest.raises(error):
                await OPERATIONS[operation](client)
        await client.aclose()  # from every state
        with pytest.raises(trio.ClosedResourceError):
            await OPERATIONS[operation](client)
        await server.aclose()


@pytest.mark.parametrize(
    "failure",
    [
        trio.BrokenResourceError("reset by peer"),
        trio.ClosedResourceError("closed under the stream"),
        ConnectionResetError("reset"),
    ],
    ids=type,
)
@pytest.mark.parametrize("direction", ["send", "receive"])
async def test_a_transport_failure_breaks_the_stream(
    failure: BaseException, direction: str
) -> None:
    with trio.fail_after(TIMEOUT):
        client, server, controlled = await _controlled_pair()
        if direction == "send":
            controlled.send_error = failure
            with pytest.raises(trio.BrokenResourceError):
                await client.send_records([b"x"])
        else:
            controlled.receive_error = failure
            with pytest.raises(trio.BrokenResourceError):
                await client.receive_records()
        controlled.send_error = controlled.receive_error = None
        # Every later operation, in both directions, says the stream is broken, even
        # the ones the transport could still do (the peer has not closed anything).
        await server.send_all(b"still there")
        for name, operation in OPERATIONS.items():
            with pytest.raises(trio.BrokenResourceError, match="broken"):
                await operation(client)
            assert name
        await client.aclose()
        await server.aclose()


async def test_a_peer_that_goes_away_breaks_the_stream() -> None:
    with trio.fail_after(TIMEOUT):
        client, server, _ = await _controlled_pair()
        await server.aclose()
        with pytest.raises(trio.BrokenResourceError):
            await client.send_all(b"nobody listens")
        # Not an end of stream: broken.
        with pytest.raises(trio.BrokenResourceError):
            await client.receive_some()
        await client.aclose()


async def test_aclose_ends_closed_even_if_the_transport_close_fails() -> None:
    with trio.fail_after(TIMEOUT):
        client, server, controlled = await _controlled_pair()
        controlled.close_error = trio.BrokenResourceError("close failed")
        with pytest.raises(trio.BrokenResourceError, match="close failed"):
            await client.aclose()
        for operation in OPERATIONS.values():
            with pytest.raises(trio.ClosedResourceError):
                await operation(client)
        await client.aclose()  # closed already: nothing more is done
        await server.aclose()


async def test_aclose_ends_closed_even_if_cancelled() -> None:
    with trio.fail_after(TIMEOUT):
        client, server, controlled = await _controlled_pair()
        controlled.close_blocks = True
        with trio.move_on_after(0.01) as scope:
            await client.aclose()
        assert scope.cancelled_caught
        for operation in OPERATIONS.values():
            with pytest.raises(trio.ClosedResourceError):
                await operation(client)
        controlled.close_blocks = False
        await client.aclose()
        await server.aclose()


async def test_aclose_while_receiving_raises_closed_in_the_receiver() -> None:
    with trio.fail_after(TIMEOUT):
        client, server, _ = await _controlled_pair()
        async with trio.open_nursery() as nursery:

            async def receive() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await client.receive_records()

            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            await client.aclose()
        await server.aclose()
