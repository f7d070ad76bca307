"""The service envelope inside a message body: a call and its reply (sans-IO).

The byte layouts are specified in docs/services.rst ("On the wire")::

    call     = F5 | 01 | u8 flags | u16 N | name (N bytes, UTF-8)
               | [u64 remaining time, microseconds, with flag 0x02]
               | [metadata, with flag 0x08] | arguments
    metadata = u8 count | count x (u8 K | key (K bytes) | u16 V | value (V bytes))
    result   = F5 | 02 | value (codec-encoded)
    raw      = F5 | 03 | the bytes result, untouched
    error    = F5 | 04 | u16 code | u16 N | name (N bytes) | u32 L | message (L bytes)
               | details (codec-encoded; nothing = none)

The arguments are ``[positional array, keyword map]`` encoded by the codec, or, with flag
0x04, the single ``bytes`` argument untouched. Metadata keys and values are UTF-8 text;
at most :data:`MAX_METADATA_ENTRIES` entries whose keys and values add up to at most
:data:`MAX_METADATA_SIZE` bytes, each key 1 to :data:`MAX_METADATA_KEY` bytes. 0xF5 never
occurs in UTF-8 text, so no text body is taken for a call. Integers are big-endian.
Nothing here imports trio.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Final

__all__ = [
    "FLAG_DEADLINE",
    "FLAG_IDEMPOTENT",
    "FLAG_METADATA",
    "FLAG_RAW",
    "MARK",
    "MAX_METADATA_ENTRIES",
    "MAX_METADATA_KEY",
    "MAX_METADATA_SIZE",
    "MAX_NAME",
    "EnvelopeError",
    "call_prefix",
    "decode_call",
    "decode_error",
    "encode_call",
    "encode_error",
    "encode_metadata",
    "is_call",
]

MARK: Final = 0xF5
CALL: Final = 0x01
RESULT: Final = 0x02
RAW_RESULT: Final = 0x03
ERROR: Final = 0x04
FLAG_IDEMPOTENT: Final = 0x01
FLAG_DEADLINE: Final = 0x02
FLAG_RAW: Final = 0x04
FLAG_METADATA: Final = 0x08
FLAGS_RESERVED: Final = 0xF0
MAX_NAME: Final = 0xFFFF
MAX_MICROSECONDS: Final = 2**64 - 1
MAX_METADATA_ENTRIES: Final = 64
"""The most metadata entries a call carries."""
MAX_METADATA_SIZE: Final = 8192
"""The most bytes a call's metadata keys and values add up to (UTF-8)."""
MAX_METADATA_KEY: Final = 255
"""The longest metadata key, in bytes of UTF-8."""

CALL_HEAD: Final = struct.Struct(">BBBH")  # mark, kind, flags, name length
_U64: Final = struct.Struct(">Q")
_U16: Final = struct.Struct(">H")
_ERROR_HEAD: Final = struct.Struct(">BBHH")
_U32: Final = struct.Struct(">I")
RESULT_PREFIX: Final = bytes([MARK, RESULT])
RAW_PREFIX: Final = bytes([MARK, RAW_RESULT])
CALL_MARK: Final = bytes([MARK, CALL])


class EnvelopeError(ValueError):
    """A body that claims to be an envelope but is malformed."""


def is_call(body: bytes) -> bool:
    """Whether ``body`` starts like a call envelope."""
    return body[:2] == CALL_MARK


def encode_name(name: str) -> bytes:
    """The method name's UTF-8 bytes.

    Raises:
        ValueError: longer than 65,535 bytes.
    """
    encoded = name.encode("utf-8", errors="surrogatepass")
    if len(encoded) > MAX_NAME:
        raise ValueError(
            f"a method name is at most {MAX_NAME} bytes of UTF-8; this one has {len(encoded)}"
        )
    return encoded


def call_prefix(name: bytes, flags: int) -> bytes:
    """The first bytes of a call envelope: marker, kind, ``flags`` and the name."""
    return CALL_HEAD.pack(MARK, CALL, flags, len(name)) + name


def remaining_field(remaining: float) -> bytes:
    """The remaining-time field for ``remaining`` seconds (below 0: 0; capped)."""
    micros = remaining * 1e6
    return _U64.pack(MAX_MICROSECONDS if micros >= MAX_MICROSECONDS else max(0, int(micros)))


def encode_metadata(metadata: Mapping[str, str]) -> bytes:
    """The metadata field of a call (``metadata`` is not empty).

    Raises:
        TypeError: a key or value is not a ``str``.
        ValueError: too many entries, too many bytes, an empty or too long key, or text
            that does not encode as UTF-8.
    """
    count = len(metadata)
    if count > MAX_METADATA_ENTRIES:
        raise ValueError(
            f"a call carries at most {MAX_METADATA_ENTRIES} metadata entries; this one has {count}"
        )
    entries: list[tuple[bytes, bytes]] = []
    for key, value in metadata.items():
        if type(key) is not str or type(value) is not str:
            raise TypeError(
                "metadata keys and values are str; got "
                f"{type(key).__name__} {printable_key(key)} -> {type(value).__name__}"
            )
        try:
            entry = (key.encode("utf-8"), value.encode("utf-8"))
        except UnicodeEncodeError:
            raise ValueError(
                f"the metadata entry {printable_key(key)} is not encodable as UTF-8"
            ) from None
        if not 0 < len(entry[0]) <= MAX_METADATA_KEY:
            raise ValueError(
                f"a metadata key is 1 to {MAX_METADATA_KEY} bytes of UTF-8; "
                f"{printable_key(key)} has {len(entry[0])}"
            )
        entries.append(entry)
    size = sum(len(key_bytes) + len(value_bytes) for key_bytes, value_bytes in entries)
    if size > MAX_METADATA_SIZE:
        raise ValueError(
            f"a call's metadata keys and values add up to at most {MAX_METADATA_SIZE} "
            f"bytes of UTF-8; these add up to {size}"
        )
    parts = [bytes([count])]
    for key_bytes, value_bytes in entries:
        parts += (bytes([len(key_bytes)]), key_bytes, _U16.pack(len(value_bytes)), value_bytes)
    return b"".join(parts)


def printable_key(key: object) -> str:
    """A metadata key as an error message shows it (``repr``, cut)."""
    text = repr(key)
    return text if len(text) <= 60 else text[:60] + "..."


def encode_call(
    name: bytes,
    flags: int,
    remaining: float | None,
    arguments: bytes,
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """A call envelope; ``remaining`` in seconds (``None``: no deadline; below 0: 0).

    Raises:
        TypeError, ValueError: the metadata is not valid (see :func:`encode_metadata`).
    """
    parts = []
    if remaining is not None:
        flags |= FLAG_DEADLINE
        parts.append(remaining_field(remaining))
    if metadata:
        flags |= FLAG_METADATA
        parts.append(encode_metadata(metadata))
    return b"".join([call_prefix(name, flags), *parts, arguments])


def decode_call(body: bytes) -> tuple[str, int, float | None, dict[str, str] | None, bytes]:
    """``(name, flags, remaining seconds or None, metadata or None, arguments)`` of a
    call envelope.

    Raises:
        EnvelopeError: truncated, reserved flags set, a name that is not UTF-8, or
            metadata that is malformed or over its limits.
    """
    if len(body) < CALL_HEAD.size:
        raise EnvelopeError("the call envelope is truncated")
    _, _, flags, size = CALL_HEAD.unpack_from(body)
    if flags & FLAGS_RESERVED:
        raise EnvelopeError(f"the call envelope has reserved flags set ({flags:#04x})")
    offset = CALL_HEAD.size + size
    if len(body) < offset:
        raise EnvelopeError("the call envelope is truncated inside the method name")
    try:
        name = body[CALL_HEAD.size : offset].decode("utf-8")
    except UnicodeDecodeError:
        raise EnvelopeError("the method name is not UTF-8") from None
    remaining: float | None = None
    if flags & FLAG_DEADLINE:
        if len(body) < offset + 8:
            raise EnvelopeError("the call envelope is truncated inside the remaining time")
        (micros,) = _U64.unpack_from(body, offset)
        remaining = micros / 1e6
        offset += 8
    metadata: dict[str, str] | None = None
    if flags & FLAG_METADATA:
        metadata, offset = _decode_metadata(body, offset)
    return name, flags, remaining, metadata, body[offset:]


def _decode_metadata(body: bytes, offset: int) -> tuple[dict[str, str], int]:
    if len(body) < offset + 1:
        raise EnvelopeError("the call envelope is truncated inside its metadata")
    count = body[offset]
    offset += 1
    if count > MAX_METADATA_ENTRIES:
        raise EnvelopeError(
            f"the call's metadata has {count} entries; at most {MAX_METADATA_ENTRIES} are allowed"
        )
    metadata: dict[str, str] = {}
    size = 0
    for _ in range(count):
        if len(body) < offset + 1:
            raise EnvelopeError("the call envelope is truncated inside its metadata")
        key_size = body[offset]
        if key_size == 0:
            raise EnvelopeError("the call's metadata has an empty key")
        start = offset + 1
        offset = start + key_size + 2
        if len(body) < offset:
            raise EnvelopeError("the call envelope is truncated inside its metadata")
        (value_size,) = _U16.unpack_from(body, offset - 2)
        size += key_size + value_size
        if size > MAX_METADATA_SIZE:
            raise EnvelopeError(
                f"the call's metadata keys and values add up to more than "
                f"{MAX_METADATA_SIZE} bytes"
            )
        if len(body) < offset + value_size:
            raise EnvelopeError("the call envelope is truncated inside its metadata")
        try:
            key = body[start : start + key_size].decode("utf-8")
            value = body[offset : offset + value_size].decode("utf-8")
        except UnicodeDecodeError:
            raise EnvelopeError("the call's metadata is not UTF-8") from None
        if key in metadata:
            raise EnvelopeError(f"the metadata key {printable_key(key)} appears twice in the call")
        metadata[key] = value
        offset += value_size
    return metadata, offset


def encode_error(code: int, name: str, message: str, details: bytes) -> bytes:
    """An error reply; ``name`` and ``message`` are cut to fit their length fields."""
    name_bytes = name.encode("utf-8", errors="replace")[:MAX_NAME]
    text = message.encode("utf-8", errors="replace")[: 2**32 - 1]
    return (
        _ERROR_HEAD.pack(MARK, ERROR, code, len(name_bytes))
        + name_bytes
        + _U32.pack(len(text))
        + text
        + details
    )


def decode_error(body: bytes) -> tuple[int, str, str, bytes]:
    """``(code, name, message, details)`` of an error reply (names and text decoded with
    replacement characters).

    Raises:
        EnvelopeError: truncated.
    """
    if len(body) < _ERROR_HEAD.size:
        raise EnvelopeError("the error reply is truncated")
    _, _, code, size = _ERROR_HEAD.unpack_from(body)
    offset = _ERROR_HEAD.size + size
    if len(body) < offset + 4:
        raise EnvelopeError("the error reply is truncated")
    name = body[_ERROR_HEAD.size : offset].decode("utf-8", errors="replace")
    (length,) = _U32.unpack_from(body, offset)
    offset += 4
    if len(body) < offset + length:
        raise EnvelopeError("the error reply is truncated inside its message")
    message = body[offset : offset + length].decode("utf-8", errors="replace")
    return code, name, message, body[offset + length :]
