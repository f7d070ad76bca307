"""Check tests/vectors/native-v2.json (wire version 2) against the sans-IO code."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from monte_trio._proto import _native_hello
from monte_trio._proto import _session as S
from monte_trio._proto import _wire2 as wire
from monte_trio._proto._noise import HandshakeState

VECTORS = Path(__file__).parent / "vectors"
DATA: dict[str, Any] = json.loads((VECTORS / "native-v2.json").read_text())


def test_generator_reproduces_the_file() -> None:
    spec = importlib.util.spec_from_file_location("gen2", VECTORS / "make_native_v2_vectors.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.render() == (VECTORS / "native-v2.json").read_text()


@pytest.mark.parametrize("hello", DATA["hellos"])
def test_hello_tlv(hello: dict[str, Any]) -> None:
    fields = {k: v for k, v in hello.items() if k != "encoded"}
    assert wire.Hello2(**fields).encode().hex() == hello["encoded"]
    assert wire.Hello2.decode(bytes.fromhex(hello["encoded"])) == wire.Hello2(**fields)


@pytest.mark.parametrize("case", DATA["headers"], ids=lambda c: c["what"])
def test_frame_headers(case: dict[str, Any]) -> None:
    header = bytes.fromhex(case["header"])
    assert len(header) == wire.HEADER_SIZE
    assert wire.HEADER.unpack(header) == (case["kind"], case["flags"], case["length"], case["id"])


def _session(initiator: bool) -> S.Session:
    ini, res = wire.Hello2(**_fields(0)), wire.Hello2(**_fields(1))
    local, peer = (ini, res) if initiator else (res, ini)
    return S.Session(initiator=initiator, local=local, peer=peer, keepalive_interval=None)


def _fields(n: int) -> dict[str, int]:
    return {k: v for k, v in DATA["hellos"][n].items() if k != "encoded"}


def test_batch_parses_into_the_messages() -> None:
    events = _session(False).receive_records(
        [bytes.fromhex(p) for p in DATA["batch"]["plaintexts"]]
    )
    assert [e[0] for e in events] == [S.EV_ONEWAY] * 3 + [S.EV_REQUEST] * 2
    assert [e[2] for e in events][:2] == [b"one", b""]
    assert all(len(bytes.fromhex(p)) <= 1008 for p in DATA["batch"]["plaintexts"])


def test_fragmentation_reassembles() -> None:
    plaintexts = [bytes.fromhex(p) for p in DATA["fragmentation"]["plaintexts"]]
    ((kind, ident, body, parent),) = _session(False).receive_records(plaintexts)
    assert (kind, ident, parent) == (S.EV_REQUEST, 1, 0)
    assert isinstance(body, bytes)
    assert hashlib.sha256(body).hexdigest() == DATA["fragmentation"]["body_sha256"]
    assert int.from_bytes(plaintexts[0][8:12], "big") == len(body)


def test_credit_frame_raises_the_window() -> None:
    ini = _session(True)
    before = ini.credit["request_window"]
    ini.send_oneway(b"z" * 100)
    ini.records_to_send(1008)
    ini.receive_records([bytes.fromhex(p) for p in DATA["credit"]["plaintexts"]])
    assert ini.credit["request_window"] == before


def test_transcript_replays_byte_for_byte() -> None:
    t = DATA["transcript"]
    keys = {k: bytes.fromhex(v) for k, v in t["keys"].items()}
    name = t["protocol_name"]
    preamble = _native_hello.encode_preamble(0, version=wire.VERSION)
    assert wire.prologue(name, preamble).hex() == t["prologue"]
    ini = HandshakeState(
        name,
        initiator=True,
        prologue=wire.prologue(name, preamble),
        s=keys["initiator_static"],
        e=keys["initiator_ephemeral"],
    )
    res = HandshakeState(
        name,
        initiator=False,
        prologue=wire.prologue(name, preamble),
        s=keys["responder_static"],
        e=keys["responder_ephemeral"],
    )
    wire1 = bytes.fromhex(t["wire_1"])
    assert wire1[:8] == b"MNTRIO\x02\x00"
    msg1 = ini.write_message(b"")
    assert wire1[10:] == msg1
    res.read_message(msg1)
    msg2 = res.write_message(bytes.fromhex(t["responder_hello"]["encoded"]))
    assert bytes.fromhex(t["wire_2"])[10:] == msg2
    ini.read_message(msg2)
    msg3 = ini.write_message(bytes.fromhex(t["initiator_hello"]["encoded"]))
    assert bytes.fromhex(t["wire_3"])[2:] == msg3
    res.read_message(msg3)
    assert ini.handshake_hash.hex() == t["handshake_hash"]
    i_send, i_recv = ini.split()
    r_i2r, r_r2i = res.split()
    _, i_opener = _native_hello.transport(
        i_send, i_recv, peer_max_record=1024, own_max_record=65535
    )
    _, r_opener = _native_hello.transport(r_r2i, r_i2r, peer_max_record=65535, own_max_record=1024)
    assert i_opener.receive_data(bytes.fromhex(t["verdict_wire"])) == [b"\x00"]
    openers = {"initiator_to_responder": r_opener, "responder_to_initiator": i_opener}
    for record in t["records"]:
        (plaintext,) = openers[record["direction"]].receive_data(bytes.fromhex(record["wire"]))
        assert plaintext.hex() == record["plaintext"]
        offset = 0
        for frame in record["frames"]:
            header = wire.HEADER.unpack_from(plaintext, offset)
            kind = wire.Kind[frame["kind"]]
            assert header == (kind, frame["flags"], frame["length"], frame["id"])
            offset += wire.HEADER_SIZE + frame["length"]
        assert offset == len(plaintext)


def test_stream_steps_frames_match_their_bytes() -> None:
    for step in DATA["streams"]["steps"]:
        for plaintext, frames in zip(step["plaintexts"], step["frames"], strict=True):
            raw = bytes.fromhex(plaintext)
            off = 0
            for f in frames:
                kind, flags, length, ident = wire.HEADER.unpack_from(raw, off)
                assert (wire.Kind(kind).name, flags, length, ident) == (
                    f["kind"],
                    f["flags"],
                    f["length"],
                    f["id"],
                )
                off += 8 + length
            assert off == len(raw)


def test_stream_steps_parse_into_the_recorded_events() -> None:
    """A fresh responder fed the initiator's records (returning each message's and each
    byte's credit as the reference application did) reports exactly the recorded events."""
    h = wire.Hello2(**{k: v for k, v in DATA["streams"]["hello"].items() if k != "encoded"})
    res = S.Session(initiator=False, local=h, peer=h, keepalive_interval=None)
    for step in DATA["streams"]["steps"]:
        if step["direction"] != "initiator_to_responder":
            continue
        events = res.receive_records([bytes.fromhex(p) for p in step["plaintexts"]])
        assert [_json(e) for e in events] == step["events"]
        for e in events:
            if e[0] in (S.EV_DATA, S.EV_MESSAGE):
                body, cost = e[2], e[3]
                assert isinstance(body, bytes)
                assert isinstance(cost, int)
                res.read_done(e[1], cost or len(body))
        res.records_to_send(1008)  # its WINDOW updates (what the initiator received)


def _json(event: S.Event) -> list[Any]:
    return [v.hex() if isinstance(v, bytes) else v for v in event]
