"""Native wire version 2: the frame header, kinds, flags, error codes and the TLV hello.

The codec half of :mod:`monte_trio._proto._session` (the full specification is
docs/wire-native.rst). Version 2 keeps version 1's handshake, records and rekeying and
changes what a record's plaintext carries: one or more frames, each
``u8 kind | u8 flags | u16 length | u32 id | payload``. Nothing here performs I/O or imports
trio.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from typing import Final

import attrs

from .._exceptions import RemoteProtocolError

__all__ = [
    "CONTROL_BURST",
    "CONTROL_RATE",
    "DEFAULT_DATA_WINDOW",
    "DEFAULT_STREAM_WINDOW",
    "FLAG_END",
    "FLAG_MORE",
    "FLAG_NESTED",
    "HEADER",
    "HEADER_SIZE",
    "ID_LIMIT",
    "MAX_CONTROL_PAYLOAD",
    "MAX_ERROR_TEXT",
    "MESSAGE_COST",
    "MIN_MESSAGE_SIZE",
    "MIN_RECORD_SIZE",
    "MIN_STREAM_WINDOW",
    "SHAPE_DOWN",
    "SHAPE_UP",
    "SLICE",
    "STREAM_ABORT_BURST",
    "STREAM_ABORT_RATE",
    "VERSION",
    "Codec",
    "ErrorCode",
    "Hello2",
    "HelloType",
    "Kind",
    "default_reply_window",
    "default_request_window",
    "prologue",
]

VERSION: Final = 2
"""The native profile's version with this frame layer (preamble, prologue and hello)."""
HEADER: Final = struct.Struct(">BBHI")
"""The frame header: kind, flags, payload length, id."""
HEADER_SIZE: Final = 8
MIN_RECORD_SIZE: Final = 1024
"""Floor of ``max_record_size``: a record holds a frame of 1,000 payload bytes (an ERROR
with its code and a 998-byte text), so no control or error frame ever needs splitting."""
MIN_MESSAGE_SIZE: Final = 1024
"""Floor of ``max_message_size`` (room for every error text)."""
MAX_RECORD: Final = 65535
MAX_CONTROL_PAYLOAD: Final = 16
"""Largest payload of a control frame (CANCEL, PING, PONG, GOAWAY, CREDIT)."""
MAX_ERROR_TEXT: Final = 998
"""Largest UTF-8 text an ERROR frame carries (its payload is ``u16 code | text``)."""
MESSAGE_COST: Final = 64
"""Bytes of window a message costs on top of its body: empty messages are not free."""
ID_LIMIT: Final = 2**32 - 2**24
"""A side never allocates a call id above this; it retires the connection with
GOAWAY(ID_EXHAUSTED) when it reaches it."""
CONTROL_BURST: Final = 1000
"""Budgeted control frames a peer may send at once ..."""
CONTROL_RATE: Final = 100
"""... and per second after that."""

FLAG_MORE: Final = 0x01
"""Data frames: the message continues in a CONTINUATION frame of the same id."""
FLAG_END: Final = 0x02
"""DATA: the sender's half of the stream or streaming call ends (half-close)."""
FLAG_NESTED: Final = 0x04
"""REQUEST: a call made by a handler of the call named by the ``u32 parent`` prefix."""
SHAPE_UP: Final = 0x01
"""CALL shape bit (in its ``u8 shape`` payload): the opener sends a stream of messages."""
SHAPE_DOWN: Final = 0x02
"""CALL shape bit: the acceptor sends a stream of messages."""

DEFAULT_STREAM_WINDOW: Final = 256 * 1024
"""Initial per-stream (and per-streaming-call) window of the reference implementation."""
MIN_STREAM_WINDOW: Final = 1024
"""Floor of the hello's ``stream_window``."""
MAX_STREAM_WINDOW: Final = 2**30
"""Ceiling of the hello's ``stream_window`` (a window grows past it only by WINDOW frames)."""
DEFAULT_DATA_WINDOW: Final = 16 * 1024 * 1024
"""Connection-level window of stream and call data of the reference implementation."""
SLICE: Final = 16 * 1024
"""Payload bytes one stream (or the message queue) may pack in its turn: a small request
waits behind at most one slice of a bulk transfer."""
STREAM_ABORT_BURST: Final = 1000
"""Streams the peer may open and then abort (RESET or STOP) at once ..."""
STREAM_ABORT_RATE: Final = 100
"""... and per second after that; beyond: GOAWAY(ENHANCE_YOUR_CALM)."""


class Kind(enum.IntEnum):
    """Frame kinds. 0x00-0x3F core (unknown = error), 0x40-0x7F extensions (unknown =
    skipped), 0x80-0xFF reserved (error)."""

    ONEWAY = 0x01
    REQUEST = 0x02
    REPLY = 0x03
    ERROR = 0x04
    CONTINUATION = 0x05
    STREAM = 0x06
    CALL = 0x07
    DATA = 0x08
    CANCEL = 0x10
    RESET = 0x11
    STOP = 0x12
    WINDOW = 0x13
    BLOCKED = 0x14
    PING = 0x18
    PONG = 0x19
    GOAWAY = 0x1A
    CREDIT = 0x1B


class ErrorCode(enum.IntEnum):
    """Codes carried by GOAWAY, ERROR, RESET and STOP."""

    NO_ERROR = 0
    PROTOCOL = 1
    FLOW_CONTROL = 2
    FRAME_SIZE = 3
    REFUSED = 4
    CANCELLED = 5
    INTERNAL = 6
    ENHANCE_YOUR_CALM = 7
    ID_EXHAUSTED = 8


RETRY_SAFE: Final = frozenset({ErrorCode.REFUSED})
"""ERROR codes after which the call was certainly not processed (RequestNotProcessed)."""


class CreditLimit(enum.IntEnum):
    """What a CREDIT frame's id names."""

    CALLS = 1
    REQUEST_WINDOW = 2
    REPLY_WINDOW = 3
    STREAMS = 4
    DATA_WINDOW = 5


class HelloType(enum.IntEnum):
    """Hello TLV types and the size of their value."""

    VERSION = 1
    MAX_RECORD_SIZE = 2
    MAX_MESSAGE_SIZE = 3
    REQUEST_WINDOW = 4
    REPLY_WINDOW = 5
    MAX_CALLS = 6
    NESTED_ALLOWANCE = 7
    FEATURES = 8
    CODEC = 9
    STREAM_WINDOW = 10
    MAX_STREAMS = 11
    DATA_WINDOW = 12
    COMPRESSION = 13


class Codec(enum.IntEnum):
    """Codec ids of the hello's optional ``codec`` field: how service calls encode their
    arguments and results (docs/services.rst). The field is sent only when it is not
    :attr:`JSON`; absent, it means :attr:`JSON`."""

    JSON = 1
    MSGPACK = 2


_TLV: Final = struct.Struct(">HH")
_SIZES: Final = {1: 2, 2: 4, 3: 4, 4: 8, 5: 8, 6: 4, 7: 4, 8: 8}
_FIELDS: Final = {
    1: "version",
    2: "max_record_size",
    3: "max_message_size",
    4: "request_window",
    5: "reply_window",
    6: "max_calls",
    7: "nested_allowance",
    8: "features",
}
_CODEC_TYPE: Final = 9
_CODEC_SIZE: Final = 2
# Optional stream fields: sent (all three) only when max_streams > 0.
_STREAM_FIELDS: Final = {10: ("stream_window", 4), 11: ("max_streams", 4), 12: ("data_window", 8)}
# Optional: the compression codec ids (u8 each) the sender can decompress, in its order of
# preference; sent only when not empty (absent: none).
_COMPRESSION_TYPE: Final = 13
_DEFAULT_M: Final = 16 * 1024 * 1024


def default_request_window(max_message_size: int) -> int:
    """The smallest request window allowed with ``max_message_size`` (and the default):
    two maximum-size messages, one of them the nested-call reserve."""
    return 2 * (max_message_size + MESSAGE_COST)


def default_reply_window(max_message_size: int) -> int:
    """The smallest reply window allowed (and the default): one maximum-size reply."""
    return max_message_size + MESSAGE_COST


def _ids(value: object) -> tuple[int, ...]:
    # Typed ``object`` so that hellos built from a ``dict[str, int]`` of the other fields
    # still type-check; anything but an iterable of ints fails here.
    if not isinstance(value, Iterable):
        raise TypeError(f"compression must be an iterable of codec ids, not {value!r}")
    return tuple(int(v) for v in value)


def prologue(name: str, initiator_preamble: bytes) -> bytes:
    """Version 1's prologue with version byte 2."""
    return b"monte_trio native/" + bytes([VERSION]) + b"\x00" + name.encode() + initiator_preamble


@attrs.frozen
class Hello2:
    """What each side announces in the handshake; every limit is what the sender *accepts*.

    Attributes:
        version: protocol version (2).
        max_record_size: largest record the sender accepts (1,024 to 65,535).
        max_message_size: largest message body the sender accepts (M, at least 1,024).
        request_window: W, the request and one-way bytes (each + 64) the sender holds for
            the peer, at least ``2 * (M + 64)``.
        reply_window: W_r, the reply bytes (each + 64) the sender accepts for its own
            calls, at least ``M + 64``.
        max_calls: S, non-nested calls the peer may have open at the sender (>= 1).
        nested_allowance: k, nested calls each open call may have (>= 1).
        features: extension bits (none defined).
        codec: the service codec the sender uses (a :class:`Codec` id; any u16 is kept,
            so that a peer naming an unknown codec is reported by name and number).
            Optional on the wire: absent means :attr:`Codec.JSON`, which is never sent.
        stream_window: initial window of each stream and streaming call the peer sends
            on (bytes; a call message costs its body + 64), 1,024 to 2**30.
        max_streams: streams and streaming calls the peer may have open at the sender; 0
            means none (and then no stream field is sent: an older peer's hello, which has
            none of them, means "no streams").
        data_window: connection-level window of stream and call data, at least
            ``2 * stream_window``.
        compression: the compression codec ids (``_compression.CompressionId``, u8 each,
            no duplicates) the sender can decompress, in its order of preference; ids
            this side does not know are kept (and never used). Optional on the wire:
            empty means none, and is not sent.
    """

    version: int = VERSION
    max_record_size: int = MAX_RECORD
    max_message_size: int = _DEFAULT_M
    request_window: int = default_request_window(_DEFAULT_M)
    reply_window: int = default_reply_window(_DEFAULT_M)
    max_calls: int = 128
    nested_allowance: int = 1
    features: int = 0
    codec: int = Codec.JSON
    stream_window: int = DEFAULT_STREAM_WINDOW
    max_streams: int = 0
    data_window: int = DEFAULT_DATA_WINDOW
    compression: tuple[int, ...] = attrs.field(default=(), converter=_ids)

    def encode(self) -> bytes:
        """The TLV encoding, types in increasing order."""
        values = (
            self.version,
            self.max_record_size,
            self.max_message_size,
            self.request_window,
            self.reply_window,
            self.max_calls,
            self.nested_allowance,
            self.features,
        )
        out = bytearray()
        for type_, value in enumerate(values, start=1):
            size = _SIZES[type_]
            # "big" is the default byte order from Python 3.11: its mutants are equivalent.
            field = value.to_bytes(size, "big")  # pragma: no mutate
            out += _TLV.pack(type_, size) + field
        if self.codec != Codec.JSON:
            codec = self.codec.to_bytes(_CODEC_SIZE, "big")  # pragma: no mutate (as above)
            out += _TLV.pack(_CODEC_TYPE, _CODEC_SIZE) + codec
        if self.max_streams:
            for type_, (name, size) in _STREAM_FIELDS.items():
                field = int(getattr(self, name)).to_bytes(size, "big")  # pragma: no mutate
                out += _TLV.pack(type_, size) + field
        if self.compression:
            out += _TLV.pack(_COMPRESSION_TYPE, len(self.compression)) + bytes(self.compression)
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes) -> Hello2:
        """Parse and check a hello; unknown types are ignored, ``codec``, the stream
        fields and ``compression`` are optional.

        Raises:
            RemoteProtocolError: truncated, a known type twice or with a wrong length (an
                empty ``compression``), a field missing, a limit below its floor, or a
                compression id listed twice (the message names it).
        """
        values: dict[str, int] = {}
        compression: tuple[int, ...] | None = None
        offset = 0
        while offset < len(data):
            if len(data) - offset < _TLV.size:
                raise RemoteProtocolError("hello truncated inside a TLV header")
            type_, length = _TLV.unpack_from(data, offset)
            offset += _TLV.size
            if len(data) - offset < length:
                raise RemoteProtocolError(f"hello field {type_} truncated")
            value = data[offset : offset + length]
            offset += length
            name = _FIELDS.get(type_)
            if type_ == _COMPRESSION_TYPE:
                if not length:
                    raise RemoteProtocolError("hello field compression is empty")
                if compression is not None:
                    raise RemoteProtocolError("hello field compression appears twice")
                compression = tuple(value)
                continue
            if type_ == _CODEC_TYPE:
                if length != _CODEC_SIZE:
                    raise RemoteProtocolError(
                        f"hello field codec has {length} bytes, not {_CODEC_SIZE}"
                    )
                if "codec" in values:
                    raise RemoteProtocolError("hello field codec appears twice")
                values["codec"] = int.from_bytes(value, "big")  # pragma: no mutate
                continue
            optional = _STREAM_FIELDS.get(type_)
            if optional is not None:
                field_name, size = optional
                if length != size:
                    raise RemoteProtocolError(
                        f"hello field {field_name} has {length} bytes, not {size}"
                    )
                if field_name in values:
                    raise RemoteProtocolError(f"hello field {field_name} appears twice")
                values[field_name] = int.from_bytes(value, "big")  # pragma: no mutate
                continue
            if name is None:
                continue
            if length != _SIZES[type_]:
                raise RemoteProtocolError(
                    f"hello field {name} has {length} bytes, not {_SIZES[type_]}"
                )
            if name in values:
                raise RemoteProtocolError(f"hello field {name} appears twice")
            number = int.from_bytes(value, "big")  # pragma: no mutate (as in encode)
            values[name] = number
        if not values.get("max_streams"):
            # No streams: the other stream fields mean nothing (and keep their defaults).
            values.pop("stream_window", None)
            values.pop("data_window", None)
            values["max_streams"] = 0
        missing = [n for n in _FIELDS.values() if n not in values]
        if missing:
            raise RemoteProtocolError(f"the peer's hello lacks {', '.join(missing)}")
        hello = cls(**values, compression=compression or ())
        hello.check()
        return hello

    def check(self) -> None:
        """Check every limit against its floor.

        Raises:
            RemoteProtocolError: naming the field, the value and the allowed range.
        """
        m = self.max_message_size
        for name, value, low, high in (
            ("max_record_size", self.max_record_size, MIN_RECORD_SIZE, MAX_RECORD),
            ("max_message_size", m, MIN_MESSAGE_SIZE, 2**32 - 1),
            ("request_window", self.request_window, default_request_window(m), 2**62),
            ("reply_window", self.reply_window, default_reply_window(m), 2**62),
            ("max_calls", self.max_calls, 1, 2**31),
            ("nested_allowance", self.nested_allowance, 1, 2**16),
            ("max_streams", self.max_streams, 0, 2**31),
        ):
            if not low <= value <= high:
                raise RemoteProtocolError(
                    f"the peer announced {name} {value}, outside the allowed range {low}..{high}"
                )
        ids = self.compression
        if len(set(ids)) != len(ids) or not all(0 <= i <= 255 for i in ids):
            raise RemoteProtocolError(
                f"the peer announced compression ids {list(ids)}: each must be a distinct "
                "byte (0..255)"
            )
        if self.max_streams:
            sw = self.stream_window
            for name, value, low, high in (
                ("stream_window", sw, MIN_STREAM_WINDOW, MAX_STREAM_WINDOW),
                ("data_window", self.data_window, 2 * sw, 2**62),
            ):
                if not low <= value <= high:
                    raise RemoteProtocolError(
                        f"the peer announced {name} {value}, outside the allowed range "
                        f"{low}..{high}"
                    )
