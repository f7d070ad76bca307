"""Generate tests/vectors/native-v2.json: known-answer vectors for native wire version 2.

Run from the repository root::

    .venv/bin/python tests/vectors/make_native_v2_vectors.py

Built with the sans-IO modules only (``_wire2``, ``_session``, ``_noise``, ``_records``,
``_native_hello``'s preamble, verdict and transport helpers). Fixed keys
(``SHA-256("monte_trio native-v2 test vector: " | label)``) and deterministic AEADs make the
output identical on every run; tests/test_native_v2_vectors.py checks it.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from pathlib import Path
from typing import Any

import attrs
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from monte_trio._proto import _native_hello
from monte_trio._proto import _session as S
from monte_trio._proto import _wire2 as wire
from monte_trio._proto._noise import HandshakeState

OUTPUT = Path(__file__).with_name("native-v2.json")
LABEL_PREFIX = b"monte_trio native-v2 test vector: "
U16 = struct.Struct(">H")
I2R = "initiator_to_responder"
R2I = "responder_to_initiator"
SMALL_M = 4096
RESPONDER_HELLO = wire.Hello2(
    max_record_size=1024,
    max_message_size=SMALL_M,
    request_window=wire.default_request_window(SMALL_M),
    reply_window=wire.default_reply_window(SMALL_M),
    max_calls=4,
    nested_allowance=1,
)
INITIATOR_HELLO = wire.Hello2()
# The optional codec field (type 9): MessagePack, and an id no implementation knows (kept,
# and reported by number when the two sides' codecs are compared).
CODEC_HELLOS = [wire.Hello2(codec=wire.Codec.MSGPACK), wire.Hello2(codec=0xFFFF)]
# Streams enabled (fields 10 to 12, sent only when max_streams > 0): small windows so the
# examples below show a blocked sender and a window update.
STREAM_HELLO = wire.Hello2(max_streams=8, stream_window=1024, data_window=4096)
# The optional compression field (type 13): LZ4 then Zstandard; and Zstandard, LZ4 and an
# id no implementation knows (kept, never used).
COMPRESSION_HELLOS = [wire.Hello2(compression=(1, 2)), wire.Hello2(compression=(2, 1, 200))]
FLAG_COMPRESSED = 0x08


def derive(label: str) -> bytes:
    return hashlib.sha256(LABEL_PREFIX + label.encode()).digest()


def public(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


KEYS = {
    name: derive(name.replace("_", " "))
    for name in (
        "initiator_static",
        "initiator_ephemeral",
        "responder_static",
        "responder_ephemeral",
    )
}


def hello_json(hello: wire.Hello2) -> dict[str, Any]:
    fields = attrs.asdict(hello)
    return {**fields, "encoded": hello.encode().hex()}


def frames_of(plaintext: bytes) -> list[dict[str, Any]]:
    out = []
    off = 0
    while off < len(plaintext):
        kind, flags, length, ident = wire.HEADER.unpack_from(plaintext, off)
        payload = plaintext[off + 8 : off + 8 + length]
        out.append(
            {
                "kind": wire.Kind(kind).name,
                "flags": flags,
                "length": length,
                "id": ident,
                "header": plaintext[off : off + 8].hex(),
                "payload": payload.hex() if length <= 64 else f"{length} bytes",
            }
        )
        off += 8 + length
    return out


def event_json(event: S.Event) -> list[Any]:
    return [
        v.hex() if isinstance(v, bytes) else v if not isinstance(v, tuple) else list(v)
        for v in event
    ]


def headers() -> list[dict[str, Any]]:
    cases = [
        ("ONEWAY, no flags, 5 bytes, id 0", wire.Kind.ONEWAY, 0, 5, 0),
        ("REQUEST, id 1, 13 bytes", wire.Kind.REQUEST, 0, 13, 1),
        ("REQUEST flagged MORE and NESTED, id 4", wire.Kind.REQUEST, 0x05, 1000, 4),
        ("REPLY, id 1", wire.Kind.REPLY, 0, 2, 1),
        ("ERROR, id 3, code + text", wire.Kind.ERROR, 0, 8, 3),
        ("CONTINUATION flagged MORE, id 7", wire.Kind.CONTINUATION, 0x01, 1000, 7),
        ("CANCEL, id 5", wire.Kind.CANCEL, 0, 0, 5),
        ("PING, id 1", wire.Kind.PING, 0, 8, 1),
        ("PONG, id 1", wire.Kind.PONG, 0, 8, 1),
        ("GOAWAY, last id 3", wire.Kind.GOAWAY, 0, 2, 3),
        ("CREDIT, request window", wire.Kind.CREDIT, 0, 8, 2),
        ("largest id", wire.Kind.REPLY, 0, 0, 0xFFFFFFFF),
        ("STREAM, opens id 9", wire.Kind.STREAM, 0, 0, 9),
        ("CALL, opens id 11, u8 shape", wire.Kind.CALL, 0, 1, 11),
        ("DATA flagged MORE, id 11", wire.Kind.DATA, 0x01, 1000, 11),
        ("DATA flagged END, id 9", wire.Kind.DATA, 0x02, 3, 9),
        ("RESET, id 9, u16 code", wire.Kind.RESET, 0, 2, 9),
        ("STOP, id 9, u16 code", wire.Kind.STOP, 0, 2, 9),
        ("WINDOW, id 9, u64 limit", wire.Kind.WINDOW, 0, 8, 9),
        ("BLOCKED, connection data window", wire.Kind.BLOCKED, 0, 8, 0),
    ]
    return [
        {
            "what": w,
            "kind": int(k),
            "flags": f,
            "length": n,
            "id": i,
            "header": wire.HEADER.pack(k, f, n, i).hex(),
        }
        for w, k, f, n, i in cases
    ]


def sessions() -> tuple[S.Session, S.Session]:
    i = S.Session(
        initiator=True, local=INITIATOR_HELLO, peer=RESPONDER_HELLO, keepalive_interval=None
    )
    r = S.Session(
        initiator=False, local=RESPONDER_HELLO, peer=INITIATOR_HELLO, keepalive_interval=None
    )
    return i, r


def batch() -> dict[str, Any]:
    ini, _ = sessions()
    bodies = [b"one", b"", b"three" * 30]
    for b in bodies:
        ini.send_oneway(b)
    ini.send_request(b"a request")
    ini.send_request(b"x" * 900)
    plaintexts = ini.records_to_send(1008)
    return {
        "what": "3 one-way messages and 2 requests packed into plaintexts of <= 1008 bytes",
        "plaintexts": [p.hex() for p in plaintexts],
        "frames": [frames_of(p) for p in plaintexts],
    }


def fragmentation() -> dict[str, Any]:
    ini, res = sessions()
    body = bytes(i % 251 for i in range(3000))
    ident = ini.send_request(body)
    plaintexts = ini.records_to_send(1008)
    events = res.receive_records(plaintexts)
    assert events == [(S.EV_REQUEST, ident, body, 0)]
    return {
        "what": "a 3,000-byte request: REQUEST|MORE with u32 total, then CONTINUATIONs",
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "plaintexts": [p.hex() for p in plaintexts],
        "frames": [frames_of(p) for p in plaintexts],
    }


def credit() -> dict[str, Any]:
    ini, res = sessions()
    ini.send_oneway(b"z" * 100)
    (_event,) = res.receive_records(ini.records_to_send(1008))
    res.consumed(0, 100)
    plaintexts = res.records_to_send(65519)
    return {
        "what": "the responder returns a 100-byte one-way's cost (164) as a cumulative CREDIT",
        "initial_request_window": RESPONDER_HELLO.request_window,
        "plaintexts": [p.hex() for p in plaintexts],
        "frames": [frames_of(p) for p in plaintexts],
    }


def streams() -> dict[str, Any]:
    """Both sides with STREAM_HELLO: a byte stream that runs out of credit, the window
    update, END both ways; a download call; a cancelled bidirectional call; a download
    whose request and last reply are empty messages."""
    ini = S.Session(initiator=True, local=STREAM_HELLO, peer=STREAM_HELLO, keepalive_interval=None)
    res = S.Session(
        initiator=False, local=STREAM_HELLO, peer=STREAM_HELLO, keepalive_interval=None
    )
    steps: list[dict[str, Any]] = []

    def flush(sender: S.Session, receiver: S.Session, what: str) -> list[S.Event]:
        plaintexts = sender.records_to_send(1008)
        events = receiver.receive_records(plaintexts)
        steps.append(
            {
                "what": what,
                "direction": I2R if sender is ini else R2I,
                "plaintexts": [p.hex() for p in plaintexts],
                "frames": [frames_of(p) for p in plaintexts],
                "events": [event_json(e) for e in events],
            }
        )
        return events

    body = bytes(i % 251 for i in range(1500))
    sid = ini.open_stream() or 0
    accepted = ini.send_data(sid, body)
    assert accepted == 1024
    flush(ini, res, "STREAM 1 and 1,024 bytes: the whole stream window")
    flush(ini, res, "BLOCKED(1, 1024): its opening frame had to go first")
    res.read_done(sid, 1024)
    flush(res, ini, "the application read 1,024 bytes: WINDOW(1, 2048)")
    assert ini.send_data(sid, body[accepted:], end=True) == len(body) - accepted
    flush(ini, res, "the last 476 bytes with END")
    res.send_data(sid, b"thanks", end=True)
    flush(res, ini, "the responder's half: data and END; the stream is closed")
    cid = ini.open_call(2) or 0
    ini.send_message(cid, b"list everything")
    flush(ini, res, "CALL 3, download: one request message, with END")
    res.read_done(cid, 15 + wire.MESSAGE_COST)
    for part in (b"first", b"", b"third"):
        res.send_message(cid, part)
    res.send_end(cid)
    flush(res, ini, "three messages (one empty) and END")
    bid = ini.open_call(3) or 0
    ini.send_message(bid, b"x" * 40)
    flush(ini, res, "CALL 5, bidirectional, and a message")
    ini.cancel(bid)
    flush(ini, res, "cancelled: RESET(5, CANCELLED) and STOP(5, CANCELLED)")
    flush(res, ini, "STOP answered by RESET(5, CANCELLED); both slots are free")
    did = ini.open_call(2) or 0
    ini.send_message(did, b"")
    flush(ini, res, "CALL 7, download with an empty request: END alone is its message")
    res.read_done(did, wire.MESSAGE_COST)
    res.send_message(did, b"", end=True)
    flush(res, ini, "a last empty message: a DATA frame without flags, then END alone")
    assert ini.streams_open == (0, 0) == res.streams_open
    return {
        "hello": hello_json(STREAM_HELLO),
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "steps": steps,
    }


def _lz4_length(n: int) -> bytes:
    """LZ4's length extension for a length whose 4-bit field holds 15."""
    n -= 15
    return b"\xff" * (n // 255) + bytes([n % 255])


def lz4_block(literals: bytes, offset: int, match: int, tail: bytes) -> bytes:
    """An LZ4 block (the format ``lz4.block`` writes with ``store_size=False``) of two
    sequences, built by hand so the vectors do not depend on a compressor's choices:
    ``literals``, then ``match`` bytes copied from ``offset`` bytes back, then ``tail``
    (the block's last literals, at least 5 bytes, as LZ4 requires)."""
    lit, ml = len(literals), match - 4
    out = bytearray([min(lit, 15) << 4 | min(ml, 15)])
    out += _lz4_length(lit) if lit >= 15 else b""
    out += literals + offset.to_bytes(2, "little")
    out += _lz4_length(ml) if ml >= 15 else b""
    out += bytes([min(len(tail), 15) << 4]) + (_lz4_length(len(tail)) if len(tail) >= 15 else b"")
    return bytes(out + tail)


def zstd_rle_frame(byte: int, size: int) -> bytes:
    """A Zstandard frame by hand: single segment, a 2-byte content size (size - 256), no
    checksum, one RLE block of ``size`` copies of ``byte``."""
    assert 256 <= size < 65536 + 256
    header = b"\x28\xb5\x2f\xfd" + b"\x60" + (size - 256).to_bytes(2, "little")
    block = (1 | 1 << 1 | size << 3).to_bytes(3, "little") + bytes([byte])
    return header + block


def compression() -> dict[str, Any]:
    """Compressed message bodies (flag 0x08, envelope ``u8 codec | u32 size | data``),
    packed into <= 1,008-byte plaintexts as the reference packer lays out any body."""
    word = b'"monte_trio", '
    head = b'{"user": "alice", "tags": ['
    small = head + word * 75 + b'"end"]}'
    small_block = lz4_block(head + word, len(word), len(word) * 74, b'"end"]}')
    seed = b"".join(hashlib.sha256(b"compression %d" % i).digest() for i in range(38))[:1200]
    large = seed + seed * 2 + seed[:600] + b"--the end--\n"
    large_block = lz4_block(seed, len(seed), 3000, b"--the end--\n")
    cases = []
    for what, kind, ident, codec, body, data in (
        ("a 1,084-byte request, LZ4: REQUEST flagged COMPRESSED", wire.Kind.REQUEST, 1, 1,
         small, small_block),
        ("a 4,212-byte request, LZ4, fragmented: REQUEST flagged MORE and COMPRESSED "
         "(u32 total = the envelope's length), then CONTINUATION (never flagged)",
         wire.Kind.REQUEST, 3, 1, large, large_block),
        ("a 1,000-byte one-way message, Zstandard (one RLE block): ONEWAY flagged "
         "COMPRESSED", wire.Kind.ONEWAY, 0, 2, b"a" * 1000, zstd_rle_frame(ord("a"), 1000)),
    ):  # fmt: skip
        payload = struct.pack(">BI", codec, len(body)) + data
        room = 1008 - 8 - 4
        if len(payload) <= 1008 - 8:
            plaintexts = [wire.HEADER.pack(kind, FLAG_COMPRESSED, len(payload), ident) + payload]
        else:
            first = len(payload).to_bytes(4, "big") + payload[:room]
            flags = FLAG_COMPRESSED | wire.FLAG_MORE
            plaintexts = [wire.HEADER.pack(kind, flags, len(first), ident) + first]
            rest = payload[room:]
            while rest:
                take, rest = rest[:1000], rest[1000:]
                more = wire.FLAG_MORE if rest else 0
                plaintexts.append(
                    wire.HEADER.pack(wire.Kind.CONTINUATION, more, len(take), ident) + take
                )
        cases.append(
            {
                "what": what,
                "codec": codec,
                "body": body.hex(),
                "body_sha256": hashlib.sha256(body).hexdigest(),
                "payload": payload.hex(),
                "plaintexts": [p.hex() for p in plaintexts],
                "frames": [frames_of(p) for p in plaintexts],
            }
        )
    return {
        "what": (
            "compressed bodies: flag 0x08 on the message's first frame; body = u8 codec | "
            "u32 decompressed size | codec data (1 = LZ4 block, 2 = one Zstandard frame with "
            "its content size); the blocks and frames are built by hand"
        ),
        "flag": FLAG_COMPRESSED,
        "hellos": [hello_json(h) for h in COMPRESSION_HELLOS],
        "cases": cases,
    }


def transcript() -> dict[str, Any]:
    name = _native_hello.protocol_name(psk=False)
    i_pre = _native_hello.encode_preamble(0, version=wire.VERSION)
    prologue = wire.prologue(name, i_pre)
    ini_hs = HandshakeState(
        name,
        initiator=True,
        prologue=prologue,
        s=KEYS["initiator_static"],
        e=KEYS["initiator_ephemeral"],
        psks=[],
    )
    res_hs = HandshakeState(
        name,
        initiator=False,
        prologue=prologue,
        s=KEYS["responder_static"],
        e=KEYS["responder_ephemeral"],
        psks=[],
    )
    msg1 = ini_hs.write_message(b"")
    res_hs.read_message(msg1)
    msg2 = res_hs.write_message(RESPONDER_HELLO.encode())
    r_pre = _native_hello.encode_preamble(_native_hello.Status.OK, version=wire.VERSION)
    assert wire.Hello2.decode(ini_hs.read_message(msg2)) == RESPONDER_HELLO
    msg3 = ini_hs.write_message(INITIATOR_HELLO.encode())
    assert wire.Hello2.decode(res_hs.read_message(msg3)) == INITIATOR_HELLO
    i_send, i_recv = ini_hs.split()
    r_i2r, r_r2i = res_hs.split()
    i_sealer, i_opener = _native_hello.transport(
        i_send, i_recv, peer_max_record=1024, own_max_record=65535
    )
    r_sealer, r_opener = _native_hello.transport(
        r_r2i, r_i2r, peer_max_record=65535, own_max_record=1024
    )
    verdict = r_sealer.seal(_native_hello.encode_verdict(True))
    assert i_opener.receive_data(verdict) == [b"\x00"]
    ini, _ = sessions()
    res = S.Session(initiator=False, local=RESPONDER_HELLO, peer=INITIATOR_HELLO, now=0.0)
    res.handle_timer(15.0)  # nothing heard for a keepalive interval: a PING is queued
    side = {I2R: (ini, i_sealer, r_opener, res), R2I: (res, r_sealer, i_opener, ini)}
    steps: list[dict[str, Any]] = []

    def flush(direction: str, what: str) -> list[S.Event]:
        sender, sealer, opener, receiver = side[direction]
        plaintexts = sender.records_to_send(sealer.max_plaintext)
        events: list[S.Event] = []
        for p in plaintexts:
            counter = sealer.counter
            record = sealer.seal(p)
            assert opener.receive_data(record) == [p]
            got = receiver.receive_records([p])
            events += got
            steps.append(
                {
                    "what": what,
                    "direction": direction,
                    "counter": counter,
                    "plaintext": p.hex(),
                    "frames": frames_of(p),
                    "wire": record.hex(),
                    "events": [event_json(e) for e in got],
                }
            )
        return events

    r1 = ini.send_request(b"hello, server")
    ini.send_oneway(b"a note")
    r3 = ini.send_request(b"divide by zero")
    flush(I2R, "two requests and a one-way message in one record")
    res.consumed(r1 or 0)
    res.consumed(0, 6)
    res.consumed(r3 or 0)
    res.send_reply(r1 or 0, b"hello, client")
    res.send_error(r3 or 0, wire.ErrorCode.INTERNAL, "ZeroDivisionError: division by zero")
    q = res.send_request(b"who are you?")
    flush(R2I, "keepalive PING, CREDIT for the bodies, the reply, the error, a request")
    ini.delivered(r1 or 0)
    ini.consumed(q or 0)
    ini.send_reply(q or 0, b"the initiator")
    flush(I2R, "PONG first (control lane), CREDIT, then the reply")
    res.delivered(q or 0)
    res.start_close()
    flush(R2I, "CREDIT, then GOAWAY (last accepted id 3)")
    flush(I2R, "the answering GOAWAY (last accepted id 2)")
    assert ini.finished
    assert res.finished
    return {
        "protocol_name": name,
        "keys": {k: v.hex() for k, v in KEYS.items()},
        "public_keys": {k: public(v).hex() for k, v in KEYS.items()},
        "initiator_hello": hello_json(INITIATOR_HELLO),
        "responder_hello": hello_json(RESPONDER_HELLO),
        "prologue": prologue.hex(),
        "wire_1": (i_pre + U16.pack(len(msg1)) + msg1).hex(),
        "wire_2": (r_pre + U16.pack(len(msg2)) + msg2).hex(),
        "wire_3": (U16.pack(len(msg3)) + msg3).hex(),
        "handshake_hash": ini_hs.handshake_hash.hex(),
        "verdict_wire": verdict.hex(),
        "records": steps,
    }


def build() -> dict[str, Any]:
    return {
        "notes": (
            "Native wire version 2. Frame header: u8 kind | u8 flags | u16 length | u32 id. "
            "Hello: TLV u16 type | u16 length | value. 'events' are the reference Session's "
            "events for each record: [kind, id, a, b] with bytes in hex (1 REQUEST, 2 ONEWAY, "
            "3 REPLY, 4 ERROR, 5 CANCEL, 6 GOAWAY, 7 PONG, 9 STREAM_OPENED, 10 DATA, 11 MESSAGE, "
            "12 END, 13 RESET, 14 STOP, 15 CALL_CREDIT). Records use version 1's layer."
        ),
        "hellos": [
            hello_json(h)
            for h in [
                INITIATOR_HELLO,
                RESPONDER_HELLO,
                *CODEC_HELLOS,
                STREAM_HELLO,
                *COMPRESSION_HELLOS,
            ]
        ],
        "headers": headers(),
        "batch": batch(),
        "fragmentation": fragmentation(),
        "credit": credit(),
        "streams": streams(),
        "transcript": transcript(),
        "compression": compression(),
    }


def render() -> str:
    return json.dumps(build(), indent=1, sort_keys=True) + "\n"


def main() -> int:
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
