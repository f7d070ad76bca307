"""Tests of the sans-IO Noise implementation (``monte_trio._proto._noise`` and the
``_noise_crypto``, ``_noise_cipher`` and ``_noise_patterns`` modules it is built on).

The known-answer tests use the cacophony vectors (25519 + BLAKE2b, AESGCM and ChaChaPoly),
stored beside this file in ``tests/vectors/``.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from monte_trio._exceptions import (
    DecryptionError,
    LocalProtocolError,
    MonteError,
    RemoteProtocolError,
)
from monte_trio._proto._noise import HandshakeState
from monte_trio._proto._noise_cipher import CipherState, SymmetricState
from monte_trio._proto._noise_crypto import (
    MAX_MESSAGE_LEN,
    MAX_NONCE,
    NOISE_AESGCM_NONCE,
    NOISE_CHACHAPOLY_NONCE,
    rekey_key,
)
from monte_trio._proto._noise_patterns import PATTERNS, parse_protocol_name
from monte_trio._proto._records import RecordOpener, RecordSealer

HERE = Path(__file__).parent
VECTOR_FILE = HERE / "vectors" / "cacophony-25519-blake2b.json"
PROTO_DIR = HERE.parent / "monte_trio" / "_proto"

Vector = dict[str, Any]


def _load_vectors() -> list[Vector]:
    with VECTOR_FILE.open(encoding="utf-8") as f:
        data = json.load(f)
    vectors: list[Vector] = data["vectors"]
    return vectors


VECTORS = _load_vectors()


def _hx(vector: Vector, field: str) -> bytes | None:
    value = vector.get(field)
    return None if value is None else bytes.fromhex(value)


def _psks(vector: Vector, field: str) -> list[bytes]:
    return [bytes.fromhex(p) for p in vector.get(field, [])]


def _key() -> bytes:
    return X25519PrivateKey.generate().private_bytes_raw()


def _public(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


# ---------------------------------------------------------------------------------------
# Known-answer vectors
# ---------------------------------------------------------------------------------------


def test_vector_file_covers_every_pattern() -> None:
    assert len(VECTORS) == 118
    bases = set()
    for vector in VECTORS:
        pattern, _ = parse_protocol_name(vector["protocol_name"])
        bases.add(pattern.name.split("psk")[0])
    # every base pattern of the table is exercised by at least one vector
    assert bases == set(PATTERNS)


@pytest.mark.parametrize("vector", VECTORS, ids=[v["protocol_name"] for v in VECTORS])
def test_cacophony_vector(vector: Vector) -> None:
    name = vector["protocol_name"]
    init = HandshakeState(
        name,
        initiator=True,
        prologue=bytes.fromhex(vector["init_prologue"]),
        s=_hx(vector, "init_static"),
        e=_hx(vector, "init_ephemeral"),
        rs=_hx(vector, "init_remote_static"),
        psks=_psks(vector, "init_psks"),
    )
    resp = HandshakeState(
        name,
        initiator=False,
        prologue=bytes.fromhex(vector["resp_prologue"]),
        s=_hx(vector, "resp_static"),
        e=_hx(vector, "resp_ephemeral"),
        rs=_hx(vector, "resp_remote_static"),
        psks=_psks(vector, "resp_psks"),
    )
    n_handshake = len(init.pattern.messages)
    one_way = init.pattern.one_way
    messages = vector["messages"]
    assert len(messages) > n_handshake

    for i, message in enumerate(messages[:n_handshake]):
        payload = bytes.fromhex(message["payload"])
        expected = bytes.fromhex(message["ciphertext"])
        sender, receiver = (init, resp) if i % 2 == 0 else (resp, init)
        assert sender.is_my_turn
        assert not receiver.is_my_turn
        assert sender.message_index == receiver.message_index == i
        assert sender.write_message(payload) == expected
        assert receiver.read_message(expected) == payload

    assert init.complete
    assert resp.complete
    assert not init.is_my_turn
    assert not resp.is_my_turn
    assert init.message_index == resp.message_index == n_handshake
    expected_hash = bytes.fromhex(vector["handshake_hash"])
    assert init.handshake_hash == expected_hash
    assert resp.handshake_hash == expected_hash
    # Each side knows the other's static key when the pattern has one.
    if vector.get("resp_static") is not None:
        assert init.remote_static == _public(bytes.fromhex(vector["resp_static"]))
    if vector.get("init_static") is not None and "N" not in name.split("_")[1][:1]:
        assert resp.remote_static == _public(bytes.fromhex(vector["init_static"]))

    init_send, init_recv = init.split()
    resp_recv, resp_send = resp.split()
    for i, message in enumerate(messages[n_handshake:], start=n_handshake):
        payload = bytes.fromhex(message["payload"])
        expected = bytes.fromhex(message["ciphertext"])
        if one_way or i % 2 == 0:
            sender_cs, receiver_cs = init_send, resp_recv
        else:
            sender_cs, receiver_cs = resp_send, init_recv
        assert sender_cs.encrypt_with_ad(b"", payload) == expected
        assert receiver_cs.decrypt_with_ad(b"", expected) == payload


# ---------------------------------------------------------------------------------------
# Helpers for the behavioural tests
# ---------------------------------------------------------------------------------------


def _xx_pair(
    cipher: str = "AESGCM", *, psk: bool = False
) -> tuple[HandshakeState, HandshakeState]:
    name = f"Noise_XX{'psk3' if psk else ''}_25519_{cipher}_BLAKE2b"
    psks = [b"k" * 32] if psk else []
    init = HandshakeState(name, initiator=True, s=_key(), psks=psks)
    resp = HandshakeState(name, initiator=False, s=_key(), psks=psks)
    return init, resp


def _turns(init: HandshakeState, resp: HandshakeState) -> tuple[bool, bool]:
    return init.is_my_turn, resp.is_my_turn


def _run(init: HandshakeState, resp: HandshakeState) -> None:
    while not (init.complete and resp.complete):
        sender, receiver = (init, resp) if init.is_my_turn else (resp, init)
        receiver.read_message(sender.write_message(b"payload"))


# ---------------------------------------------------------------------------------------
# Handshake behaviour
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cipher", ["AESGCM", "ChaChaPoly"])
def test_xx_handshake_and_transport(cipher: str) -> None:
    init_s, resp_s = _key(), _key()
    name = f"Noise_XX_25519_{cipher}_BLAKE2b"
    init = HandshakeState(name, initiator=True, s=init_s, prologue=b"monte")
    resp = HandshakeState(name, initiator=False, s=resp_s, prologue=b"monte")
    assert init.local_static_public == _public(init_s)
    assert (init.remote_static, resp.remote_static) == (None, None)
    assert _turns(init, resp) == (True, False)
    assert init.expects_write
    assert resp.read_message(init.write_message(b"hello")) == b"hello"
    assert _turns(init, resp) == (False, True)
    assert init.read_message(resp.write_message(b"")) == b""
    assert init.remote_static == _public(resp_s)
    assert resp.read_message(init.write_message(b"done")) == b"done"
    assert resp.remote_static == _public(init_s)
    assert init.complete
    assert resp.complete
    assert init.handshake_hash == resp.handshake_hash
    assert len(init.handshake_hash) == 64

    i2r, r2i = init.split()
    r_i2r, r_r2i = resp.split()
    assert i2r.key == r_i2r.key
    assert r2i.key == r_r2i.key
    assert i2r.key != r2i.key
    assert i2r.cipher_name == cipher
    for n in range(3):
        assert r_i2r.decrypt_with_ad(b"ad", i2r.encrypt_with_ad(b"ad", b"x" * n)) == b"x" * n
        assert r2i.decrypt_with_ad(b"", r_r2i.encrypt_with_ad(b"", b"y")) == b"y"
    assert i2r.nonce == 3


def test_ik_initiator_knows_responder_key() -> None:
    resp_s = _key()
    name = "Noise_IK_25519_ChaChaPoly_BLAKE2b"
    init = HandshakeState(name, initiator=True, s=_key(), rs=_public(resp_s))
    resp = HandshakeState(name, initiator=False, s=resp_s)
    assert init.remote_static == _public(resp_s)
    msg1 = init.write_message(b"zero-rtt")
    # e (32) + encrypted s (32 + 16) + encrypted payload (8 + 16)
    assert len(msg1) == 32 + 48 + 8 + 16
    assert resp.read_message(msg1) == b"zero-rtt"
    assert resp.remote_static == init.local_static_public
    assert init.read_message(resp.write_message(b"")) == b""
    assert init.complete
    assert resp.complete
    assert init.handshake_hash == resp.handshake_hash


def test_xxpsk3_handshake() -> None:
    init, resp = _xx_pair(psk=True)
    _run(init, resp)
    assert init.handshake_hash == resp.handshake_hash
    (a, _), (b, _) = init.split(), resp.split()
    assert b.decrypt_with_ad(b"", a.encrypt_with_ad(b"", b"ok")) == b"ok"


def test_one_way_pattern() -> None:
    resp_s = _key()
    init = HandshakeState("Noise_N_25519_AESGCM_BLAKE2b", initiator=True, rs=_public(resp_s))
    resp = HandshakeState("Noise_N_25519_AESGCM_BLAKE2b", initiator=False, s=resp_s)
    assert resp.read_message(init.write_message(b"sealed")) == b"sealed"
    assert init.complete
    assert resp.complete
    assert init.pattern.one_way
    send, _ = init.split()
    recv, _ = resp.split()
    assert recv.decrypt_with_ad(b"", send.encrypt_with_ad(b"", b"m")) == b"m"


def test_split_only_once_and_only_when_complete() -> None:
    init, resp = _xx_pair()
    with pytest.raises(LocalProtocolError):
        init.split()
    _run(init, resp)
    init.split()
    with pytest.raises(LocalProtocolError):
        init.split()
    # calls after completion raise, without breaking the (finished) state
    with pytest.raises(LocalProtocolError):
        resp.write_message(b"")
    resp.split()


def test_generated_ephemeral_differs() -> None:
    a, _ = _xx_pair()
    b, _ = _xx_pair()
    assert a.write_message()[:32] != b.write_message()[:32]


def test_long_protocol_name_is_hashed() -> None:
    short = SymmetricState("Noise_XX_25519_AESGCM_BLAKE2b")
    assert short.get_handshake_hash() == b"Noise_XX_25519_AESGCM_BLAKE2b".ljust(64, b"\0")
    long_name = b"N" * 65
    import hashlib

    assert SymmetricState(long_name).get_handshake_hash() == hashlib.blake2b(long_name).digest()
    assert SymmetricState(long_name).chaining_key == hashlib.blake2b(long_name).digest()


@pytest.mark.parametrize(
    "name",
    [
        "Noise_XX_448_AESGCM_BLAKE2b",
        "Noise_XX_25519_AESGCM_SHA256",
        "Noise_XX_25519_AESGCM_BLAKE2s",
        "Noise_XX_25519_AES256_BLAKE2b",
        "Noise_ZZ_25519_AESGCM_BLAKE2b",
        "Noise_XXfallback_25519_AESGCM_BLAKE2b",
        "Noise_XXpsk4_25519_AESGCM_BLAKE2b",
        "Noise_XXpsk3+psk3_25519_AESGCM_BLAKE2b",
        "Noise_xx_25519_AESGCM_BLAKE2b",
        "Noise_XX_25519_AESGCM",
        "Noisy_XX_25519_AESGCM_BLAKE2b",
        "Noise_XX_25519_AESGCM_BLAKE2b_extra",
        "",
    ],
)
def test_unsupported_protocol_names(name: str) -> None:
    with pytest.raises(ValueError, match=r"(?i)noise|unsupported|malformed"):
        HandshakeState(name, initiator=True, s=_key())


def test_multiple_psk_modifiers() -> None:
    pattern, cipher = parse_protocol_name("Noise_XXpsk0+psk3_25519_ChaChaPoly_BLAKE2b")
    assert cipher == "ChaChaPoly"
    assert pattern.messages == (("psk", "e"), ("e", "ee", "s", "es"), ("s", "se", "psk"))
    name = "Noise_XXpsk0+psk3_25519_ChaChaPoly_BLAKE2b"
    psks = [b"a" * 32, b"b" * 32]
    init = HandshakeState(name, initiator=True, s=_key(), psks=psks)
    resp = HandshakeState(name, initiator=False, s=_key(), psks=psks)
    _run(init, resp)
    assert init.handshake_hash == resp.handshake_hash


def test_constructor_argument_errors() -> None:
    xx = "Noise_XX_25519_AESGCM_BLAKE2b"
    with pytest.raises(ValueError, match="static key"):
        HandshakeState(xx, initiator=True)
    with pytest.raises(ValueError, match="static key"):
        HandshakeState(xx, initiator=False)
    with pytest.raises(ValueError, match="rs"):
        HandshakeState("Noise_IK_25519_AESGCM_BLAKE2b", initiator=True, s=_key())
    with pytest.raises(ValueError, match="rs"):
        HandshakeState(xx, initiator=True, s=_key(), rs=_public(_key()))
    with pytest.raises(ValueError, match="pre-shared"):
        HandshakeState("Noise_XXpsk3_25519_AESGCM_BLAKE2b", initiator=True, s=_key())
    with pytest.raises(ValueError, match="pre-shared"):
        HandshakeState(xx, initiator=True, s=_key(), psks=[b"k" * 32])
    with pytest.raises(ValueError, match="32 bytes"):
        HandshakeState(
            "Noise_XXpsk3_25519_AESGCM_BLAKE2b", initiator=True, s=_key(), psks=[b"short"]
        )
    with pytest.raises(ValueError, match="private key"):
        HandshakeState(xx, initiator=True, s=b"\x01" * 31)
    with pytest.raises(ValueError, match="public key"):
        HandshakeState("Noise_IK_25519_AESGCM_BLAKE2b", initiator=True, s=_key(), rs=b"x")
    # A static key the pattern does not use is accepted and ignored.
    nn = HandshakeState("Noise_NN_25519_AESGCM_BLAKE2b", initiator=True, s=_key())
    assert nn.write_message()


# ---------------------------------------------------------------------------------------
# CipherState and rekey
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cipher", ["AESGCM", "ChaChaPoly"])
def test_cipher_state_nonce_format(cipher: str) -> None:
    key = bytes(range(32))
    cs = CipherState(cipher, key)
    cs.set_nonce(0x0102030405060708)
    counter = (0x0102030405060708).to_bytes(8, "big" if cipher == "AESGCM" else "little")
    nonce = b"\0\0\0\0" + counter
    aead = AESGCM(key) if cipher == "AESGCM" else ChaCha20Poly1305(key)
    assert cs.encrypt_with_ad(b"ad", b"data") == aead.encrypt(nonce, b"data", b"ad")
    assert cs.nonce == 0x0102030405060709


def test_cipher_state_without_key_is_identity() -> None:
    cs = CipherState()
    assert not cs.has_key()
    assert cs.key is None
    assert cs.encrypt_with_ad(b"ad", b"plain") == b"plain"
    assert cs.decrypt_with_ad(b"ad", b"plain") == b"plain"
    assert cs.nonce == 0
    with pytest.raises(LocalProtocolError):
        cs.rekey()


def test_cipher_state_argument_errors() -> None:
    with pytest.raises(ValueError, match="cipher"):
        CipherState("AES128")
    with pytest.raises(ValueError, match="32 bytes"):
        CipherState("AESGCM", b"short")
    cs = CipherState("AESGCM", bytes(32))
    with pytest.raises(ValueError, match="nonce"):
        cs.set_nonce(-1)
    with pytest.raises(ValueError, match="nonce"):
        cs.set_nonce(2**64)
    with pytest.raises(ValueError, match="cipher"):
        rekey_key("Blowfish", bytes(32))


@pytest.mark.parametrize("cipher", ["AESGCM", "ChaChaPoly"])
def test_nonce_exhaustion(cipher: str) -> None:
    sender = CipherState(cipher, bytes(32))
    receiver = CipherState(cipher, bytes(32))
    sender.set_nonce(MAX_NONCE - 1)
    receiver.set_nonce(MAX_NONCE - 1)
    # the last usable nonce, 2**64 - 2, works
    assert receiver.decrypt_with_ad(b"", sender.encrypt_with_ad(b"", b"last")) == b"last"
    assert sender.nonce == MAX_NONCE
    # 2**64 - 1 is reserved: refused both ways, and the nonce does not move
    with pytest.raises(LocalProtocolError, match="exhausted"):
        sender.encrypt_with_ad(b"", b"more")
    with pytest.raises(LocalProtocolError, match="exhausted"):
        receiver.decrypt_with_ad(b"", b"\0" * 32)
    assert sender.nonce == MAX_NONCE
    assert receiver.nonce == MAX_NONCE


def test_transport_decryption_failure_keeps_nonce() -> None:
    a = CipherState("ChaChaPoly", b"k" * 32)
    b = CipherState("ChaChaPoly", b"k" * 32)
    ct = a.encrypt_with_ad(b"", b"hello")
    bad = bytes([ct[0] ^ 1]) + ct[1:]
    with pytest.raises(DecryptionError) as exc_info:
        b.decrypt_with_ad(b"", bad)
    # opaque: no chained cryptography exception
    assert exc_info.value.__cause__ is None
    assert exc_info.value.__suppress_context__
    assert b.nonce == 0
    with pytest.raises(DecryptionError):
        b.decrypt_with_ad(b"", ct[:10])
    assert b.decrypt_with_ad(b"", ct) == b"hello"
    assert b.nonce == 1


def _independent_rekey(cipher: str, key: bytes) -> bytes:
    """REKEY(k) straight from section 4.2, using the AEAD directly."""
    maxnonce = b"\x00" * 4 + b"\xff" * 8  # 2**64-1 encodes the same in either byte order
    aead = AESGCM(key) if cipher == "AESGCM" else ChaCha20Poly1305(key)
    return aead.encrypt(maxnonce, b"\x00" * 32, b"")[:32]


@pytest.mark.parametrize("cipher", ["AESGCM", "ChaChaPoly"])
def test_rekey_key_matches_spec_definition(cipher: str) -> None:
    for key in (bytes(32), bytes(range(32)), b"\xff" * 32):
        assert rekey_key(cipher, key) == _independent_rekey(cipher, key)


# Computed once with the AEAD directly, not with rekey_key:
#   key = bytes(range(32)); n = b"\0" * 4 + b"\xff" * 8
#   AESGCM(key).encrypt(n, bytes(32), b"")[:32].hex()
#   ChaCha20Poly1305(key).encrypt(n, bytes(32), b"")[:32].hex()
# (cryptography 50.0.2)
KNOWN_REKEY = {
    "AESGCM": "0201675c87335949b909793da5bb4d92fcf6d44b92a6e0792b6ae48b1881259d",
    "ChaChaPoly": "50835543a205b22c9323f2022bc4f67d838f90e61d5ccf33c4513e01f85b5042",
}


@pytest.mark.parametrize("cipher", ["AESGCM", "ChaChaPoly"])
def test_rekey_known_value(cipher: str) -> None:
    assert rekey_key(cipher, bytes(range(32))).hex() == KNOWN_REKEY[cipher]
    cs = CipherState(cipher, bytes(range(32)))
    cs.set_nonce(7)
    cs.rekey()
    assert cs.key is not None
    assert cs.key.hex() == KNOWN_REKEY[cipher]
    assert cs.nonce == 7  # rekey does not reset the nonce (section 11.3)


@pytest.mark.parametrize("cipher", ["AESGCM", "ChaChaPoly"])
def test_rekey_keeps_peers_in_sync(cipher: str) -> None:
    init, resp = _xx_pair(cipher)
    _run(init, resp)
    send, _ = init.split()
    recv, _ = resp.split()
    for round_ in range(4):
        for _ in range(3):
            msg = f"round {round_}".encode()
            assert recv.decrypt_with_ad(b"", send.encrypt_with_ad(b"", msg)) == msg
        old = send.key
        send.rekey()
        recv.rekey()
        assert send.key == recv.key != old
    # a one-sided rekey breaks the channel
    send.rekey()
    with pytest.raises(DecryptionError):
        recv.decrypt_with_ad(b"", send.encrypt_with_ad(b"", b"x"))


@pytest.mark.parametrize("cipher", ["AESGCM", "ChaChaPoly"])
def test_record_layer_encrypts_as_the_cipher_state(cipher: str) -> None:
    # The transport records are Noise transport messages: a record body is exactly what
    # the CipherState would produce for the same nonce, including across the rekeys the
    # record layer does on its own every ``rekey_interval`` records (Rekey keeps n).
    key = bytes(range(32))
    fmt = NOISE_AESGCM_NONCE if cipher == "AESGCM" else NOISE_CHACHAPOLY_NONCE
    interval = 3
    sealer = RecordSealer(key, fmt, max_record_size=256, rekey_interval=interval)
    opener = RecordOpener(key, fmt, max_record_size=256, rekey_interval=interval)
    cs = CipherState(cipher, key)
    for n in range(10):
        if n and n % interval == 0:
            cs.rekey()
        plaintext = f"record {n}".encode()
        record = sealer.seal(plaintext)
        assert record[4:] == cs.encrypt_with_ad(b"", plaintext)
        assert opener.receive_data(record) == [plaintext]
    assert cs.nonce == sealer.counter == opener.counter == 10


# ---------------------------------------------------------------------------------------
# Handshake errors
# ---------------------------------------------------------------------------------------


def _assert_unusable(hs: HandshakeState) -> None:
    assert hs.broken
    assert not hs.is_my_turn
    with pytest.raises(LocalProtocolError):
        hs.write_message(b"")
    with pytest.raises(LocalProtocolError):
        hs.read_message(b"\0" * 200)
    with pytest.raises(LocalProtocolError):
        hs.split()


@pytest.mark.parametrize("position", [0, 31, 32, 60, -1])
def test_tampered_handshake_message(position: int) -> None:
    init, resp = _xx_pair()
    resp.read_message(init.write_message(b""))
    msg2 = bytearray(resp.write_message(b"secret"))
    msg2[position] ^= 0x01
    with pytest.raises(DecryptionError):
        init.read_message(bytes(msg2))
    _assert_unusable(init)


def test_truncated_handshake_message() -> None:
    # Too short for its tokens: RemoteProtocolError (but not a DecryptionError).
    init, resp = _xx_pair()
    with pytest.raises(RemoteProtocolError) as exc_info:
        resp.read_message(init.write_message(b"")[:31])
    assert type(exc_info.value) is RemoteProtocolError
    _assert_unusable(resp)

    init, resp = _xx_pair()
    resp.read_message(init.write_message(b""))
    msg2 = resp.write_message(b"")
    # e (32) + encrypted s (48) + tag (16) = 96 bytes; cut inside the encrypted static key
    assert len(msg2) == 96
    with pytest.raises(RemoteProtocolError) as exc_info:
        init.read_message(msg2[:70])
    assert type(exc_info.value) is RemoteProtocolError
    _assert_unusable(init)

    # Room left for every token but not for the payload's tag: RemoteProtocolError too.
    init, resp = _xx_pair()
    resp.read_message(init.write_message(b""))
    with pytest.raises(RemoteProtocolError) as exc_info:
        init.read_message(resp.write_message(b"")[:90])
    assert type(exc_info.value) is RemoteProtocolError

    # A truncation that still leaves room for every field fails authentication instead
    # (DecryptionError is a subclass of RemoteProtocolError).
    init, resp = _xx_pair()
    resp.read_message(init.write_message(b""))
    with pytest.raises(DecryptionError):
        init.read_message(resp.write_message(b"payload")[:-1])
    _assert_unusable(init)


def test_writing_or_reading_out_of_turn() -> None:
    init, resp = _xx_pair()
    with pytest.raises(LocalProtocolError, match="turn"):
        resp.write_message(b"")
    _assert_unusable(resp)

    init, resp = _xx_pair()
    with pytest.raises(LocalProtocolError, match="turn"):
        init.read_message(b"\0" * 32)
    _assert_unusable(init)

    init, resp = _xx_pair()
    init.write_message(b"")
    with pytest.raises(LocalProtocolError, match="turn"):
        init.write_message(b"")
    _assert_unusable(init)


def test_wrong_psk_fails() -> None:
    name = "Noise_XXpsk3_25519_AESGCM_BLAKE2b"
    init = HandshakeState(name, initiator=True, s=_key(), psks=[b"a" * 32])
    resp = HandshakeState(name, initiator=False, s=_key(), psks=[b"b" * 32])
    resp.read_message(init.write_message(b""))
    init.read_message(resp.write_message(b""))
    with pytest.raises(DecryptionError):
        resp.read_message(init.write_message(b""))
    _assert_unusable(resp)


def test_wrong_psk_fails_psk0() -> None:
    name = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2b"
    init = HandshakeState(name, initiator=True, psks=[b"a" * 32])
    resp = HandshakeState(name, initiator=False, psks=[b"b" * 32])
    with pytest.raises(DecryptionError):
        resp.read_message(init.write_message(b"early"))


def test_mismatched_prologue_fails() -> None:
    name = "Noise_XX_25519_AESGCM_BLAKE2b"
    init = HandshakeState(name, initiator=True, s=_key(), prologue=b"v1")
    resp = HandshakeState(name, initiator=False, s=_key(), prologue=b"v2")
    resp.read_message(init.write_message(b""))  # msg1 is unencrypted: nothing to check yet
    with pytest.raises(DecryptionError):
        init.read_message(resp.write_message(b""))
    _assert_unusable(init)


# Low-order X25519 points (all give an all-zero shared secret): 0, 1, and a point of
# order 8 (from the libsodium / RFC 7748 blocklist).
LOW_ORDER_POINTS = [
    bytes(32),
    b"\x01" + bytes(31),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
]


@pytest.mark.parametrize("point", LOW_ORDER_POINTS)
def test_low_order_point_refused(point: bytes) -> None:
    # The responder's ephemeral is a low-order point: "ee" on reading message 2.
    init = HandshakeState("Noise_NN_25519_AESGCM_BLAKE2b", initiator=True)
    init.write_message(b"")
    with pytest.raises(RemoteProtocolError, match="low-order"):
        init.read_message(point)
    _assert_unusable(init)

    # The initiator's ephemeral is a low-order point: "ee" on writing message 2.
    resp = HandshakeState("Noise_NN_25519_AESGCM_BLAKE2b", initiator=False)
    resp.read_message(point)
    with pytest.raises(RemoteProtocolError, match="low-order"):
        resp.write_message(b"")
    _assert_unusable(resp)

    # A pre-known static key that is low-order is refused up front.
    with pytest.raises(ValueError, match="low-order"):
        HandshakeState("Noise_IK_25519_AESGCM_BLAKE2b", initiator=True, s=_key(), rs=point)


def test_message_size_limits() -> None:
    init, resp = _xx_pair()
    # msg1 of XX is e (32 bytes) + an unencrypted payload
    with pytest.raises(LocalProtocolError, match="65535"):
        init.write_message(b"\0" * (MAX_MESSAGE_LEN - 31))
    _assert_unusable(init)
    init, resp = _xx_pair()
    msg1 = init.write_message(b"\0" * (MAX_MESSAGE_LEN - 32))
    assert len(msg1) == MAX_MESSAGE_LEN
    assert resp.read_message(msg1) == b"\0" * (MAX_MESSAGE_LEN - 32)
    # msg2 carries e + encrypted s + encrypted payload: 32 + 48 + 16 bytes of overhead
    with pytest.raises(LocalProtocolError, match="65535"):
        resp.write_message(b"\0" * (MAX_MESSAGE_LEN - 95))

    init, resp = _xx_pair()
    with pytest.raises(RemoteProtocolError, match="65535"):
        resp.read_message(b"\0" * (MAX_MESSAGE_LEN + 1))
    _assert_unusable(resp)


# ---------------------------------------------------------------------------------------
# Property-based tests
# ---------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, database=None)
@given(
    cipher=st.sampled_from(["AESGCM", "ChaChaPoly"]),
    psk=st.booleans(),
    handshake_payloads=st.lists(st.binary(max_size=300), min_size=3, max_size=3),
    transport=st.lists(st.tuples(st.booleans(), st.binary(max_size=2000)), max_size=10),
)
def test_xx_roundtrip_property(
    cipher: str,
    psk: bool,
    handshake_payloads: list[bytes],
    transport: list[tuple[bool, bytes]],
) -> None:
    init, resp = _xx_pair(cipher, psk=psk)
    for i, payload in enumerate(handshake_payloads):
        sender, receiver = (init, resp) if i % 2 == 0 else (resp, init)
        assert receiver.read_message(sender.write_message(payload)) == payload
    assert init.complete
    assert resp.complete
    assert init.handshake_hash == resp.handshake_hash
    i_send, i_recv = init.split()
    r_recv, r_send = resp.split()
    for from_initiator, payload in transport:
        sender_cs, receiver_cs = (i_send, r_recv) if from_initiator else (r_send, i_recv)
        assert receiver_cs.decrypt_with_ad(b"", sender_cs.encrypt_with_ad(b"", payload)) == (
            payload
        )


def _reader_at(step: int, protocol: str) -> HandshakeState:
    """A handshake state whose next call is read_message, after ``step`` messages."""
    resp_s = _key()
    rs = _public(resp_s) if "IK" in protocol else None
    init = HandshakeState(protocol, initiator=True, s=_key(), rs=rs)
    resp = HandshakeState(protocol, initiator=False, s=resp_s)
    if step == 0:
        return resp
    resp.read_message(init.write_message(b""))
    return init


@settings(max_examples=150, deadline=None, database=None)
@given(
    target=st.sampled_from(
        [
            (0, "Noise_XX_25519_AESGCM_BLAKE2b"),
            (1, "Noise_XX_25519_AESGCM_BLAKE2b"),
            (1, "Noise_XX_25519_ChaChaPoly_BLAKE2b"),
            (0, "Noise_IK_25519_AESGCM_BLAKE2b"),
            (1, "Noise_IK_25519_ChaChaPoly_BLAKE2b"),
        ]
    ),
    data=st.one_of(
        st.binary(max_size=200),
        st.integers(min_value=0, max_value=200).map(lambda n: b"\0" * n),
    ),
)
def test_arbitrary_bytes_raise_only_monte_errors(target: tuple[int, str], data: bytes) -> None:
    step, protocol = target
    hs = _reader_at(step, protocol)
    try:
        hs.read_message(data)
    except MonteError:
        assert hs.broken
    except Exception as exc:  # pragma: no cover - this is the failure being tested for
        pytest.fail(f"read_message raised {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------------------
# The sans-IO rule
# ---------------------------------------------------------------------------------------


def test_proto_package_does_not_import_trio() -> None:
    files = sorted(PROTO_DIR.glob("**/*.py"))
    for name in ("_noise.py", "_noise_cipher.py", "_noise_crypto.py", "_noise_patterns.py"):
        assert PROTO_DIR / name in files
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            modules: list[str] = []
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, (ast.Name, ast.Attribute))
                and getattr(node.func, "id", getattr(node.func, "attr", "")) == "import_module"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                modules = [node.args[0].value]
            for module in modules:
                top = module.split(".")[0]
                assert top not in {"trio", "anyio", "asyncio"}, (
                    f"{path.name}:{getattr(node, 'lineno', '?')} imports {module!r}; "
                    "monte_trio._proto is sans-IO"
                )
