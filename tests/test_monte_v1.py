"""monte-v1 against known-answer records produced by Go monte's own code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from monte_trio._exceptions import DecryptionError, HandshakeError, RemoteProtocolError
from monte_trio._proto._frames import FrameKind, MonteV1Codec
from monte_trio._proto._monte_v1 import MonteV1HandshakeState, session_key

VECTORS = json.loads((Path(__file__).parent / "vectors" / "go-monte-records.json").read_text())
CASES: list[dict[str, Any]] = VECTORS["cases"]
KIND = {"oneway": FrameKind.ONEWAY, "request": FrameKind.REQUEST, "reply": FrameKind.REPLY}


def _pair(case: dict[str, Any]) -> tuple[MonteV1HandshakeState, MonteV1HandshakeState]:
    client = MonteV1HandshakeState(
        initiator=True, private_key=bytes.fromhex(case["client_private"])
    )
    server = MonteV1HandshakeState(
        initiator=False, private_key=bytes.fromhex(case["server_private"])
    )
    assert server.data_to_send() == b""  # the server reads first
    c2s = client.data_to_send()
    assert c2s.hex() == case["handshake_wire"]["client_to_server"]
    assert server.receive_data(c2s) == b""
    s2c = server.data_to_send()
    assert s2c.hex() == case["handshake_wire"]["server_to_client"]
    assert client.receive_data(s2c) == b""
    assert client.complete
    assert server.complete
    return client, server


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_handshake_and_key(case: dict[str, Any]) -> None:
    _pair(case)
    key = session_key(bytes.fromhex(case["client_private"]), bytes.fromhex(case["server_public"]))
    assert key.hex() == case["session_key"]
    key2 = session_key(bytes.fromhex(case["server_private"]), bytes.fromhex(case["client_public"]))
    assert key2 == key


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_records_seal_and_open_like_go(case: dict[str, Any]) -> None:
    client, server = _pair(case)
    c_seal, c_open = client.records(max_record_size=4096)
    s_seal, s_open = server.records(max_record_size=4096)
    codecs = {
        "client_to_server": (c_seal, s_open, MonteV1Codec(initiator=False, max_record_size=4096)),
        "server_to_client": (s_seal, c_open, MonteV1Codec(initiator=True, max_record_size=4096)),
    }
    for record in case["records"]:
        sealer, opener, receiver_codec = codecs[record["direction"]]
        assert sealer.counter == record["index"]
        wire = sealer.seal(bytes.fromhex(record["plaintext"]))
        assert wire.hex() == record["wire"], record
        (plaintext,) = opener.receive_data(wire)
        assert plaintext.hex() == record["plaintext"]
        kind, seq, payload = receiver_codec.decode(plaintext)
        assert (kind, seq, payload.hex()) == (
            KIND[record["kind"]],
            record["seq"],
            record["payload"],
        )


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_records_byte_at_a_time(case: dict[str, Any]) -> None:
    _, server = _pair(case)
    _, opener = server.records(max_record_size=4096)
    wire = b"".join(
        bytes.fromhex(r["wire"]) for r in case["records"] if r["direction"] == "client_to_server"
    )
    got: list[bytes] = []
    for i in range(len(wire)):
        got += opener.receive_data(wire[i : i + 1])
    expected = [r["plaintext"] for r in case["records"] if r["direction"] == "client_to_server"]
    assert [p.hex() for p in got] == expected
    assert opener.buffered == 0


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_tampered_record_is_refused(case: dict[str, Any]) -> None:
    for bad in case["invalid_records"]:
        _, server = _pair(case)
        _, opener = server.records(max_record_size=4096)
        earlier = [
            bytes.fromhex(r["wire"])
            for r in case["records"]
            if r["direction"] == bad["direction"] and r["index"] < bad["index"]
        ]
        for wire in earlier:
            opener.receive_data(wire)
        tampered = bytes.fromhex(bad["wire"])
        (valid,) = [
            r["wire"]
            for r in case["records"]
            if r["direction"] == bad["direction"] and r["index"] == bad["index"]
        ]
        untampered = bytearray(tampered)
        untampered[bad["flip_wire_offset"]] ^= bad["flip_xor"]
        assert untampered.hex() == valid  # the vector is the valid record, one bit flipped
        with pytest.raises(DecryptionError):
            opener.receive_data(tampered)
        # Broken for good: even the valid record is refused afterwards.
        with pytest.raises(DecryptionError):
            opener.receive_data(bytes(untampered))


def test_oversized_length_refused_before_body() -> None:
    case = CASES[0]
    _, server = _pair(case)
    _, opener = server.records(max_record_size=4096)
    with pytest.raises(RemoteProtocolError, match="outside the allowed range"):
        opener.receive_data(b"\xff\xff\xff\xff")  # 4 GiB announced, nothing buffered
    assert opener.buffered == 0


def test_truncated_record_at_eof() -> None:
    _, server = _pair(CASES[0])
    _, opener = server.records(max_record_size=4096)
    wire = bytes.fromhex(CASES[0]["records"][0]["wire"])
    assert opener.receive_data(wire[:-3]) == []
    with pytest.raises(RemoteProtocolError, match="middle of a record"):
        opener.receive_data(b"")


def test_peer_closing_during_handshake() -> None:
    server = MonteV1HandshakeState(initiator=False)
    server.receive_data(b"\x01" * 10)
    with pytest.raises(HandshakeError, match="10 of 32 bytes"):
        server.receive_data(b"")


def test_low_order_point_refused() -> None:
    server = MonteV1HandshakeState(initiator=False)
    with pytest.raises(HandshakeError, match="low-order"):
        server.receive_data(bytes(32))


def test_trailing_bytes_after_handshake_are_returned() -> None:
    client = MonteV1HandshakeState(initiator=True)
    server = MonteV1HandshakeState(initiator=False)
    assert server.receive_data(client.data_to_send() + b"early") == b"early"
