"""The native profile's sans-IO parts: preamble, hello, verdict, keys and frames.

The handshake is ``Noise_XX_25519_AESGCM_BLAKE2b`` (``XXpsk3`` with a pre-shared key),
framed as follows (the full specification, with test vectors, is in docs/wire-native)::

    initiator                                             responder
    PREAMBLE(version, flags) | u16 len | msg1  ------>
                                 <------  PREAMBLE(version, status) | u16 len | msg2
    u16 len | msg3  ------------------------------------>
                                 <------  record 0: VERDICT (accept / refuse + reason)
    records ...                  <----->  records ...

* ``msg1`` carries the initiator's ephemeral key and an empty payload (it is not
  encrypted, so nothing is said there).
* ``msg2`` and ``msg3`` carry each side's static key and its :class:`Hello`, encrypted: the
  version 2 TLV hello (version, record and message sizes, windows, call slots, nested
  allowance, feature bits).
* An initiator whose trust policy refuses the responder's key sends an empty ``msg3``
  (length 0) instead of the real one, so an impostor never learns the initiator's key, and
  closes; the responder reports the refusal.
* The responder checks the initiator's key with its trust policy and answers with a
  verdict in the first transport record, so a refused client learns why before it sends
  anything, and the client's handshake only completes once it is accepted.
* The prologue binds the protocol name, the version and the initiator's preamble, so a
  man in the middle who alters the version or the psk flag makes the handshake fail.

After the handshake each direction has its own key from Noise's ``Split()``; nonces are
the Noise counters; both sides rekey (Noise ``REKEY``) every :data:`REKEY_INTERVAL` records
of a direction, keeping every key's use far below AES-GCM's limits. Every record's
plaintext carries one or more wire version 2 frames: the session
(:mod:`monte_trio._proto._session`) packs and parses them. :class:`NativeCodec` (one
6-byte-header frame per record) is the older frame layer, kept only for the record-layer
known-answer vectors and the fuzz tests.
"""

from __future__ import annotations

import struct
from typing import Final

from .._exceptions import HandshakeError, LocalProtocolError, RemoteProtocolError
from . import _wire2
from ._frames import Frame, FrameKind
from ._noise import CipherState
from ._records import NOISE_AESGCM_NONCE, NOISE_CHACHAPOLY_NONCE, RecordOpener, RecordSealer

__all__ = [
    "CONTROL_BURST",
    "CONTROL_RATE",
    "FLAG_MORE",
    "HEADER",
    "MAGIC",
    "MAX_CONTROL_PAYLOAD",
    "MAX_RECORD",
    "MAX_VERDICT_REASON",
    "MIN_MESSAGE_SIZE",
    "MIN_RECORD_SIZE",
    "PREAMBLE_SIZE",
    "REKEY_INTERVAL",
    "VERSION",
    "Hello",
    "NativeCodec",
    "Status",
    "decode_preamble",
    "decode_verdict",
    "encode_preamble",
    "encode_verdict",
    "fit_text",
    "prologue",
    "protocol_name",
    "transport",
]

MAGIC: Final = b"MNTRIO"
"""The first six bytes each side sends."""
VERSION: Final = _wire2.VERSION
"""The native profile's version (2), in the preamble, the prologue and the hello."""
PREAMBLE_SIZE: Final = 8
FLAG_PSK: Final = 0x01
"""Initiator preamble flag: a pre-shared key is in use (``XXpsk3``)."""
MAX_RECORD: Final = 65535
"""Noise's limit on one transport message, so the largest record (ciphertext and tag)."""
MIN_RECORD_SIZE: Final = _wire2.MIN_RECORD_SIZE
"""The smallest ``max_record_size`` a hello may announce (1,024: an ERROR frame and every
control frame fit one record)."""
MIN_MESSAGE_SIZE: Final = 1024
"""The smallest ``max_message_size`` a hello may announce: room for every control frame
and for a useful error text."""
MAX_CONTROL_PAYLOAD: Final = 16
"""The largest payload of a control frame (CANCEL, PING, PONG, GOAWAY)."""
MAX_VERDICT_REASON: Final = 1024
"""The largest refusal reason (UTF-8 bytes) a verdict may carry."""
CONTROL_BURST: Final = 1000
"""Control frames that cost the receiver work without carrying a request (PING, PONG,
GOAWAY, CANCEL of an id not in progress) a peer may send at once..."""
CONTROL_RATE: Final = 100
"""... and per second after that burst; a peer that sends more is disconnected."""
REKEY_INTERVAL: Final = 1 << 20
"""Records per direction between two rekeys."""
HEADER: Final = struct.Struct(">BBI")
"""A frame header: kind, flags, id."""
# For the decoder's hot path: plain ints and a bound method, not enum members.
_HEADER_SIZE: Final = HEADER.size
_unpack_header: Final = HEADER.unpack_from
_LAST_KIND: Final = max(FrameKind).value
_FIRST_CONTROL: Final = FrameKind.CANCEL.value
FLAG_MORE: Final = 0x01
"""Frame flag: the message continues in the next record."""
VERDICT_ACCEPT: Final = 0
VERDICT_REFUSE: Final = 1


class Status:
    """The responder preamble's status byte."""

    OK = 0
    UNSUPPORTED_VERSION = 1
    PSK_REQUIRED = 2
    PSK_NOT_CONFIGURED = 3

    MESSAGES: Final = {
        1: "the server does not support this protocol version",
        2: "the server requires a pre-shared key (psk) and none was configured here",
        3: "a pre-shared key (psk) is configured here but the server has none",
    }


def protocol_name(*, psk: bool, cipher: str = "AESGCM") -> str:
    """The Noise protocol name for the native profile."""
    return f"Noise_XX{'psk3' if psk else ''}_25519_{cipher}_BLAKE2b"


def prologue(name: str, initiator_preamble: bytes) -> bytes:
    """What both sides mix into the handshake hash before the first message."""
    return b"monte_trio native/" + bytes([VERSION]) + b"\x00" + name.encode() + initiator_preamble


def encode_preamble(byte: int, version: int = VERSION) -> bytes:
    """A preamble: magic, version, then flags (initiator) or status (responder)."""
    return MAGIC + bytes([version, byte])


def decode_preamble(data: bytes, *, who: str) -> tuple[int, int]:
    """Return ``(version, flags_or_status)`` from an 8-byte preamble.

    Raises:
        HandshakeError: the bytes are not a monte_trio native preamble.
    """
    if len(data) != PREAMBLE_SIZE or data[: len(MAGIC)] != MAGIC:
        hint = (
            "it may be a monte-v1 (Go monte) server: use the monte-v1 profile to talk to it"
            if who == "server"
            else "it may be a monte-v1 (Go monte) client, which this server does not accept"
        )
        raise HandshakeError(f"the {who} does not speak the monte_trio native profile; {hint}")
    return data[6], data[7]


Hello = _wire2.Hello2
"""The hello each side sends in msg2 / msg3 (wire version 2: TLV, see ``_wire2``)."""


def encode_verdict(accept: bool, reason: str = "", *, max_size: int = 1025) -> bytes:
    """The plaintext of the responder's first transport record.

    A refusal's reason is cut to at most 1,024 bytes and to ``max_size`` in all (the
    largest plaintext the initiator's records allow).
    """
    if accept:
        return bytes([VERDICT_ACCEPT])
    room = max(0, min(MAX_VERDICT_REASON, max_size - 1))
    return bytes([VERDICT_REFUSE]) + fit_text(reason, room)


def decode_verdict(plaintext: bytes) -> tuple[bool, str]:
    """Return ``(accepted, reason)`` from the responder's first transport record.

    Raises:
        RemoteProtocolError: the record is not a verdict, or its reason is longer than
            :data:`MAX_VERDICT_REASON` bytes.
    """
    if not plaintext or plaintext[0] not in (VERDICT_ACCEPT, VERDICT_REFUSE):
        raise RemoteProtocolError("the server's first record is not a handshake verdict")
    if len(plaintext) - 1 > MAX_VERDICT_REASON:
        raise RemoteProtocolError(
            f"the server's verdict carries a reason of {len(plaintext) - 1} bytes, more than "
            f"the {MAX_VERDICT_REASON} the protocol allows"
        )
    return plaintext[0] == VERDICT_ACCEPT, plaintext[1:].decode("utf-8", errors="replace")


def fit_text(text: str, limit: int) -> bytes:
    """``text`` in UTF-8, cut to at most ``limit`` bytes on a character boundary."""
    data = text.encode("utf-8", errors="replace")
    if len(data) <= limit:
        return data
    cut = max(0, limit)
    while cut and (data[cut] & 0xC0) == 0x80:  # a continuation byte: back to a boundary
        cut -= 1
    return data[:cut]


def transport(
    send: CipherState, receive: CipherState, *, peer_max_record: int, own_max_record: int
) -> tuple[RecordSealer, RecordOpener]:
    """Record sealer and opener from the cipher states of Noise's ``Split()``."""
    nonce = NOISE_AESGCM_NONCE if send.cipher_name == "AESGCM" else NOISE_CHACHAPOLY_NONCE
    send_key, receive_key = send.key, receive.key
    if send_key is None or receive_key is None:
        raise LocalProtocolError("split cipher states have no key")
    return (
        RecordSealer(
            send_key,
            nonce,
            max_record_size=min(peer_max_record, MAX_RECORD),
            counter=send.nonce,
            rekey_interval=REKEY_INTERVAL,
        ),
        RecordOpener(
            receive_key,
            nonce,
            max_record_size=min(own_max_record, MAX_RECORD),
            counter=receive.nonce,
            rekey_interval=REKEY_INTERVAL,
        ),
    )


class NativeCodec:
    """The native message layer: ``u8 kind | u8 flags | u32 id | payload`` per record.

    Args:
        max_record_size: the largest record the peer accepts (from its hello).
        send_limit: the largest message the peer accepts (from its hello).
        receive_limit: the largest message this side accepts.
    """

    profile = "native"
    kinds: frozenset[FrameKind] = frozenset(FrameKind)

    __slots__ = ("_chunk", "_partial", "_partial_head", "max_message_size", "receive_limit")

    def __init__(self, *, max_record_size: int, send_limit: int, receive_limit: int) -> None:
        self._chunk = max_record_size - 16 - HEADER.size
        if self._chunk < 1:
            raise ValueError("max_record_size leaves no room for a payload")
        self.max_message_size = send_limit
        self.receive_limit = receive_limit
        # The message being reassembled: its payload so far in one buffer, so that its
        # memory is its payload whatever the fragment sizes; and (kind, id).
        self._partial = bytearray()
        self._partial_head: tuple[int, int] | None = None

    @property
    def reassembling(self) -> int:
        """Payload bytes of a message received in part (held until its last record)."""
        return len(self._partial)

    def encode(self, kind: int, ident: int, payload: bytes, out: list[bytes | None]) -> int:
        size = len(payload)
        if size > self.max_message_size:
            raise LocalProtocolError(
                f"message of {size} bytes exceeds the peer's maximum of "
                f"{self.max_message_size} (max_message_size)"
            )
        chunk = self._chunk
        if size <= chunk:
            plaintext = HEADER.pack(kind, 0, ident) + payload
            out.append(plaintext)
            return len(plaintext)
        view = memoryview(payload)
        total = 0
        for start in range(0, size, chunk):
            stop = start + chunk
            flags = FLAG_MORE if stop < size else 0
            plaintext = HEADER.pack(kind, flags, ident) + view[start:stop]
            out.append(plaintext)
            total += len(plaintext)
        return total

    def decode(self, plaintext: bytes) -> Frame | None:
        size = len(plaintext)
        if size < _HEADER_SIZE:
            raise RemoteProtocolError(
                f"native record of {size} bytes is too short for a frame header"
            )
        kind, flags, ident = _unpack_header(plaintext)
        if kind >= _FIRST_CONTROL:
            return self._decode_control(kind, flags, ident, plaintext)
        head = self._partial_head
        if head is None and not flags & FLAG_MORE:
            if size - _HEADER_SIZE > self.receive_limit:
                raise RemoteProtocolError(
                    f"the peer sent a message larger than our maximum of "
                    f"{self.receive_limit} bytes (max_message_size)"
                )
            return (kind, ident, plaintext[_HEADER_SIZE:])
        if head is not None and (head[0] != kind or head[1] != ident):
            raise RemoteProtocolError(
                f"a record of message {ident} arrived in the middle of message {head[1]}"
            )
        partial = self._partial
        if len(partial) + size - _HEADER_SIZE > self.receive_limit:
            raise RemoteProtocolError(
                f"the peer sent a message larger than our maximum of {self.receive_limit} "
                "bytes (max_message_size)"
            )
        if flags & FLAG_MORE:
            if size == _HEADER_SIZE:
                raise RemoteProtocolError(
                    f"the peer sent an empty fragment flagged MORE (message {ident}); every "
                    "fragment but the last must carry payload"
                )
            with memoryview(plaintext) as view:
                partial += view[_HEADER_SIZE:]
            self._partial_head = (kind, ident)
            return None
        with memoryview(plaintext) as view:
            partial += view[_HEADER_SIZE:]
        payload = bytes(partial)
        self._partial = bytearray()
        self._partial_head = None
        return (kind, ident, payload)

    def _decode_control(self, kind: int, flags: int, ident: int, plaintext: bytes) -> Frame:
        if kind > _LAST_KIND:
            raise RemoteProtocolError(f"unknown frame kind {kind}")
        name = FrameKind(kind).name
        if self._partial_head is not None:
            raise RemoteProtocolError(
                f"a {name} frame arrived in the middle of message {self._partial_head[1]}"
            )
        if flags & FLAG_MORE:
            raise RemoteProtocolError(
                f"a {name} frame was flagged MORE; control frames are never split"
            )
        if len(plaintext) - _HEADER_SIZE > MAX_CONTROL_PAYLOAD:
            raise RemoteProtocolError(
                f"a {name} frame carried {len(plaintext) - _HEADER_SIZE} bytes of payload, "
                f"more than the {MAX_CONTROL_PAYLOAD} control frames may carry"
            )
        return (kind, ident, plaintext[_HEADER_SIZE:])
