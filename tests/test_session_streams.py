"""Synchronous tests of streams and streaming calls in the sans-IO session: one or more per
rule of docs/wire-native.rst's "Streams and streaming calls", at the extremes. No event loop."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from monte_trio import LocalProtocolError, RemoteProtocolError
from monte_trio._proto import _session as S
from monte_trio._proto._calls import (
    SHAPE_BIDIRECTIONAL,
    SHAPE_DOWNLOAD,
    SHAPE_UPLOAD,
    update_due,
)
from monte_trio._proto._wire2 import (
    DEFAULT_STREAM_WINDOW,
    FLAG_END,
    FLAG_MORE,
    MESSAGE_COST,
    SLICE,
    STREAM_ABORT_BURST,
    ErrorCode,
    Hello2,
    Kind,
)

MP = 65535 - 16
HDR = struct.Struct(">BBHI")


def hello(**kw: Any) -> Hello2:
    kw.setdefault("max_streams", 8)
    return Hello2(**kw)


def pair(
    a_hello: Hello2 | None = None, b_hello: Hello2 | None = None, **kw: Any
) -> tuple[S.Session, S.Session]:
    ha = a_hello or hello()
    hb = b_hello or hello()
    kw.setdefault("keepalive_interval", None)
    return (
        S.Session(initiator=True, local=ha, peer=hb, **kw),
        S.Session(initiator=False, local=hb, peer=ha, **kw),
    )


def pump(x: S.Session, y: S.Session, maxp: int = MP) -> list[S.Event]:
    return y.receive_records(x.records_to_send(maxp))


def frame(kind: int, ident: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return HDR.pack(kind, flags, len(payload), ident) + payload


def frames(plaintexts: list[bytes]) -> list[tuple[int, int, int, int]]:
    """(kind, flags, length, id) of every frame."""
    out = []
    for pt in plaintexts:
        off = 0
        while off < len(pt):
            kind, flags, length, ident = HDR.unpack_from(pt, off)
            out.append((kind, flags, length, ident))
            off += 8 + length
    return out


def kinds(events: list[S.Event]) -> list[int]:
    return [e[0] for e in events]


def data_of(events: list[S.Event], ident: int) -> bytes:
    return b"".join(e[2] for e in events if e[0] == S.EV_DATA and e[1] == ident)  # type: ignore[misc]


def opened(a: S.Session, b: S.Session) -> int:
    sid = a.open_stream()
    assert sid is not None
    assert pump(a, b) == [(S.EV_STREAM_OPENED, sid, 0, 0)]
    return sid


def violates(session: S.Session, records: list[bytes], code: ErrorCode) -> None:
    with pytest.raises(RemoteProtocolError):
        session.receive_records(records)
    assert session.state == S.ERROR
    assert session.error_code == code
    final = session.records_to_send(MP)
    assert frames(final) == [(Kind.GOAWAY, 0, 2, frames(final)[0][3])]
    assert final[0][-2:] == code.to_bytes(2, "big")


# --------------------------------------------------------------------------- hello
def test_hello_stream_fields_sent_only_with_streams_and_default_hello_unchanged() -> None:
    assert len(Hello2().encode()) == 74
    h = Hello2(max_streams=100, stream_window=4096, data_window=8192)
    data = h.encode()
    assert len(data) == 74 + 8 + 8 + 12
    assert Hello2.decode(data) == h
    # An older peer (no stream fields) means: no streams.
    assert Hello2.decode(Hello2().encode()).max_streams == 0


@pytest.mark.parametrize(
    "change",
    [
        {"stream_window": 1023},
        {"stream_window": 2**30 + 1, "data_window": 2**32},
        {"data_window": 2 * DEFAULT_STREAM_WINDOW - 1},
    ],
)
def test_hello_stream_floors(change: dict[str, int]) -> None:
    with pytest.raises(RemoteProtocolError, match="outside the allowed range"):
        Hello2.decode(hello(**change).encode())


def test_hello_stream_field_wrong_length_or_twice() -> None:
    data = hello().encode()
    with pytest.raises(RemoteProtocolError, match="appears twice"):
        Hello2.decode(data + struct.pack(">HHI", 11, 4, 3))
    with pytest.raises(RemoteProtocolError, match="has 2 bytes"):
        Hello2.decode(Hello2().encode() + struct.pack(">HHH", 11, 2, 3))


def test_streams_need_both_hellos() -> None:
    a, b = pair(hello(), Hello2())
    with pytest.raises(LocalProtocolError, match="not enabled"):
        a.open_stream()
    with pytest.raises(LocalProtocolError, match="not enabled"):
        b.open_call(SHAPE_UPLOAD)
    violates(b, [frame(Kind.STREAM, 1)], ErrorCode.PROTOCOL)


# --------------------------------------------------------------------------- opening
def test_stream_ids_share_the_call_id_space_and_open_in_order() -> None:
    a, b = pair()
    r1 = a.send_request(b"q")
    s3 = a.open_stream()
    c5 = a.open_call(SHAPE_DOWNLOAD)
    assert (r1, s3, c5) == (1, 3, 5)
    events = pump(a, b)
    assert kinds(events) == [S.EV_REQUEST, S.EV_STREAM_OPENED, S.EV_STREAM_OPENED]
    assert events[2] == (S.EV_STREAM_OPENED, 5, SHAPE_DOWNLOAD, 0)
    violates(b, [frame(Kind.STREAM, 3)], ErrorCode.PROTOCOL)  # at or below the highest


@pytest.mark.parametrize(
    ("record", "code"),
    [
        (frame(Kind.STREAM, 2), ErrorCode.PROTOCOL),  # wrong parity
        (frame(Kind.STREAM, 1, b"x"), ErrorCode.FRAME_SIZE),
        (frame(Kind.STREAM, 1, flags=FLAG_END), ErrorCode.PROTOCOL),
        (frame(Kind.CALL, 1, b""), ErrorCode.FRAME_SIZE),
        (frame(Kind.CALL, 1, b"\x00"), ErrorCode.PROTOCOL),  # shape 0 is a REQUEST
        (frame(Kind.CALL, 1, b"\x04"), ErrorCode.PROTOCOL),
        (frame(Kind.DATA, 1, b"x"), ErrorCode.PROTOCOL),  # never opened
        (frame(Kind.RESET, 9, b"\x00\x05"), ErrorCode.PROTOCOL),  # RESET of an unknown id
        (frame(Kind.STOP, 9, b"\x00\x05"), ErrorCode.PROTOCOL),
        (frame(Kind.WINDOW, 9, bytes(8)), ErrorCode.PROTOCOL),
        (frame(Kind.RESET, 1, b"\x00"), ErrorCode.FRAME_SIZE),
        (frame(Kind.WINDOW, 1, bytes(4)), ErrorCode.FRAME_SIZE),
        (frame(Kind.CREDIT, 7, bytes(8)), ErrorCode.PROTOCOL),
    ],
)
def test_malformed_stream_frames(record: bytes, code: ErrorCode) -> None:
    _, b = pair()
    violates(b, [record], code)


def test_max_streams_is_credit_reached_then_freed_and_separate_from_calls() -> None:
    a, b = pair(hello(max_calls=1), hello(max_streams=2, max_calls=1))
    s1, s3 = a.open_stream(), a.open_stream()
    assert None not in (s1, s3)
    assert a.open_stream() is None  # wait: no refusal on the wire
    assert a.send_request(b"unary") is not None  # the call pool is separate
    pump(a, b)
    assert b.streams_open == (0, 2)
    assert s1 is not None
    a.send_end(s1)
    pump(a, b)
    assert a.open_stream() is None  # one half closed: the slot is still held
    b.send_end(s1)
    assert pump(b, a) == [(S.EV_END, s1, 0, 0)]
    assert a.streams_open == (1, 0)
    assert b.streams_open == (0, 1)
    assert a.open_stream() is not None


def test_opening_beyond_max_streams_is_a_flow_control_error() -> None:
    _, b = pair(hello(), hello(max_streams=1))
    violates(b, [frame(Kind.STREAM, 1) + frame(Kind.STREAM, 3)], ErrorCode.FLOW_CONTROL)


def test_credit_raises_max_streams() -> None:
    a, _b = pair(hello(), hello(max_streams=1))
    assert a.open_stream() is not None
    assert a.open_stream() is None
    a.receive_records([frame(Kind.CREDIT, 4, (5).to_bytes(8, "big"))])
    assert a.credit["streams"] == 4


# --------------------------------------------------------------------------- windows
def test_data_exactly_the_window_then_one_byte_over() -> None:
    a, b = pair(hello(stream_window=1024, data_window=4096), hello(stream_window=1024))
    sid = opened(a, b)
    assert a.send_data(sid, bytes(1025)) == 1024  # exactly the window, not a byte more
    assert a.stream_credit(sid) == {"send": 0, "window": 1024, "unread": 0, "unsent": 1024}
    assert a.send_data(sid, b"x") == 0
    events = pump(a, b)
    assert len(data_of(events, sid)) == 1024
    # One byte over, forged: the receiver's window check.
    violates(b, [frame(Kind.DATA, sid, b"x")], ErrorCode.FLOW_CONTROL)


def test_window_one_byte_left_and_zero() -> None:
    a, b = pair(hello(stream_window=1024), hello(stream_window=1024))
    sid = opened(a, b)
    assert a.send_data(sid, bytes(1023)) == 1023
    assert a.stream_credit(sid)["send"] == 1  # type: ignore[index]
    assert a.send_data(sid, bytes(5)) == 1
    assert a.send_data(sid, bytes(5)) == 0
    assert a.send_data(sid, b"") == 0


def test_credit_returns_when_the_application_reads_not_on_receipt() -> None:
    a, b = pair(hello(stream_window=4096), hello(stream_window=4096))
    sid = opened(a, b)
    a.send_data(sid, bytes(4096))
    pump(a, b)
    assert b.data_ledger["returned"] == 4096  # connection credit: returned on receipt
    assert b.records_to_send(MP) == []  # no per-stream WINDOW before the reads
    assert b.stream_credit(sid)["unread"] == 4096  # type: ignore[index]
    b.read_done(sid, 2047)
    assert b.records_to_send(MP) == []  # less than half a window read
    b.read_done(sid, 1)
    out = b.records_to_send(MP)
    assert frames(out) == [(Kind.WINDOW, 0, 8, sid)]
    assert out[0][8:] == (4096 + 2048).to_bytes(8, "big")
    assert pump(b, a) == []
    assert a.stream_credit(sid)["send"] == 0  # type: ignore[index]
    a.receive_records(out)


def test_window_update_is_cumulative_latest_wins_and_never_lowers() -> None:
    a, b = pair(hello(stream_window=4096), hello(stream_window=4096))
    sid = opened(a, b)
    a.send_data(sid, bytes(4096))
    pump(a, b)
    b.read_done(sid, 3000)
    b.read_done(sid, 1096)
    out = b.records_to_send(MP)
    assert frames(out) == [(Kind.WINDOW, 0, 8, sid)]  # one frame: the latest value
    assert a.receive_records(out) == [(S.EV_CALL_CREDIT, sid, 4096, 0)]
    violates(a, [frame(Kind.WINDOW, sid, (4096).to_bytes(8, "big"))], ErrorCode.FLOW_CONTROL)


def test_blocked_sender_gets_credit_at_once() -> None:
    a, b = pair(hello(stream_window=8192), hello(stream_window=8192))
    sid = opened(a, b)
    assert a.send_data(sid, bytes(9000)) == 8192
    out = a.records_to_send(MP)
    assert (Kind.BLOCKED, 0, 8, sid) in frames(out)
    b.receive_records(out)
    b.read_done(sid, 1024)  # far below half a window, but the sender is blocked
    update = b.records_to_send(MP)
    assert frames(update) == [(Kind.WINDOW, 0, 8, sid)]
    # Once per limit value: the same BLOCKED again is charged, not acted on.
    before = b.records_to_send(MP)
    b.receive_records([frame(Kind.BLOCKED, sid, (8192).to_bytes(8, "big"))])
    assert before == []
    assert b.records_to_send(MP) == []


def test_update_rule_at_the_extremes() -> None:
    assert not update_due(1024, 1024, 0, True)  # nothing read
    assert not update_due(1024, 1024, 511, False)
    assert update_due(1024, 1024, 512, False)  # half
    assert not update_due(1024, 1024, 255, True)
    assert update_due(1024, 1024, 256, True)  # blocked: a quarter of a small window
    assert update_due(2**20, 2**20, 1024, True)  # blocked: at most 1,024 bytes
    assert not update_due(2**20, 2**20, 1023, True)


def test_window_grows_toward_bdp_up_to_the_cap() -> None:
    a, b = pair(hello(stream_window=4096), hello(stream_window=4096), stream_window_cap=16384)
    sid = opened(a, b)
    b.observe_rtt(0.1)
    windows = []
    now = 0.0
    for _ in range(6):
        credit = a.stream_credit(sid)["send"]  # type: ignore[index]
        assert a.send_data(sid, bytes(credit)) == credit
        pump(a, b)
        now += 0.01  # read fast: well within two round trips
        b.read_done(sid, credit, now=now)
        pump(b, a)
        windows.append(b.stream_credit(sid)["window"])  # type: ignore[index]
    assert windows == [4096, 8192, 16384, 16384, 16384, 16384]
    # A slow reader (updates further apart than two round trips): no growth.
    a2, b2 = pair(hello(stream_window=4096), hello(stream_window=4096))
    sid2 = opened(a2, b2)
    b2.observe_rtt(0.001)
    for step in range(4):
        a2.send_data(sid2, bytes(4096))
        pump(a2, b2)
        b2.read_done(sid2, 4096, now=float(step))
        pump(b2, a2)
    assert b2.stream_credit(sid2)["window"] == 4096  # type: ignore[index]


def test_connection_data_window_limits_and_is_returned_on_receipt() -> None:
    a, b = pair(
        hello(stream_window=4096, data_window=8192), hello(stream_window=4096, data_window=8192)
    )
    s1, s3, s5 = opened(a, b), opened(a, b), opened(a, b)
    assert a.send_data(s1, bytes(4096)) == 4096
    assert a.send_data(s3, bytes(4096)) == 4096
    assert a.credit["data_window"] == 0
    assert a.send_data(s5, b"x") == 0  # the connection window, not the stream's, is short
    events = pump(a, b)
    assert len(data_of(events, s1)) == len(data_of(events, s3)) == 4096
    # Nobody reads s1 or s3; the connection credit came back anyway.
    update = b.records_to_send(MP)
    assert (Kind.CREDIT, 0, 8, 5) in frames(update)
    credit_events = a.receive_records(update)
    assert (S.EV_CALL_CREDIT, 0, 8192, 0) in credit_events
    assert a.send_data(s5, b"x") == 1


def test_an_unread_stream_does_not_starve_unary_calls_or_another_stream() -> None:
    a, b = pair(
        hello(stream_window=4096, data_window=8192), hello(stream_window=4096, data_window=8192)
    )
    stuck = opened(a, b)
    assert a.send_data(stuck, bytes(10_000)) == 4096
    pump(a, b)  # never read
    live = opened(a, b)
    total = 0
    for _ in range(20):
        n = a.send_data(live, bytes(4096))
        total += n
        events = pump(a, b)
        b.read_done(live, len(data_of(events, live)))
        pump(b, a)
        ident = a.send_request(b"ping")
        assert ident is not None
        (_request,) = pump(a, b)
        b.consumed(ident)
        b.send_reply(ident, b"pong")
        assert kinds(pump(b, a))[-1] == S.EV_REPLY
        a.delivered(ident)
    assert total >= 20 * 2048


# --------------------------------------------------------------------------- half-close and aborts
def test_end_then_data_after_end_and_end_twice_are_errors() -> None:
    a, b = pair()
    sid = opened(a, b)
    a.send_data(sid, b"abc", end=True)
    out = a.records_to_send(MP)
    assert frames(out) == [(Kind.DATA, FLAG_END, 3, sid)]  # END rides on the last data
    assert b.receive_records(out) == [(S.EV_DATA, sid, b"abc", 0), (S.EV_END, sid, 0, 0)]
    with pytest.raises(LocalProtocolError, match="not open for sending"):
        a.send_data(sid, b"more")
    _, b2 = pair()
    b2.receive_records([frame(Kind.STREAM, 1), frame(Kind.DATA, 1, flags=FLAG_END)])
    violates(b2, [frame(Kind.DATA, 1, flags=FLAG_END)], ErrorCode.PROTOCOL)
    _, b3 = pair()
    b3.receive_records([frame(Kind.STREAM, 1), frame(Kind.DATA, 1, flags=FLAG_END)])
    violates(b3, [frame(Kind.DATA, 1, b"late")], ErrorCode.PROTOCOL)


def test_reset_drops_unsent_data_returns_its_credit_and_never_ends() -> None:
    a, b = pair(hello(stream_window=4096), hello(stream_window=4096))
    sid = opened(a, b)
    a.send_data(sid, bytes(4000), end=True)
    before = a.credit["data_window"]
    a.reset(sid, ErrorCode.CANCELLED)
    assert a.credit["data_window"] == before + 4000
    out = a.records_to_send(MP)
    assert frames(out) == [(Kind.RESET, 0, 2, sid)]  # no END, no data: truncation shows
    assert b.receive_records(out) == [(S.EV_RESET, sid, ErrorCode.CANCELLED, 0)]


def test_stop_is_answered_by_reset_and_data_in_flight_is_discarded() -> None:
    a, b = pair()
    sid = opened(a, b)
    a.send_data(sid, b"in flight")
    in_flight = a.records_to_send(MP)
    b.stop(sid, ErrorCode.CANCELLED)
    stop = b.records_to_send(MP)
    assert frames(stop) == [(Kind.STOP, 0, 2, sid)]
    assert b.receive_records(in_flight) == []  # STOP then DATA: discarded, not an error
    a.send_data(sid, b"queued")
    assert a.receive_records(stop) == [(S.EV_STOP, sid, ErrorCode.CANCELLED, 0)]
    with pytest.raises(LocalProtocolError):
        a.send_data(sid, b"after stop")
    answer = a.records_to_send(MP)
    assert frames(answer) == [(Kind.RESET, 0, 2, sid)]
    assert b.receive_records(answer) == []  # we asked for it: no EV_RESET
    assert b.data_ledger["returned"] == b.data_ledger["received"] == len(b"in flight")


def test_frames_for_closed_ids_are_ignored_and_charged() -> None:
    a, b = pair(control_burst=3)
    sid = opened(a, b)
    a.cancel(sid)
    pump(a, b)
    pump(b, a)  # b answers the STOP with RESET: closed on both sides
    assert a.streams_open == (0, 0) == b.streams_open
    b.receive_records([frame(Kind.RESET, sid, b"\x00\x05")])
    b.receive_records([frame(Kind.WINDOW, sid, (10**6).to_bytes(8, "big"))])
    b.receive_records([frame(Kind.DATA, sid, b"crossed")])  # carries bytes: not charged
    b.receive_records([frame(Kind.DATA, sid)])
    violates(b, [frame(Kind.STOP, sid, b"\x00\x05")], ErrorCode.ENHANCE_YOUR_CALM)


def test_cancel_before_the_wire_withdraws_the_stream() -> None:
    a, _b = pair()
    sid = a.open_stream()
    assert sid is not None
    a.send_data(sid, b"never sent")
    a.cancel(sid)
    assert a.records_to_send(MP) == []
    assert a.streams_open == (0, 0)
    assert a.credit["data_window"] == hello().data_window


def test_open_and_reset_burst_triggers_the_guard() -> None:
    _a, b = pair(hello(), hello(max_streams=4))
    records = []
    ident = 1
    for _ in range(10_000):
        records.append(
            frame(Kind.STREAM, ident)
            + frame(Kind.RESET, ident, b"\x00\x05")
            + frame(Kind.STOP, ident, b"\x00\x05")
        )
        ident += 2
    for record in records[:STREAM_ABORT_BURST]:
        b.receive_records([record])
        b.records_to_send(MP)  # the RESET answers free the slot
    assert b.state == S.OPEN
    with pytest.raises(RemoteProtocolError, match="opened and aborted too fast"):
        b.receive_records([records[STREAM_ABORT_BURST]])
    assert b.error_code == ErrorCode.ENHANCE_YOUR_CALM
    assert b.records_to_send(MP)[0][-2:] == ErrorCode.ENHANCE_YOUR_CALM.to_bytes(2, "big")


def test_abort_guard_refills_at_its_rate() -> None:
    _, b = pair(hello(), hello(max_streams=4), abort_burst=2, abort_rate=1.0)
    ident = 1
    for step in range(10):
        b.handle_timer(float(step))  # one second: one more abort allowed
        b.receive_records(
            [
                frame(Kind.STREAM, ident)
                + frame(Kind.RESET, ident, b"\x00\x05")
                + frame(Kind.STOP, ident, b"\x00\x05")
            ]
        )
        assert frames(b.records_to_send(MP)) == [(Kind.RESET, 0, 2, ident)]
        ident += 2
    assert b.state == S.OPEN


# --------------------------------------------------------------------------- streaming calls
def test_download_call_one_request_many_replies() -> None:
    a, b = pair()
    cid = a.open_call(SHAPE_DOWNLOAD)
    assert cid is not None
    assert a.send_message(cid, b"list")  # one-message half: END implied
    out = a.records_to_send(MP)
    assert frames(out) == [(Kind.CALL, 0, 1, cid), (Kind.DATA, FLAG_END, 4, cid)]
    events = b.receive_records(out)
    assert events == [
        (S.EV_STREAM_OPENED, cid, SHAPE_DOWNLOAD, 0),
        (S.EV_MESSAGE, cid, b"list", 4 + MESSAGE_COST),
        (S.EV_END, cid, 0, 0),
    ]
    for part in (b"a", b"", b"c"):
        assert b.send_message(cid, part)
    b.send_end(cid)
    events = pump(b, a)
    assert [e[2] for e in events if e[0] == S.EV_MESSAGE] == [b"a", b"", b"c"]
    assert events[-1] == (S.EV_END, cid, 0, 0)
    assert a.streams_open == (0, 0) == b.streams_open


@pytest.mark.parametrize(
    ("shape", "messages"),
    [
        (SHAPE_BIDIRECTIONAL, [b""]),
        (SHAPE_BIDIRECTIONAL, [b"a", b""]),
        (SHAPE_BIDIRECTIONAL, [b"", b""]),
        (SHAPE_DOWNLOAD, [b""]),  # a download's one request, empty
        (SHAPE_UPLOAD, [b"", b""]),
    ],
)
def test_an_empty_last_message_is_not_an_end(shape: int, messages: list[bytes]) -> None:
    """An empty message is a DATA frame without flags, so END never rides on it: it
    follows in a frame of its own (else the receiver reads END alone and loses the
    message, or on a one-message half fails the connection)."""
    a, b = pair()
    cid = a.open_call(shape)
    assert cid is not None
    for i, message in enumerate(messages):
        last = i == len(messages) - 1
        assert a.send_message(cid, message, end=last and shape != SHAPE_DOWNLOAD)
    out = a.records_to_send(MP)
    data = [f for f in frames(out) if f[0] == Kind.DATA]
    assert data[-1] == (Kind.DATA, FLAG_END, 0, cid)  # END alone
    assert all(f[1] == 0 for f in data[:-1])
    events = b.receive_records(out)
    assert [e[2] for e in events if e[0] == S.EV_MESSAGE] == messages
    assert events[-1] == (S.EV_END, cid, 0, 0)


def test_upload_call_reply_is_one_message() -> None:
    a, b = pair()
    cid = a.open_call(SHAPE_UPLOAD)
    assert cid is not None
    a.send_message(cid, b"part1")
    a.send_message(cid, b"part2", end=True)
    pump(a, b)
    b.send_message(cid, b"done")
    with pytest.raises(LocalProtocolError, match=r"not open for sending|exactly one"):
        b.send_message(cid, b"again")
    assert pump(b, a)[-2:] == [(S.EV_MESSAGE, cid, b"done", 68), (S.EV_END, cid, 0, 0)]


@pytest.mark.parametrize(
    "data",
    [
        frame(Kind.DATA, 1, b"one") + frame(Kind.DATA, 1, b"two"),  # END missing
        frame(Kind.DATA, 1, b""),  # an empty message without END
        frame(Kind.DATA, 1, b"", FLAG_MORE),  # empty MORE fragment
        frame(Kind.DATA, 1, b"x", FLAG_MORE | FLAG_END),
    ],
)
def test_one_message_half_rules(data: bytes) -> None:
    _, b = pair()
    violates(b, [frame(Kind.CALL, 1, bytes([SHAPE_DOWNLOAD])) + data], ErrorCode.PROTOCOL)


def test_large_call_message_fragments_with_more_and_message_cost() -> None:
    a, b = pair()
    cid = a.open_call(SHAPE_BIDIRECTIONAL)
    assert cid is not None
    body = bytes(i % 251 for i in range(100_000))
    assert a.send_message(cid, body)
    out = a.records_to_send(MP)
    data_frames = [f for f in frames(out) if f[0] == Kind.DATA]
    assert all(f[1] == FLAG_MORE for f in data_frames[:-1])
    assert data_frames[-1][1] == 0
    # A call alone on the connection: frames as large as a record allows.
    assert len(data_frames) == 2
    assert max(f[2] for f in data_frames) <= MP - 8
    events = b.receive_records(out)
    assert events[-1] == (S.EV_MESSAGE, cid, body, len(body) + MESSAGE_COST)
    assert b.stream_credit(cid)["unread"] == len(body) + MESSAGE_COST  # type: ignore[index]
    with pytest.raises(LocalProtocolError, match="largest message"):
        a.send_message(cid, bytes(DEFAULT_STREAM_WINDOW // 2))


def test_call_message_needs_its_whole_cost() -> None:
    a, b = pair(hello(stream_window=1024), hello(stream_window=1024))
    cid = a.open_call(SHAPE_BIDIRECTIONAL)
    assert cid is not None
    for _ in range(2):
        assert a.send_message(cid, bytes(448))  # 448 + 64 = half the window
    assert not a.send_message(cid, b"")  # 0 left: even an empty message costs 64
    pump(a, b)
    b.read_done(cid, 512)
    pump(b, a)
    assert a.send_message(cid, b"")


def test_error_ends_a_call_both_ways_and_is_only_the_acceptors() -> None:
    a, b = pair()
    cid = a.open_call(SHAPE_BIDIRECTIONAL)
    assert cid is not None
    with pytest.raises(LocalProtocolError, match="not a streaming call this side accepted"):
        a.send_error(cid, ErrorCode.INTERNAL, "no")
    a.send_message(cid, b"x")
    pump(a, b)
    b.send_error(cid, ErrorCode.REFUSED, "busy")
    assert pump(b, a) == [(S.EV_ERROR, cid, ErrorCode.REFUSED, "busy")]
    assert a.streams_open == (0, 0) == b.streams_open
    _, b2 = pair()
    b2.receive_records([frame(Kind.STREAM, 1)])
    sid = 1
    with pytest.raises(LocalProtocolError):
        b2.send_error(sid, ErrorCode.INTERNAL, "streams use reset")


# --------------------------------------------------------------------------- scheduling and goaway
def test_fairness_small_request_waits_behind_at_most_one_slice() -> None:
    big = hello(stream_window=2**30 // 2, data_window=2**30)
    a, b = pair(big, big)
    sid = opened(a, b)
    assert a.send_data(sid, bytes(10 * 2**20)) == 10 * 2**20
    first = a.records_to_send(MP, max_bytes=256 * 1024)
    assert sum(len(p) for p in first) < 512 * 1024
    ident = a.send_request(b"small")
    out = a.records_to_send(MP, max_bytes=256 * 1024)
    seen = 0
    for kind, _flags, length, fid in frames(out):
        if kind == Kind.REQUEST:
            assert fid == ident
            break
        seen += length
    else:
        raise AssertionError("the request did not go out")
    assert seen <= SLICE


def test_two_streams_interleave_round_robin() -> None:
    a, b = pair()
    s1, s3 = opened(a, b), opened(a, b)
    a.send_data(s1, bytes(100_000))
    a.send_data(s3, bytes(100_000))
    order = [
        f[3] for f in frames(a.records_to_send(MP, max_bytes=128 * 1024)) if f[0] == Kind.DATA
    ]
    assert order[:4] == [s1, s3, s1, s3]


def test_a_stream_alone_takes_large_frames_and_two_take_slices() -> None:
    a, b = pair()
    s1 = opened(a, b)
    a.send_data(s1, bytes(100_000))
    alone = [f for f in frames(a.records_to_send(MP, max_bytes=128 * 1024)) if f[0] == Kind.DATA]
    assert max(f[2] for f in alone) > SLICE  # nobody to be fair to: frames a record long
    assert sum(f[2] for f in alone) == 100_000
    s3 = opened(a, b)
    a.send_data(s1, bytes(100_000))
    a.send_data(s3, bytes(100_000))
    shared = [f for f in frames(a.records_to_send(MP, max_bytes=128 * 1024)) if f[0] == Kind.DATA]
    assert max(f[2] for f in shared) <= SLICE


def test_control_frames_jump_ahead_of_stream_data() -> None:
    a, b = pair()
    sid = opened(a, b)
    a.send_data(sid, bytes(200_000))
    a.records_to_send(MP, max_bytes=16 * 1024)
    a.reset(sid)
    assert frames(a.records_to_send(MP))[0] == (Kind.RESET, 0, 2, sid)


def test_goaway_fails_streams_above_its_id_safe_to_retry() -> None:
    a, b = pair()
    s1 = opened(a, b)
    s3 = a.open_stream()
    a.send_data(s1, b"accepted")
    b.start_close()
    events = pump(b, a)  # GOAWAY(last id 1) crosses s3's opening frame
    assert events[0][0] == S.EV_GOAWAY
    assert events[0][1] == s1
    assert events[0][3] == (s3,)
    assert a.streams_open == (1, 0)
    events = pump(a, b)
    assert data_of(events, s1) == b"accepted"
    with pytest.raises(LocalProtocolError, match="closing"):
        a.open_stream()


def test_streams_opened_after_our_goaway_are_dropped() -> None:
    a, b = pair()
    sid = a.open_stream()
    assert sid is not None
    a.send_data(sid, b"late", end=True)
    b.start_close()
    b.records_to_send(MP)
    assert pump(a, b) == []  # not accepted: no event, its data discarded
    assert b.data_ledger["returned"] == 4
    assert b.streams_open == (0, 0)


def test_cancel_and_reply_on_stream_ids_are_errors() -> None:
    a, b = pair()
    sid = opened(a, b)
    violates(a, [frame(Kind.REPLY, sid, b"no")], ErrorCode.PROTOCOL)
    _, b2 = pair()
    b2.receive_records([frame(Kind.STREAM, 1)])
    violates(b2, [frame(Kind.CANCEL, 1)], ErrorCode.PROTOCOL)


# --------------------------------------------------------------------------- state machine
class TwoSessionsWithStreams(RuleBasedStateMachine):
    """Two sessions back to back with streams, calls and unary requests; records delivered
    in arbitrary interleavings, applications that read late or never until the end."""

    def __init__(self) -> None:
        super().__init__()
        h = hello(max_record_size=1024, stream_window=1024, data_window=2048, max_streams=3)
        self.sides = dict(zip("ab", pair(h, h), strict=True))
        self.wire: dict[str, list[bytes]] = {"a": [], "b": []}
        self.sendable: dict[str, set[int]] = {"a": set(), "b": set()}
        self.unread: dict[str, list[tuple[int, int]]] = {"a": [], "b": []}
        self.sent: dict[tuple[str, int], bytes] = {}
        self.got: dict[tuple[str, int], bytes] = {}
        self.clean_end: set[tuple[str, int]] = set()  # (receiver, id): END, no abort
        self.aborted: set[int] = set()
        self.handling: dict[str, list[int]] = {"a": [], "b": []}

    def other(self, x: str) -> str:
        return "b" if x == "a" else "a"

    def pick(self, x: str, n: int) -> int | None:
        ids = sorted(self.sendable[x])
        return ids[n % len(ids)] if ids else None

    @rule(x=st.sampled_from("ab"), call=st.booleans())
    def open(self, x: str, call: bool) -> None:
        s = self.sides[x]
        if not s.can_open:
            return
        ident = s.open_call(SHAPE_BIDIRECTIONAL) if call else s.open_stream()
        if ident is not None:
            self.sendable[x].add(ident)

    @rule(
        x=st.sampled_from("ab"), n=st.integers(0, 9), size=st.integers(0, 3000), end=st.booleans()
    )
    def send(self, x: str, n: int, size: int, end: bool) -> None:
        ident = self.pick(x, n)
        if ident is None:
            return
        s = self.sides[x]
        body = bytes([ident % 256]) * size
        try:
            ok = s.send_message(ident, body[:400], end)
            taken = body[:400] if ok else b""
            ended = ok and end
        except LocalProtocolError:  # a byte stream
            k = s.send_data(ident, body, end)
            taken = body[:k]
            ended = end and k == len(body)
        self.sent[x, ident] = self.sent.get((x, ident), b"") + taken
        if ended:
            self.sendable[x].discard(ident)

    @rule(x=st.sampled_from("ab"))
    def request(self, x: str) -> None:
        s = self.sides[x]
        if s.can_open:
            s.send_request(b"unary")

    @rule(x=st.sampled_from("ab"), n=st.integers(0, 9), stop=st.booleans())
    def abort(self, x: str, n: int, stop: bool) -> None:
        ident = self.pick(x, n)
        if ident is None:
            return
        self.aborted.add(ident)
        self.sendable[x].discard(ident)
        if stop:
            self.sides[x].cancel(ident)
        else:
            self.sides[x].reset(ident, ErrorCode.CANCELLED)

    @rule(x=st.sampled_from("ab"))
    def write(self, x: str) -> None:
        self.wire[x].extend(self.sides[x].records_to_send(1008))

    @rule(x=st.sampled_from("ab"), n=st.integers(1, 4))
    def deliver(self, x: str, n: int) -> None:
        y = self.other(x)
        records, self.wire[x] = self.wire[x][:n], self.wire[x][n:]
        for e in self.sides[y].receive_records(records):
            kind, ident = e[0], e[1]
            if kind == S.EV_STREAM_OPENED:
                self.sendable[y].add(ident)
            elif kind == S.EV_DATA:
                assert isinstance(e[2], bytes)
                self.got[y, ident] = self.got.get((y, ident), b"") + e[2]
                self.unread[y].append((ident, len(e[2])))
            elif kind == S.EV_MESSAGE:
                assert isinstance(e[2], bytes)
                assert isinstance(e[3], int)
                self.got[y, ident] = self.got.get((y, ident), b"") + e[2]
                self.unread[y].append((ident, e[3]))
            elif kind == S.EV_END:
                assert (y, ident) not in self.clean_end, "END twice"
                self.clean_end.add((y, ident))
            elif kind in (S.EV_RESET, S.EV_STOP, S.EV_ERROR):
                self.aborted.add(ident)
                if kind == S.EV_STOP:
                    self.sendable[y].discard(ident)
            elif kind == S.EV_REQUEST:
                self.handling[y].append(ident)
            elif kind == S.EV_REPLY:
                self.sides[y].delivered(ident)

    @rule(x=st.sampled_from("ab"))
    def consume(self, x: str) -> None:
        s = self.sides[x]
        for ident, n in self.unread[x]:
            s.read_done(ident, n)
        self.unread[x] = []
        for ident in self.handling[x]:
            s.consumed(ident)
            s.send_reply(ident, b"ok")
        self.handling[x] = []

    @invariant()
    def never_error(self) -> None:
        for s in self.sides.values():
            assert s.state != S.ERROR

    def quiesce(self) -> None:
        for _ in range(400):
            for x in "ab":
                self.consume(x)
                self.write(x)
            moved = False
            for x in "ab":
                if self.wire[x]:
                    self.deliver(x, len(self.wire[x]))
                    moved = True
            if not moved and not any(s.wants_write for s in self.sides.values()):
                return
        raise AssertionError("no quiescence: a window deadlock")

    def teardown(self) -> None:
        # Everyone reads everything: every transfer finishes and every byte is credited back.
        for _ in range(50):
            self.quiesce()
            pending = False
            for x in "ab":
                s = self.sides[x]
                for ident in sorted(self.sendable[x]):
                    credit = s.stream_credit(ident)
                    if credit is not None and credit["unsent"]:
                        pending = True
                        continue
                    try:
                        s.send_end(ident)
                    except LocalProtocolError:
                        s.send_message(ident, b"", True)
                    self.sendable[x].discard(ident)
                    pending = True
            if not pending:
                break
        a, b = self.sides["a"], self.sides["b"]
        assert a.streams_open == (0, 0) == b.streams_open, (a.streams_open, b.streams_open)
        for x, y in (("a", "b"), ("b", "a")):
            sent, recv = self.sides[x].data_ledger, self.sides[y].data_ledger
            assert recv["returned"] == recv["received"], "connection credit not all returned"
            assert sent["sent"] == recv["received"], "bytes lost or credited twice"
            assert sent["granted"] == recv["advertised"]
        for (y, ident), _ in self.got.items():
            if ident not in self.aborted:
                x = self.other(y)
                assert self.got[y, ident] == self.sent.get((x, ident), b"")
        for y, ident in self.clean_end:
            if ident not in self.aborted:
                assert self.got.get((y, ident), b"") == self.sent.get((self.other(y), ident), b"")


TwoSessionsWithStreams.TestCase.settings = settings(
    max_examples=80, stateful_step_count=50, deadline=None
)
test_two_sessions_with_streams = TwoSessionsWithStreams.TestCase
