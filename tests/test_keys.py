"""Tests of monte_trio._keys: PublicKey values and Identity key files."""

from __future__ import annotations

import base64
import os
import random
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from monte_trio._exceptions import KeyFileError
from monte_trio._keys import Identity, PublicKey
from monte_trio._secret_files import encrypt_private_key, read_secret_file

FAST_SCRYPT = {"n": 2**10, "r": 8, "p": 1}
"""Cheap scrypt parameters for tests: the encrypted format records its parameters."""


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600, as a secret file must be."""
    path.write_bytes(data)
    path.chmod(0o600)


def write_encrypted(path: Path, identity: Identity, passphrase: bytes) -> None:
    """An encrypted key file with cheap scrypt parameters."""
    write_private(path, encrypt_private_key(identity.private_bytes(), passphrase, **FAST_SCRYPT))


def legacy_encrypted_pem(identity: Identity, passphrase: bytes) -> bytes:
    """What earlier versions wrote with a passphrase: PKCS#8 encrypted with PBKDF2."""
    key = X25519PrivateKey.from_private_bytes(identity.private_bytes())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase),
    )


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
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    pem = path.read_bytes()
    assert pem.startswith(
        b"-----BEGIN MONTE_TRIO ENCRYPTED PRIVATE KEY-----\nFormat: 1\n"
        b"KDF: scrypt n=131072 r=8 p=1\n"
        if passphrase
        else b"-----BEGIN PRIVATE KEY-----"
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
    write_encrypted(path, Identity.generate(), b"right")
    with pytest.raises(KeyFileError, match="wrong passphrase") as info:
        Identity.load(path, passphrase=b"wrong")
    assert "right" not in str(info.value)


def test_load_encrypted_without_passphrase(tmp_path: Path) -> None:
    path = tmp_path / "id.pem"
    write_encrypted(path, Identity.generate(), b"secret")
    legacy = tmp_path / "legacy.pem"
    write_private(legacy, legacy_encrypted_pem(Identity.generate(), b"secret"))
    for file in (path, legacy):
        with pytest.raises(KeyFileError) as info:
            Identity.load(file)
        # Neutral wording: the CLI adds its flag name, the API its argument.
        assert (
            str(info.value) == f"key file {str(file)!r} is encrypted and no passphrase was given"
        )


def test_load_unencrypted_with_passphrase(tmp_path: Path) -> None:
    path = tmp_path / "id.pem"
    Identity.generate().save(path)
    with pytest.raises(KeyFileError, match=r"not encrypted.*load it without one"):
        Identity.load(path, passphrase=b"secret")


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"garbage\n",
        b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
        random.Random(200).randbytes(200),  # fixed: every pytest-xdist worker collects the same
    ],
    ids=["empty", "text", "not-a-key", "random-bytes"],
)
def test_load_garbage(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "id.pem"
    write_private(path, content)
    with pytest.raises(KeyFileError, match="not a private key in a format monte_trio reads"):
        Identity.load(path)


def test_load_too_large(tmp_path: Path) -> None:
    path = tmp_path / "big.pem"
    write_private(path, b"x" * (1 << 20))
    with pytest.raises(KeyFileError, match="larger than"):
        Identity.load(path)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match=r"does not exist") as info:
        Identity.load(tmp_path / "missing.pem")
    # A hint for both audiences: the CLI's users and the API's.
    assert "`monte-trio keygen FILE` or Identity.generate().save(FILE)" in str(info.value)


def test_load_directory(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="is not a regular file"):
        Identity.load(tmp_path)


def test_load_other_key_type(tmp_path: Path) -> None:
    path = tmp_path / "ed.pem"
    write_private(
        path,
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    with pytest.raises(KeyFileError, match="Ed25519PrivateKey, not an X25519"):
        Identity.load(path)


# --- secret files: modes, links, file kinds ----------------------------------------------


@pytest.mark.parametrize(
    ("mode", "described"),
    [
        (0o644, "mode 0644: readable by its group and others"),
        (0o604, "mode 0604: readable by others"),
        (0o640, "mode 0640: readable by its group"),
        (0o666, "mode 0666: readable and writable by its group and others"),
        (0o620, "mode 0620: writable by its group"),
        (0o444, "mode 0444: readable by its group and others"),
    ],
)
def test_secret_file_readable_by_others_is_refused(
    tmp_path: Path, mode: int, described: str
) -> None:
    key = tmp_path / "k"
    Identity.generate().save(key)
    psk = tmp_path / "psk"
    write_private(psk, os.urandom(32))
    for path, call, what in (
        (key, lambda: Identity.load(key), "key file"),
        (psk, lambda: read_secret_file(psk, what="psk file"), "psk file"),
    ):
        path.chmod(mode)
        with pytest.raises(KeyFileError) as info:
            call()
        message = str(info.value)
        assert message.startswith(f"{what} {str(path)!r} has {described};")
        assert message.endswith(f"run chmod 600 {path}")


def test_secret_file_private_modes_are_read(tmp_path: Path) -> None:
    path = tmp_path / "passphrase"
    for mode in (0o600, 0o400, 0o700):
        write_private(path, b"correct horse\n")
        path.chmod(mode)
        assert read_secret_file(path, what="passphrase file") == b"correct horse\n"
        assert read_secret_file(str(path), what="passphrase file") == b"correct horse\n"
        path.chmod(0o600)
        path.unlink()


def test_secret_file_symlink_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "real.key"
    me = Identity.generate()
    me.save(target)
    link = tmp_path / "link.key"
    link.symlink_to(target)
    with pytest.raises(KeyFileError, match="is a symbolic link") as info:
        Identity.load(link)
    assert str(link) in str(info.value)
    with pytest.raises(KeyFileError, match=r"psk file .* is a symbolic link"):
        read_secret_file(link, what="psk file")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(KeyFileError, match="is a symbolic link"):
        read_secret_file(dangling, what="psk file")
    # The real file still loads.
    assert Identity.load(target).public_key == me.public_key


def test_secret_file_must_be_a_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    # Refused at once, not blocked waiting for a writer.
    with pytest.raises(KeyFileError, match=r"is not a regular file \(a named pipe\)"):
        read_secret_file(fifo, what="passphrase file")
    with pytest.raises(KeyFileError, match=r"is not a regular file \(a directory\)"):
        read_secret_file(tmp_path, what="psk file")
    with pytest.raises(KeyFileError, match=r"is not a regular file \(a device\)"):
        read_secret_file("/dev/null", what="psk file")


def test_secret_file_missing_and_too_large(tmp_path: Path) -> None:
    with pytest.raises(
        KeyFileError, match=r"^psk file '.*missing' does not exist; check the path"
    ):
        read_secret_file(tmp_path / "missing", what="psk file")
    big = tmp_path / "big"
    write_private(big, b"x" * (64 * 1024 + 1))
    with pytest.raises(KeyFileError, match="larger than 65536 bytes"):
        read_secret_file(big, what="psk file")
    write_private(big, b"x" * (64 * 1024))
    assert len(read_secret_file(big, what="psk file")) == 64 * 1024


# --- encrypted key files: scrypt format, legacy PKCS#8, str passphrases ------------------


def test_encrypted_format_round_trip_with_recorded_parameters(tmp_path: Path) -> None:
    me = Identity.generate()
    path = tmp_path / "id.key"
    write_encrypted(path, me, b"pass")
    text = path.read_text()
    lines = text.splitlines()
    assert lines[0] == "-----BEGIN MONTE_TRIO ENCRYPTED PRIVATE KEY-----"
    assert lines[1:3] == ["Format: 1", "KDF: scrypt n=1024 r=8 p=1"]
    assert lines[4] == "Cipher: AES-256-GCM"
    assert lines[-1] == "-----END MONTE_TRIO ENCRYPTED PRIVATE KEY-----"
    assert Identity.load(path, passphrase=b"pass").private_bytes() == me.private_bytes()
    # Salts and nonces are fresh: two files of one key differ.
    write_encrypted(tmp_path / "again", me, b"pass")
    assert (tmp_path / "again").read_text() != text


def test_encrypted_header_is_authenticated(tmp_path: Path) -> None:
    path = tmp_path / "id.key"
    write_encrypted(path, Identity.generate(), b"pass")
    original = path.read_text()
    # Change the parameters: the derived key changes, or the header no longer matches.
    tampered = original.replace("KDF: scrypt n=1024 r=8 p=1", "KDF: scrypt n=1024 r=8 p=2")
    assert tampered != original
    write_private(path, tampered.encode())
    with pytest.raises(KeyFileError, match="wrong passphrase, or the file is damaged"):
        Identity.load(path, passphrase=b"pass")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (("Format: 1", "Format: 2"), "format '2'.*upgrade monte_trio"),
        (("KDF: scrypt n=1024", "KDF: pbkdf2 n=1024"), "does not support"),
        (("Cipher: AES-256-GCM", "Cipher: ROT13"), "does not support"),
        (("KDF: scrypt n=1024", "KDF: scrypt n=1000"), "unsupported scrypt parameters"),
        (("KDF: scrypt n=1024", "KDF: scrypt n=2097152"), "unsupported scrypt parameters"),
        (("r=8 p=1", "r=8 p=99"), "unsupported scrypt parameters"),
        (("Salt: ", "Salt: !"), "is damaged"),
        (("-----END MONTE_TRIO", "-----END SOMETHING"), "is damaged"),
    ],
)
def test_encrypted_format_errors(tmp_path: Path, edit: tuple[str, str], match: str) -> None:
    path = tmp_path / "id.key"
    write_encrypted(path, Identity.generate(), b"pass")
    text = path.read_text()
    assert edit[0] in text
    write_private(path, text.replace(edit[0], edit[1], 1).encode())
    with pytest.raises(KeyFileError, match=match):
        Identity.load(path, passphrase=b"pass")


def test_legacy_pbkdf2_file_still_loads_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    me = Identity.generate()
    path = tmp_path / "old.pem"
    write_private(path, legacy_encrypted_pem(me, b"old secret"))
    assert path.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    with caplog.at_level("WARNING", logger="monte_trio"):
        loaded = Identity.load(path, passphrase=b"old secret")
    assert loaded.private_bytes() == me.private_bytes()
    assert "PBKDF2" in caplog.text
    assert "old secret" not in caplog.text
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        Identity.load(path, passphrase=b"wrong")


def test_str_passphrase_is_utf8(tmp_path: Path) -> None:
    me = Identity.generate()
    path = tmp_path / "id.key"
    write_encrypted(path, me, "pässwörd".encode())
    assert Identity.load(path, passphrase="pässwörd").public_key == me.public_key
    legacy = tmp_path / "legacy.pem"
    write_private(legacy, legacy_encrypted_pem(me, "pässwörd".encode()))
    assert Identity.load(legacy, passphrase="pässwörd").public_key == me.public_key
    with pytest.raises(TypeError, match="bytes or str, not int"):
        Identity.load(path, passphrase=1234)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        me.save(tmp_path / "x", passphrase="")
