"""The record layer at its edges: sizes at the limits, end of stream, the rekey schedule.

The round trips in any chunking and the hostile inputs are property tests in
``tests/test_fuzz.py``; these are the boundaries a mutation review found untested. The
expected ciphertexts come from an oracle independent of the code under test: the AEADs of
``cryptography`` with nonces packed here, and Noise's ``REKEY`` written out from the spec.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from monte_trio import DecryptionError, LocalProtocolError, RemoteProtocolError
from monte_trio._proto import _native_hello as wire
from monte_trio._proto._noise_cipher import CipherState
from monte_trio._proto._noise_crypto import NOISE_AESGCM_NONCE, NOISE_CHACHAPOLY_NONCE, NonceFormat
from monte_trio._proto._records import (
    MONTE_V1_NONCE,
    TAG_SIZE,
    RecordOpener,
    RecordSealer,
)
from monte_trio._proto._wire2 import MAX_RECORD

KEY = bytes(range(32))
_LENGTH = struct.Struct(">I")
INTERVAL = wire.REKEY_INTERVAL  # the native profile's: 2**20 records
assert INTERVAL == 1 << 20

# cipher name -> (our NonceFormat, an independent AEAD and nonce packing)
Oracle = tuple[Callable[[bytes], AESGCM | ChaCha20Poly1305], Callable[[int], bytes]]
ORACLES: dict[str, tuple[NonceFormat, Oracle]] = {
    "AESGCM": (NOISE_AESGCM_NONCE, (AESGCM, lambda n: bytes(4) + n.to_bytes(8, "big"))),
    "ChaChaPoly": (
        NOISE_CHACHAPOLY_NONCE,
        (ChaCha20Poly1305, lambda n: bytes(4) + n.to_bytes(8, "little")),
    ),
}


def oracle_rekey(cipher: str, key: bytes) -> bytes:
    """Noise section 4.2: REKEY(k) = ENCRYPT(k, 2**64 - 1, zero-length ad, 32 zeros)[:32]."""
    aead, nonce = ORACLES[cipher][1]
    return aead(key).encrypt(nonce(2**64 - 1), bytes(32), b"")[:32]


def oracle_record(cipher: str, key: bytes, counter: int, plaintext: bytes) -> bytes:
    aead, nonce = ORACLES[cipher][1]
    body = aead(key).encrypt(nonce(counter), plaintext, None)
    return _LENGTH.pack(len(body)) + body


def feed(opener: RecordOpener, data: bytes, *, bytewise: bool) -> list[bytes]:
    """Feed ``data`` whole, or one byte at a time (the buffered path of the opener)."""
    if not bytewise:
        return opener.receive_data(data)
    out: list[bytes] = []
    for i in range(len(data)):
        out.extend(opener.receive_data(data[i : i + 1]))
    return out


# --- sizes at the edges ------------------------------------------------------------------


def test_a_record_size_equal_to_the_tag_is_refused_by_both() -> None:
    for make in (RecordSealer, RecordOpener):
        with pytest.raises(ValueError, match=f"must exceed {TAG_SIZE}"):
            make(KEY, MONTE_V1_NONCE, max_record_size=TAG_SIZE)


def test_a_record_size_of_tag_plus_one_carries_one_byte() -> None:
    sealer = RecordSealer(KEY, MONTE_V1_NONCE, max_record_size=TAG_SIZE + 1)
    opener = RecordOpener(KEY, MONTE_V1_NONCE, max_record_size=TAG_SIZE + 1)
    assert sealer.max_plaintext == 1
    data = sealer.seal_many([b"", b"x", b""])
    assert opener.receive_data(data) == [b"", b"x", b""]
    with pytest.raises(LocalProtocolError, match="exceeds the maximum of 1"):
        sealer.seal(b"xy")


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_an_empty_record_is_exactly_the_tag_and_is_accepted(bytewise: bool) -> None:
    sealed = RecordSealer(KEY, MONTE_V1_NONCE, max_record_size=64).seal_many([b"", b""])
    assert sealed[:4] == _LENGTH.pack(TAG_SIZE)
    assert len(sealed) == 2 * (4 + TAG_SIZE)
    opener = RecordOpener(KEY, MONTE_V1_NONCE, max_record_size=64)
    assert feed(opener, sealed, bytewise=bytewise) == [b"", b""]
    assert opener.receive_data(b"") == []


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize("max_record", [TAG_SIZE + 1, 17 + 1000, MAX_RECORD])
def test_a_message_of_exactly_the_maximum(bytewise: bool, max_record: int) -> None:
    sealer = RecordSealer(KEY, NOISE_AESGCM_NONCE, max_record_size=max_record)
    opener = RecordOpener(KEY, NOISE_AESGCM_NONCE, max_record_size=max_record)
    largest = bytes(range(256)) * (max_record // 256) + bytes(max_record % 256)
    largest = largest[: max_record - TAG_SIZE]
    assert len(largest) == sealer.max_plaintext == max_record - TAG_SIZE
    data = sealer.seal_many([largest, b""])
    assert data[:4] == _LENGTH.pack(max_record)
    assert feed(opener, data, bytewise=bytewise) == [largest, b""]
    # One byte more is refused, and nothing of the batch is sealed: no nonce is spent, so
    # the records sealed next still open on the peer.
    with pytest.raises(LocalProtocolError, match=f"exceeds the maximum of {max_record - 16}"):
        sealer.seal_many([b"", largest + b"!"])
    assert sealer.counter == 2
    assert opener.receive_data(sealer.seal(b"")) == [b""]


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_a_length_one_past_the_maximum_is_refused(bytewise: bool) -> None:
    big = RecordSealer(KEY, MONTE_V1_NONCE, max_record_size=101).seal(bytes(85))
    opener = RecordOpener(KEY, MONTE_V1_NONCE, max_record_size=100)
    with pytest.raises(RemoteProtocolError, match=r"length 101 is outside .* 16\.\.100"):
        feed(opener, big, bytewise=bytewise)
    assert opener.buffered == 0


# --- end of stream -----------------------------------------------------------------------


def test_receive_data_after_end_of_stream_is_refused() -> None:
    sealer = RecordSealer(KEY, MONTE_V1_NONCE, max_record_size=64)
    opener = RecordOpener(KEY, MONTE_V1_NONCE, max_record_size=64)
    assert opener.receive_data(sealer.seal(b"one")) == [b"one"]
    assert opener.receive_data(b"") == []
    assert opener.receive_data(b"") == []  # end of stream may be reported twice
    with pytest.raises(RuntimeError, match="after end of stream"):
        opener.receive_data(sealer.seal(b"two"))
    assert opener.buffered == 0


def test_end_of_stream_inside_a_record_is_refused() -> None:
    record = RecordSealer(KEY, MONTE_V1_NONCE, max_record_size=64).seal(b"cut")
    for cut in (1, 4, len(record) - 1):
        opener = RecordOpener(KEY, MONTE_V1_NONCE, max_record_size=64)
        assert opener.receive_data(record[:cut]) == []
        with pytest.raises(RemoteProtocolError, match=f"middle of a record .{cut} bytes"):
            opener.receive_data(b"")


# --- the rekey schedule, past record 2**20 of a direction --------------------------------


@pytest.mark.parametrize("cipher", sorted(ORACLES))
def test_records_past_the_rekey_interval_match_the_spec(cipher: str) -> None:
    fmt = ORACLES[cipher][0]
    sealer = RecordSealer(
        KEY, fmt, max_record_size=64, counter=INTERVAL - 1, rekey_interval=INTERVAL
    )
    once = oracle_rekey(cipher, KEY)
    twice = oracle_rekey(cipher, once)
    assert once != KEY
    expected = oracle_record(cipher, KEY, INTERVAL - 1, b"last of key 0")
    expected += oracle_record(cipher, once, INTERVAL, b"first of key 1")
    assert sealer.seal_many([b"last of key 0", b"first of key 1"]) == expected
    # The next rekey comes INTERVAL records later, not sooner.
    sealer = RecordSealer(
        once, fmt, max_record_size=64, counter=2 * INTERVAL - 2, rekey_interval=INTERVAL
    )
    assert sealer.seal_many([b"a", b"b", b"c"]) == (
        oracle_record(cipher, once, 2 * INTERVAL - 2, b"a")
        + oracle_record(cipher, once, 2 * INTERVAL - 1, b"b")
        + oracle_record(cipher, twice, 2 * INTERVAL, b"c")
    )
    opener = RecordOpener(
        KEY, fmt, max_record_size=64, counter=INTERVAL - 1, rekey_interval=INTERVAL
    )
    assert opener.receive_data(expected) == [b"last of key 0", b"first of key 1"]


@pytest.mark.parametrize("cipher", sorted(ORACLES))
@pytest.mark.parametrize("off", ["sealer", "opener"])
def test_rekey_switched_off_on_one_side_is_detected(cipher: str, off: str) -> None:
    fmt = ORACLES[cipher][0]
    start = INTERVAL - 2
    sealer = RecordSealer(
        KEY,
        fmt,
        max_record_size=64,
        counter=start,
        rekey_interval=None if off == "sealer" else INTERVAL,
    )
    opener = RecordOpener(
        KEY,
        fmt,
        max_record_size=64,
        counter=start,
        rekey_interval=None if off == "opener" else INTERVAL,
    )
    # Both agree up to the interval, and part at its first record.
    assert opener.receive_data(sealer.seal_many([b"a", b"b"])) == [b"a", b"b"]
    with pytest.raises(DecryptionError):
        opener.receive_data(sealer.seal(b"c"))


@pytest.mark.parametrize("cipher", sorted(ORACLES))
def test_the_native_transport_rekeys_every_interval(cipher: str) -> None:
    # The records of the native profile, made from Noise's split cipher states.
    send, receive = CipherState(cipher, KEY), CipherState(cipher, bytes(32))
    send.set_nonce(INTERVAL - 1)
    sealer, _ = wire.transport(send, receive, peer_max_record=2048, own_max_record=2048)
    assert sealer.seal_many([b"x", b"y"]) == oracle_record(
        cipher, KEY, INTERVAL - 1, b"x"
    ) + oracle_record(cipher, oracle_rekey(cipher, KEY), INTERVAL, b"y")


@pytest.mark.parametrize("cipher", sorted(ORACLES))
@pytest.mark.parametrize("start", [0, 2, 5])
def test_every_interval_rekeys_again(cipher: str, start: int) -> None:
    # A short interval, so that one sealer and one opener cross several rekeys.
    fmt = ORACLES[cipher][0]
    plaintexts: list[bytes | None] = [bytes([i]) for i in range(10)]
    keys = [KEY]
    for _ in range(4):
        keys.append(oracle_rekey(cipher, keys[-1]))
    # the key of counter n is the one after n // 3 rekeys, counted from the start's key
    expected = b"".join(
        oracle_record(cipher, keys[n // 3 - start // 3], n, bytes([n - start]))
        for n in range(start, start + 10)
    )
    sealer = RecordSealer(KEY, fmt, max_record_size=64, counter=start, rekey_interval=3)
    assert sealer.seal_many(plaintexts) == expected
    opener = RecordOpener(KEY, fmt, max_record_size=64, counter=start, rekey_interval=3)
    assert feed(opener, expected, bytewise=True) == plaintexts
