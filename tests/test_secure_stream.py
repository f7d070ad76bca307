"""SecureStream: the trio Stream contract, the record API, and hostile input."""

from __future__ import annotations

import struct

import pytest
import trio
import trio.testing

import monte_trio
from monte_trio import DecryptionError, Handshake, RemoteProtocolError, SecureStream
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
        # Broken for good: even a valid record later is refused.
        await raw.send_all(sealer.seal(b"\x00\x00\x00\x00again"))
        with pytest.raises(DecryptionError):
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
