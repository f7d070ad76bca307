"""The message layer: what a record's plaintext means.

* :class:`MonteV1Codec` is Go monte's layout, ``u32 seq | payload``: seq 0 is a one-way
  message, other seqs are requests or replies. It can express nothing else; Go monte's
  session (:mod:`~monte_trio._proto._session_v1`) routes on it.
* The native profile's frames (wire version 2: an 8-byte header with kind, flags, length
  and id, several frames per record) are packed and parsed by the session
  (:mod:`~monte_trio._proto._session`), with the layout in :mod:`~monte_trio._proto._wire2`.

Frames are plain tuples ``(kind, id, payload)`` on the hot path; :class:`FrameKind` names the
kinds. Nothing here performs I/O or imports trio.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

from .._exceptions import LocalProtocolError, RemoteProtocolError

__all__ = ["Frame", "FrameKind", "MonteV1Codec", "id_parity"]


class FrameKind(enum.IntEnum):
    """The kinds of frame a connection exchanges."""

    ONEWAY = 0
    """A message that expects no reply (monte's seq 0)."""
    REQUEST = 1
    """A request; the peer answers with REPLY or ERROR carrying the same id."""
    REPLY = 2
    """The successful answer to a request."""
    ERROR = 3
    """The handler raised: the payload is a UTF-8 message for the caller (native only)."""
    CANCEL = 4
    """The caller gave up on a request: cancel its handler (native only)."""
    PING = 5
    """Keepalive probe; answered by PONG with the same id and payload (native only)."""
    PONG = 6
    """Answer to PING (native only)."""
    GOAWAY = 7
    """The sender is shutting down; the id is the last request it processed (native only)."""


Frame = tuple[int, int, bytes]
"""A decoded frame: ``(kind, id, payload)``, kind being a :class:`FrameKind` value."""


def id_parity(initiator: bool) -> int:
    """The parity of request ids a side allocates: odd (1, 3, ...) for the side that dialed,
    even (2, 4, ...) for the side that accepted, as in Go monte."""
    return 1 if initiator else 0


_SEQ: Final = struct.Struct(">I")


class MonteV1Codec:
    """Go monte's message layer: ``u32 big-endian seq | payload`` in every record.

    monte decides whether a sequenced frame is a reply by looking its seq up among its own
    pending requests, and calls the handler otherwise. This codec decides by parity instead:
    a frame whose id has our own parity answers one of our requests, any other is the peer's
    request. With monte's default numbering (client odd, server even) the two rules agree for
    every well-behaved exchange; where they differ, a late reply to a request we gave up on,
    monte would hand the reply to its handler as a request, while we drop it.

    Args:
        initiator: whether this side dialed the connection.
        max_record_size: the largest record (ciphertext) either side accepts; a message
            must fit in one record (monte-v1 cannot split messages).
    """

    profile = "monte-v1"
    kinds: frozenset[FrameKind] = frozenset({FrameKind.ONEWAY, FrameKind.REQUEST, FrameKind.REPLY})

    __slots__ = ("_reply_parity", "max_message_size")

    reassembling: Final = 0
    """monte-v1 messages are one record each: nothing is ever held in part."""

    def __init__(self, *, initiator: bool, max_record_size: int) -> None:
        self._reply_parity = id_parity(initiator)
        self.max_message_size = max_record_size - 16 - _SEQ.size

    def encode(self, kind: int, ident: int, payload: bytes, out: list[bytes | None]) -> int:
        if kind > FrameKind.REPLY:
            raise LocalProtocolError(
                f"the monte-v1 profile cannot send {FrameKind(kind).name} frames; "
                "use the native profile for that feature"
            )
        if len(payload) > self.max_message_size:
            raise LocalProtocolError(
                f"message of {len(payload)} bytes exceeds the monte-v1 maximum of "
                f"{self.max_message_size} (one record); raise max_record_size on both sides"
            )
        plaintext = _SEQ.pack(ident) + payload
        out.append(plaintext)
        return len(plaintext)

    def decode(self, plaintext: bytes) -> Frame:
        if len(plaintext) < 4:
            raise RemoteProtocolError(
                f"monte-v1 record of {len(plaintext)} bytes is too short for a sequence number"
            )
        (seq,) = _SEQ.unpack_from(plaintext)
        if seq == 0:
            return (FrameKind.ONEWAY, 0, plaintext[4:])
        if seq & 1 == self._reply_parity:
            return (FrameKind.REPLY, seq, plaintext[4:])
        return (FrameKind.REQUEST, seq, plaintext[4:])
