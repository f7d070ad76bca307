"""Generate tests/vectors/native-handshake.json: known-answer vectors for the native profile.

Run from the repository root::

    .venv/bin/python tests/vectors/make_native_vectors.py

Everything is built with the sans-IO modules (``monte_trio._proto``) and the very helpers
:class:`monte_trio.NativeHandshake` uses to put bytes on the wire (``encode_preamble``,
``prologue``, ``protocol_name``, ``Hello2.encode``, ``transport``, ``encode_verdict``), in
the order it uses them. The records' plaintexts are opaque bytes: these vectors cover the
handshake and the record layer; what a plaintext carries (version 2 frames) has its own
vectors, tests/vectors/native-v2.json. No socket and no event loop is involved; the
output is fully deterministic (fixed keys, deterministic AEADs), so running the script twice
gives the same file. tests/test_native_vectors.py checks the file independently, including
one end-to-end run of NativeHandshake over trio memory streams.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from monte_trio._config import ConnectionConfig
from monte_trio._exceptions import DecryptionError
from monte_trio._proto import _native_hello as wire
from monte_trio._proto._noise import HandshakeState
from monte_trio._proto._noise_crypto import (
    NOISE_AESGCM_NONCE,
    NOISE_CHACHAPOLY_NONCE,
    NonceFormat,
    rekey_key,
)
from monte_trio._proto._records import RecordOpener, RecordSealer
from monte_trio._proto._wire2 import MAX_RECORD, VERSION, Hello2, prologue

OUTPUT = Path(__file__).with_name("native-handshake.json")
LABEL_PREFIX = b"monte_trio native-v1 test vector: "
U16 = struct.Struct(">H")
I2R = "initiator_to_responder"
R2I = "responder_to_initiator"

# Each side's ConnectionConfig in every case. The responder deliberately accepts small
# records and messages, so that a message split into several records stays short in the
# file; the initiator uses the defaults.
# Fixed limits (not the defaults), so the vectors do not change when a default does.
INITIATOR_CONFIG = ConnectionConfig(max_message_size=16 << 20)
RESPONDER_CONFIG = ConnectionConfig(max_record_size=1024, max_message_size=4096)

TEST_REKEY_INTERVAL = 4
"""A TEST-ONLY rekey interval, far below the protocol's wire.REKEY_INTERVAL (2**20)."""


def derive(label: str) -> bytes:
    """A fixed 32-byte value: SHA-256 of the prefix and ``label``."""
    return hashlib.sha256(LABEL_PREFIX + label.encode()).digest()


def public(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


KEYS = {
    "initiator_static": derive("initiator static"),
    "initiator_ephemeral": derive("initiator ephemeral"),
    "responder_static": derive("responder static"),
    "responder_ephemeral": derive("responder ephemeral"),
}
PSK = derive("psk")
WRONG_PSK = derive("wrong psk")


def hello_for(config: ConnectionConfig) -> Hello2:
    """The hello NativeHandshake._hello builds from ``config``."""
    max_record = min(config.max_record_size or MAX_RECORD, MAX_RECORD)
    return Hello2(
        max_record_size=max_record,
        max_message_size=config.max_message_size,
        request_window=config.effective_request_window,
        reply_window=config.effective_reply_window,
        max_calls=config.max_calls,
        nested_allowance=config.nested_allowance,
    )


def hello_json(hello: Hello2) -> dict[str, Any]:
    return {
        "version": hello.version,
        "max_record_size": hello.max_record_size,
        "max_message_size": hello.max_message_size,
        "request_window": hello.request_window,
        "reply_window": hello.reply_window,
        "max_calls": hello.max_calls,
        "nested_allowance": hello.nested_allowance,
        "features": hello.features,
        "encoded": hello.encode().hex(),
    }


def states(
    name: str, preamble: bytes, psk: bytes | None, responder_psk: bytes | None = None
) -> tuple[HandshakeState, HandshakeState]:
    """Initiator and responder states exactly as NativeHandshake._state makes them, plus
    the fixed ephemeral keys."""
    bound = prologue(name, preamble)
    rpsk = psk if responder_psk is None else responder_psk
    initiator = HandshakeState(
        name,
        initiator=True,
        prologue=bound,
        s=KEYS["initiator_static"],
        e=KEYS["initiator_ephemeral"],
        psks=[psk] if psk is not None else [],
    )
    responder = HandshakeState(
        name,
        initiator=False,
        prologue=bound,
        s=KEYS["responder_static"],
        e=KEYS["responder_ephemeral"],
        psks=[rpsk] if rpsk is not None else [],
    )
    return initiator, responder


def flip(data: bytes, index: int) -> bytes:
    """``data`` with the lowest bit of byte ``index`` flipped."""
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


def build_case(psk: bytes | None, cipher: str) -> dict[str, Any]:
    name = wire.protocol_name(psk=psk is not None, cipher=cipher)
    # --- the handshake, step by step as NativeHandshake._initiate / _respond ---------------
    i_preamble = wire.encode_preamble(wire.FLAG_PSK if psk else 0)
    initiator, responder = states(name, i_preamble, psk)
    msg1 = initiator.write_message(b"")
    wire1 = i_preamble + U16.pack(len(msg1)) + msg1

    version, flags = wire.decode_preamble(wire1[: wire.PREAMBLE_SIZE], who="client")
    assert (version, flags) == (VERSION, wire.FLAG_PSK if psk else 0)
    assert responder.read_message(msg1) == b""
    r_hello = hello_for(RESPONDER_CONFIG)
    msg2 = responder.write_message(r_hello.encode())
    r_preamble = wire.encode_preamble(wire.Status.OK)
    wire2 = r_preamble + U16.pack(len(msg2)) + msg2

    assert Hello2.decode(initiator.read_message(msg2)) == r_hello
    i_hello = hello_for(INITIATOR_CONFIG)
    msg3 = initiator.write_message(i_hello.encode())
    wire3 = U16.pack(len(msg3)) + msg3
    assert Hello2.decode(responder.read_message(msg3)) == i_hello
    assert initiator.handshake_hash == responder.handshake_hash

    i_send, i_receive = initiator.split()
    r_i2r, r_r2i = responder.split()
    assert i_send.key == r_i2r.key
    assert i_receive.key == r_r2i.key
    assert i_send.key is not None
    assert i_receive.key is not None
    i_sealer, i_opener = wire.transport(
        i_send,
        i_receive,
        peer_max_record=r_hello.max_record_size,
        own_max_record=i_hello.max_record_size,
    )
    r_sealer, r_opener = wire.transport(
        r_r2i,
        r_i2r,
        peer_max_record=i_hello.max_record_size,
        own_max_record=r_hello.max_record_size,
    )
    verdict_plain = wire.encode_verdict(True)
    verdict_wire = r_sealer.seal(verdict_plain)
    assert i_opener.receive_data(verdict_wire) == [verdict_plain]

    sealers = {I2R: i_sealer, R2I: r_sealer}
    openers = {I2R: r_opener, R2I: i_opener}
    by_direction: dict[str, list[bytes]] = {I2R: [], R2I: [verdict_wire]}

    big = bytes(i % 251 for i in range(2400))
    room = i_sealer.max_plaintext  # towards the responder: its 1024-byte records
    script: list[tuple[str, str, bytes]] = [
        ("a short record from the initiator", I2R, b"hello, responder"),
        ("a short record from the responder", R2I, b"hello, initiator"),
        ("an empty plaintext: the record is its length and the tag", I2R, b""),
        (
            f"the largest plaintext the responder accepts ({room} = 1024 - 16 bytes)",
            I2R,
            big[:room],
        ),
        ("2400 bytes towards the initiator, which accepts 65535-byte records", R2I, big),
        ("a last record from the initiator", I2R, b"goodbye"),
    ]
    records: list[dict[str, Any]] = []
    for step, direction, plain in script:
        index = sealers[direction].counter
        sealed = sealers[direction].seal(plain)
        (opened,) = openers[direction].receive_data(sealed)
        assert opened == plain
        by_direction[direction].append(sealed)
        records.append(
            {
                "step": step,
                "direction": direction,
                "index": index,
                "plaintext": plain.hex(),
                "wire": sealed.hex(),
            }
        )

    case: dict[str, Any] = {
        "name": f"{'XXpsk3' if psk else 'XX'}-{cipher}",
        "protocol_name": name,
        "cipher": cipher,
        "psk": psk.hex() if psk else None,
        "initiator_config": {
            "max_record_size": INITIATOR_CONFIG.max_record_size,
            "max_message_size": INITIATOR_CONFIG.max_message_size,
        },
        "responder_config": {
            "max_record_size": RESPONDER_CONFIG.max_record_size,
            "max_message_size": RESPONDER_CONFIG.max_message_size,
        },
        "initiator_hello": hello_json(i_hello),
        "responder_hello": hello_json(r_hello),
        "prologue": prologue(name, i_preamble).hex(),
        "handshake": {
            "initiator_preamble": i_preamble.hex(),
            "msg1": msg1.hex(),
            "msg1_payload": "",
            "wire_1": wire1.hex(),
            "responder_preamble": r_preamble.hex(),
            "msg2": msg2.hex(),
            "msg2_payload": r_hello.encode().hex(),
            "wire_2": wire2.hex(),
            "msg3": msg3.hex(),
            "msg3_payload": i_hello.encode().hex(),
            "wire_3": wire3.hex(),
            "handshake_hash": initiator.handshake_hash.hex(),
        },
        "transport_keys": {I2R: i_send.key.hex(), R2I: i_receive.key.hex()},
        "verdict": {
            "direction": R2I,
            "index": 0,
            "plaintext": verdict_plain.hex(),
            "wire": verdict_wire.hex(),
        },
        "records": records,
        "rekey": build_rekey(cipher, i_send.key),
        "invalid_records": build_invalid(by_direction, r_hello, cipher, i_send.key),
        "invalid_handshakes": build_invalid_handshakes(name, psk, msg1, msg3),
    }
    return case


def _nonce(cipher: str) -> NonceFormat:
    return NOISE_AESGCM_NONCE if cipher == "AESGCM" else NOISE_CHACHAPOLY_NONCE


def build_rekey(cipher: str, key: bytes) -> dict[str, Any]:
    """Records around rekey boundaries, in the initiator-to-responder direction."""
    nonce = _nonce(cipher)

    def run(interval: int, start: int, count: int) -> list[dict[str, Any]]:
        sealer = RecordSealer(
            key, nonce, max_record_size=256, counter=start, rekey_interval=interval
        )
        opener = RecordOpener(
            key, nonce, max_record_size=256, counter=start, rekey_interval=interval
        )
        out = []
        for index in range(start, start + count):
            plain = f"record {index}".encode()
            sealed = sealer.seal(plain)
            assert opener.receive_data(sealed) == [plain]
            out.append(
                {
                    "index": index,
                    "rekeys_before": index // interval,
                    "plaintext": plain.hex(),
                    "wire": sealed.hex(),
                }
            )
        return out

    keys = [key]
    for _ in range(3):
        keys.append(rekey_key(cipher, keys[-1]))
    start = wire.REKEY_INTERVAL - 2
    return {
        "direction": I2R,
        "keys": [k.hex() for k in keys],
        "test_interval": {
            "rekey_interval": TEST_REKEY_INTERVAL,
            "TEST_ONLY": True,
            "start_counter": 0,
            "records": run(TEST_REKEY_INTERVAL, 0, 10),
        },
        "protocol_interval": {
            "rekey_interval": wire.REKEY_INTERVAL,
            "TEST_ONLY": False,
            "start_counter": start,
            "records": run(wire.REKEY_INTERVAL, start, 4),
        },
    }


def build_invalid(
    by_direction: dict[str, list[bytes]],
    r_hello: Hello2,
    cipher: str,
    i2r_key: bytes,
) -> list[dict[str, Any]]:
    i2r, r2i = by_direction[I2R], by_direction[R2I]
    rec0 = i2r[0]
    cut = rec0[:-5]
    relabelled = struct.pack(">I", len(rec0) - 4 - 5) + rec0[4:-5]

    def sealed_from_zero(plaintexts: list[bytes]) -> bytes:
        """Records a misbehaving initiator seals from counter 0 (its first records)."""
        sealer = RecordSealer(
            i2r_key,
            _nonce(cipher),
            max_record_size=r_hello.max_record_size,
            rekey_interval=wire.REKEY_INTERVAL,
        )
        return b"".join(sealer.seal(p) for p in plaintexts)

    invalid: list[dict[str, Any]] = [
        {
            "name": "tampered",
            "what": "the initiator's record 0 with one ciphertext bit flipped",
            "direction": I2R,
            "preceded_by": 0,
            "wire": flip(rec0, 10).hex(),
            "eof": False,
            "error": "DecryptionError",
        },
        {
            "name": "tampered-tag",
            "what": "the responder's record 1 with the last tag bit flipped",
            "direction": R2I,
            "preceded_by": 1,
            "wire": flip(r2i[1], len(r2i[1]) - 1).hex(),
            "eof": False,
            "error": "DecryptionError",
        },
        {
            "name": "tampered-length",
            "what": "the initiator's record 0 with its length prefix one byte larger",
            "direction": I2R,
            "preceded_by": 0,
            "wire": (struct.pack(">I", len(rec0) - 4 + 1) + rec0[4:] + b"\x00").hex(),
            "eof": False,
            "error": "DecryptionError",
        },
        {
            "name": "reflected",
            "what": (
                "the initiator's own record 1 sent back to it where the responder's record "
                "1 is expected (same counter, other direction's key)"
            ),
            "direction": R2I,
            "preceded_by": 1,
            "wire": i2r[1].hex(),
            "eof": False,
            "error": "DecryptionError",
        },
        {
            "name": "replayed",
            "what": "the initiator's record 0 again, after record 0",
            "direction": I2R,
            "preceded_by": 1,
            "wire": rec0.hex(),
            "eof": False,
            "error": "DecryptionError",
        },
        {
            "name": "reordered",
            "what": "the initiator's record 2 where record 1 is expected",
            "direction": I2R,
            "preceded_by": 1,
            "wire": i2r[2].hex(),
            "eof": False,
            "error": "DecryptionError",
        },
        {
            "name": "truncated-then-eof",
            "what": "the initiator's record 0 without its last 5 bytes, then end of stream",
            "direction": I2R,
            "preceded_by": 0,
            "wire": cut.hex(),
            "eof": True,
            "error": "RemoteProtocolError",
        },
        {
            "name": "truncated-relabelled",
            "what": "the initiator's record 0 cut by 5 bytes, length prefix lowered to match",
            "direction": I2R,
            "preceded_by": 0,
            "wire": relabelled.hex(),
            "eof": False,
            "error": "DecryptionError",
        },
        {
            "name": "oversized-length",
            "what": "a length prefix above the receiver's max record size (1024): refused "
            "from its 4 bytes alone",
            "direction": I2R,
            "preceded_by": 0,
            "wire": struct.pack(">I", r_hello.max_record_size + 1).hex(),
            "eof": False,
            "error": "RemoteProtocolError",
        },
        {
            "name": "undersized-length",
            "what": "a length prefix below the 16-byte tag",
            "direction": I2R,
            "preceded_by": 0,
            "wire": struct.pack(">I", 15).hex(),
            "eof": False,
            "error": "RemoteProtocolError",
        },
    ]
    return invalid


def build_invalid_handshakes(
    name: str, psk: bytes | None, msg1: bytes, msg3: bytes
) -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = []
    # A man in the middle alters the initiator's preamble (an unknown flag bit the
    # responder does not act on): the prologues differ. Without a psk msg1 carries no tag,
    # so the responder answers and the initiator cannot decrypt msg2; with XXpsk3 msg1's
    # (empty) payload is already encrypted (the psk modifier makes "e" mix the key), so the
    # responder fails on msg1 itself.
    sent = wire.encode_preamble(wire.FLAG_PSK if psk else 0)
    altered = wire.encode_preamble((wire.FLAG_PSK if psk else 0) | 0x02)
    _, responder = states(name, altered, psk)
    entry: dict[str, Any] = {
        "name": "altered-preamble",
        "what": "the responder received the initiator's preamble with flag bit 0x02 set in "
        "transit (so its prologue differs)",
        "initiator_preamble_sent": sent.hex(),
        "initiator_preamble_received": altered.hex(),
        "error": "DecryptionError",
    }
    if psk is None:
        responder.read_message(msg1)
        msg2 = responder.write_message(hello_for(RESPONDER_CONFIG).encode())
        entry.update(msg2=msg2.hex(), failing_side="initiator", failing_message=2)
    else:
        try:
            responder.read_message(msg1)
        except DecryptionError:
            entry.update(msg1=msg1.hex(), failing_side="responder", failing_message=1)
        else:  # pragma: no cover - the prologue binding would be broken
            raise AssertionError("msg1 was accepted under another prologue")
    cases.append(entry)
    if psk is not None:
        _, responder = states(name, sent, psk, responder_psk=WRONG_PSK)
        responder.read_message(msg1)
        responder.write_message(hello_for(RESPONDER_CONFIG).encode())
        cases.append(
            {
                "name": "wrong-psk",
                "what": "the responder holds another psk; msg1 and msg2 are unchanged (psk3 "
                "is mixed in at the end of message 3), so the responder fails on msg3",
                "responder_psk": WRONG_PSK.hex(),
                "msg3": msg3.hex(),
                "failing_side": "responder",
                "failing_message": 3,
                "error": "DecryptionError",
            }
        )
    return cases


def preamble_refusals() -> list[dict[str, Any]]:
    out = []
    for what, sent, responder_psk, status in (
        ("version 1 offered", wire.encode_preamble(0, version=1), False, 1),
        ("no psk flag, responder has a psk", wire.encode_preamble(0), True, 2),
        ("psk flag, responder has none", wire.encode_preamble(wire.FLAG_PSK), False, 3),
    ):
        out.append(
            {
                "what": what,
                "initiator_preamble": sent.hex(),
                "responder_has_psk": responder_psk,
                "responder_reply": wire.encode_preamble(status).hex(),
                "status": status,
                "message": wire.Status.MESSAGES[status],
            }
        )
    return out


NOTES = [
    "All byte strings are lowercase hex. Integers on the wire are big-endian.",
    "Keys: every private key (and the psk) is SHA-256(b'" + LABEL_PREFIX.decode() + "' + "
    "label) with the label given in 'key_labels'; *_private are raw X25519 scalars (X25519 "
    "clamps them), *_public the raw 32-byte public keys. The same keys are used in every "
    "case. Ephemeral keys are fixed here only: a real handshake generates fresh ones.",
    "cases: Noise_XX and Noise_XXpsk3, each with AESGCM (the default) and ChaChaPoly; DH "
    "25519 and hash BLAKE2b always.",
    "initiator_config / responder_config: each side's ConnectionConfig (null "
    "max_record_size = the profile default 65535). *_hello: the hello each side sends, "
    "built from its config like NativeHandshake does; 'encoded' is the version 2 TLV hello "
    "(u16 type | u16 length | value, types 1..8 in increasing order; docs/wire-native.rst, "
    "'Hello').",
    "prologue = b'monte_trio native/' | u8 version (2) | 0x00 | protocol_name (ASCII) | "
    "the initiator's 8-byte preamble, as both sides mix it into h before msg1.",
    "handshake: initiator_preamble = b'MNTRIO' | u8 version | u8 flags (0x01 = psk). "
    "wire_1 = initiator_preamble | u16 len(msg1) | msg1 (payload empty). wire_2 = "
    "responder_preamble (b'MNTRIO' | u8 version | u8 status, 0 = OK) | u16 len(msg2) | "
    "msg2 (payload: the responder's hello). wire_3 = u16 len(msg3) | msg3 (payload: the "
    "initiator's hello). Each wire_N is exactly one send_all of NativeHandshake. "
    "handshake_hash is Noise's h after msg3, identical on both sides.",
    "transport_keys: the two keys of Noise Split(): initiator_to_responder is the first "
    "(the initiator seals with it), responder_to_initiator the second.",
    "Records: wire = u32 len | AEAD(key, nonce, plaintext, ad=empty), len = "
    "len(plaintext) + 16. Nonce = 4 zero bytes | u64 counter, big-endian for AESGCM and "
    "little-endian for ChaChaPoly (Noise's nonce encodings); counters start at 0 in each "
    "direction and count every record of that direction. index = that counter.",
    "verdict: the responder's first record (index 0 towards the initiator), plaintext 00 = "
    "accepted (01 | UTF-8 reason = refused). The responder's other records start at index 1.",
    "records: one exchange in the order the records are sent, interleaving directions. The "
    "plaintexts are opaque to the record layer (on a connection they carry version 2 "
    "frames: see native-v2.json); the long ones are byte(i % 251) for i = 0, 1, .... The "
    "responder accepts 1024-byte records, so at most 1008 plaintext bytes per record "
    "towards it; the initiator accepts 65535-byte records.",
    "rekey: REKEY(k) = first 32 bytes of ENCRYPT(k, nonce 2**64-1, ad empty, 32 zero "
    "bytes); keys[i] is the key after i rekeys. A direction rekeys before sealing (and "
    "opening) each record whose counter is a non-zero multiple of the interval; the counter "
    "is not reset. test_interval uses a TEST-ONLY interval of 4 records from counter 0 "
    "(never used on a real connection); protocol_interval uses the real interval 2**20 and "
    "starts at counter 2**20 - 2 with the original key (records 0..2**20-3 are not listed: "
    "they change nothing but the counter). rekeys_before = index // interval = which key "
    "sealed the record. These records use the initiator_to_responder key, separately from "
    "the 'records' exchange.",
    "invalid_records: feed the receiving side's opener (fresh, from the transport keys) the "
    "first 'preceded_by' valid wire records of that direction (for responder_to_initiator "
    "the verdict is record 0), then 'wire' (then end of stream if eof); it must raise "
    "'error' (monte_trio exception class; DecryptionError is a subclass of "
    "RemoteProtocolError, and a RemoteProtocolError case must not be a DecryptionError). "
    "Any such error closes the connection; there is no resynchronisation.",
    "invalid_handshakes: altered-preamble shows the prologue binding: a preamble changed "
    "in transit makes the first encrypted handshake message fail (msg2 at the initiator for "
    "XX, msg1 at the responder for XXpsk3); wrong-psk shows a psk mismatch failing at msg3 "
    "at the responder. Replay with the case's keys and the sent or received preamble in "
    "the prologue of each side; NativeHandshake reports these as HandshakeError.",
    "preamble_refusals: what a responder sends back (only its preamble, then it closes) to "
    "an initiator preamble it refuses; status 1 = unsupported version, 2 = psk required, 3 = "
    "psk not configured.",
]


def build() -> dict[str, Any]:
    cases = [build_case(psk, cipher) for psk in (None, PSK) for cipher in ("AESGCM", "ChaChaPoly")]
    keys: dict[str, Any] = {}
    for label, private in KEYS.items():
        keys[f"{label}_private"] = private.hex()
        keys[f"{label}_public"] = public(private).hex()
    return {
        "source": "generated by tests/vectors/make_native_vectors.py from monte_trio's sans-IO "
        "modules (the helpers NativeHandshake uses); see docs/wire-native.rst",
        "profile": f"monte_trio native, version {VERSION}",
        "notes": NOTES,
        "key_labels": {
            "initiator_static": "initiator static",
            "initiator_ephemeral": "initiator ephemeral",
            "responder_static": "responder static",
            "responder_ephemeral": "responder ephemeral",
            "psk": "psk",
            "wrong_psk": "wrong psk",
        },
        "keys": keys,
        "psk": PSK.hex(),
        "constants": {
            "magic": wire.MAGIC.hex(),
            "version": VERSION,
            "max_record": MAX_RECORD,
            "rekey_interval": wire.REKEY_INTERVAL,
            "test_rekey_interval": TEST_REKEY_INTERVAL,
        },
        "cases": cases,
        "preamble_refusals": preamble_refusals(),
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main() -> int:
    OUTPUT.write_text(render(), encoding="utf-8")
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
