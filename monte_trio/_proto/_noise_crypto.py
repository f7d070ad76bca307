"""The crypto functions of Noise (sections 4 and 12): DH, hash, HKDF and the AEADs.

This module owns the primitives the Noise state objects are built from: X25519 (with the
low-order point refused, section 12.1), BLAKE2b, HMAC and HKDF (section 4.3), and the two
cipher functions, ``AESGCM`` and ``ChaChaPoly`` (sections 12.3 and 12.4). A cipher function
is a :class:`NonceFormat`: the AEAD, how a 64-bit counter becomes its 12-byte nonce, and
``REKEY`` (section 4.2). The record layer (``_records.py``) uses the same
:class:`NonceFormat` objects for the transport records, so there is one nonce packer and
one ``REKEY`` in the package.

It keeps no state, performs no I/O and imports no async library.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable
from typing import Final, Protocol

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from .._exceptions import RemoteProtocolError

__all__ = [
    "CIPHERS",
    "DHLEN",
    "HASHLEN",
    "KEYLEN",
    "MAX_MESSAGE_LEN",
    "MAX_NONCE",
    "NOISE_AESGCM_NONCE",
    "NOISE_CHACHAPOLY_NONCE",
    "NOISE_NONCES",
    "TAGLEN",
    "AEADCipher",
    "NonceFormat",
    "check_cipher",
    "check_key",
    "check_public",
    "dh",
    "hkdf2",
    "hkdf3",
    "is_low_order",
    "noise_hash",
    "private_key",
    "rekey_key",
]

DHLEN: Final = 32
"""Length of an X25519 public key and of a DH output."""
HASHLEN: Final = 64
"""Length of a BLAKE2b output."""
KEYLEN: Final = 32
"""Length of a cipher key and of a pre-shared key."""
TAGLEN: Final = 16
"""Length of the AEAD authentication tag."""
MAX_MESSAGE_LEN: Final = 65535
"""The largest Noise message (section 3)."""
MAX_NONCE: Final = 2**64 - 1
"""The reserved nonce value: reaching it means the key is exhausted (section 5.1)."""
CIPHERS: Final = ("AESGCM", "ChaChaPoly")
"""The supported cipher names."""

_ZEROS32: Final = bytes(32)


# ---------------------------------------------------------------------------------------
# Cipher functions (sections 4.2, 12.3 and 12.4)
# ---------------------------------------------------------------------------------------


class AEADCipher(Protocol):
    """What Noise and the record layer need of an AEAD: cryptography's AESGCM and
    ChaCha20Poly1305."""

    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes: ...

    def decrypt(
        self, nonce: bytes, data: bytes | memoryview, associated_data: bytes | None
    ) -> bytes: ...


class NonceFormat:
    """An AEAD with its nonce layout: how a counter becomes a 12-byte nonce, and ``REKEY``.

    Args:
        name: a short description used in error messages.
        layout: the :mod:`struct` format packing the counter into 12 bytes (for example
            ``">4xQ"``: 4 zero bytes, then the counter as u64 big-endian).
        make_aead: the AEAD class, called with a 32-byte key.

    Attributes:
        name: a short description used in error messages.
        pack: packs a counter in ``[0, 2**64 - 1]`` into the 12-byte nonce (the hot path
            of every record: a bound :meth:`struct.Struct.pack`).
    """

    __slots__ = ("_make_aead", "name", "pack")

    name: str
    pack: Callable[..., bytes]

    def __init__(self, name: str, layout: str, make_aead: type[AESGCM | ChaCha20Poly1305]) -> None:
        self.name = name
        self.pack = struct.Struct(layout).pack
        self._make_aead = make_aead

    def __repr__(self) -> str:
        return f"<NonceFormat {self.name}>"

    def aead(self, key: bytes) -> AEADCipher:
        """Return the AEAD object for ``key``."""
        return self._make_aead(key)

    def rekey(self, key: bytes) -> bytes:
        """Noise's ``REKEY(k)`` (section 4.2): the first 32 bytes of
        ``ENCRYPT(k, 2**64 - 1, b"", 32 zero bytes)``."""
        return self._make_aead(key).encrypt(self.pack(MAX_NONCE), _ZEROS32, b"")[:KEYLEN]


NOISE_AESGCM_NONCE: Final = NonceFormat("Noise AESGCM", ">4xQ", AESGCM)
"""``AESGCM`` (section 12.4): 32 bits of zeros, then the counter big-endian."""
NOISE_CHACHAPOLY_NONCE: Final = NonceFormat("Noise ChaChaPoly", "<4xQ", ChaCha20Poly1305)
"""``ChaChaPoly`` (section 12.3): 32 bits of zeros, then the counter little-endian."""
NOISE_NONCES: Final[dict[str, NonceFormat]] = {
    "AESGCM": NOISE_AESGCM_NONCE,
    "ChaChaPoly": NOISE_CHACHAPOLY_NONCE,
}
"""The cipher functions by their name in a protocol name (:data:`CIPHERS`)."""


def check_cipher(cipher: str) -> NonceFormat:
    """Return the cipher function named ``cipher``.

    Raises:
        ValueError: the cipher is not one of :data:`CIPHERS`.
    """
    try:
        return NOISE_NONCES[cipher]
    except (KeyError, TypeError):
        raise ValueError(
            f"unsupported Noise cipher {cipher!r}: expected one of {', '.join(CIPHERS)}"
        ) from None


def check_key(key: bytes, what: str = "key") -> bytes:
    """Return ``key`` as :class:`bytes`, checking that it is a 32-byte key.

    Raises:
        TypeError: ``key`` is not bytes-like.
        ValueError: ``key`` is not 32 bytes.
    """
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what} must be bytes, not {type(key).__name__}")
    key = bytes(key)
    if len(key) != KEYLEN:
        raise ValueError(f"{what} must be {KEYLEN} bytes, got {len(key)}")
    return key


def rekey_key(cipher: str, key: bytes) -> bytes:
    """Compute the Noise ``REKEY(k)`` function (section 4.2).

    ``REKEY(k)`` is the first 32 bytes of ``ENCRYPT(k, 2**64 - 1, b"", 32 zero bytes)``.

    Args:
        cipher: ``"AESGCM"`` or ``"ChaChaPoly"``.
        key: the current 32-byte cipher key.

    Returns:
        The new 32-byte cipher key.

    Raises:
        ValueError: if the cipher is unsupported or the key is not 32 bytes.
    """
    return check_cipher(cipher).rekey(check_key(key))


# ---------------------------------------------------------------------------------------
# Hash functions (sections 4.3 and 12.8)
# ---------------------------------------------------------------------------------------


def noise_hash(data: bytes) -> bytes:
    """``HASH(data)``: BLAKE2b with a 64-byte output."""
    return hashlib.blake2b(data, digest_size=HASHLEN).digest()


def _hmac_hash(key: bytes, data: bytes) -> bytes:
    # hashlib.blake2b has block_size 128 (BLOCKLEN) and digest_size 64 (HASHLEN).
    return hmac.new(key, data, hashlib.blake2b).digest()


def hkdf2(chaining_key: bytes, ikm: bytes) -> tuple[bytes, bytes]:
    """``HKDF(chaining_key, input_key_material, 2)`` (section 4.3)."""
    temp_key = _hmac_hash(chaining_key, ikm)
    out1 = _hmac_hash(temp_key, b"\x01")
    out2 = _hmac_hash(temp_key, out1 + b"\x02")
    return out1, out2


def hkdf3(chaining_key: bytes, ikm: bytes) -> tuple[bytes, bytes, bytes]:
    """``HKDF(chaining_key, input_key_material, 3)`` (section 4.3)."""
    temp_key = _hmac_hash(chaining_key, ikm)
    out1 = _hmac_hash(temp_key, b"\x01")
    out2 = _hmac_hash(temp_key, out1 + b"\x02")
    out3 = _hmac_hash(temp_key, out2 + b"\x03")
    return out1, out2, out3


# ---------------------------------------------------------------------------------------
# DH functions (sections 4.1 and 12.1)
# ---------------------------------------------------------------------------------------


def private_key(raw: bytes, what: str) -> X25519PrivateKey:
    """Load a raw 32-byte X25519 private key.

    Raises:
        ValueError: ``raw`` is not 32 bytes.
    """
    if not isinstance(raw, (bytes, bytearray, memoryview)) or len(raw) != DHLEN:
        raise ValueError(f"{what} must be a {DHLEN}-byte raw X25519 private key")
    return X25519PrivateKey.from_private_bytes(bytes(raw))


def check_public(raw: bytes, what: str) -> bytes:
    """Return a raw 32-byte X25519 public key as :class:`bytes`.

    Raises:
        ValueError: ``raw`` is not 32 bytes.
    """
    if not isinstance(raw, (bytes, bytearray, memoryview)) or len(raw) != DHLEN:
        raise ValueError(f"{what} must be a {DHLEN}-byte raw X25519 public key")
    return bytes(raw)


def dh(private: X25519PrivateKey, public: bytes) -> bytes:
    """X25519, refusing the all-zero output of a low-order public key.

    Raises:
        RemoteProtocolError: the public key is a low-order point.
    """
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        # OpenSSL refuses the all-zero shared secret itself.
        raise RemoteProtocolError("peer public key is a low-order point") from None
    if shared == _ZEROS32:  # pragma: no cover - OpenSSL already refuses it
        raise RemoteProtocolError("peer public key is a low-order point")
    return shared


def is_low_order(public: bytes) -> bool:
    """Whether ``public`` is a low-order X25519 point (its DH output is all zeros)."""
    # With clamped scalars (multiples of the cofactor 8), every low-order point gives the
    # all-zero output for any private key, so one test exchange is conclusive.
    try:
        shared = X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        return True
    return shared == _ZEROS32
