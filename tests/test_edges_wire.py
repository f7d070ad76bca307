"""The message layers at their edges: monte-v1 frames, call ids, the v2 hello, the verdict.

Each limit is tried at its value and one past it, on both sides of the boundary; the
round trips in general are property tests in ``tests/test_fuzz.py``.
"""

from __future__ import annotations

import struct

import pytest

from monte_trio import HandshakeError, LocalProtocolError, RemoteProtocolError
from monte_trio._proto import _native_hello as hello_wire
from monte_trio._proto import _wire2 as wire2
from monte_trio._proto._frames import FrameKind, MonteV1Codec, id_parity
from monte_trio._proto._noise_cipher import CipherState
from monte_trio._proto._noise_crypto import NOISE_AESGCM_NONCE, NOISE_CHACHAPOLY_NONCE, NonceFormat
from monte_trio._proto._records import RecordOpener, RecordSealer
from monte_trio._proto._session import Session
from monte_trio._proto._wire2 import Hello2

_TLV = struct.Struct(">HH")

# --- monte-v1 frames -----------------------------------------------------------------------


def test_call_id_parity_of_each_side() -> None:
    assert id_parity(True) == 1
    assert id_parity(False) == 0


@pytest.mark.parametrize("initiator", [True, False])
def test_monte_v1_reply_or_request_by_parity(initiator: bool) -> None:
    codec = MonteV1Codec(initiator=initiator, max_record_size=64)
    own, theirs = (1, 2) if initiator else (2, 1)
    for base in (0, 2**32 - 4):  # and at the top of the id space
        plaintext = struct.pack(">I", base + own) + b"p"
        assert codec.decode(plaintext) == (FrameKind.REPLY, base + own, b"p")
        plaintext = struct.pack(">I", base + theirs) + b"q"
        assert codec.decode(plaintext) == (FrameKind.REQUEST, base + theirs, b"q")
    assert codec.decode(bytes(4)) == (FrameKind.ONEWAY, 0, b"")
    assert codec.decode(bytes(4) + b"one-way") == (FrameKind.ONEWAY, 0, b"one-way")


def test_monte_v1_decode_needs_a_whole_sequence_number() -> None:
    codec = MonteV1Codec(initiator=True, max_record_size=64)
    for size in range(4):
        with pytest.raises(RemoteProtocolError, match=f"record of {size} bytes is too short"):
            codec.decode(bytes(size))


def test_monte_v1_message_of_exactly_the_maximum() -> None:
    codec = MonteV1Codec(initiator=True, max_record_size=64)
    assert codec.max_message_size == 64 - 16 - 4
    assert codec.reassembling == 0
    out: list[bytes | None] = []
    largest = bytes(range(44))
    assert codec.encode(FrameKind.REQUEST, 7, largest, out) == 48
    assert out == [struct.pack(">I", 7) + largest]
    with pytest.raises(LocalProtocolError, match=r"message of 45 bytes exceeds .* of 44"):
        codec.encode(FrameKind.REQUEST, 9, largest + b"!", out)
    assert len(out) == 1


def test_monte_v1_sends_only_its_three_kinds() -> None:
    codec = MonteV1Codec(initiator=False, max_record_size=64)
    assert codec.kinds == {FrameKind.ONEWAY, FrameKind.REQUEST, FrameKind.REPLY}
    out: list[bytes | None] = []
    for kind in (FrameKind.ONEWAY, FrameKind.REQUEST, FrameKind.REPLY):
        assert codec.encode(kind, 2, b"", out) == 4
    for kind in FrameKind:
        if kind > FrameKind.REPLY:
            with pytest.raises(LocalProtocolError, match=f"cannot send {kind.name} frames"):
                codec.encode(kind, 2, b"", out)
    assert len(out) == 3


# --- the accepting side's call ids ---------------------------------------------------------


def _session(*, initiator: bool, first_id: int | None = None) -> Session:
    return Session(
        initiator=initiator, local=Hello2(), peer=Hello2(), keepalive_interval=None,
        first_id=first_id,
    )  # fmt: skip


@pytest.mark.parametrize("initiator", [True, False])
def test_each_side_allocates_ids_of_its_own_parity(initiator: bool) -> None:
    session = _session(initiator=initiator)
    ids = [session.send_request(b"") for _ in range(4)]
    assert ids == ([1, 3, 5, 7] if initiator else [2, 4, 6, 8])


def test_the_accepting_side_stays_even_up_to_the_id_limit() -> None:
    session = _session(initiator=False, first_id=wire2.ID_LIMIT - 2)
    assert session.send_request(b"") == wire2.ID_LIMIT - 2
    assert session.send_request(b"") == wire2.ID_LIMIT
    assert not session.can_open  # it retires the connection instead of wrapping
    with pytest.raises(ValueError, match="wrong parity"):
        _session(initiator=False, first_id=wire2.ID_LIMIT - 1)
    with pytest.raises(ValueError, match="wrong parity"):
        _session(initiator=True, first_id=2)


# --- the version 2 hello -------------------------------------------------------------------


def test_hello_encoding_is_every_field_in_type_order() -> None:
    data = Hello2().encode()
    sizes = [2, 4, 4, 8, 8, 4, 4, 8]
    assert len(data) == 4 * 8 + sum(sizes)
    offset = 0
    for type_, size in enumerate(sizes, start=1):
        assert _TLV.unpack_from(data, offset) == (type_, size)
        offset += 4 + size
    assert data[4:6] == b"\x00\x02"  # the version, big-endian
    assert Hello2.decode(data) == Hello2()


def test_hello_defaults() -> None:
    m = 16 * 1024 * 1024
    assert Hello2() == Hello2(
        version=2, max_record_size=65535, max_message_size=m, request_window=2 * (m + 64),
        reply_window=m + 64, max_calls=128, nested_allowance=1, features=0,
    )  # fmt: skip
    assert wire2.default_request_window(1000) == 2128
    assert wire2.default_reply_window(1000) == 1064


def _limits(**fields: int) -> Hello2:
    m = fields.get("max_message_size", 1024)
    base = {
        "max_record_size": 1024,
        "max_message_size": m,
        "request_window": wire2.default_request_window(m),
        "reply_window": wire2.default_reply_window(m),
        "max_calls": 1,
        "nested_allowance": 1,
    }
    return Hello2(**(base | fields))


@pytest.mark.parametrize(
    ("field", "lowest", "highest"),
    [
        ("max_record_size", 1024, 65535),
        ("max_message_size", 1024, 2**32 - 1),
        ("max_calls", 1, 2**31),
        ("nested_allowance", 1, 2**16),
        ("request_window", wire2.default_request_window(1024), 2**62),
        ("reply_window", wire2.default_reply_window(1024), 2**62),
    ],
)
def test_hello_limits_at_their_edges(field: str, lowest: int, highest: int) -> None:
    for good in (lowest, highest):
        hello = _limits(**{field: good})
        if field == "max_message_size" and good == highest:
            hello = _limits(
                max_message_size=good, request_window=2**62, reply_window=2**62
            )  # the windows' floors grow with it
        hello.check()
        assert Hello2.decode(hello.encode()) == hello
    for bad in (lowest - 1, highest + 1):
        hello = _limits(**{field: bad})
        with pytest.raises(RemoteProtocolError, match=f"{field} {bad}, outside .* {lowest}\\."):
            hello.check()


def test_hello_windows_grow_with_the_message_size() -> None:
    m = 5000
    _limits(max_message_size=m).check()
    for field in ("request_window", "reply_window"):
        low = getattr(_limits(max_message_size=m), field)
        with pytest.raises(RemoteProtocolError, match=f"{field} {low - 1}, outside"):
            _limits(max_message_size=m, **{field: low - 1}).check()


def test_hello_decode_refusals() -> None:
    data = Hello2().encode()
    with pytest.raises(RemoteProtocolError, match="truncated inside a TLV header"):
        Hello2.decode(data + b"\x00\x64\x00")
    with pytest.raises(RemoteProtocolError, match="hello field 100 truncated"):
        Hello2.decode(data + _TLV.pack(100, 2) + b"\x00")
    # An unknown type is skipped, whatever its length (here exactly what remains).
    assert Hello2.decode(data + _TLV.pack(100, 3) + b"abc") == Hello2()
    assert Hello2.decode(_TLV.pack(200, 0) + data) == Hello2()
    assert Hello2.decode(data + _TLV.pack(100, 0)) == Hello2()  # a bare header, last
    with pytest.raises(RemoteProtocolError, match="field version has 3 bytes, not 2"):
        Hello2.decode(_TLV.pack(1, 3) + b"\x00\x00\x02" + data[6:])
    with pytest.raises(RemoteProtocolError, match="field version appears twice"):
        Hello2.decode(data + data[:6])
    with pytest.raises(RemoteProtocolError, match=r"lacks max_calls, nested_allowance$"):
        Hello2.decode(data[: -(4 + 4) - (4 + 4) - (4 + 8)] + data[-(4 + 8) :])
    with pytest.raises(RemoteProtocolError, match="lacks version, max_record_size"):
        Hello2.decode(b"")
    with pytest.raises(RemoteProtocolError, match="max_record_size 1023"):
        Hello2.decode(_limits(max_record_size=1023).encode())


def test_prologue_binds_version_name_and_preamble() -> None:
    assert wire2.prologue("Noise_X", b"PRE") == b"monte_trio native/\x02\x00Noise_XPRE"


# --- the verdict and the preamble ----------------------------------------------------------


def test_a_verdict_reason_of_exactly_1024_bytes_is_kept_whole() -> None:
    reason = "r" * 1024
    encoded = hello_wire.encode_verdict(False, reason)
    assert encoded == b"\x01" + reason.encode()
    assert hello_wire.decode_verdict(encoded) == (False, reason)


def test_a_verdict_reason_is_cut_at_1024_bytes() -> None:
    encoded = hello_wire.encode_verdict(False, "r" * 5000, max_size=10_000)
    assert encoded == b"\x01" + b"r" * 1024
    # on a character boundary: 1 + 2 * 511 bytes, the next "é" would end at byte 1025
    encoded = hello_wire.encode_verdict(False, "x" + "é" * 600, max_size=10_000)
    assert encoded == b"\x01" + ("x" + "é" * 511).encode()
    assert len(encoded) == 1 + 1023


def test_a_verdict_reason_fits_the_record() -> None:
    assert hello_wire.encode_verdict(False, "abcdef", max_size=4) == b"\x01abc"
    assert hello_wire.encode_verdict(False, "abcdef", max_size=7) == b"\x01abcdef"
    assert hello_wire.encode_verdict(False, "abcdef", max_size=1) == b"\x01"
    assert hello_wire.encode_verdict(False, "abcdef", max_size=0) == b"\x01"
    assert hello_wire.encode_verdict(True, "ignored", max_size=0) == b"\x00"
    assert hello_wire.encode_verdict(False) == b"\x01"


def test_decode_verdict_edges() -> None:
    assert hello_wire.decode_verdict(b"\x00") == (True, "")
    assert hello_wire.decode_verdict(b"\x01" + b"y" * 1024) == (False, "y" * 1024)
    with pytest.raises(RemoteProtocolError, match="reason of 1025 bytes, more than the 1024"):
        hello_wire.decode_verdict(b"\x01" + b"y" * 1025)
    for bad in (b"", b"\x02", b"\xff reason"):
        with pytest.raises(RemoteProtocolError, match="not a handshake verdict"):
            hello_wire.decode_verdict(bad)
    assert hello_wire.decode_verdict(b"\x01\xff!") == (False, "\ufffd!")


@pytest.mark.parametrize(
    ("text", "limit", "expected"),
    [
        ("abc", 3, b"abc"),
        ("abc", 2, b"ab"),
        ("abc", 0, b""),
        ("abc", -1, b""),
        ("é", 1, b""),
        ("aé", 2, b"a"),
        ("aé", 3, "aé".encode()),
        ("€x", 3, "€".encode()),
        ("€x", 2, b""),
        ("\ud800", 1, b"?"),  # not encodable: replaced
    ],
)
def test_fit_text(text: str, limit: int, expected: bytes) -> None:
    assert hello_wire.fit_text(text, limit) == expected


def test_preamble_round_trip_and_refusals() -> None:
    assert hello_wire.encode_preamble(1) == b"MNTRIO\x02\x01"
    assert hello_wire.encode_preamble(3, version=9) == b"MNTRIO\x09\x03"
    assert hello_wire.decode_preamble(b"MNTRIO\x07\x05", who="server") == (7, 5)
    for bad in (b"MNTRIO\x02", b"MNTRIO\x02\x00\x00", b"MNTRIX\x02\x00"):
        with pytest.raises(HandshakeError) as refused:
            hello_wire.decode_preamble(bad, who="server")
        assert str(refused.value) == (
            "the server does not speak the monte_trio native profile; it may be a monte-v1 "
            "(Go monte) server: use the monte-v1 profile to talk to it"
        )
        with pytest.raises(HandshakeError) as refused:
            hello_wire.decode_preamble(bad, who="client")
        assert str(refused.value) == (
            "the client does not speak the monte_trio native profile; it may be a monte-v1 "
            "(Go monte) client, which this server does not accept"
        )


def test_protocol_names() -> None:
    assert hello_wire.protocol_name(psk=False) == "Noise_XX_25519_AESGCM_BLAKE2b"
    assert hello_wire.protocol_name(psk=True, cipher="ChaChaPoly") == (
        "Noise_XXpsk3_25519_ChaChaPoly_BLAKE2b"
    )


@pytest.mark.parametrize("cipher", ["AESGCM", "ChaChaPoly"])
def test_transport_caps_records_and_starts_at_the_split_counters(cipher: str) -> None:
    send, receive = CipherState(cipher, bytes(32)), CipherState(cipher, bytes(32))
    send.set_nonce(5)
    receive.set_nonce(7)
    sealer, opener = hello_wire.transport(
        send, receive, peer_max_record=70_000, own_max_record=2048
    )
    assert (sealer.max_record_size, opener.max_record_size) == (65535, 2048)
    assert (sealer.counter, opener.counter) == (5, 7)
    # Same key both ways here: what one seals at counter 7, the other opens.
    twin, _ = hello_wire.transport(receive, send, peer_max_record=100, own_max_record=100)
    assert twin.max_record_size == 100
    assert opener.receive_data(twin.seal(b"hi")) == [b"hi"]
    # The nonce layout follows the cipher: a record body is Noise's encryption at the
    # record's counter (the two layouts differ for any counter but 0).
    noise = CipherState(cipher, bytes(32))
    noise.set_nonce(5)
    assert sealer.seal(b"x")[4:] == noise.encrypt_with_ad(b"", b"x")


@pytest.mark.parametrize("cipher", ["AESGCM", "ChaChaPoly"])
def test_transport_rekeys_both_directions_at_the_interval(cipher: str) -> None:
    interval = hello_wire.REKEY_INTERVAL
    assert interval == 1 << 20
    key = bytes(range(32))
    send, receive = CipherState(cipher, key), CipherState(cipher, key)
    send.set_nonce(interval - 1)
    receive.set_nonce(interval - 1)
    sealer, opener = hello_wire.transport(send, receive, peer_max_record=1024, own_max_record=1024)
    # What a peer that rekeys at the interval sends, and expects.
    peer_sealer = RecordSealer(
        key, opener_nonce(cipher), max_record_size=1024, counter=interval - 1,
        rekey_interval=interval,
    )  # fmt: skip
    peer_opener = RecordOpener(
        key, opener_nonce(cipher), max_record_size=1024, counter=interval - 1,
        rekey_interval=interval,
    )  # fmt: skip
    assert opener.receive_data(peer_sealer.seal_many([b"old key", b"new key"])) == [
        b"old key",
        b"new key",
    ]
    assert peer_opener.receive_data(sealer.seal_many([b"old", b"new"])) == [b"old", b"new"]


def opener_nonce(cipher: str) -> NonceFormat:
    return NOISE_AESGCM_NONCE if cipher == "AESGCM" else NOISE_CHACHAPOLY_NONCE


def test_transport_needs_keys() -> None:
    with pytest.raises(LocalProtocolError, match="no key"):
        hello_wire.transport(
            CipherState("AESGCM", None), CipherState("AESGCM", bytes(32)),
            peer_max_record=100, own_max_record=100,
        )  # fmt: skip
    with pytest.raises(LocalProtocolError, match="no key"):
        hello_wire.transport(
            CipherState("AESGCM", bytes(32)), CipherState("AESGCM", None),
            peer_max_record=100, own_max_record=100,
        )  # fmt: skip


# --- the hello's optional fields: codec (9) and streams (10-12) -----------------------------


def _tlv(type_: int, value: int, size: int) -> bytes:
    return _TLV.pack(type_, size) + value.to_bytes(size, "big")


def _streams_hello(**fields: int) -> Hello2:
    values = {"max_streams": 1, "stream_window": 2**18, "data_window": 2**24, **fields}
    return Hello2(**values)


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"max_streams": 2**31}, None),
        (
            {"max_streams": 2**31 + 1},
            "max_streams 2147483649, outside the allowed range 0..2147483648",
        ),
        (
            {"stream_window": wire2.MIN_STREAM_WINDOW, "data_window": 2 * wire2.MIN_STREAM_WINDOW},
            None,
        ),
        ({"stream_window": wire2.MIN_STREAM_WINDOW - 1}, "stream_window 1023, outside"),
        (
            {"stream_window": wire2.MAX_STREAM_WINDOW, "data_window": 2 * wire2.MAX_STREAM_WINDOW},
            None,
        ),
        (
            {"stream_window": wire2.MAX_STREAM_WINDOW + 1, "data_window": 2**62},
            "stream_window 1073741825",
        ),
        ({"data_window": 2 * 2**18}, None),
        ({"data_window": 2 * 2**18 - 1}, "data_window 524287, outside the allowed range 524288.."),
        ({"data_window": 2**62}, None),
        (
            {"data_window": 2**62 + 1},
            f"data_window {2**62 + 1}, outside the allowed range 524288..{2**62}",
        ),
    ],
)
def test_stream_fields_at_their_edges(fields: dict[str, int], problem: str | None) -> None:
    data = _streams_hello(**fields).encode()
    if problem is None:
        decoded = Hello2.decode(data)
        for name, value in fields.items():
            assert getattr(decoded, name) == value
    else:
        with pytest.raises(RemoteProtocolError, match=problem.replace("..", r"\.\.")):
            Hello2.decode(data)


def test_codec_twice_is_refused_and_fields_after_it_are_read() -> None:
    with_codec = _streams_hello(max_streams=3, codec=2)
    decoded = Hello2.decode(with_codec.encode())  # codec (9) comes before 10-12
    assert (decoded.codec, decoded.max_streams) == (2, 3)
    base = Hello2(codec=2).encode()
    with pytest.raises(RemoteProtocolError, match="hello field codec appears twice"):
        Hello2.decode(base + _tlv(9, 2, 2))


def test_stream_fields_without_max_streams_mean_nothing() -> None:
    defaults = Hello2()
    data = defaults.encode() + _tlv(10, 5000, 4) + _tlv(12, 7 * 2**20, 8)  # max_streams absent
    decoded = Hello2.decode(data)
    assert decoded.max_streams == 0
    assert (decoded.stream_window, decoded.data_window) == (
        defaults.stream_window,
        defaults.data_window,
    )
