"""The record layer: ``u32 big-endian length | AEAD ciphertext+tag``, one direction each.

Both wire profiles frame every record the same way and differ only in the AEAD's nonce
layout and key schedule. A layout is a :class:`~monte_trio._proto._noise_crypto.NonceFormat`,
the same object Noise's ``CipherState`` encrypts with, so the nonce packing and Noise's
``REKEY`` (section 4.2) exist once in the package:

============  ==========================================  ===============================
profile       nonce (12 bytes)                             keys
============  ==========================================  ===============================
monte-v1      u64 big-endian counter || 4 zero bytes       one key, both directions
native AES    4 zero bytes || u64 big-endian counter       one key per direction, rekeyed
native ChaCha 4 zero bytes || u64 little-endian counter    one key per direction, rekeyed
============  ==========================================  ===============================

A :class:`RecordSealer` turns plaintexts into wire bytes; a :class:`RecordOpener` is an
incremental decoder in the style of h11: feed it bytes with :meth:`RecordOpener.receive_data`,
which returns the plaintexts of the records they complete.

Theory of operation (the hot path): the writer hands a whole batch of plaintexts to
:meth:`RecordSealer.seal_many`, which produces one ``bytes`` object for one ``send_all``. The
reader feeds each received chunk; complete records are decrypted straight out of the chunk
through ``memoryview`` slices, and only an incomplete tail is copied and kept. A length
prefix is checked against the maximum record size as soon as its four bytes are known, so a
hostile peer can never make us buffer more than one maximum-size record.

Nothing here performs I/O or imports trio.
"""

from __future__ import annotations

import struct
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .._exceptions import DecryptionError, LocalProtocolError, RemoteProtocolError

# The nonce layouts and REKEY are Noise's cipher functions (_noise_crypto), shared with the
# Noise CipherState.
from ._noise_crypto import KEYLEN, MAX_NONCE, TAGLEN, NonceFormat

__all__ = [
    "MONTE_V1_NONCE",
    "NONCE_LIMIT",
    "TAG_SIZE",
    "RecordOpener",
    "RecordSealer",
]

TAG_SIZE: Final = TAGLEN
"""Bytes of authentication tag added by either AEAD."""

NONCE_LIMIT: Final = MAX_NONCE
"""First counter value that may never be used (Noise reserves 2**64 - 1)."""

_LENGTH = struct.Struct(">I")

MONTE_V1_NONCE: Final = NonceFormat("monte-v1 AES-256-GCM", ">Q4x", AESGCM)
"""monte-v1: the counter as u64 big-endian, then 4 zero bytes (Go monte's layout)."""


class _Direction:
    """Key, nonce counter, size limit and rekey schedule of one direction's records."""

    __slots__ = (
        "_aead",
        "_key",
        "_next_rekey",
        "_nonce",
        "_rekey_interval",
        "counter",
        "max_plaintext",
        "max_record_size",
    )

    counter: int
    """Records sealed or opened so far: the next record's nonce counter."""
    max_plaintext: int
    max_record_size: int

    def __init__(
        self,
        key: bytes,
        nonce: NonceFormat,
        *,
        max_record_size: int,
        counter: int = 0,
        rekey_interval: int | None = None,
    ) -> None:
        if max_record_size <= TAG_SIZE:
            raise ValueError(f"max_record_size must exceed {TAG_SIZE}")
        self.max_record_size = max_record_size
        self.max_plaintext = max_record_size - TAG_SIZE
        if len(key) != KEYLEN:
            raise ValueError(f"record keys are {KEYLEN} bytes, got {len(key)}")
        if rekey_interval is not None and rekey_interval < 1:
            raise ValueError("rekey_interval must be a positive number of records")
        self._key = key
        self._nonce = nonce
        self._aead = nonce.aead(key)
        self.counter = counter
        self._rekey_interval = rekey_interval
        # The next counter at which to act: a rekey, or at NONCE_LIMIT the refusal to go
        # on (capped, since the interval need not divide 2**64 - 1).
        self._next_rekey = (
            NONCE_LIMIT
            if rekey_interval is None
            else min((counter // rekey_interval + 1) * rekey_interval, NONCE_LIMIT)
        )

    def _rekey(self) -> None:
        # Called when ``counter`` reaches the next multiple of the interval: both ends
        # count the same records, so both rekey at the same record without signalling.
        assert self._rekey_interval is not None
        self._key = self._nonce.rekey(self._key)
        self._aead = self._nonce.aead(self._key)
        self._next_rekey = min(self._next_rekey + self._rekey_interval, NONCE_LIMIT)


class RecordSealer(_Direction):
    """Encrypts plaintexts into length-prefixed records for one direction.

    Args:
        key: the 32-byte AEAD key of this direction.
        nonce: the profile's :class:`NonceFormat`.
        max_record_size: the largest ciphertext (plaintext + 16) the peer accepts.
        counter: the first nonce counter to use (0 for a fresh key).
        rekey_interval: rekey after every this many records (native profile), or ``None``.
    """

    __slots__ = ()

    def seal(self, plaintext: bytes) -> bytes:
        """Return one record (length prefix included) carrying ``plaintext``."""
        return self.seal_many([plaintext])

    def seal_many(self, plaintexts: list[bytes | None]) -> bytes:
        """Return the records for ``plaintexts``, in order, as one buffer for one write.

        ``None`` entries are skipped (a sender cancelled before its record was taken).

        Raises:
            LocalProtocolError: a plaintext is larger than ``max_plaintext`` (nothing is
                sealed in that case), or the nonce counter is exhausted.
        """
        # The hot path of every write: attributes are read into locals once per batch.
        pack_len = _LENGTH.pack
        pack_nonce = self._nonce.pack
        limit = self.max_plaintext
        encrypt = self._aead.encrypt
        next_rekey = self._next_rekey
        parts: list[bytes] = []
        append = parts.append
        # Sizes are checked before any record is sealed: sealing some and then refusing
        # would spend nonces the peer never sees, and every later record would fail there.
        for plaintext in plaintexts:
            if plaintext is not None and len(plaintext) > limit:
                raise LocalProtocolError(
                    f"record plaintext of {len(plaintext)} bytes exceeds the maximum of "
                    f"{limit}; split the message or raise max_record_size on both sides"
                )
        counter = self.counter
        try:
            for plaintext in plaintexts:
                if plaintext is None:
                    continue
                size = len(plaintext)
                if counter == next_rekey:
                    if counter >= NONCE_LIMIT:
                        raise LocalProtocolError("nonce counter exhausted: open a new connection")
                    self._rekey()
                    encrypt = self._aead.encrypt
                    next_rekey = self._next_rekey
                append(pack_len(size + TAG_SIZE))
                append(encrypt(pack_nonce(counter), plaintext, None))
                counter += 1
        finally:
            self.counter = counter
        return b"".join(parts)


class RecordOpener(_Direction):
    """Incremental decoder and decrypter of records for one direction.

    Args:
        key: the 32-byte AEAD key of this direction.
        nonce: the profile's :class:`NonceFormat`.
        max_record_size: the largest ciphertext length accepted; a larger length prefix is
            refused before any of the record body is buffered.
        counter: the first nonce counter expected.
        rekey_interval: rekey after every this many records (native profile), or ``None``.

    After any error the opener is broken: every later call raises the same error, so a
    connection can never resynchronise on attacker-chosen bytes.
    """

    __slots__ = ("_broken", "_buffer", "_eof")

    def __init__(
        self,
        key: bytes,
        nonce: NonceFormat,
        *,
        max_record_size: int,
        counter: int = 0,
        rekey_interval: int | None = None,
    ) -> None:
        super().__init__(
            key,
            nonce,
            max_record_size=max_record_size,
            counter=counter,
            rekey_interval=rekey_interval,
        )
        self._buffer = bytearray()
        # Equivalent mutant (None): _eof is only ever tested for truth.
        self._eof = False  # pragma: no mutate
        self._broken: RemoteProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete record."""
        return len(self._buffer)

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Feed received bytes (``b""`` means end of stream) and return complete plaintexts.

        Raises:
            RemoteProtocolError: a length prefix is out of range, or the stream ended in
                the middle of a record.
            DecryptionError: a record failed authentication.
        """
        if self._broken is not None:
            raise self._broken
        if not data:
            self._eof = True
            if self._buffer:
                self._fail(
                    RemoteProtocolError(
                        f"connection closed in the middle of a record "
                        f"({len(self._buffer)} bytes of it received)"
                    )
                )
            return []
        if self._eof:
            raise RuntimeError("receive_data called after end of stream")
        records: list[bytes] = []
        with memoryview(data) as view:
            # Both tests below only skip work: completing an empty buffer, or keeping an
            # empty tail, gives the same records and the same (empty) buffer.
            rest = view
            if self._buffer:  # pragma: no mutate
                rest = self._complete_buffered(view, records)
            if rest:
                used = self._open_from(rest, records)
                if used < len(rest):  # pragma: no mutate
                    self._buffer = bytearray(rest[used:])  # only ever a partial record
        return records

    def _complete_buffered(self, view: memoryview, records: list[bytes]) -> memoryview:
        """Complete the buffered partial record from the start of ``view``: copy just the
        bytes it lacks, open it, and return the rest of ``view`` (empty if it is still
        incomplete)."""
        buffer = self._buffer
        # With the 4 length bytes already buffered this would copy nothing (equivalent).
        if len(buffer) < 4:  # pragma: no mutate
            # Taking more (up to a whole minimum record) would change nothing: the body's
            # copy below takes what this one did not (equivalent mutants).
            take = 4 - len(buffer)  # pragma: no mutate
            buffer += view[:take]
            view = view[take:]
            if len(buffer) < 4:
                return view
        (length,) = _LENGTH.unpack_from(buffer)
        self._check_length(length)
        take = 4 + length - len(buffer)  # > 0: the buffer never holds a whole record
        buffer += view[:take]
        view = view[take:]
        with memoryview(buffer) as whole:
            if self._open_from(whole, records):
                self._buffer = bytearray()
        return view

    def _check_length(self, length: int) -> None:
        if length > self.max_record_size or length < TAG_SIZE:
            self._fail(
                RemoteProtocolError(
                    f"record length {length} is outside the allowed range "
                    f"{TAG_SIZE}..{self.max_record_size}; closing the connection"
                )
            )

    def _open_from(self, view: memoryview, records: list[bytes]) -> int:
        """Open the complete records at the start of ``view`` into ``records``; return how
        many bytes they took."""
        end = len(view)
        pos = 0
        # The hot path of every read: attributes are read into locals once per chunk.
        unpack_len = _LENGTH.unpack_from
        pack_nonce = self._nonce.pack
        max_record = self.max_record_size
        decrypt = self._aead.decrypt
        next_rekey = self._next_rekey
        append = records.append
        counter = self.counter
        try:
            while end - pos >= 4:
                (length,) = unpack_len(view, pos)
                # Only spares the call in range; _check_length decides (equivalent mutants).
                if length > max_record or length < TAG_SIZE:  # pragma: no mutate
                    self._check_length(length)  # raises
                stop = pos + 4 + length
                if stop > end:
                    break
                if counter == next_rekey:
                    if counter >= NONCE_LIMIT:
                        self._fail(RemoteProtocolError("peer exhausted the nonce counter"))
                    self._rekey()
                    decrypt = self._aead.decrypt
                    next_rekey = self._next_rekey
                try:
                    append(decrypt(pack_nonce(counter), view[pos + 4 : stop], None))
                except InvalidTag:
                    self._fail(
                        DecryptionError(
                            "a record failed authentication (tampered, truncated, replayed, "
                            "reordered or sent with the wrong key); closing the connection"
                        )
                    )
                counter += 1
                pos = stop
        finally:
            self.counter = counter
        return pos

    def _fail(self, exc: RemoteProtocolError) -> None:
        self._broken = exc
        self._buffer = bytearray()
        raise exc
