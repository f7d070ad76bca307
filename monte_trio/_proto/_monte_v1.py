"""Go monte's handshake and record keys, for talking to Go monte services.

.. warning::

   This profile is for interoperability only. It does **not** authenticate either peer
   (anyone in the middle can terminate both handshakes and read and forge everything), and
   it seals the first record of each direction with the same key and nonce (AES-GCM nonce
   reuse, which leaks the XOR of plaintexts and lets an attacker forge records). Use the
   native profile unless the peer is a Go monte service.

The exchange (Go monte's ``Session.DoClient`` / ``DoServer``): each side sends its raw
32-byte X25519 public key with no framing; the client writes first, the server reads then
writes. ``key = BLAKE2b-256(X25519(own private, peer public))`` keys AES-256-GCM in both
directions, with the nonce ``u64 big-endian counter || 4 zero bytes`` counted per direction
from 0.

:class:`MonteV1HandshakeState` is a sans-IO state machine: :meth:`~MonteV1HandshakeState.
data_to_send` says what to write, :meth:`~MonteV1HandshakeState.receive_data` takes what was
read, and once :attr:`~MonteV1HandshakeState.complete` it hands out the record sealer and
opener plus any bytes that arrived after the handshake. Nothing here performs I/O.
"""

from __future__ import annotations

import hashlib
from typing import Final

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from .._exceptions import HandshakeError, LocalProtocolError
from ._records import MONTE_V1_NONCE, RecordOpener, RecordSealer

__all__ = ["KEY_SIZE", "MONTE_V1_DEFAULT_MAX_RECORD", "MonteV1HandshakeState", "session_key"]

KEY_SIZE: Final = 32
MONTE_V1_DEFAULT_MAX_RECORD: Final = 4096
"""Go monte's default read buffer size: it refuses any larger record."""


def session_key(private_key: bytes, peer_public: bytes) -> bytes:
    """Return monte's AES-256-GCM key: BLAKE2b-256 of the X25519 shared secret.

    Raises:
        HandshakeError: the peer's key is a low-order point (the shared secret is zero).
    """
    try:
        shared = X25519PrivateKey.from_private_bytes(private_key).exchange(
            X25519PublicKey.from_public_bytes(peer_public)
        )
    except ValueError:
        raise HandshakeError(
            "the peer sent an invalid X25519 public key (a low-order point); "
            "it is not a monte peer or the connection was tampered with"
        ) from None
    return hashlib.blake2b(shared, digest_size=32).digest()


class MonteV1HandshakeState:
    """The monte-v1 handshake for one side of a connection.

    Args:
        initiator: ``True`` on the side that dialed (it writes its key first).
        private_key: a raw 32-byte X25519 private key; by default a fresh one is made, as
            monte does for every connection. Only tests should pass one.
    """

    __slots__ = ("_initiator", "_key", "_peer_public", "_private", "_received", "_sent", "public")

    def __init__(self, *, initiator: bool, private_key: bytes | None = None) -> None:
        private = (
            X25519PrivateKey.generate()
            if private_key is None
            else X25519PrivateKey.from_private_bytes(private_key)
        )
        self._initiator = initiator
        self._private = private.private_bytes_raw()
        self.public: bytes = private.public_key().public_bytes_raw()
        self._received = bytearray()
        self._peer_public: bytes | None = None
        self._sent = False
        self._key: bytes | None = None

    @property
    def complete(self) -> bool:
        """Whether both keys have been exchanged."""
        return self._sent and self._peer_public is not None

    @property
    def peer_public(self) -> bytes | None:
        """The peer's ephemeral public key, once received."""
        return self._peer_public

    def data_to_send(self) -> bytes:
        """Bytes to write now (possibly ``b""``). The key is returned once, at its turn."""
        if self._sent:
            return b""
        if self._initiator or self._peer_public is not None:
            self._sent = True
            return self.public
        return b""

    def receive_data(self, data: bytes) -> bytes:
        """Take bytes read from the peer; return any that belong to the record stream.

        Raises:
            HandshakeError: the peer closed the connection (``data == b""``) before sending
                its key, or sent an invalid key.
        """
        if self._peer_public is not None:
            return bytes(data)
        if not data:
            raise HandshakeError(
                f"the peer closed the connection during the monte-v1 handshake after "
                f"{len(self._received)} of {KEY_SIZE} bytes; it may expect another profile "
                "(a monte_trio native server refuses monte-v1 clients)"
            )
        if self._initiator and not self._sent:
            raise LocalProtocolError("the initiator must send its key before reading")
        self._received += data
        if len(self._received) < KEY_SIZE:
            return b""
        self._peer_public = bytes(self._received[:KEY_SIZE])
        rest = bytes(self._received[KEY_SIZE:])
        self._received = bytearray()
        self._key = session_key(self._private, self._peer_public)
        return rest

    def records(self, *, max_record_size: int) -> tuple[RecordSealer, RecordOpener]:
        """Return the record sealer (our direction) and opener (the peer's direction).

        Both use the one session key with counters from 0, exactly as Go monte.
        """
        if not self.complete or self._key is None:
            raise LocalProtocolError("the monte-v1 handshake is not complete")
        return (
            RecordSealer(self._key, MONTE_V1_NONCE, max_record_size=max_record_size),
            RecordOpener(self._key, MONTE_V1_NONCE, max_record_size=max_record_size),
        )
