"""Static X25519 keys: :class:`PublicKey` values and :class:`Identity` key pairs.

This module owns the printable form of public keys (URL-safe base64 without padding, 43
characters) and the on-disk format of private keys (PEM PKCS#8, optionally encrypted with a
passphrase, written atomically with mode 0600).

Everything here is synchronous: key files are small and local. Async callers that must not
block the event loop even briefly may wrap :meth:`Identity.load` and :meth:`Identity.save`
in :func:`trio.to_thread.run_sync`.
"""

from __future__ import annotations

import base64
import os
import re
import secrets

import attrs
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ._exceptions import KeyFileError

__all__ = ["Identity", "PublicKey"]

KEY_SIZE = 32
"""Length in bytes of a raw X25519 key, public or private."""

_MAX_KEY_FILE_SIZE = 64 * 1024
"""A PEM X25519 key is a few hundred bytes; refuse to read anything much larger."""

# 32 bytes = 256 bits = 43 base64 characters (258 bits, the last 2 must be zero), plus one
# "=" of padding in the standard, padded form.
_URLSAFE_UNPADDED = re.compile(r"[A-Za-z0-9_-]{43}")
_STANDARD_PADDED = re.compile(r"[A-Za-z0-9+/]{43}=")

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
        passphrase: bytes | None = None,
        overwrite: bool = False,
    ) -> None:
        """Write the private key to ``path`` as PEM PKCS#8, readable only by its owner.

        The file is written to a temporary file in the same directory (mode 0600), flushed
        to disk, then moved into place, so ``path`` never holds a partial key and is never
        readable by others.

        Args:
            path: where to write the key.
            passphrase: if given, the key is encrypted with it (the best encryption
                cryptography offers); if ``None``, the key is stored unencrypted.
            overwrite: replace an existing file at ``path``. By default an existing file
                is left alone and :class:`KeyFileError` is raised, so that a key is never
                destroyed by mistake.

        Raises:
            KeyFileError: ``path`` exists and ``overwrite`` is false, or the file could not
                be written.
            ValueError: ``passphrase`` is empty (pass ``None`` for no encryption).
        """
        if passphrase is not None and len(passphrase) == 0:
            raise ValueError("the passphrase is empty; pass passphrase=None for no encryption")
        encryption: serialization.KeySerializationEncryption = (
            serialization.NoEncryption()
            if passphrase is None
            else serialization.BestAvailableEncryption(bytes(passphrase))
        )
        data = self._private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )
        _write_private_file(os.fspath(path), data, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, passphrase: bytes | None = None) -> Identity:
        """Read a key pair written by :meth:`save` (or any PEM PKCS#8 X25519 private key).

        Args:
            path: the key file.
            passphrase: the passphrase the file is encrypted with, or ``None`` if it is
                not encrypted.

        Returns:
            The key pair.

        Raises:
            KeyFileError: the file is missing or unreadable, is encrypted and no (or the
                wrong) passphrase was given, is not encrypted but a passphrase was given,
                or does not hold an X25519 private key. The message says which.
        """
        name = os.fspath(path)
        try:
            with open(name, "rb") as f:
                data = f.read(_MAX_KEY_FILE_SIZE + 1)
        except FileNotFoundError as exc:
            raise KeyFileError(
                f"key file {name!r} does not exist; check the path, or create a key with "
                "Identity.generate().save(path)"
            ) from exc
        except OSError as exc:
            raise KeyFileError(f"cannot read key file {name!r}: {exc.strerror or exc}") from exc
        if len(data) > _MAX_KEY_FILE_SIZE:
            raise KeyFileError(
                f"key file {name!r} is larger than {_MAX_KEY_FILE_SIZE} bytes, far too "
                "large for a PEM X25519 private key; is it the right file?"
            )

        encrypted = any(marker in data for marker in _ENCRYPTED_PEM_MARKERS)
        if encrypted and passphrase is None:
            raise KeyFileError(
                f"key file {name!r} is encrypted; pass the passphrase it was saved with"
            )
        try:
            key = serialization.load_pem_private_key(
                data, password=None if passphrase is None else bytes(passphrase)
            )
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            if isinstance(exc, TypeError) and not encrypted and passphrase is not None:
                raise KeyFileError(
                    f"key file {name!r} is not encrypted, but a passphrase was given; "
                    "load it with passphrase=None (and consider saving it with a passphrase)"
                ) from exc
            if encrypted:
                raise KeyFileError(
                    f"cannot decrypt key file {name!r}: wrong passphrase, or the file is damaged"
                ) from exc
            raise KeyFileError(
                f"key file {name!r} is not a PEM PKCS#8 private key (is it the right file? "
                "monte_trio writes keys with Identity.save())"
            ) from exc
        if not isinstance(key, X25519PrivateKey):
            raise KeyFileError(
                f"key file {name!r} holds a {type(key).__name__.lstrip('_')}, not an X25519 "
                "private key; monte_trio identities are X25519 keys: create one with "
                "Identity.generate().save(path)"
            )
        return cls(key)


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
