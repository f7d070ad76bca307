"""Synchronous tests of the sans-IO session (native wire v2): one per rule of
docs/wire-native.rst, a Hypothesis state machine over two sessions back to back, and the
nested-call scenarios. No event loop anywhere."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from monte_trio import LocalProtocolError, RemoteProtocolError
from monte_trio._proto import _session as S
from monte_trio._proto._session_v1 import MonteV1Session
from monte_trio._proto._wire2 import (
    ID_LIMIT,
    MESSAGE_COST,
    ErrorCode,
    Hello2,
    Kind,
    default_reply_window,
    default_request_window,
)

MP = 65535 - 16
HDR = struct.Struct(">BBHI")


def pair(
    a_hello: Hello2 | None = None, b_hello: Hello2 | None = None, **kw: Any
) -> tuple[S.Session, S.Session]:
    ha = a_hello or Hello2()
    hb = b_hello or Hello2()
    a = S.Session(initiator=True, local=ha, peer=hb, **kw)
    b = S.Session(initiator=False, local=hb, peer=ha, **kw)
    return a, b


def pump(x: S.Session, y: S.Session, maxp: int = MP) -> list[S.Event]:
    return y.receive_records(x.records_to_send(maxp))


def call(s: S.Session | MonteV1Session, body: bytes, parent: int = 0) -> int:
    ident = s.send_request(body, parent=parent)
    assert ident is not None
    return ident


def size_of(event: S.Event) -> int:
    body = event[2]
    assert isinstance(body, bytes)
    return len(body)


def can_open(s: S.Session) -> bool:
    return s.can_open


def finished(s: S.Session) -> bool:
    return s.finished


def owed(s: S.Session) -> bool:
    return s.credit_owed


def wants(s: S.Session) -> bool:
    return s.wants_write


def frame(kind: int, ident: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return HDR.pack(kind, flags, len(payload), ident) + payload


def small(m: int = 1024, **kw: Any) -> Hello2:
    return Hello2(
        max_record_size=kw.pop("record", 1024),
        max_message_size=m,
        request_window=kw.pop("w", default_request_window(m)),
        reply_window=kw.pop("wr", default_reply_window(m)),
        **kw,
    )


def violates(session: S.Session, records: list[bytes], code: ErrorCode) -> None:
    with pytest.raises(RemoteProtocolError):
        session.receive_records(records)
    assert session.state == S.ERROR
    assert session.error_code == code
    final = session.records_to_send(MP)
    assert len(final) == 1
    assert final[0][0] == Kind.GOAWAY
    assert final[0][-2:] == code.to_bytes(2, "big")
    assert session.receive_records([frame(Kind.PING, 1, b"x")]) == []  # nothing after ERROR
    assert session.records_to_send(MP) == []


# --------------------------------------------------------------------------- hello
def test_hello_tlv_roundtrip_and_unknown_types_ignored() -> None:
    hello = Hello2(max_calls=7)
    assert Hello2.decode(hello.encode() + struct.pack(">HH", 999, 3) + b"abc") == hello


@pytest.mark.parametrize(
    "change",
    [
        {"max_record_size": 1023},
        {"max_message_size": 1023, "request_window": 4096, "reply_window": 2048},
        {"request_window": 2 * (16 * 2**20 + 64) - 1},
        {"reply_window": 16 * 2**20 + 63},
        {"max_calls": 0},
        {"nested_allowance": 0},
    ],
)
def test_hello_floors(change: dict[str, int]) -> None:
    import attrs

    with pytest.raises(RemoteProtocolError, match="outside the allowed range"):
        Hello2.decode(attrs.evolve(Hello2(), **change).encode())


def test_hello_missing_duplicate_and_bad_length() -> None:
    data = Hello2().encode()
    with pytest.raises(RemoteProtocolError, match="lacks"):
        Hello2.decode(data[:-12])
    with pytest.raises(RemoteProtocolError, match="twice"):
        Hello2.decode(data + data[:6])
    with pytest.raises(RemoteProtocolError, match="not 2"):
        Hello2.decode(struct.pack(">HHB", 1, 1, 2) + data[6:])
    with pytest.raises(RemoteProtocolError, match="truncated"):
        Hello2.decode(data[:-1])


# --------------------------------------------------------------------------- frames
def test_many_messages_packed_into_few_records() -> None:
    a, b = pair()
    for n in range(100):
        assert a.send_oneway(bytes([n]) * 1400)
    records = a.records_to_send(MP)
    assert len(records) == 3  # 100 x 1408 bytes in 65,519-byte plaintexts
    events = b.receive_records(records)
    assert [e[2] for e in events] == [bytes([n]) * 1400 for n in range(100)]


def test_frame_crossing_its_record_is_an_error() -> None:
    _, b = pair()
    violates(b, [frame(Kind.ONEWAY, 0, b"abc")[:-1]], ErrorCode.FRAME_SIZE)


def test_truncated_header_and_empty_record_are_errors() -> None:
    _, b = pair()
    violates(b, [frame(Kind.ONEWAY, 0) + b"\x01\x00"], ErrorCode.FRAME_SIZE)
    _, b = pair()
    violates(b, [b""], ErrorCode.FRAME_SIZE)


@pytest.mark.parametrize("kind", [0x00, 0x06, 0x0F, 0x20, 0x3F, 0x80, 0xFF])
def test_unknown_core_kind_is_an_error(kind: int) -> None:
    _, b = pair()
    violates(b, [frame(kind, 0)], ErrorCode.PROTOCOL)


def test_unknown_extension_kind_is_skipped_but_budgeted() -> None:
    _, b = pair(control_burst=3)
    assert b.receive_records([frame(0x40, 0, b"x" * 100) + frame(Kind.ONEWAY, 0, b"m")]) == [
        (S.EV_ONEWAY, 0, b"m", 0)
    ]
    violates(b, [frame(0x7F, 9)] * 3, ErrorCode.ENHANCE_YOUR_CALM)


def test_unknown_flags_are_errors() -> None:
    _, b = pair()
    violates(b, [frame(Kind.ONEWAY, 0, b"x", flags=0x08)], ErrorCode.PROTOCOL)
    _, b = pair()
    violates(b, [frame(Kind.PING, 1, b"x", flags=0x01)], ErrorCode.PROTOCOL)
    _, b = pair()
    violates(b, [frame(Kind.REPLY, 1, b"x", flags=0x04)], ErrorCode.PROTOCOL)


def test_oneway_with_an_id_is_an_error() -> None:
    _, b = pair()
    violates(b, [frame(Kind.ONEWAY, 5, b"x")], ErrorCode.PROTOCOL)


# --------------------------------------------------------------------------- fragments
def test_large_message_is_fragmented_and_reassembled() -> None:
    a, b = pair(small(8192, record=1024), small(8192, record=1024))
    body = bytes(range(256)) * 20  # 5,120 bytes
    ident = call(a, body)
    records = a.records_to_send(1008)
    assert len(records) == 6
    kind, flags, _length, rid = HDR.unpack_from(records[0])
    assert (kind, flags, rid) == (Kind.REQUEST, 0x01, ident)
    assert int.from_bytes(records[0][8:12], "big") == len(body)
    assert all(r[0] == Kind.CONTINUATION for r in records[1:])
    assert b.receive_records(records) == [(S.EV_REQUEST, ident, body, 0)]


def test_total_over_limit_is_refused_before_buffering() -> None:
    _, b = pair(small(2048), small(1024))
    first = frame(Kind.ONEWAY, 0, (2**31).to_bytes(4, "big") + b"x", flags=0x01)
    violates(b, [first], ErrorCode.FRAME_SIZE)


def test_empty_non_final_fragment_is_an_error() -> None:
    _, b = pair()
    first = frame(Kind.ONEWAY, 0, (10).to_bytes(4, "big") + b"x", flags=0x01)
    violates(b, [first, frame(Kind.CONTINUATION, 0, b"", flags=0x01)], ErrorCode.PROTOCOL)


def test_fragments_must_add_up_to_the_total() -> None:
    _, b = pair()
    first = frame(Kind.ONEWAY, 0, (4).to_bytes(4, "big") + b"x", flags=0x01)
    violates(b, [first, frame(Kind.CONTINUATION, 0, b"yy")], ErrorCode.FRAME_SIZE)
    _, b = pair()
    violates(b, [first, frame(Kind.CONTINUATION, 0, b"yyyy")], ErrorCode.FRAME_SIZE)


def test_continuation_without_a_message_is_an_error() -> None:
    _, b = pair()
    violates(b, [frame(Kind.CONTINUATION, 0, b"x")], ErrorCode.PROTOCOL)


def test_fragments_of_different_ids_may_interleave() -> None:
    _, b = pair()
    first1 = frame(Kind.REQUEST, 1, (3).to_bytes(4, "big") + b"a", flags=0x01)
    first3 = frame(Kind.REQUEST, 3, (2).to_bytes(4, "big") + b"c", flags=0x01)
    events = b.receive_records(
        [first1 + first3, frame(Kind.CONTINUATION, 3, b"d") + frame(Kind.CONTINUATION, 1, b"bb")]
    )
    assert events == [(S.EV_REQUEST, 3, b"cd", 0), (S.EV_REQUEST, 1, b"abb", 0)]


# --------------------------------------------------------------------------- ids
def test_id_parity_and_order() -> None:
    a, b = pair()
    assert [call(a, b"x") for _ in range(3)] == [1, 3, 5]
    assert [call(b, b"x") for _ in range(2)] == [2, 4]


def test_duplicate_or_lower_request_id_is_an_error() -> None:
    _, b = pair()
    b.receive_records([frame(Kind.REQUEST, 5, b"x")])
    violates(b, [frame(Kind.REQUEST, 3, b"x")], ErrorCode.PROTOCOL)


def test_request_with_wrong_parity_is_an_error() -> None:
    _, b = pair()
    violates(b, [frame(Kind.REQUEST, 2, b"x")], ErrorCode.PROTOCOL)


def test_answer_for_an_id_above_the_highest_opened_is_an_error() -> None:
    a, _ = pair()
    a.send_request(b"x")
    violates(a, [frame(Kind.REPLY, 3, b"x")], ErrorCode.PROTOCOL)


def test_cancel_for_an_id_above_the_highest_is_an_error_at_or_below_ignored() -> None:
    a, b = pair()
    i = call(a, b"x")
    pump(a, b)
    b.send_reply(i, b"r")
    b.records_to_send(MP)  # the reply is on the wire; the call ended at b
    assert b.receive_records([frame(Kind.CANCEL, 1)]) == []  # crossed: ignored
    violates(b, [frame(Kind.CANCEL, 3)], ErrorCode.PROTOCOL)


def test_ids_never_wrap_goaway_id_exhausted() -> None:
    a = S.Session(initiator=True, local=Hello2(), peer=Hello2(), first_id=ID_LIMIT - 3)
    b = S.Session(initiator=False, local=Hello2(), peer=Hello2())
    assert a.send_request(b"x") == ID_LIMIT - 3
    assert can_open(a)
    assert a.send_request(b"y") == ID_LIMIT - 1  # the next would be above ID_LIMIT
    assert not can_open(a)
    with pytest.raises(LocalProtocolError):
        a.send_request(b"z")
    events = pump(a, b)
    assert [e[0] for e in events] == [S.EV_REQUEST, S.EV_REQUEST, S.EV_GOAWAY]
    assert events[2][2] == ErrorCode.ID_EXHAUSTED


# --------------------------------------------------------------------------- credit
def test_call_slots_freed_only_by_the_terminal_frame() -> None:
    a, b = pair(Hello2(max_calls=2), Hello2(max_calls=2))
    ids = [call(a, b"x"), call(a, b"y")]
    assert a.send_request(b"z") is None
    pump(a, b)
    b.send_reply(ids[0], b"r")
    assert b.calls_open == (0, 2)
    pump(b, a)
    assert b.calls_open == (0, 1)  # freed when packed
    assert a.calls_open == (1, 0)  # freed on receipt
    assert a.send_request(b"z") == 5


def test_more_calls_than_slots_is_an_error() -> None:
    _, b = pair(Hello2(), Hello2(max_calls=1))
    violates(
        b, [frame(Kind.REQUEST, 1, b"x") + frame(Kind.REQUEST, 3, b"x")], ErrorCode.FLOW_CONTROL
    )


def test_request_window_returned_when_the_handler_is_done() -> None:
    m = 1024
    a, b = pair(small(m), small(m))
    w = default_request_window(m)
    plain = w - (m + MESSAGE_COST)  # the nested reserve is kept back
    assert a.send_oneway(bytes(plain - MESSAGE_COST))
    assert not a.send_oneway(b"")
    (event,) = pump(a, b)
    changed = a.credit_changed
    pump(b, a)
    assert a.credit_changed == changed  # nothing returned yet
    b.consumed(0, size_of(event))
    pump(b, a)
    assert a.credit_changed == changed + 1
    assert a.send_oneway(b"")


def test_sending_past_the_request_window_is_an_error() -> None:
    _, b = pair(small(1024), small(1024))
    body = bytes(1000)
    records = [frame(Kind.ONEWAY, 0, body)] * 3  # 3 x 1064 > 2 x 1088
    violates(b, records, ErrorCode.FLOW_CONTROL)


def test_reply_window_holds_replies_in_the_session_not_the_reader() -> None:
    m = 1024
    a, b = pair(small(m), small(m))
    ids = [call(a, b"q") for _ in range(3)]
    pump(a, b)
    for i in ids:
        b.send_reply(i, bytes(1000))  # 1064 each, W_r is 1088: one fits
    events = pump(b, a)
    assert [e[1] for e in events] == [ids[0]]
    a.delivered(ids[0])
    events = pump(b, a, 1008) if not pump(a, b) else []
    assert [e[1] for e in events] == [ids[1]]


def test_sending_past_the_reply_window_is_an_error() -> None:
    a, _ = pair(small(1024), small(1024))
    ids = [call(a, b"q") for _ in range(2)]
    a.records_to_send(MP)
    violates(a, [frame(Kind.REPLY, i, bytes(1000)) for i in ids], ErrorCode.FLOW_CONTROL)


def test_credit_frames_are_cumulative_and_never_lower() -> None:
    a, _ = pair(small(1024), small(1024))
    w = default_request_window(1024)
    new = (w + 10).to_bytes(8, "big")
    a.receive_records([frame(Kind.CREDIT, 2, new), frame(Kind.CREDIT, 2, new)])
    assert a.credit["request_window"] == w + 10
    violates(a, [frame(Kind.CREDIT, 2, (w).to_bytes(8, "big"))], ErrorCode.FLOW_CONTROL)


def test_credit_update_is_state_latest_wins() -> None:
    a, b = pair()
    for _ in range(10):
        a.send_oneway(b"x")
    events = pump(a, b)
    for e in events:
        b.consumed(0, size_of(e))
    records = b.records_to_send(MP)
    assert len(records) == 1
    assert len(records[0]) == 16


def test_credit_below_the_floor_is_held_until_flushed() -> None:
    a, b = pair(credit_floor=1000)
    i = call(a, b"abc")
    pump(a, b)
    b.consumed(i)  # 67 bytes back: below the floor
    assert owed(b)
    assert not wants(b)
    b.send_reply(i, b"ok")
    [record] = b.records_to_send(MP)
    assert record == frame(Kind.REPLY, i, b"ok")  # the credit does not ride along
    assert owed(b)
    b.flush_credit()
    assert wants(b)
    assert not owed(b)
    a.receive_records(b.records_to_send(MP))
    assert a.credit["request_window"] == Hello2().request_window
    assert not owed(b)
    assert not wants(b)


def test_credit_reaching_the_floor_rides_on_the_next_record() -> None:
    a, b = pair(credit_floor=1000)
    for _ in range(15):  # 15 x 65 bytes: under the floor
        assert a.send_oneway(b"x")
    for event in pump(a, b):
        b.consumed(0, size_of(event))
    assert owed(b)
    assert not wants(b)
    assert a.send_oneway(b"x")
    b.consumed(0, size_of(pump(a, b)[0]))  # 16 x 65 = 1,040: due
    assert wants(b)
    assert not owed(b)
    a.receive_records(b.records_to_send(MP))
    assert a.credit["request_window"] == Hello2().request_window


def test_reply_credit_below_the_floor_is_held_too() -> None:
    a, b = pair(credit_floor=1000)
    i = call(a, b"q")
    pump(a, b)
    b.send_reply(i, b"r")
    pump(b, a)
    a.delivered(i)
    assert owed(a)
    assert not wants(a)
    a.flush_credit()
    b.receive_records(a.records_to_send(MP))
    assert b.credit["reply_window"] == Hello2().reply_window


def test_flush_credit_with_nothing_owed_sends_nothing() -> None:
    a, _ = pair(credit_floor=1000)
    a.flush_credit()
    assert not wants(a)
    assert not owed(a)
    assert a.records_to_send(MP) == []


def test_one_message_packs_as_the_general_path_does() -> None:
    """The single-message fast path and the batch packer give the same bytes."""
    a, b = pair()
    i = call(a, b"hello")
    [alone] = a.records_to_send(MP)
    assert alone == frame(Kind.REQUEST, i, b"hello")
    j = call(a, b"one")
    k = call(a, b"two")
    [both] = a.records_to_send(MP)
    assert both == frame(Kind.REQUEST, j, b"one") + frame(Kind.REQUEST, k, b"two")
    events = b.receive_records([alone, both])
    assert [e[1] for e in events] == [i, j, k]


def test_every_byte_credited_exactly_once() -> None:
    a, b = pair()
    i = call(a, b"abc")
    pump(a, b)
    b.consumed(i)
    b.consumed(i)  # a second return is ignored
    pump(b, a)
    assert a.credit["request_window"] == Hello2().request_window


def test_nested_call_outside_slots_within_allowance() -> None:
    a, b = pair(Hello2(max_calls=1), Hello2(max_calls=1))
    i = call(a, b"x")
    pump(a, b)
    assert b.send_request(b"cb", parent=i) == 2  # b's own slot count is untouched
    assert b.send_request(b"cb2", parent=i) is None  # k = 1
    assert b.send_request(b"plain") == 4  # its own slot
    events = pump(b, a)
    assert events[0] == (S.EV_REQUEST, 2, b"cb", i)
    with pytest.raises(LocalProtocolError):
        b.send_request(b"x", parent=99)


def test_nested_call_beyond_allowance_is_an_error() -> None:
    a, _ = pair()
    i = call(a, b"x")
    a.records_to_send(MP)
    nested = frame(Kind.REQUEST, 2, i.to_bytes(4, "big") + b"x", flags=0x04)
    nested2 = frame(Kind.REQUEST, 4, i.to_bytes(4, "big") + b"x", flags=0x04)
    violates(a, [nested + nested2], ErrorCode.FLOW_CONTROL)


def test_nested_call_naming_no_open_call_is_an_error() -> None:
    a, _ = pair()
    violates(a, [frame(Kind.REQUEST, 2, (7).to_bytes(4, "big"), flags=0x04)], ErrorCode.PROTOCOL)


def test_local_misuse_raises_without_changing_state() -> None:
    a, _b = pair(Hello2(), small(1024))
    with pytest.raises(LocalProtocolError):
        a.send_request(bytes(1025))
    with pytest.raises(LocalProtocolError):
        a.send_reply(1, b"x")
    assert a.state == S.OPEN
    assert a.send_request(b"ok") == 1


# --------------------------------------------------------------------------- control lane
def test_one_owed_pong_latest_wins() -> None:
    _, b = pair()
    b.receive_records([frame(Kind.PING, n, bytes([n]) * 8) for n in range(1, 6)])
    (record,) = b.records_to_send(MP)
    assert record == frame(Kind.PONG, 5, bytes([5]) * 8)


def test_control_payload_bound() -> None:
    _, b = pair()
    violates(b, [frame(Kind.PING, 1, bytes(17))], ErrorCode.FRAME_SIZE)


def test_control_budget_flood_goaway_enhance_your_calm() -> None:
    _, b = pair(control_burst=10, control_rate=1)
    b.receive_records([frame(Kind.PING, 1)] * 10)
    b.handle_timer(5.0)  # refills 5
    b.receive_records([frame(Kind.PING, 1)] * 5)
    violates(b, [frame(Kind.PING, 1)], ErrorCode.ENHANCE_YOUR_CALM)


def test_control_frames_are_written_before_data() -> None:
    a, _b = pair()
    a.send_oneway(b"data")
    a.receive_records([frame(Kind.PING, 9, b"p")])
    (record,) = a.records_to_send(MP)
    assert record[0] == Kind.PONG


def test_cancel_answered_by_a_terminal_error_and_slot_held_until_then() -> None:
    a, b = pair(Hello2(max_calls=1), Hello2(max_calls=1))
    i = call(a, b"x")
    pump(a, b)
    a.cancel(i)
    assert pump(a, b) == [(S.EV_CANCEL, i, 0, 0)]
    assert a.send_request(b"y") is None  # no Rapid Reset: the slot is still held
    b.consumed(i)
    b.send_error(i, ErrorCode.CANCELLED, "")
    assert pump(b, a) == []  # no event for a call we gave up on
    assert a.send_request(b"y") == 3


def test_cancel_before_the_wire_withdraws_the_call() -> None:
    a, _b = pair()
    i = call(a, b"x")
    a.cancel(i)
    assert a.records_to_send(MP) == []
    assert a.credit["request_window"] == Hello2().request_window


def test_cancel_during_a_fragmented_request() -> None:
    a, b = pair(small(8192), small(8192))
    i = call(a, bytes(5000))
    records = a.records_to_send(1008)
    b.receive_records(records[:1])
    b.receive_records([frame(Kind.CANCEL, i)])
    assert b.receive_records(records[1:]) == []
    (record,) = b.records_to_send(MP)
    assert HDR.unpack_from(record)[0] == Kind.CREDIT  # the body credited back
    assert record[-10:] == frame(Kind.ERROR, i, b"\x00\x05")[-10:]


def test_goaway_is_a_barrier_and_fails_unprocessed_calls_safe() -> None:
    a, b = pair()
    first = call(a, b"1")
    pump(a, b)
    second = call(a, b"2")  # not yet seen by b
    b.send_oneway(b"before")
    b.start_close()
    b.send_oneway(b"after")  # allowed, and it may follow the barrier
    records = b.records_to_send(MP)
    kinds = []
    for r in records:
        off = 0
        while off < len(r):
            k, _f, n, _i = HDR.unpack_from(r, off)
            kinds.append(k)
            off += 8 + n
    assert kinds.index(Kind.GOAWAY) > kinds.index(Kind.ONEWAY)
    events = a.receive_records(records)
    (goaway,) = [e for e in events if e[0] == S.EV_GOAWAY]
    assert goaway[1] == first
    assert goaway[3] == (second,)
    assert not can_open(a)
    assert a.records_to_send(MP)[0][0] == Kind.GOAWAY  # answered; the withdrawn call never sent


def test_requests_after_our_goaway_are_ignored_and_credited_back() -> None:
    _, b = pair()
    b.start_close()
    b.records_to_send(MP)
    assert b.receive_records([frame(Kind.REQUEST, 1, b"late")]) == []
    (record,) = b.records_to_send(MP)
    assert HDR.unpack_from(record)[0] == Kind.CREDIT


def test_a_second_goaway_may_not_raise_the_last_id() -> None:
    a, _ = pair()
    a.send_request(b"x")
    a.send_request(b"x")
    a.records_to_send(MP)
    a.receive_records([frame(Kind.GOAWAY, 1, b"\x00\x00")])
    violates(a, [frame(Kind.GOAWAY, 3, b"\x00\x00")], ErrorCode.PROTOCOL)


def test_graceful_close_finishes_and_grace_period_ends() -> None:
    a, b = pair()
    i = call(a, b"x")
    pump(a, b)
    a.start_close(now=0.0)
    pump(a, b)
    pump(b, a)
    assert not finished(a)  # our call is still open
    b.send_reply(i, b"r")
    pump(b, a)
    a.delivered(i)
    pump(a, b)
    assert finished(a)
    assert finished(b)
    c, _ = pair(grace_period=2.0)
    c.start_close(now=10.0)
    assert c.get_timer() == 12.0
    assert c.handle_timer(12.0)[0][0] == S.EV_CLOSED


# --------------------------------------------------------------------------- keepalive
def test_keepalive_pings_only_when_silent_and_declares_death() -> None:
    a, _b = pair(keepalive_interval=10.0, keepalive_tolerance=30.0)
    assert a.get_timer() == 10.0
    a.handle_timer(10.0)
    ping = a.records_to_send(MP)
    assert ping[0][0] == Kind.PING
    a.handle_timer(20.0)
    assert a.records_to_send(MP) == []  # one ping outstanding at a time
    assert a.handle_timer(30.0) == []
    assert a.handle_timer(40.0)[0][0] == S.EV_CLOSED  # ceil(30/10) silent ticks after the ping
    assert a.state == S.CLOSED


def test_receipt_counts_as_heard_and_pong_reports_rtt() -> None:
    a, b = pair(keepalive_interval=10.0)
    a.handle_timer(10.0)
    events = pump(a, b)
    assert events == []
    events = pump(b, a)
    assert events[0][0] == S.EV_PONG
    assert events[0][2] == 10.0
    assert a.handle_timer(20.0) == []
    assert a.records_to_send(MP) == []  # heard: no ping


def test_own_back_pressure_is_not_silence() -> None:
    a, _ = pair(keepalive_interval=10.0, keepalive_tolerance=10.0)
    a.handle_timer(10.0)
    a.records_to_send(MP)
    a.reader_paused(True)
    for t in range(20, 100, 10):
        assert a.handle_timer(float(t)) == []
    a.reader_paused(False)
    assert a.handle_timer(100.0)[0][0] == S.EV_CLOSED


# --------------------------------------------------------------------------- nested scenarios
def test_128_callbacks_each_way_at_full_slots() -> None:
    a, b = pair(Hello2(max_calls=128), Hello2(max_calls=128))
    outer_a = [call(a, b"a") for _ in range(128)]
    outer_b = [call(b, b"b") for _ in range(128)]
    assert a.send_request(b"x") is None
    assert b.send_request(b"x") is None
    events_b = pump(a, b)
    events_a = pump(b, a)
    cb_from_b = [call(b, b"cb", parent=e[1]) for e in events_b]  # nested: no slot needed
    cb_from_a = [call(a, b"cb", parent=e[1]) for e in events_a]
    assert len(set(cb_from_a + cb_from_b)) == 256
    callbacks = {"a": pump(b, a), "b": pump(a, b)}
    for y, name in ((a, "a"), (b, "b")):
        assert len(callbacks[name]) == 128
        for e in callbacks[name]:
            assert e[0] == S.EV_REQUEST
            assert e[3]
            y.consumed(e[1])
            y.send_reply(e[1], b"cb-done")
    for x, y in ((a, b), (b, a)):
        replies = pump(x, y)
        assert len(replies) == 128
        for e in replies:
            y.delivered(e[1])
    for x, outer in ((b, outer_a), (a, outer_b)):
        for i in outer:
            x.consumed(i)
            x.send_reply(i, b"done")
    got_a = pump(b, a)
    got_b = pump(a, b)
    assert sorted(e[1] for e in got_a) == outer_a
    assert sorted(e[1] for e in got_b) == outer_b


def test_chain_10mib_request_callback_10mib_request_default_windows() -> None:
    a, b = pair()
    big = bytes(10 * 2**20)
    r1 = call(a, big)
    (_e1,) = pump(a, b)
    q = call(b, b"callback", parent=r1)  # R1's handler holds its body
    (_eq,) = pump(b, a)
    r2 = call(a, big, parent=q)
    assert r2 is not None
    (e2,) = pump(a, b)
    assert e2[2] == big
    assert e2[3] == q
    b.consumed(r2)
    b.send_reply(r2, b"r2")
    assert pump(b, a)[0][1] == r2
    a.consumed(q)
    a.send_reply(q, b"q")
    assert pump(a, b)[0][1] == q
    b.consumed(r1)
    b.send_reply(r1, b"r1")
    assert pump(b, a)[0][1] == r1


def test_plain_calls_cannot_take_the_nested_reserve() -> None:
    m = 1024
    a, b = pair(small(m), small(m))
    i = call(a, bytes(m))
    assert a.send_oneway(b"x") is False  # W - M is used up
    pump(a, b)
    q = call(b, b"cb", parent=i)
    pump(b, a)
    assert a.send_request(bytes(m), parent=q) is not None  # the reserve


# --------------------------------------------------------------------------- monte-v1
def test_monte_v1_session_routes_by_parity() -> None:
    c = MonteV1Session(initiator=True, max_record_size=4096)
    s = MonteV1Session(initiator=False, max_record_size=4096)
    i = call(c, b"req")
    c.send_oneway(b"one")
    records = c.records_to_send(4080)
    assert records == [b"\x00\x00\x00\x01req", b"\x00\x00\x00\x00one"]
    assert s.receive_records(records) == [
        (S.EV_REQUEST, 1, b"req", 0),
        (S.EV_ONEWAY, 0, b"one", 0),
    ]
    s.send_reply(1, b"rep")
    assert c.receive_records(s.records_to_send(4080)) == [(S.EV_REPLY, i, b"rep", 0)]
    c.send_request(b"x")
    c.cancel(3)
    assert c.receive_records([b"\x00\x00\x00\x03late"]) == []  # forgotten at once
    with pytest.raises(LocalProtocolError):
        s.send_error(2, 6, "no error frames")
    with pytest.raises(RemoteProtocolError):
        s.receive_records([b"\x00"])


# --------------------------------------------------------------------------- state machine
class TwoSessions(RuleBasedStateMachine):
    """Two sessions back to back; the wire is delivered in arbitrary interleavings."""

    def __init__(self) -> None:
        super().__init__()
        m = 2048
        h = Hello2(
            max_record_size=1024,
            max_message_size=m,
            request_window=default_request_window(m),
            reply_window=default_reply_window(m),
            max_calls=3,
            nested_allowance=1,
        )
        self.sides = dict(zip("ab", pair(h, h, keepalive_interval=None), strict=True))
        self.handling: dict[str, list[int]] = {"a": [], "b": []}
        self.calls: dict[str, dict[int, int]] = {"a": {}, "b": {}}  # id -> times ended
        self.oneways_held: dict[str, list[int]] = {"a": [], "b": []}
        self.replies_held: dict[str, list[int]] = {"a": [], "b": []}
        self.wire: dict[str, list[bytes]] = {"a": [], "b": []}  # records in flight from x

    def other(self, x: str) -> str:
        return "b" if x == "a" else "a"

    @rule(x=st.sampled_from("ab"), size=st.integers(0, 5000), nested=st.booleans())
    def request(self, x: str, size: int, nested: bool) -> None:
        s = self.sides[x]
        parent = self.handling[x][0] if nested and self.handling[x] else 0
        if not parent and not s.can_open:
            return
        ident = s.send_request(bytes(min(size, 2048)), parent=parent)
        if ident is not None:
            self.calls[x][ident] = 0

    @rule(x=st.sampled_from("ab"), size=st.integers(0, 3000))
    def oneway(self, x: str, size: int) -> None:
        self.sides[x].send_oneway(bytes(min(size, 2048)))

    @rule(x=st.sampled_from("ab"), maxp=st.sampled_from([1008, 4000]))
    def write(self, x: str, maxp: int) -> None:
        self.wire[x].extend(self.sides[x].records_to_send(min(maxp, 1008)))

    @rule(x=st.sampled_from("ab"), n=st.integers(1, 4))
    def read(self, x: str, n: int) -> None:
        y = self.other(x)
        records, self.wire[x] = self.wire[x][:n], self.wire[x][n:]
        for e in self.sides[y].receive_records(records):
            kind = e[0]
            if kind == S.EV_REQUEST:
                self.handling[y].append(e[1])
            elif kind == S.EV_ONEWAY:
                self.oneways_held[y].append(len(e[2]))  # type: ignore[arg-type]
            elif kind in (S.EV_REPLY, S.EV_ERROR):
                assert e[1] in self.calls[y], "an answer for a call never opened"
                self.calls[y][e[1]] += 1
                assert self.calls[y][e[1]] == 1, "a call ended twice"
                if kind == S.EV_REPLY:
                    self.replies_held[y].append(e[1])
            elif kind == S.EV_GOAWAY:
                for i in e[3]:  # type: ignore[attr-defined]
                    self.calls[y][i] += 1

    @rule(x=st.sampled_from("ab"), error=st.booleans())
    def answer(self, x: str, error: bool) -> None:
        if not self.handling[x]:
            return
        s = self.sides[x]
        ident = self.handling[x].pop()
        s.consumed(ident)
        if error:
            s.send_error(ident, ErrorCode.INTERNAL, "boom")
        else:
            s.send_reply(ident, b"r" * (ident % 50))

    @rule(x=st.sampled_from("ab"))
    def take(self, x: str) -> None:
        s = self.sides[x]
        for n in self.oneways_held[x]:
            s.consumed(0, n)
        self.oneways_held[x] = []
        for i in self.replies_held[x]:
            s.delivered(i)
        self.replies_held[x] = []

    @rule(x=st.sampled_from("ab"))
    def cancel(self, x: str) -> None:
        open_ = [i for i, n in self.calls[x].items() if n == 0]
        if open_:
            self.sides[x].cancel(open_[0])
            self.calls[x][open_[0]] = 1  # the caller is done with it

    @precondition(lambda self: all(s.state == S.OPEN for s in self.sides.values()))
    @rule(x=st.sampled_from("ab"))
    def close(self, x: str) -> None:
        self.sides[x].start_close()

    @invariant()
    def never_error(self) -> None:
        for s in self.sides.values():
            assert s.state != S.ERROR

    def teardown(self) -> None:
        # Quiescence: answer everything, take everything, deliver everything.
        for _ in range(200):
            progress = False
            for x in "ab":
                while self.handling[x]:
                    self.answer(x, False)
                    progress = True
                self.take(x)
                self.write(x, 1008)
            for x in "ab":
                if self.wire[x]:
                    self.read(x, len(self.wire[x]))
                    progress = True
                    self.take(self.other(x))
            if not progress and not any(s.wants_write for s in self.sides.values()):
                break
        a, b = self.sides["a"], self.sides["b"]
        assert a.calls_open == (0, 0) == b.calls_open, (a.calls_open, b.calls_open)
        for x in "ab":
            assert all(n == 1 for n in self.calls[x].values()), self.calls[x]
            s = self.sides[x]
            credit = s.credit
            assert credit["request_bytes_held"] == 0
            assert credit["reply_bytes_held"] == 0
            assert credit["request_window"] == default_request_window(2048)
            assert credit["reply_window"] == default_reply_window(2048)
            assert credit["slots"] == 3


TwoSessions.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
test_two_sessions = TwoSessions.TestCase
