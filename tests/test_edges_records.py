"""The record opener's incremental decoding at every split point, and the counters' ends.

``tests/test_records.py`` feeds records whole or one byte at a time; a chunk boundary can
also fall inside a length prefix or a body with more records behind it in the same chunk,
which is the path that copies just the bytes a buffered record lacks. The nonce counter's
last value and the shortest rekey interval are checked here too.
"""

from __future__ import annotations

import struct

import pytest

from monte_trio import DecryptionError, LocalProtocolError, RemoteProtocolError
from monte_trio._proto._noise_crypto import NOISE_AESGCM_NONCE
from monte_trio._proto._records import (
    MONTE_V1_NONCE,
    NONCE_LIMIT,
    TAG_SIZE,
    RecordOpener,
    RecordSealer,
)

KEY = bytes(range(32))
_LENGTH = struct.Struct(">I")
PLAINTEXTS = [b"first", b"", b"third record", b"4"]


def sealed(plaintexts: list[bytes] = PLAINTEXTS) -> bytes:
    return RecordSealer(KEY, MONTE_V1_NONCE, max_record_size=64).seal_many(list(plaintexts))


def opener() -> RecordOpener:
    return RecordOpener(KEY, MONTE_V1_NONCE, max_record_size=64)


# --- chunk boundaries ----------------------------------------------------------------------


def test_every_split_into_two_chunks() -> None:
    data = sealed()
    for cut in range(len(data) + 1):
        o = opener()
        got = o.receive_data(data[:cut]) if cut else []
        got += o.receive_data(data[cut:]) if cut < len(data) else []
        assert got == PLAINTEXTS, f"cut at {cut}"
        assert o.buffered == 0, f"cut at {cut}"


def test_every_split_into_three_chunks() -> None:
    data = sealed(PLAINTEXTS[:3])
    for a in range(1, len(data)):
        for b in range(a + 1, len(data)):
            o = opener()
            got = o.receive_data(data[:a]) + o.receive_data(data[a:b])
            got += o.receive_data(data[b:])
            assert got == PLAINTEXTS[:3], f"cuts at {a}, {b}"


def test_buffered_counts_only_the_incomplete_tail() -> None:
    data = sealed()
    first = 4 + len(PLAINTEXTS[0]) + TAG_SIZE
    o = opener()
    assert o.receive_data(data[:2]) == []
    assert o.buffered == 2
    assert o.receive_data(data[2 : first + 3]) == [b"first"]
    assert o.buffered == 3
    assert o.receive_data(data[first + 3 :]) == PLAINTEXTS[1:]
    assert o.buffered == 0
    assert o.receive_data(b"") == []


@pytest.mark.parametrize("length", [TAG_SIZE - 1, 65, 2**32 - 1])
def test_a_bad_length_is_refused_as_soon_as_its_four_bytes_arrive(length: int) -> None:
    # Whole, and completing a buffered prefix: nothing more is waited for.
    for chunks in ([_LENGTH.pack(length)], [_LENGTH.pack(length)[:1], _LENGTH.pack(length)[1:]]):
        o = opener()
        for chunk in chunks[:-1]:
            assert o.receive_data(chunk) == []
        with pytest.raises(RemoteProtocolError, match=f"record length {length} is outside"):
            o.receive_data(chunks[-1])


def test_a_good_length_alone_waits_for_its_body() -> None:
    o = opener()
    assert o.receive_data(_LENGTH.pack(64)) == []  # exactly the maximum: accepted
    assert o.buffered == 4


# --- an opener that failed stays failed ----------------------------------------------------


def test_after_a_bad_record_every_call_raises_the_same_error() -> None:
    data = bytearray(sealed())
    data[6] ^= 1  # inside the first record's body
    o = opener()
    with pytest.raises(DecryptionError) as first:
        o.receive_data(bytes(data))
    assert o.buffered == 0
    for again in (sealed(), b""):  # good records, or end of stream: the same error
        with pytest.raises(DecryptionError) as later:
            o.receive_data(again)
        assert later.value is first.value


def test_after_a_bad_length_every_call_raises_the_same_error() -> None:
    o = opener()
    with pytest.raises(RemoteProtocolError) as first:
        o.receive_data(_LENGTH.pack(0))
    with pytest.raises(RemoteProtocolError) as later:
        o.receive_data(sealed())
    assert later.value is first.value


# --- sealing -------------------------------------------------------------------------------


def test_none_entries_are_skipped_anywhere_in_a_batch() -> None:
    sealer = RecordSealer(KEY, MONTE_V1_NONCE, max_record_size=64)
    data = sealer.seal_many([None, b"a", None, None, b"b", None])
    assert sealer.counter == 2
    assert opener().receive_data(data) == [b"a", b"b"]
    assert sealer.seal_many([None]) == b""
    assert sealer.counter == 2


# --- the counters' ends --------------------------------------------------------------------


@pytest.mark.parametrize("interval", [None, 1 << 20])
def test_the_last_nonce_is_never_used(interval: int | None) -> None:
    sealer = RecordSealer(
        KEY, NOISE_AESGCM_NONCE, max_record_size=64, counter=NONCE_LIMIT - 1,
        rekey_interval=interval,
    )  # fmt: skip
    last = sealer.seal(b"last")
    with pytest.raises(LocalProtocolError, match="nonce counter exhausted"):
        sealer.seal(b"one too many")
    assert sealer.counter == NONCE_LIMIT
    o = RecordOpener(
        KEY, NOISE_AESGCM_NONCE, max_record_size=64, counter=NONCE_LIMIT - 1,
        rekey_interval=interval,
    )  # fmt: skip
    assert o.receive_data(last) == [b"last"]
    # A peer that goes on (with any key) is refused before decryption is tried.
    forged = RecordSealer(KEY, NOISE_AESGCM_NONCE, max_record_size=64).seal(b"x")
    with pytest.raises(RemoteProtocolError, match="exhausted the nonce counter"):
        o.receive_data(forged)


def test_a_rekey_interval_of_one_rekeys_every_record_within_one_chunk() -> None:
    sealer = RecordSealer(KEY, NOISE_AESGCM_NONCE, max_record_size=64, rekey_interval=1)
    plaintexts: list[bytes | None] = [bytes([i]) * i for i in range(6)]
    data = sealer.seal_many(plaintexts)
    o = RecordOpener(KEY, NOISE_AESGCM_NONCE, max_record_size=64, rekey_interval=1)
    assert o.receive_data(data) == plaintexts
    # Every record has its own key: none opens with the schedule of another interval.
    two = RecordOpener(KEY, NOISE_AESGCM_NONCE, max_record_size=64, rekey_interval=2)
    with pytest.raises(DecryptionError):
        two.receive_data(data)


@pytest.mark.parametrize("interval", [0, -1])
def test_a_rekey_interval_below_one_is_refused(interval: int) -> None:
    for make in (RecordSealer, RecordOpener):
        with pytest.raises(ValueError, match="rekey_interval must be a positive"):
            make(KEY, NOISE_AESGCM_NONCE, max_record_size=64, rekey_interval=interval)


def test_keys_must_be_32_bytes() -> None:
    for key in (KEY[:31], KEY + b"!"):
        with pytest.raises(ValueError, match=f"record keys are 32 bytes, got {len(key)}"):
            RecordSealer(key, NOISE_AESGCM_NONCE, max_record_size=64)
