"""Tests of monte_trio._keys: PublicKey values and Identity key files."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from monte_trio._exceptions import KeyFileError
from monte_trio._keys import Identity, PublicKey

# --- PublicKey ---------------------------------------------------------------------------


def test_public_key_requires_32_bytes() -> None:
    assert PublicKey(bytes(32)).raw == bytes(32)
    for size in (0, 31, 33, 64):
        with pytest.raises(ValueError, match="32 bytes"):
            PublicKey(bytes(size))
    with pytest.raises(TypeError):
        PublicKey("a" * 32)  # type: ignore[arg-type]


def test_public_key_accepts_bytes_like_and_copies() -> None:
    buf = bytearray(range(32))
    key = PublicKey(buf)
    buf[0] = 99
    assert key.raw == bytes(range(32))
    assert type(key.raw) is bytes


def test_public_key_printable_form() -> None:
    raw = bytes(range(32))
    key = PublicKey(raw)
    text = str(key)
    assert text == key.printable()
    assert len(text) == 43
    assert "=" not in text
    assert base64.urlsafe_b64decode(text + "=") == raw
    assert repr(key) == f"PublicKey({text!r})"


def test_public_key_parse_round_trip_and_forms() -> None:
    raw = bytes([0xFB, 0xFF, 0xFE] * 10 + [0, 1])  # exercises "-" and "_" / "+" and "/"
    key = PublicKey(raw)
    assert "-" in str(key) or "_" in str(key)
    assert PublicKey.parse(str(key)) == key
    assert PublicKey.parse(f"  {key}\n") == key
    standard = base64.b64encode(raw).decode()
    assert len(standard) == 44
    assert standard.endswith("=")
    assert PublicKey.parse(standard) == key


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello",
        "A" * 42,
        "A" * 44,
        "A" * 42 + "!",
        base64.b64encode(bytes(31)).decode(),
        base64.b64encode(bytes(33)).decode(),
        base64.urlsafe_b64encode(b"\xfb\xff" * 16).decode(),  # URL-safe *with* padding
        base64.b64encode(b"\xfb\xff" * 16).decode().rstrip("="),  # standard, no padding
        "A" * 42 + "B",  # non-zero unused trailing bits: not canonical
        "A" * 21 + " " + "A" * 21,
    ],
)
def test_public_key_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a public key"):
        PublicKey.parse(text)


def test_public_key_equality_and_hash() -> None:
    a = PublicKey(bytes(range(32)))
    b = PublicKey(bytes(range(32)))
    c = PublicKey(bytes(32))
    assert a == b
    assert hash(a) == hash(b)
    assert a != c
    assert len({a, b, c}) == 2
    assert {a: 1}[b] == 1


@given(st.binary(min_size=32, max_size=32))
def test_public_key_parse_str_round_trip(raw: bytes) -> None:
    key = PublicKey(raw)
    assert PublicKey.parse(str(key)) == key
    assert PublicKey.parse(base64.b64encode(raw).decode()) == key


# --- Identity ----------------------------------------------------------------------------


def test_identity_generate_and_from_private_bytes() -> None:
    me = Identity.generate()
    raw = me.private_bytes()
    assert len(raw) == 32
    again = Identity.from_private_bytes(raw)
    assert again.public_key == me.public_key
    assert Identity.generate().public_key != me.public_key
    with pytest.raises(ValueError, match="32 bytes"):
        Identity.from_private_bytes(raw[:31])


def test_identity_requires_x25519_private_key() -> None:
    with pytest.raises(TypeError, match="X25519PrivateKey"):
        Identity(b"x" * 32)  # type: ignore[arg-type]


def test_identity_repr_hides_private_key() -> None:
    me = Identity.generate()
    raw = me.private_bytes()
    text = repr(me) + str(me)
    assert str(me.public_key) in text
    forms = [
        raw.hex(),
        raw.hex().upper(),
        base64.b64encode(raw).decode(),
        base64.b64encode(raw).decode().rstrip("="),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        repr(raw),
    ]
    for form in forms:
        assert form not in text


@pytest.mark.parametrize("passphrase", [None, b"correct horse battery staple"])
def test_save_load_round_trip(tmp_path: Path, passphrase: bytes | None) -> None:
    me = Identity.generate()
    path = tmp_path / "id.pem"
    me.save(path, passphrase=passphrase)
    loaded = Identity.load(path, passphrase=passphrase)
    assert loaded.public_key == me.public_key
    assert loaded.private_bytes() == me.private_bytes()
    pem = path.read_bytes()
    assert pem.startswith(
        b"-----BEGIN ENCRYPTED PRIVATE KEY-----" if passphrase else b"-----BEGIN PRIVATE KEY-----"
    )
    # str paths work too
    assert Identity.load(str(path), passphrase=passphrase).public_key == me.public_key


def test_saved_file_is_mode_0600_and_no_temp_left(tmp_path: Path) -> None:
    path = tmp_path / "id.pem"
    old_umask = os.umask(0)  # the mode must not depend on a permissive umask
    try:
        Identity.generate().save(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["id.pem"]


def test_save_refuses_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "id.pem"
    first = Identity.generate()
    first.save(path)
    second = Identity.generate()
    with pytest.raises(KeyFileError, match=r"already exists.*overwrite=True"):
        second.save(path)
    assert Identity.load(path).public_key == first.public_key
    second.save(path, overwrite=True)
    assert Identity.load(path).public_key == second.public_key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["id.pem"]


def test_save_refuses_empty_passphrase(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="passphrase"):
        Identity.generate().save(tmp_path / "id.pem", passphrase=b"")
    assert not (tmp_path / "id.pem").exists()


def test_save_into_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot write key file"):
        Identity.generate().save(tmp_path / "nope" / "id.pem")


def test_load_wrong_passphrase(tmp_path: Path) -> None:
    path = tmp_path / "id.pem"
    Identity.generate().save(path, passphrase=b"right")
    with pytest.raises(KeyFileError, match="wrong passphrase") as info:
        Identity.load(path, passphrase=b"wrong")
    assert "right" not in str(info.value)


def test_load_encrypted_without_passphrase(tmp_path: Path) -> None:
    path = tmp_path / "id.pem"
    Identity.generate().save(path, passphrase=b"secret")
    with pytest.raises(KeyFileError, match="is encrypted; pass the passphrase"):
        Identity.load(path)


def test_load_unencrypted_with_passphrase(tmp_path: Path) -> None:
    path = tmp_path / "id.pem"
    Identity.generate().save(path)
    with pytest.raises(KeyFileError, match=r"not encrypted.*passphrase=None"):
        Identity.load(path, passphrase=b"secret")


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"garbage\n",
        b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
        os.urandom(200),
    ],
)
def test_load_garbage(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "id.pem"
    path.write_bytes(content)
    with pytest.raises(KeyFileError, match="not a PEM PKCS#8 private key"):
        Identity.load(path)


def test_load_too_large(tmp_path: Path) -> None:
    path = tmp_path / "big.pem"
    path.write_bytes(b"x" * (1 << 20))
    with pytest.raises(KeyFileError, match="larger than"):
        Identity.load(path)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match=r"does not exist.*Identity\.generate\(\)\.save"):
        Identity.load(tmp_path / "missing.pem")


def test_load_directory(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot read key file"):
        Identity.load(tmp_path)


def test_load_other_key_type(tmp_path: Path) -> None:
    path = tmp_path / "ed.pem"
    path.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(KeyFileError, match="Ed25519PrivateKey, not an X25519"):
        Identity.load(path)
