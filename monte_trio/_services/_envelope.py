"""The service envelope inside a message body: a call and its reply (sans-IO).

The byte layouts are specified in docs/services.rst ("On the wire")::

    call   = F5 | 01 | u8 flags | u16 N | name (N bytes, UTF-8)
             | [u64 remaining time, microseconds, with flag 0x02] | arguments
    result = F5 | 02 | value (codec-encoded)
    raw    = F5 | 03 | the bytes result, untouched
    error  = F5 | 04 | u16 code | u16 N | name (N bytes) | u32 L | message (L bytes)
             | details (codec-encoded; nothing = none)

The arguments are ``[positional array, keyword map]`` encoded by the codec, or, with flag
0x04, the single ``bytes`` argument untouched. 0xF5 never occurs in UTF-8 text, so no
text body is taken for a call. Integers are big-endian. Nothing here imports trio.
"""

from __future__ import annotations

import struct
from typing import Final

__all__ = [
    "FLAG_DEADLINE",
    "FLAG_IDEMPOTENT",
    "FLAG_RAW",
    "MARK",
    "MAX_NAME",
    "EnvelopeError",
    "decode_call",
    "decode_error",
    "encode_call",
    "encode_error",
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
FLAGS_RESERVED: Final = 0xF8
MAX_NAME: Final = 0xFFFF
MAX_MICROSECONDS: Final = 2**64 - 1

_CALL_HEAD: Final = struct.Struct(">BBBH")
_U64: Final = struct.Struct(">Q")
_ERROR_HEAD: Final = struct.Struct(">BBHH")
_U32: Final = struct.Struct(">I")
RESULT_PREFIX: Final = bytes([MARK, RESULT])
RAW_PREFIX: Final = bytes([MARK, RAW_RESULT])


class EnvelopeError(ValueError):
    """A body that claims to be an envelope but is malformed."""


def is_call(body: bytes) -> bool:
    """Whether ``body`` starts like a call envelope."""
    return len(body) >= 2 and body[0] == MARK and body[1] == CALL


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


def encode_call(name: bytes, flags: int, remaining: float | None, arguments: bytes) -> bytes:
    """A call envelope; ``remaining`` in seconds (``None``: no deadline; below 0: 0)."""
    head = _CALL_HEAD.pack(
        MARK, CALL, flags | (FLAG_DEADLINE if remaining is not None else 0), len(name)
    )
    if remaining is None:
        return head + name + arguments
    micros = (
        MAX_MICROSECONDS if remaining * 1e6 >= MAX_MICROSECONDS else max(0, int(remaining * 1e6))
    )
    return head + name + _U64.pack(micros) + arguments


def decode_call(body: bytes) -> tuple[str, int, float | None, bytes]:
    """``(name, flags, remaining seconds or None, arguments)`` of a call envelope.

    Raises:
        EnvelopeError: truncated, reserved flags set, or a name that is not UTF-8.
    """
    if len(body) < _CALL_HEAD.size:
        raise EnvelopeError("the call envelope is truncated")
    _, _, flags, size = _CALL_HEAD.unpack_from(body)
    if flags & FLAGS_RESERVED:
        raise EnvelopeError(f"the call envelope has reserved flags set ({flags:#04x})")
    offset = _CALL_HEAD.size + size
    if len(body) < offset:
        raise EnvelopeError("the call envelope is truncated inside the method name")
    try:
        name = body[_CALL_HEAD.size : offset].decode("utf-8")
    except UnicodeDecodeError:
        raise EnvelopeError("the method name is not UTF-8") from None
    remaining: float | None = None
    if flags & FLAG_DEADLINE:
        if len(body) < offset + 8:
            raise EnvelopeError("the call envelope is truncated inside the remaining time")
        (micros,) = _U64.unpack_from(body, offset)
        remaining = micros / 1e6
        offset += 8
    return name, flags, remaining, body[offset:]


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
