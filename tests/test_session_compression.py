"""Per-message compression in the sans-IO session (docs/wire-native.rst, "Compression"):
what is compressed and flagged, what the receiver refuses, and that every byte of credit
is charged and returned once, by the size before compression. No event loop. Tests that
need a codec's package skip without it (``pip install monte_trio[compression]``)."""

from __future__ import annotations

import json
import os
import random
import struct
from pathlib import Path
from typing import Any

import pytest
from helpers import json_body
from hypothesis import given, settings
from hypothesis import strategies as st

from monte_trio import RemoteProtocolError
from monte_trio._proto import _compression as comp
from monte_trio._proto import _session as S
from monte_trio._proto._calls import SHAPE_BIDIRECTIONAL
from monte_trio._proto._wire2 import (
    FLAG_END,
    FLAG_MORE,
    FLAG_NESTED,
    MESSAGE_COST,
    SLICE,
    CreditLimit,
    ErrorCode,
    Hello2,
    Kind,
)

MP = 65535 - 16
HDR = struct.Struct(">BBHI")
C = comp.FLAG_COMPRESSED
LZ4 = int(comp.CompressionId.LZ4)
ZSTD = int(comp.CompressionId.ZSTD)
needs_lz4 = pytest.mark.skipif(not comp.is_available(LZ4), reason="lz4 is not installed")
needs_zstd = pytest.mark.skipif(not comp.is_available(ZSTD), reason="zstandard is not installed")
CODECS = [
    pytest.param(LZ4, marks=needs_lz4, id="lz4"),
    pytest.param(ZSTD, marks=needs_zstd, id="zstd"),
]
VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parent / "vectors" / "native-v2.json").read_text()
)["compression"]


def pair(
    a_codecs: tuple[int, ...] = (LZ4, ZSTD),
    b_codecs: tuple[int, ...] | None = None,
    **hello_kw: Any,
) -> tuple[S.Session, S.Session]:
    """(initiator a, responder b), each announcing its codecs; ``threshold`` is the
    sessions' compression threshold."""
    threshold = hello_kw.pop("threshold", comp.DEFAULT_THRESHOLD)
    hello_kw.setdefault("max_streams", 8)
    if "max_message_size" in hello_kw:  # the windows' floors follow M
        m = hello_kw["max_message_size"]
        hello_kw.setdefault("request_window", 2 * (m + MESSAGE_COST))
        hello_kw.setdefault("reply_window", m + MESSAGE_COST)
    ha = Hello2(compression=a_codecs, **hello_kw)
    hb = Hello2(compression=a_codecs if b_codecs is None else b_codecs, **hello_kw)
    kw: dict[str, Any] = {"keepalive_interval": None, "compression_threshold": threshold}
    return (
        S.Session(initiator=True, local=ha, peer=hb, **kw),
        S.Session(initiator=False, local=hb, peer=ha, **kw),
    )


def frames(plaintexts: list[bytes]) -> list[tuple[int, int, int, int, bytes]]:
    """(kind, flags, length, id, payload) of every frame."""
    out = []
    for pt in plaintexts:
        off = 0
        while off < len(pt):
            kind, flags, length, ident = HDR.unpack_from(pt, off)
            out.append((kind, flags, length, ident, pt[off + 8 : off + 8 + length]))
            off += 8 + length
    return out


def message_frames(plaintexts: list[bytes]) -> list[tuple[int, int, int, int, bytes]]:
    """The frames of messages (kinds below the control kinds)."""
    return [f for f in frames(plaintexts) if f[0] < 0x10]


def frame(kind: int, ident: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return HDR.pack(kind, flags, len(payload), ident) + payload


def envelope(codec: int, body: bytes) -> bytes:
    data = comp.compress(codec, body)
    assert data is not None
    return comp.ENVELOPE.pack(codec, len(body)) + data


def transfer(x: S.Session, y: S.Session, maxp: int = MP) -> tuple[list[bytes], list[S.Event]]:
    plaintexts = x.records_to_send(maxp)
    return plaintexts, y.receive_records(plaintexts)


def busy(*sessions: S.Session) -> bool:
    """Whether any of the sessions has something to send (a function: mypy would take a
    property read twice for the same value)."""
    return any(s.wants_write for s in sessions)


def refused(session: S.Session, plaintext: bytes, code: ErrorCode) -> str:
    with pytest.raises(RemoteProtocolError) as info:
        session.receive_records([plaintext])
    assert session.error_code == code
    return str(info.value)


def credit_values(plaintexts: list[bytes]) -> dict[int, int]:
    """The CREDIT frames' new limits, by limit id."""
    return {f[3]: int.from_bytes(f[4], "big") for f in frames(plaintexts) if f[0] == Kind.CREDIT}


# -- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
def test_every_message_kind_round_trips_compressed_with_the_receivers_codec(codec: int) -> None:
    """Each side compresses with the first codec of the *peer's* list that its own holds."""
    other = ZSTD if codec == LZ4 else LZ4
    a, b = pair((other, codec), (codec, other))
    body = json_body(20_000, 1)
    reply = json_body(30_000, 2)

    ident = a.send_request(body)
    assert ident is not None
    plaintexts, events = transfer(a, b)
    ((kind, flags, length, fid, payload),) = message_frames(plaintexts)
    assert (kind, flags, fid) == (Kind.REQUEST, C, ident)
    assert payload[0] == codec
    assert length < len(body) // 2
    assert events == [(S.EV_REQUEST, ident, body, 0)]

    b.consumed(ident)
    b.send_reply(ident, reply)
    plaintexts, events = transfer(b, a)
    ((kind, flags, _, _, payload),) = message_frames(plaintexts)
    assert (kind, flags, payload[0]) == (Kind.REPLY, C, other)  # a's first choice
    assert events == [(S.EV_REPLY, ident, reply, 0)]

    assert a.send_oneway(body)
    plaintexts, events = transfer(a, b)
    ((kind, flags, _, fid, _),) = message_frames(plaintexts)
    assert (kind, flags, fid) == (Kind.ONEWAY, C, 0)
    assert events == [(S.EV_ONEWAY, 0, body, 0)]


@pytest.mark.parametrize("codec", CODECS)
def test_a_nested_request_keeps_its_parent_outside_the_envelope(codec: int) -> None:
    a, b = pair((codec,))
    outer = a.send_request(b"outer")
    assert outer is not None
    transfer(a, b)
    body = json_body(5000, 3)
    nested = b.send_request(body, parent=outer)
    assert nested is not None
    plaintexts, events = transfer(b, a)
    ((kind, flags, _, _, payload),) = message_frames(plaintexts)
    assert (kind, flags) == (Kind.REQUEST, C | FLAG_NESTED)
    assert payload[:4] == outer.to_bytes(4, "big")
    assert payload[4] == codec
    assert events == [(S.EV_REQUEST, nested, body, outer)]


@pytest.mark.parametrize("codec", CODECS)
def test_a_fragmented_message_flags_only_its_first_frame(codec: int) -> None:
    """Small records: the envelope is split into a first frame (MORE | COMPRESSED, u32
    total = the envelope's length) and CONTINUATIONs without the flag."""
    a, b = pair((codec,), max_record_size=1024)
    body = os.urandom(3000) + json_body(60_000, 4)  # compresses, to more than a record
    ident = a.send_request(body)
    assert ident is not None
    plaintexts = a.records_to_send(1024 - 16)
    sent = message_frames(plaintexts)
    assert len(sent) > 3
    kind, flags, _, _, payload = sent[0]
    assert (kind, flags) == (Kind.REQUEST, FLAG_MORE | C)
    total = int.from_bytes(payload[:4], "big")
    assert total == sum(f[2] for f in sent) - 4 < len(body)
    assert all(f[0] == Kind.CONTINUATION and not f[1] & C for f in sent[1:])
    assert b.receive_records(plaintexts) == [(S.EV_REQUEST, ident, body, 0)]
    # The request window was charged by the size before compression, and only that.
    assert b.credit["request_bytes_held"] == len(body) + MESSAGE_COST


@pytest.mark.parametrize("codec", CODECS)
def test_the_threshold_decides_what_is_looked_at(codec: int) -> None:
    a, b = pair((codec,))
    for size, flagged in ((1023, False), (1024, True)):
        body = b"a" * size
        assert a.send_oneway(body)
        plaintexts, events = transfer(a, b)
        assert [f[1] for f in message_frames(plaintexts)] == [C if flagged else 0]
        assert events == [(S.EV_ONEWAY, 0, body, 0)]
    # A session's own threshold.
    a, b = pair((codec,), threshold=10_000)
    assert a.send_oneway(b"a" * 9999)
    assert [f[1] for f in message_frames(a.records_to_send(MP))] == [0]


@pytest.mark.parametrize("codec", CODECS)
def test_a_body_that_does_not_shrink_travels_as_it_is(codec: int) -> None:
    a, b = pair((codec,))
    body = os.urandom(50_000)
    ident = a.send_request(body)
    plaintexts, events = transfer(a, b)
    assert [f[1] for f in message_frames(plaintexts)] == [0]
    assert events == [(S.EV_REQUEST, ident, body, 0)]


@pytest.mark.parametrize("codec", CODECS)
def test_a_large_body_is_compressed_only_if_a_sample_of_it_shrinks(
    codec: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From 64 KiB a sample (4 x 4 KiB across the body) is tried first: random bytes are
    never compressed whole; a compressible body is."""
    seen: list[int] = []
    whole: list[int] = []
    real = comp.compress
    real_whole = comp.Compressor.compress

    def spy(codec: int, body: bytes, level: int = comp.DEFAULT_ZSTD_LEVEL) -> bytes | None:
        seen.append(len(body))
        return real(codec, body, level)

    def spy_whole(self: comp.Compressor, body: bytes) -> tuple[int, bytes]:
        whole.append(len(body))
        return real_whole(self, body)

    monkeypatch.setattr(S, "compress", spy)
    monkeypatch.setattr(comp.Compressor, "compress", spy_whole)
    a, b = pair((codec,))
    noise = os.urandom(1024 * 1024)
    text = os.urandom(20_000) + json_body(1024 * 1024)  # starts with noise: sampled across
    for body, flagged in ((noise, False), (text, True)):
        seen.clear()
        whole.clear()
        assert a.send_oneway(body)
        plaintexts, events = transfer(a, b)
        assert [f[1] & C for f in message_frames(plaintexts)][:1] == [C if flagged else 0]
        assert events == [(S.EV_ONEWAY, 0, body, 0)]
        assert seen == [16 * 1024]
        assert whole == ([len(body)] if flagged else [])
        b.consumed(0, len(body))
        transfer(b, a)


@pytest.mark.parametrize("codec", CODECS)
def test_compress_false_sends_every_kind_as_it_is(codec: int) -> None:
    a, b = pair((codec,))
    body = json_body(8000, 5)
    ident = a.send_request(body, compress=False)
    assert ident is not None
    assert a.send_oneway(body, compress=False)
    plaintexts, events = transfer(a, b)
    assert [(f[0], f[1]) for f in message_frames(plaintexts)] == [
        (Kind.REQUEST, 0),
        (Kind.ONEWAY, 0),
    ]
    assert [e[2] for e in events] == [body, body]
    b.consumed(ident)
    b.send_reply(ident, body, compress=False)
    plaintexts, events = transfer(b, a)
    assert [(f[0], f[1]) for f in message_frames(plaintexts)] == [(Kind.REPLY, 0)]
    assert events == [(S.EV_REPLY, ident, body, 0)]
    call = a.open_call(SHAPE_BIDIRECTIONAL)
    assert call is not None
    assert a.send_message(call, body, compress=False)
    plaintexts, events = transfer(a, b)
    assert [f[1] for f in message_frames(plaintexts) if f[0] == Kind.DATA] == [0]
    assert events[-1] == (S.EV_MESSAGE, call, body, len(body) + MESSAGE_COST)


@pytest.mark.parametrize(
    ("a_codecs", "b_codecs"),
    [((), (LZ4, ZSTD)), ((LZ4, ZSTD), ()), ((LZ4,), (ZSTD,))],
    ids=["a-offers-none", "b-offers-none", "no-codec-in-common"],
)
@needs_lz4
@needs_zstd
def test_without_a_codec_in_common_nothing_is_compressed(
    a_codecs: tuple[int, ...], b_codecs: tuple[int, ...]
) -> None:
    a, b = pair(a_codecs, b_codecs)
    body = json_body(10_000, 6)
    ident = a.send_request(body)
    assert ident is not None
    plaintexts, events = transfer(a, b)
    assert [f[1] for f in message_frames(plaintexts)] == [0]
    b.consumed(ident)
    b.send_reply(ident, body)
    plaintexts, events = transfer(b, a)
    assert [f[1] for f in message_frames(plaintexts)] == [0]
    assert events == [(S.EV_REPLY, ident, body, 0)]


# -- streaming calls -----------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
def test_streaming_call_messages_are_compressed_one_by_one(codec: int) -> None:
    a, b = pair((codec,))
    call = a.open_call(SHAPE_BIDIRECTIONAL)
    assert call is not None
    bodies = [os.urandom(70_000) + json_body(50_000, 7), b"tiny", json_body(5000, 8)]
    start = a.stream_credit(call)
    assert start is not None
    for body in bodies:
        assert a.send_message(call, body)
    sent_data = a.data_ledger["sent"]
    # The stream window holds the sizes before compression; the data window the bytes
    # that travel.
    after = a.stream_credit(call)
    assert after is not None
    assert start["send"] - after["send"] == sum(len(x) + MESSAGE_COST for x in bodies)
    plaintexts: list[bytes] = []
    events: list[S.Event] = []
    while a.wants_write:
        more, evs = transfer(a, b)
        plaintexts += more
        events += evs
    data = [f for f in message_frames(plaintexts) if f[0] == Kind.DATA]
    assert sum(f[2] for f in data) == sent_data < sum(map(len, bodies))
    assert b.data_ledger["received"] == sent_data
    # The first message is longer than a frame even compressed: MORE frames, and only
    # its first frame carries the flag.
    first = [f[1] for f in data[:-2]]
    assert first[0] == C | FLAG_MORE
    assert all(not f & C for f in first[1:])
    assert [f[1] for f in data[-2:]] == [0, C]  # "tiny" is under the threshold
    messages = [e for e in events if e[0] == S.EV_MESSAGE]
    assert messages == [(S.EV_MESSAGE, call, x, len(x) + MESSAGE_COST) for x in bodies]
    # What the application holds is charged by the size once decompressed, exactly.
    held = b.stream_credit(call)
    assert held is not None
    assert held["unread"] == sum(len(x) + MESSAGE_COST for x in bodies)
    for message in messages:
        b.read_done(call, message[3])  # type: ignore[arg-type]
    held = b.stream_credit(call)
    assert held is not None
    assert held["unread"] == 0


@pytest.mark.parametrize("codec", CODECS)
def test_a_compressed_message_never_starts_with_a_frame_shorter_than_its_envelope_header(
    codec: int,
) -> None:
    """A message that ends 3 bytes before the end of the turn: the compressed one after it
    waits for the next turn instead of starting with a 3-byte frame."""
    a, b = pair((codec,))
    call = a.open_call(SHAPE_BIDIRECTIONAL)
    assert call is not None
    transfer(a, b)
    filler = os.urandom(SLICE - 3)
    body = json_body(4000, 9)
    assert a.send_message(call, filler, compress=False)
    assert a.send_message(call, body, end=True)
    plaintexts: list[bytes] = []
    events: list[S.Event] = []
    while a.wants_write:
        more, evs = transfer(a, b)
        plaintexts += more
        events += evs
    data = [f for f in message_frames(plaintexts) if f[0] == Kind.DATA]
    assert [(f[1], f[2]) for f in data] == [
        (0, len(filler)),
        (C | FLAG_END, data[1][2]),
    ]
    assert [e[2] for e in events if e[0] == S.EV_MESSAGE] == [filler, body]


# -- what the receiver refuses -------------------------------------------------------------


@needs_lz4
@pytest.mark.parametrize(
    "kind", [Kind.REQUEST, Kind.ONEWAY, Kind.REPLY, Kind.DATA], ids=lambda k: k.name
)
def test_the_flag_is_refused_by_a_side_that_offered_no_codec(kind: Kind) -> None:
    a, b = pair((), (LZ4,))  # b may compress nothing towards a
    if kind == Kind.REPLY:
        ident = a.send_request(b"call")
    elif kind == Kind.DATA:
        ident = a.open_call(SHAPE_BIDIRECTIONAL)
    else:
        ident = 0 if kind == Kind.ONEWAY else 2
    assert ident is not None
    transfer(a, b)
    text = refused(a, frame(kind, ident, envelope(LZ4, b"x" * 2000), C), ErrorCode.PROTOCOL)
    assert "not allowed" in text


@needs_lz4
@pytest.mark.parametrize(
    "where",
    ["continuation", "error", "later DATA", "byte stream DATA", "control", "STREAM"],
)
def test_the_flag_is_refused_on_every_frame_but_a_messages_first(where: str) -> None:
    a, b = pair((LZ4,))
    payload = envelope(LZ4, b"x" * 2000)
    if where == "continuation":
        body = json_body(2000)
        b.receive_records(
            [frame(Kind.REQUEST, 1, len(body).to_bytes(4, "big") + body[:100], FLAG_MORE)]
        )
        plaintext = frame(Kind.CONTINUATION, 1, body[100:], C)
    elif where == "error":
        ident = b.send_request(b"call")
        assert ident is not None
        transfer(b, a)
        b, a = a, b
        plaintext = frame(Kind.ERROR, ident, b"\x00\x05" + payload, C)
    elif where in ("later DATA", "byte stream DATA"):
        ident = a.open_call(SHAPE_BIDIRECTIONAL) if where == "later DATA" else a.open_stream()
        assert ident is not None
        transfer(a, b)
        if where == "later DATA":
            b.receive_records([frame(Kind.DATA, ident, payload[:10], C | FLAG_MORE)])
        plaintext = frame(Kind.DATA, ident, payload[10:], C)
    elif where == "control":
        plaintext = frame(Kind.PING, 1, b"\x00" * 8, C)
    else:
        plaintext = frame(Kind.STREAM, 1, b"", C)
    refused(b, plaintext, ErrorCode.PROTOCOL)


@needs_lz4
@needs_zstd
@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        ("codec not offered", ErrorCode.PROTOCOL, "never offered"),
        ("unknown codec", ErrorCode.PROTOCOL, "never offered"),
        ("declares more than M", ErrorCode.FRAME_SIZE, "over the limit"),
        ("declares no more than its length", ErrorCode.PROTOCOL, "not smaller"),
        ("header cut short", ErrorCode.FRAME_SIZE, "shorter than its envelope"),
        ("a bomb: decodes past its size", ErrorCode.PROTOCOL, "LZ4"),
        ("decodes short of its size", ErrorCode.PROTOCOL, "decompresses to"),
        ("garbage", ErrorCode.PROTOCOL, "Zstandard"),
    ],
)
def test_a_bad_envelope_is_refused_before_anything_is_delivered(
    case: str, code: ErrorCode, message: str
) -> None:
    m = 64 * 1024
    _, b = pair((LZ4,), (LZ4,), max_message_size=m)
    big = b"z" * (m + 1)
    payloads = {
        "codec not offered": envelope(ZSTD, b"x" * 2000),
        "unknown codec": b"\x07" + envelope(LZ4, b"x" * 2000)[1:],
        "declares more than M": envelope(LZ4, big),
        "declares no more than its length": comp.ENVELOPE.pack(LZ4, 10) + b"\x00" * 10,
        "header cut short": b"\x01\x00\x00",
        "a bomb: decodes past its size": comp.ENVELOPE.pack(LZ4, 4000)
        + envelope(LZ4, b"y" * 40_000)[5:],
        "decodes short of its size": comp.ENVELOPE.pack(LZ4, 2001)
        + envelope(LZ4, b"x" * 2000)[5:],
        "garbage": comp.ENVELOPE.pack(ZSTD, 5000) + b"\x28\xb5\x2f\xfd" + os.urandom(40),
    }
    if case == "garbage":
        _, b = pair((LZ4, ZSTD), (ZSTD,), max_message_size=m)
    text = refused(b, frame(Kind.REQUEST, 1, payloads[case], C), code)
    assert message in text


@needs_lz4
def test_a_bomb_is_charged_its_full_size_before_it_is_buffered() -> None:
    """A fragmented body of a few bytes that declares more than the window allows fails
    at its first frame (FLOW_CONTROL), before the rest of it arrives."""
    _, b = pair((LZ4,), max_message_size=64 * 1024)
    window = b.credit  # nothing in use yet
    assert window["request_bytes_held"] == 0
    body = b"q" * (64 * 1024)
    data = envelope(LZ4, body)
    first = frame(Kind.ONEWAY, 0, len(data).to_bytes(4, "big") + data[:100], FLAG_MORE | C)
    # Two of them fit W = 2 (M + 64); the third does not, although its wire bytes would.
    b.receive_records([first, frame(Kind.CONTINUATION, 0, data[100:])])
    b.receive_records([first, frame(Kind.CONTINUATION, 0, data[100:])])
    text = refused(b, first, ErrorCode.FLOW_CONTROL)
    assert "window" in text


@needs_lz4
def test_a_call_message_over_the_call_limit_is_refused_at_its_first_frame() -> None:
    a, b = pair((LZ4,))
    call = a.open_call(SHAPE_BIDIRECTIONAL)
    assert call is not None
    transfer(a, b)
    limit = min(Hello2().max_message_size, Hello2().stream_window // 2 - MESSAGE_COST)
    data = envelope(LZ4, b"w" * (limit + 1))
    text = refused(b, frame(Kind.DATA, call, data[:50], C | FLAG_MORE), ErrorCode.FRAME_SIZE)
    assert "over the limit" in text


@needs_lz4
def test_a_call_message_that_grows_to_its_declared_size_is_refused() -> None:
    a, b = pair((LZ4,))
    call = a.open_call(SHAPE_BIDIRECTIONAL)
    assert call is not None
    transfer(a, b)
    head = comp.ENVELOPE.pack(LZ4, 30)
    b.receive_records([frame(Kind.DATA, call, head + b"\x00" * 20, C | FLAG_MORE)])
    text = refused(b, frame(Kind.DATA, call, b"\x00" * 5, 0), ErrorCode.PROTOCOL)
    assert "not smaller" in text


@needs_lz4
def test_a_dropped_message_is_never_decompressed_and_its_credit_returns() -> None:
    """After our GOAWAY a new request is dropped unread: its (corrupt) data is never
    decompressed, and its cost by declared size goes back to the peer."""
    a, b = pair((LZ4,))
    b.start_close()
    transfer(b, a)
    corrupt = comp.ENVELOPE.pack(LZ4, 5000) + b"\xff" * 100
    assert b.receive_records([frame(Kind.REQUEST, 1, corrupt, C)]) == []
    plaintexts = b.records_to_send(MP)
    window = Hello2().request_window
    assert credit_values(plaintexts) == {CreditLimit.REQUEST_WINDOW: window + 5000 + MESSAGE_COST}


# -- credit ---------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
def test_every_byte_of_credit_is_charged_and_returned_once_by_uncompressed_size(
    codec: int,
) -> None:
    a, b = pair((codec,), max_record_size=4096)
    initial = a.credit
    sizes = [1500, 20_000, 200_000, 3000, 1_000_000]
    bodies = [json_body(n, n) for n in sizes]
    idents = []
    for body in bodies:
        ident = a.send_request(body)
        assert ident is not None
        idents.append(ident)
    assert a.send_oneway(bodies[1])
    used = sum(len(x) + MESSAGE_COST for x in bodies) + len(bodies[1]) + MESSAGE_COST
    assert initial["request_window"] - a.credit["request_window"] == used
    events: list[S.Event] = []
    while a.wants_write:
        events += transfer(a, b, 4096 - 16)[1]
    assert [e[2] for e in events] == [*bodies, bodies[1]]
    assert b.credit["request_bytes_held"] == used - len(bodies[1]) - MESSAGE_COST
    for ident, body in zip(idents, bodies, strict=True):
        b.consumed(ident)
        b.send_reply(ident, body)
    b.consumed(0, len(bodies[1]))
    events = []
    while b.wants_write:
        events += transfer(b, a, 4096 - 16)[1]
    replies = [e for e in events if e[0] == S.EV_REPLY]
    assert [e[2] for e in replies] == bodies
    assert a.credit["reply_bytes_held"] == sum(len(x) + MESSAGE_COST for x in bodies)
    for ident in idents:
        a.delivered(ident)
    transfer(a, b, 4096 - 16)
    assert a.credit == initial
    assert b.credit == initial
    assert a.calls_open == b.calls_open == (0, 0)


@needs_lz4
def test_a_reply_waits_for_its_uncompressed_cost_in_the_reply_window() -> None:
    """W_r holds one reply of 8,000 bytes: the second waits (although compressed it would
    fit) and goes out, still compressed, once the first is taken."""
    m = 8192
    a, b = pair((LZ4,), max_message_size=m, reply_window=m + MESSAGE_COST)
    first = a.send_request(b"1")
    second = a.send_request(b"2")
    assert first is not None
    assert second is not None
    transfer(a, b)
    bodies = {first: json_body(8000, 10), second: json_body(8000, 11)}
    for ident, body in bodies.items():
        b.consumed(ident)
        b.send_reply(ident, body)
    plaintexts, events = transfer(b, a)
    assert [(f[0], f[1], f[3]) for f in message_frames(plaintexts)] == [(Kind.REPLY, C, first)]
    assert events == [(S.EV_REPLY, first, bodies[first], 0)]
    a.delivered(first)
    transfer(a, b)  # the CREDIT
    plaintexts, events = transfer(b, a)
    assert [(f[0], f[1], f[3]) for f in message_frames(plaintexts)] == [(Kind.REPLY, C, second)]
    assert events == [(S.EV_REPLY, second, bodies[second], 0)]


@needs_lz4
def test_the_senders_window_counts_the_size_before_compression() -> None:
    """A body whose compressed form would fit the window but whose size does not waits."""
    m = 64 * 1024
    a, _ = pair((LZ4,), max_message_size=m)
    body = b"r" * m
    assert a.send_oneway(body)  # W = 2 (M + 64), less the reserve of one message: full
    assert not a.send_oneway(body)
    assert a.send_request(body) is None


@needs_lz4
def test_withdrawn_compressed_requests_give_back_exactly_what_they_took() -> None:
    a, b = pair((LZ4,))
    initial = a.credit["request_window"]
    ident = a.send_request(json_body(50_000))
    assert ident is not None
    a.cancel(ident)  # never on the wire: withdrawn
    assert a.credit["request_window"] == initial
    assert a.send_queue_bytes == 0
    # Refused by the peer's GOAWAY before it was written: likewise.
    sent = a.send_request(b"first")
    transfer(a, b)
    b.start_close()
    queued = a.send_request(json_body(50_000, 1))
    assert sent is not None
    assert queued is not None
    events = transfer(b, a)[1]
    assert events[0][0] == S.EV_GOAWAY
    assert events[0][3] == (queued,)
    assert a.credit["request_window"] == initial - len(b"first") - MESSAGE_COST
    assert a.send_queue_bytes == 2  # only a's own GOAWAY is left to send


@needs_lz4
@needs_zstd
@settings(max_examples=60, deadline=None)
@given(
    codec=st.sampled_from([LZ4, ZSTD]),
    record=st.integers(1024, 65535),
    threshold=st.integers(0, 5000),
    pieces=st.lists(st.tuples(st.booleans(), st.integers(0, 30_000)), min_size=1, max_size=4),
    compress=st.booleans(),
)
def test_any_body_round_trips_and_its_credit_comes_back_whole(
    codec: int,
    record: int,
    threshold: int,
    pieces: list[tuple[bool, int]],
    compress: bool,
) -> None:
    rng = random.Random(record)
    body = b"".join(
        rng.randbytes(n) if noise else bytes([rng.randrange(256)]) * n for noise, n in pieces
    )
    a, b = pair((codec,), max_record_size=record, threshold=threshold)
    initial = a.credit
    maxp = record - 16
    ident = a.send_request(body, compress=compress)
    assert ident is not None
    assert a.send_oneway(body, compress=compress)
    events: list[S.Event] = []
    while a.wants_write:
        events += transfer(a, b, maxp)[1]
    assert events == [(S.EV_REQUEST, ident, body, 0), (S.EV_ONEWAY, 0, body, 0)]
    b.consumed(ident)
    b.consumed(0, len(body))
    b.send_reply(ident, body, compress=compress)
    events = []
    while b.wants_write:
        events += transfer(b, a, maxp)[1]
    assert events == [(S.EV_REPLY, ident, body, 0)]
    a.delivered(ident)
    b.flush_credit()
    a.flush_credit()
    while busy(a, b):
        transfer(a, b, maxp)
        transfer(b, a, maxp)
    assert a.credit == b.credit == initial


# -- vectors -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", VECTORS["cases"], ids=lambda c: c["what"][:40])
def test_the_specifications_vectors_decode_through_the_session(case: dict[str, Any]) -> None:
    if not comp.is_available(case["codec"]):
        pytest.skip(f"{comp.codec_name(case['codec'])} is not installed")
    body = bytes.fromhex(case["body"])
    receiver = S.Session(
        initiator=False,
        local=Hello2(compression=(LZ4, ZSTD)),
        peer=Hello2(compression=(LZ4, ZSTD)),
        keepalive_interval=None,
    )
    events = receiver.receive_records([bytes.fromhex(p) for p in case["plaintexts"]])
    kind = case["frames"][0][0]["kind"]
    ident = case["frames"][0][0]["id"]
    expected = S.EV_REQUEST if kind == "REQUEST" else S.EV_ONEWAY
    assert events == [(expected, ident, body, 0)]
    # Charged by the size before compression.
    if kind == "REQUEST":
        assert receiver.credit["request_bytes_held"] == len(body) + MESSAGE_COST
