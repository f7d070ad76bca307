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

import attrs
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ._exceptions import KeyFileError
from ._secret_files import (
    CREATE_HINT,
    ENCRYPTED_BEGIN,
    KEY_SIZE,
    abbreviate,
    decrypt_private_key,
    encrypt_private_key,
    passphrase_bytes,
    read_named_secret_file,
    write_private_file,
)

__all__ = ["Identity", "PublicKey"]

logger = logging.getLogger("monte_trio")


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
                f"not a public key: {abbreviate(stripped)!r}; expected 43 characters of "
                "URL-safe base64 without padding (as printed by monte_trio), or 44 "
                "characters of standard base64 ending in '='"
            )
        key = cls(raw)
        # The last character carries 2 unused bits; insist they are zero, so that each key
        # has exactly one printable form.
        if key.printable() != stripped.replace("+", "-").replace("/", "_").rstrip("="):
            raise ValueError(
                f"not a public key: {abbreviate(stripped)!r} is not canonical base64 "
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
        secret = passphrase_bytes(passphrase)
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
        write_private_file(os.fspath(path), data, overwrite=overwrite)

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
        secret = passphrase_bytes(passphrase)
        name = os.fspath(path)
        data = read_named_secret_file(
            name, what="key file", missing_hint=f"check the path, or {CREATE_HINT}"
        )
        if data.lstrip().startswith(ENCRYPTED_BEGIN.encode()):
            if secret is None:
                raise KeyFileError(f"key file {name!r} is encrypted and no passphrase was given")
            return cls.from_private_bytes(decrypt_private_key(name, data, secret))

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
                f"{CREATE_HINT[0].upper()}{CREATE_HINT[1:]}"
            ) from exc
        if not isinstance(key, X25519PrivateKey):
            raise KeyFileError(
                f"key file {name!r} holds a {type(key).__name__.lstrip('_')}, not an X25519 "
                f"private key; monte_trio identities are X25519 keys: {CREATE_HINT}"
            )
        if encrypted:
            logger.warning(
                "key file %r is encrypted with PKCS#8's PBKDF2 (weak against passphrase "
                "guessing); save it again with its passphrase to use scrypt",
                name,
            )
        return cls(key)
