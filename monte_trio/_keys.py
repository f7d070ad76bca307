"""Static X25519 keys: :class:`PublicKey` values and :class:`Identity` key pairs.

This module owns the printable form of public keys (URL-safe base64 without padding, 43
characters), the on-disk format of private keys (PEM PKCS#8 when unencrypted; monte_trio's
scrypt + AES-256-GCM format when encrypted with a passphrase; written atomically with mode
0600), and :func:`read_secret_file`, which every reader of a secret file (key, psk,
passphrase) goes through: it refuses symbolic links, non-regular files and files that
their group or others may access.

Everything here is synchronous: key files are small and local. Async callers that must not
block the event loop even briefly may wrap :meth:`Identity.load` and :meth:`Identity.save`
in :func:`trio.to_thread.run_sync` (an encrypted key takes a fraction of a second: scrypt).
"""

from __future__ import annotations

import base64
import logging
import os
import re
import secrets
import shlex
import stat

import attrs
from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from ._exceptions import KeyFileError

__all__ = ["Identity", "PublicKey", "read_secret_file"]

logger = logging.getLogger(__name__)

KEY_SIZE = 32
"""Length in bytes of a raw X25519 key, public or private."""

# 32 bytes = 256 bits = 43 base64 characters (258 bits, the last 2 must be zero), plus one
# "=" of padding in the standard, padded form.
_URLSAFE_UNPADDED = re.compile(r"[A-Za-z0-9_-]{43}")
_STANDARD_PADDED = re.compile(r"[A-Za-z0-9+/]{43}=")

_MAX_SECRET_FILE_SIZE = 64 * 1024
"""The most :func:`read_secret_file` reads: keys, psks and passphrases are far smaller."""

_ENCRYPTED_PEM_MARKERS = (b"-----BEGIN ENCRYPTED PRIVATE KEY-----", b"Proc-Type: 4,ENCRYPTED")


def _to_bytes(value: bytes | bytearray | memoryview) -> bytes:
    """Converter for :attr:`PublicKey.raw`: copy bytes-like values, refuse anything else."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"a raw public key must be bytes, not {type(value).__name__}")
    return bytes(value)


def _check_raw_length(
    instance: PublicKey, attribute: attrs.Attribute[bytes], value: bytes
) -> None:
    if len(value) != KEY_SIZE:
        raise ValueError(f"an X25519 public key is {KEY_SIZE} bytes, got {len(value)} bytes")


@attrs.frozen(repr=False)
class PublicKey:
    """A static X25519 public key: 32 raw bytes.

    Compared and hashed by value, so it can be used in sets and as a dictionary key.
    ``str(key)`` gives the printable form, URL-safe base64 without padding (43 characters),
    which :meth:`parse` reads back.

    Args:
        raw: the 32 raw bytes of the key (any bytes-like object; it is copied).

    Raises:
        ValueError: ``raw`` is not 32 bytes long.
        TypeError: ``raw`` is not bytes-like.
    """

    raw: bytes = attrs.field(converter=_to_bytes, validator=_check_raw_length)

    @classmethod
    def parse(cls, text: str) -> PublicKey:
        """Read a public key from its printable form.

        Surrounding whitespace is ignored. Accepted forms are URL-safe base64 without
        padding (43 characters, what ``str(key)`` produces) and standard base64 with
        padding (44 characters ending in ``=``).

        Args:
            text: the printable key.

        Returns:
            The key.

        Raises:
            ValueError: ``text`` is not one of the accepted forms of a 32-byte key.
        """
        stripped = text.strip()
        if _URLSAFE_UNPADDED.fullmatch(stripped):
            raw = base64.urlsafe_b64decode(stripped + "=")
        elif _STANDARD_PADDED.fullmatch(stripped):
            raw = base64.b64decode(stripped, validate=True)
        else:
            raise ValueError(
                f"not a public key: {_abbreviate(stripped)!r}; expected 43 characters of "
                "URL-safe base64 without padding (as printed by monte_trio), or 44 "
                "characters of standard base64 ending in '='"
            )
        key = cls(raw)
        # The last character carries 2 unused bits; insist they are zero, so that each key
        # has exactly one printable form.
        if key.printable() != stripped.replace("+", "-").replace("/", "_").rstrip("="):
            raise ValueError(
                f"not a public key: {_abbreviate(stripped)!r} is not canonical base64 "
                "(its last character has non-zero unused bits); was it mistyped?"
            )
        return key

    def printable(self) -> str:
        """Return the printable form: URL-safe base64 without padding (43 characters)."""
        return base64.urlsafe_b64encode(self.raw).rstrip(b"=").decode("ascii")

    def __str__(self) -> str:
        return self.printable()

    def __repr__(self) -> str:
        return f"PublicKey({self.printable()!r})"


def _abbreviate(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _require_private_key(value: X25519PrivateKey) -> X25519PrivateKey:
    """Converter for :class:`Identity`'s key (a converter, not a validator, so that it runs
    before the public key is derived)."""
    if not isinstance(value, X25519PrivateKey):
        raise TypeError(
            "an Identity wraps a cryptography X25519PrivateKey, not "
            f"{type(value).__name__}; use Identity.generate(), "
            "Identity.from_private_bytes() or Identity.load()"
        )
    return value


@attrs.frozen(eq=False, repr=False)
class Identity:
    """A static X25519 key pair: who this endpoint is.

    The private key never appears in ``repr()``. Identities compare by object identity;
    compare :attr:`public_key` to ask whether two identities are the same key.

    Args:
        private_key: the private key, as a cryptography
            :class:`~cryptography.hazmat.primitives.asymmetric.x25519.X25519PrivateKey`.
            Most callers use :meth:`generate`, :meth:`from_private_bytes` or :meth:`load`.

    Attributes:
        public_key: the public half, which peers see and trust policies check.
    """

    _private_key: X25519PrivateKey = attrs.field(converter=_require_private_key)
    public_key: PublicKey = attrs.field(init=False)

    @public_key.default
    def _derive_public_key(self) -> PublicKey:
        return PublicKey(self._private_key.public_key().public_bytes_raw())

    @classmethod
    def generate(cls) -> Identity:
        """Return a new random key pair."""
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> Identity:
        """Return the key pair whose private key is the 32 bytes ``raw``.

        Raises:
            ValueError: ``raw`` is not 32 bytes long.
        """
        if len(raw) != KEY_SIZE:
            raise ValueError(f"an X25519 private key is {KEY_SIZE} bytes, got {len(raw)} bytes")
        return cls(X25519PrivateKey.from_private_bytes(bytes(raw)))

    def private_bytes(self) -> bytes:
        """Return the raw 32-byte private key, for the handshake. Keep it secret."""
        return self._private_key.private_bytes_raw()

    def __repr__(self) -> str:
        return f"Identity(public_key={self.public_key!r})"

    def save(
        self,
        path: str | os.PathLike[str],
        *,
        passphrase: bytes | str | None = None,
        overwrite: bool = False,
    ) -> None:
        """Write the private key to ``path``, readable only by its owner (mode 0600).

        Without a passphrase the file is PEM PKCS#8. With one, it is monte_trio's encrypted
        key format (see :doc:`security`): the passphrase is stretched with scrypt
        (``n=2**17, r=8, p=1``, about 128 MiB and a fraction of a second) into an
        AES-256-GCM key. The file is written to a temporary file in the same directory
        (mode 0600), flushed to disk, then moved into place, so ``path`` never holds a
        partial key and is never readable by others.

        Args:
            path: where to write the key.
            passphrase: if given, the key is encrypted with it (a ``str`` is encoded as
                UTF-8); if ``None``, the key is stored unencrypted.
            overwrite: replace an existing file at ``path``. By default an existing file
                is left alone and :class:`KeyFileError` is raised, so that a key is never
                destroyed by mistake.

        Raises:
            KeyFileError: ``path`` exists and ``overwrite`` is false, or the file could not
                be written.
            ValueError: ``passphrase`` is empty (pass ``None`` for no encryption).
            TypeError: ``passphrase`` is neither bytes nor str.
        """
        secret = _passphrase_bytes(passphrase)
        if secret is not None and len(secret) == 0:
            raise ValueError("the passphrase is empty; pass passphrase=None for no encryption")
        if secret is None:
            data = self._private_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        else:
            data = encrypt_private_key(self.private_bytes(), secret)
        _write_private_file(os.fspath(path), data, overwrite=overwrite)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, passphrase: bytes | str | None = None
    ) -> Identity:
        """Read a key pair written by :meth:`save` (or any PEM PKCS#8 X25519 private key).

        The file must be private to its owner: a symbolic link, or a file with any
        permission bit for its group or others, is refused (see
        :func:`read_secret_file`). PKCS#8 files encrypted by earlier versions (PBKDF2)
        still load, with a logged warning to save them again.

        Args:
            path: the key file.
            passphrase: the passphrase the file is encrypted with (a ``str`` is encoded as
                UTF-8), or ``None`` if it is not encrypted.

        Returns:
            The key pair.

        Raises:
            KeyFileError: the file is missing, unreadable, not private to its owner, is
                encrypted and no (or the wrong) passphrase was given, is not encrypted but
                a passphrase was given, or does not hold an X25519 private key. The
                message says which.
            TypeError: ``passphrase`` is neither bytes nor str.
        """
        secret = _passphrase_bytes(passphrase)
        name = os.fspath(path)
        data = _read_secret_file(
            name, what="key file", missing_hint=f"check the path, or {_CREATE_HINT}"
        )
        if data.lstrip().startswith(_BEGIN.encode()):
            if secret is None:
                raise KeyFileError(f"key file {name!r} is encrypted and no passphrase was given")
            return cls.from_private_bytes(_decrypt_private_key(name, data, secret))

        encrypted = any(marker in data for marker in _ENCRYPTED_PEM_MARKERS)
        if encrypted and secret is None:
            raise KeyFileError(f"key file {name!r} is encrypted and no passphrase was given")
        try:
            key = serialization.load_pem_private_key(data, password=secret)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            if isinstance(exc, TypeError) and not encrypted and secret is not None:
                raise KeyFileError(
                    f"key file {name!r} is not encrypted, but a passphrase was given; load "
                    "it without one (or save it again with a passphrase to encrypt it)"
                ) from exc
            if encrypted:
                raise KeyFileError(
                    f"cannot decrypt key file {name!r}: wrong passphrase, or the file is damaged"
                ) from exc
            raise KeyFileError(
                f"key file {name!r} is not a private key in a format monte_trio reads (PEM "
                f"PKCS#8, or monte_trio's encrypted format); is it the right file? "
                f"{_CREATE_HINT[0].upper()}{_CREATE_HINT[1:]}"
            ) from exc
        if not isinstance(key, X25519PrivateKey):
            raise KeyFileError(
                f"key file {name!r} holds a {type(key).__name__.lstrip('_')}, not an X25519 "
                f"private key; monte_trio identities are X25519 keys: {_CREATE_HINT}"
            )
        if encrypted:
            logger.warning(
                "key file %r is encrypted with PKCS#8's PBKDF2 (weak against passphrase "
                "guessing); save it again with its passphrase to use scrypt",
                name,
            )
        return cls(key)


_CREATE_HINT = "create one with `monte-trio keygen FILE` or Identity.generate().save(FILE)"


def _passphrase_bytes(passphrase: bytes | bytearray | memoryview | str | None) -> bytes | None:
    if passphrase is None:
        return None
    if isinstance(passphrase, str):
        return passphrase.encode("utf-8")
    if isinstance(passphrase, (bytes, bytearray, memoryview)):
        return bytes(passphrase)
    raise TypeError(f"a passphrase is bytes or str, not {type(passphrase).__name__}")


# -- monte_trio's encrypted key format ------------------------------------------------------
#
#   -----BEGIN MONTE_TRIO ENCRYPTED PRIVATE KEY-----
#   Format: 1
#   KDF: scrypt n=131072 r=8 p=1
#   Salt: <16 bytes, standard base64>
#   Cipher: AES-256-GCM
#   Nonce: <12 bytes, standard base64>
#
#   <AES-256-GCM(key = scrypt(passphrase, salt, n, r, p, 32), nonce,
#                plaintext = the 32-byte raw X25519 private key,
#                associated data = the header lines above, from "Format" to "Nonce",
#                each ending with "\n"), 48 bytes, standard base64>
#   -----END MONTE_TRIO ENCRYPTED PRIVATE KEY-----

SCRYPT_N = 2**17
"""scrypt's CPU/memory cost for new encrypted key files (128 MiB with ``r=8``)."""
SCRYPT_R = 8
"""scrypt's block size for new encrypted key files."""
SCRYPT_P = 1
"""scrypt's parallelism for new encrypted key files."""
_SCRYPT_MAX_N = 2**20
"""The largest ``n`` a key file may ask for (1 GiB with ``r=8``): bounds a hostile file."""
_SCRYPT_MAX_MEMORY = 1 << 30
_SCRYPT_MAX_P = 16
_FORMAT_VERSION = 1
_BEGIN = "-----BEGIN MONTE_TRIO ENCRYPTED PRIVATE KEY-----"
_END = "-----END MONTE_TRIO ENCRYPTED PRIVATE KEY-----"
_SALT_SIZE = 16
_NONCE_SIZE = 12
_CIPHER = "AES-256-GCM"


def _header(n: int, r: int, p: int, salt: bytes, nonce: bytes) -> str:
    return (
        f"Format: {_FORMAT_VERSION}\n"
        f"KDF: scrypt n={n} r={r} p={p}\n"
        f"Salt: {base64.b64encode(salt).decode()}\n"
        f"Cipher: {_CIPHER}\n"
        f"Nonce: {base64.b64encode(nonce).decode()}\n"
    )


def _scrypt(secret: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(secret)


def encrypt_private_key(
    raw: bytes, passphrase: bytes, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P
) -> bytes:
    """The content of an encrypted key file holding the raw private key ``raw``.

    :meth:`Identity.save` calls it with the default scrypt parameters; tests may pass
    cheaper ones, since the file records them.
    """
    _check_scrypt_parameters(n, r, p, where="scrypt parameters")
    salt, nonce = secrets.token_bytes(_SALT_SIZE), secrets.token_bytes(_NONCE_SIZE)
    header = _header(n, r, p, salt, nonce)
    sealed = AESGCM(_scrypt(passphrase, salt, n, r, p)).encrypt(nonce, raw, header.encode("ascii"))
    body = base64.b64encode(sealed).decode()
    wrapped = "\n".join(body[i : i + 64] for i in range(0, len(body), 64))
    return f"{_BEGIN}\n{header}\n{wrapped}\n{_END}\n".encode("ascii")


def _check_scrypt_parameters(n: int, r: int, p: int, *, where: str) -> None:
    if (
        n < 2
        or n & (n - 1)
        or n > _SCRYPT_MAX_N
        or not 1 <= r <= 64
        or not 1 <= p <= _SCRYPT_MAX_P
        or 128 * n * r > _SCRYPT_MAX_MEMORY
    ):
        raise KeyFileError(
            f"{where}: unsupported scrypt parameters n={n} r={r} p={p} (n must be a power "
            f"of 2 up to 2**20, 128*n*r at most 1 GiB, p at most {_SCRYPT_MAX_P})"
        )


def _decrypt_private_key(name: str, data: bytes, passphrase: bytes) -> bytes:
    """The raw private key of an encrypted key file; KeyFileError if anything is wrong."""
    where = f"key file {name!r}"
    damaged = f"{where} is damaged (not monte_trio's encrypted key format)"
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError(damaged) from None
    lines = [line.strip() for line in text.strip().splitlines()]
    if len(lines) < 4 or lines[0] != _BEGIN or lines[-1] != _END or "" not in lines:
        raise KeyFileError(damaged)
    blank = lines.index("")
    fields: dict[str, str] = {}
    for line in lines[1:blank]:
        field, sep, value = line.partition(":")
        if not sep or field in fields:
            raise KeyFileError(damaged)
        fields[field] = value.strip()
    if fields.get("Format") != str(_FORMAT_VERSION):
        raise KeyFileError(
            f"{where} uses encrypted key format {_abbreviate(fields.get('Format', '?'))!r}; "
            f"this version of monte_trio reads format {_FORMAT_VERSION}: upgrade monte_trio"
        )
    match = re.fullmatch(r"scrypt n=(\d{1,8}) r=(\d{1,3}) p=(\d{1,3})", fields.get("KDF", ""))
    if match is None or fields.get("Cipher") != _CIPHER or len(fields) != 5:
        raise KeyFileError(
            f"{where} uses an encryption this version of monte_trio does not support "
            f"(KDF {_abbreviate(fields.get('KDF', '?'))!r}, cipher "
            f"{_abbreviate(fields.get('Cipher', '?'))!r})"
        )
    n, r, p = (int(group) for group in match.groups())
    _check_scrypt_parameters(n, r, p, where=where)
    try:
        salt = base64.b64decode(fields.get("Salt", ""), validate=True)
        nonce = base64.b64decode(fields.get("Nonce", ""), validate=True)
        sealed = base64.b64decode("".join(lines[blank + 1 : -1]), validate=True)
    except ValueError:
        raise KeyFileError(damaged) from None
    if len(salt) != _SALT_SIZE or len(nonce) != _NONCE_SIZE or len(sealed) != KEY_SIZE + 16:
        raise KeyFileError(damaged)
    header = _header(n, r, p, salt, nonce).encode("ascii")
    try:
        return AESGCM(_scrypt(passphrase, salt, n, r, p)).decrypt(nonce, sealed, header)
    except InvalidTag:
        raise KeyFileError(
            f"cannot decrypt {where}: wrong passphrase, or the file is damaged"
        ) from None


def _write_private_file(path: str, data: bytes, *, overwrite: bool) -> None:
    """Write ``data`` to ``path`` atomically, with mode 0600.

    Raises:
        KeyFileError: ``path`` exists and ``overwrite`` is false, or writing failed.
    """
    if not overwrite and os.path.lexists(path):
        raise KeyFileError(
            f"key file {path!r} already exists; refusing to overwrite a key (pass "
            "overwrite=True to replace it, or choose another path)"
        )
    directory, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{base}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600
        )
    except OSError as exc:
        raise KeyFileError(
            f"cannot write key file {path!r}: cannot create a file in {directory!r}: "
            f"{exc.strerror or exc}"
        ) from exc
    try:
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, 0o600)  # exactly 0600, whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            _move_no_clobber(tmp, path)
    except KeyFileError:
        _unlink_quietly(tmp)
        raise
    except OSError as exc:
        _unlink_quietly(tmp)
        raise KeyFileError(f"cannot write key file {path!r}: {exc.strerror or exc}") from exc
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_directory(directory)


def _move_no_clobber(tmp: str, path: str) -> None:
    """Move ``tmp`` to ``path``, failing if ``path`` appeared meanwhile.

    A hard link fails atomically if the target exists; where hard links are not supported
    (some filesystems), fall back to a check followed by :func:`os.replace`.
    """
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise KeyFileError(
            f"key file {path!r} already exists; refusing to overwrite a key (pass "
            "overwrite=True to replace it, or choose another path)"
        ) from None
    except OSError:
        if os.path.lexists(path):
            raise KeyFileError(
                f"key file {path!r} already exists; refusing to overwrite a key (pass "
                "overwrite=True to replace it, or choose another path)"
            ) from None
        os.replace(tmp, path)
    else:
        _unlink_quietly(tmp)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _fsync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable, where the platform allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- secret files --------------------------------------------------------------------------


def read_secret_file(path: str | os.PathLike[str], *, what: str) -> bytes:
    """Read a small secret file (a private key, a psk, a passphrase) safely.

    The file must be a regular file, not a symbolic link, with no permission bits for its
    group or others (mode 0600 or 0400): a secret that others can read is no longer a
    secret, and one that others can write can be replaced. The file is opened without
    following a symbolic link and its mode is checked on the opened descriptor, so it
    cannot be swapped between the check and the read. On platforms without POSIX modes
    (Windows) only the symbolic link and regular file checks apply.

    Args:
        path: the file.
        what: what the file is, for error messages, e.g. ``"psk file"``.

    Returns:
        The file's content (at most 64 KiB).

    Raises:
        KeyFileError: the file is missing, unreadable, a symbolic link, not a regular
            file, accessible by its group or others, or larger than 64 KiB. The message
            says which and what to do.
    """
    return _read_secret_file(os.fspath(path), what=what, missing_hint="check the path")


def _read_secret_file(name: str, *, what: str, missing_hint: str) -> bytes:
    flags = (
        os.O_RDONLY
        | getattr(os, "O_NOFOLLOW", 0)
        | getattr(os, "O_CLOEXEC", 0)
        | getattr(os, "O_NOCTTY", 0)
        # Opening a FIFO for reading would block until a writer appears: don't wait, the
        # fstat below refuses it anyway. No effect on regular files.
        | getattr(os, "O_NONBLOCK", 0)
    )
    if not hasattr(os, "O_NOFOLLOW") and os.path.islink(name):  # pragma: no cover
        raise KeyFileError(_symlink_message(name, what))
    try:
        fd = os.open(name, flags)
    except FileNotFoundError as exc:
        if os.path.islink(name):
            raise KeyFileError(_symlink_message(name, what)) from exc
        raise KeyFileError(f"{what} {name!r} does not exist; {missing_hint}") from exc
    except OSError as exc:
        # O_NOFOLLOW on a symbolic link fails with ELOOP (EMLINK or EFTYPE on some BSDs).
        if os.path.islink(name):
            raise KeyFileError(_symlink_message(name, what)) from exc
        raise KeyFileError(f"cannot read {what} {name!r}: {exc.strerror or exc}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(
                f"{what} {name!r} is not a regular file ({_file_kind(info.st_mode)}); "
                "give the path of the file itself"
            )
        _check_private_mode(name, what, info.st_mode)
        chunks: list[bytes] = []
        size = 0
        while size <= _MAX_SECRET_FILE_SIZE:
            chunk = os.read(fd, _MAX_SECRET_FILE_SIZE + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {name!r}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    if size > _MAX_SECRET_FILE_SIZE:
        raise KeyFileError(
            f"{what} {name!r} is larger than {_MAX_SECRET_FILE_SIZE} bytes, far too large "
            f"for a {what}; is it the right file?"
        )
    return b"".join(chunks)


def _symlink_message(name: str, what: str) -> str:
    return (
        f"{what} {name!r} is a symbolic link; secret files are not read through links "
        f"(a link can be pointed elsewhere): give the path of the file itself"
    )


def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a plain file"


def _check_private_mode(name: str, what: str, mode: int) -> None:
    """Refuse a mode with any permission bit for the group or others (POSIX only)."""
    if os.name != "posix":  # pragma: no cover - no POSIX permission bits to check
        return
    bits = stat.S_IMODE(mode)
    if not bits & 0o077:
        return

    def rights(shift: int) -> str:
        names = [
            right
            for right, bit in (("readable", 4), ("writable", 2), ("executable", 1))
            if bits >> shift & bit
        ]
        return " and ".join(names)

    group, others = rights(3), rights(0)
    if group == others:
        parts = [f"{group} by its group and others"]
    else:
        parts = [f"{r} by {who}" for r, who in ((group, "its group"), (others, "others")) if r]
    raise KeyFileError(
        f"{what} {name!r} has mode {bits:04o}: {'; '.join(parts)}; a secret must be "
        f"private to its owner: run chmod 600 {shlex.quote(name)}"
    )
