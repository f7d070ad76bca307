"""Per-message compression of native message bodies: the codec registry and the envelope.

Compression is negotiated in the hello (field 13, the codec ids a side can decompress, in
its order of preference; docs/wire-native.rst, "Compression"). It is **per message and
stateless**: every compressed body is one self-contained LZ4 block or Zstandard frame, with
no dictionary and no context shared with any other message, so nothing one message holds
can leak into another's size (docs/security.rst, "Compression"). Handshake messages,
control frames, ERROR frames and byte streams are never compressed.

A compressed body travels in an **envelope** and its first frame carries
:data:`FLAG_COMPRESSED`::

    envelope = u8 codec | u32 size | compressed data     (size: the body's length)

The receiver learns the decompressed size from the first 5 bytes, before it buffers or
decompresses anything, so it charges its window (and checks its maximum message size)
against what the message will occupy once decompressed, and it decompresses into a buffer
of exactly that size: a decompression bomb fails with :class:`CompressionError` before any
memory is used for it.

Codecs come from optional PyPI packages (``pip install monte_trio[compression]``); a codec
is available only if its package imports. Nothing here performs I/O or imports trio; the
packages are imported on first use.

Why LZ4's block format rather than its frame format: the frame format adds up to 25 bytes
of header, sizes and end mark to every message of up to 1 KiB (the record layer already
authenticates every byte), and its Python decompressor cannot be held to an exact output
size. The block format is one ``LZ4_decompress_safe`` call into a buffer of the size the
envelope declares (benchmarks/compression.py measures both).
"""

from __future__ import annotations

import enum
import importlib
import struct
import threading
from collections.abc import Collection, Iterable, Sequence
from typing import Any, Final, Protocol

import attrs

from .._exceptions import RemoteProtocolError
from ._wire2 import ErrorCode

__all__ = [
    "DEFAULT_THRESHOLD",
    "DEFAULT_ZSTD_LEVEL",
    "ENVELOPE",
    "ENVELOPE_SIZE",
    "FLAG_COMPRESSED",
    "LZ4_MAX_INPUT",
    "PREFERENCE",
    "CompressionError",
    "CompressionId",
    "Compressor",
    "agree",
    "available",
    "codec_name",
    "compress",
    "decompress",
    "decompress_body",
    "is_available",
    "read_envelope",
    "resolve",
]

FLAG_COMPRESSED: Final = 0x08
"""Frame flag: the message's body is an envelope. Set on the first frame of a message only
(ONEWAY, REQUEST, REPLY, or a streaming call's first DATA frame of the message), never on
CONTINUATION frames, on the later DATA frames of a message, or on any other kind."""
ENVELOPE: Final = struct.Struct(">BI")
"""The envelope header: codec id, decompressed size."""
ENVELOPE_SIZE: Final = 5
DEFAULT_THRESHOLD: Final = 1024
"""Bodies shorter than this are sent as they are. From benchmarks/compression.py: below
1 KiB a structured body saves little (a 256-byte one 30 to 65 bytes), and compressing it
pays only on links slower than about 110 MB/s (512 B) or 20 MB/s (256 B); from 1 KiB it
pays up to 140 to 250 MB/s with LZ4 (500 to 650 MB/s at 4 KiB). A body under 1 KiB also
fits one TCP segment either way, so shrinking it saves no packet."""
DEFAULT_ZSTD_LEVEL: Final = 1
"""Zstandard level of the reference sender: level 3 saves at most 7 percent more bytes
than level 1 on the measured bodies, for 5 to 45 percent more time."""
LZ4_MAX_INPUT: Final = 0x7E000000
"""LZ4_MAX_INPUT_SIZE: larger bodies are never LZ4-compressed (sent as they are)."""
_ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"
_U32_MAX: Final = 2**32 - 1
_Buffer = bytes | bytearray | memoryview


class CompressionId(enum.IntEnum):
    """Compression codec ids of the hello's field 13 and of the envelope (u8; 0 is
    reserved)."""

    LZ4 = 1
    """LZ4 block format (python package ``lz4``, ``lz4.block``), no stored size."""
    ZSTD = 2
    """One Zstandard frame with its content size, no checksum, no dictionary (python
    package ``zstandard``)."""


PREFERENCE: Final = (CompressionId.LZ4, CompressionId.ZSTD)
"""The reference implementation's order of preference: LZ4 first, Zstandard second. From
benchmarks/compression.py: on bodies of 1 to 4 KiB LZ4 compresses 2 to 3 times faster
than Zstandard level 1 (1.3 to 1.9 times at 64 KiB and 1 MiB) and decompresses 2 to 3.5
times faster, so it pays on faster links (hundreds of MB/s), where an RPC library mostly
runs; Zstandard's output is 15 to 45 percent smaller than LZ4's, the better choice on
slow or metered links (a side that prefers it lists it first: the receiver's order
decides)."""

_NAMES: Final = {CompressionId.LZ4: "lz4", CompressionId.ZSTD: "zstd"}
_PACKAGES: Final = {CompressionId.LZ4: "lz4", CompressionId.ZSTD: "zstandard"}


class CompressionError(RemoteProtocolError):
    """A compressed message body from the peer is invalid: a codec it may not use, a size
    over the limit, data that does not decompress to exactly the declared size.

    Attributes:
        code: the :class:`~monte_trio._proto._wire2.ErrorCode` the connection's final
            GOAWAY carries: ``FRAME_SIZE`` for a size over the limit or an envelope cut
            short, ``PROTOCOL`` otherwise.
    """

    def __init__(self, message: str, code: int = ErrorCode.PROTOCOL) -> None:
        super().__init__(message)
        self.code = code


class _Backend(Protocol):
    def compress(self, body: bytes, level: int) -> bytes | None: ...

    def decompress(self, data: _Buffer, max_size: int) -> bytes: ...


class _Lz4:
    """LZ4 block format: ``lz4.block.compress(store_size=False)``; decompression into a
    buffer of the caller's bound (``uncompressed_size``), never more."""

    def __init__(self, block: Any) -> None:
        self._block = block
        self._error: type[Exception] = block.LZ4BlockError

    def compress(self, body: bytes, level: int) -> bytes | None:
        if len(body) > LZ4_MAX_INPUT:
            return None
        out: bytes = self._block.compress(body, store_size=False)
        return out

    def decompress(self, data: _Buffer, max_size: int) -> bytes:
        if max_size > LZ4_MAX_INPUT:
            raise CompressionError(
                f"an LZ4 body may not decompress to more than {LZ4_MAX_INPUT} bytes, "
                f"{max_size} declared",
                ErrorCode.FRAME_SIZE,
            )
        if not data:
            raise CompressionError("an empty LZ4 block")
        if max_size < 1:
            raise CompressionError("an LZ4 block must decompress to at least 1 byte")
        try:
            # Allocates exactly max_size bytes; fails if the block decodes to more.
            out: bytes = self._block.decompress(data, uncompressed_size=max_size)
        except self._error:
            raise CompressionError(
                f"the LZ4 block does not decompress within {max_size} bytes"
            ) from None
        return out


class _Zstd:
    """One Zstandard frame. The frame must state its content size, which is checked
    against the bound before zstandard allocates a buffer of exactly that size (a whole
    frame then decodes in one pass, with no window buffer; libzstd caps any buffer of its
    own at the content size too). Contexts are reused per thread (a context is reset for
    every frame: nothing carries over between messages)."""

    def __init__(self, zstd: Any) -> None:
        self._zstd = zstd
        self._error: type[Exception] = zstd.ZstdError
        self._unknown: int = zstd.CONTENTSIZE_UNKNOWN
        self._local = threading.local()

    def compress(self, body: bytes, level: int) -> bytes | None:
        cctxs: dict[int, Any] | None = getattr(self._local, "cctxs", None)
        if cctxs is None:
            cctxs = self._local.cctxs = {}
        cctx = cctxs.get(level)
        if cctx is None:
            cctx = cctxs[level] = self._zstd.ZstdCompressor(
                level=level, write_content_size=True, write_checksum=False, write_dict_id=False
            )
        out: bytes = cctx.compress(body)
        return out

    def decompress(self, data: _Buffer, max_size: int) -> bytes:
        if data[:4] != _ZSTD_MAGIC:
            raise CompressionError("the body is not a Zstandard frame")
        try:
            params = self._zstd.get_frame_parameters(data)
        except self._error:
            raise CompressionError("the Zstandard frame header is invalid") from None
        size: int = params.content_size
        if size == self._unknown:
            raise CompressionError("the Zstandard frame does not state its content size")
        if size > max_size:
            raise CompressionError(
                f"the Zstandard frame decompresses to {size} bytes, over the limit of {max_size}",
                ErrorCode.FRAME_SIZE,
            )
        if params.dict_id:
            raise CompressionError("the Zstandard frame needs a dictionary")
        dctx = getattr(self._local, "dctx", None)
        if dctx is None:
            dctx = self._local.dctx = self._zstd.ZstdDecompressor()
        try:
            out: bytes = dctx.decompress(data, max_output_size=max_size, allow_extra_data=False)
        except self._error:
            raise CompressionError("the Zstandard frame does not decompress") from None
        return out


_LOCK: Final = threading.Lock()
_BACKENDS: dict[int, _Backend | None] = {}


def _backend(codec: int) -> _Backend | None:
    """The codec's backend, importing its package on first use (``None``: not installed,
    or an id with no codec)."""
    try:
        return _BACKENDS[codec]
    except KeyError:
        pass
    with _LOCK:
        backend: _Backend | None = None
        try:
            if codec == CompressionId.LZ4:
                backend = _Lz4(importlib.import_module("lz4.block"))
            elif codec == CompressionId.ZSTD:
                backend = _Zstd(importlib.import_module("zstandard"))
        except ImportError:
            backend = None
        _BACKENDS[codec] = backend
        return backend


def is_available(codec: int) -> bool:
    """Whether this process can compress and decompress with ``codec``."""
    return _backend(codec) is not None


def available() -> tuple[int, ...]:
    """The ids of the codecs whose package imports, in :data:`PREFERENCE` order."""
    return tuple(int(c) for c in PREFERENCE if is_available(c))


def codec_name(codec: int) -> str:
    """``"lz4"``, ``"zstd"``, or ``"codec N"`` for an id this implementation does not
    know."""
    try:
        return _NAMES[CompressionId(codec)]
    except ValueError:
        return f"codec {codec}"


def resolve(names: Iterable[str] | None) -> tuple[int, ...]:
    """The codec ids a configuration names, in the order given (``None``: every installed
    codec, in :data:`PREFERENCE` order; empty: none).

    Raises:
        ValueError: an unknown name, a name given twice, or a codec whose package is not
            installed (the message says what to install).
    """
    if names is None:
        return available()
    by_name = {name: codec for codec, name in _NAMES.items()}
    ids: list[int] = []
    for name in names:
        codec = by_name.get(name)
        if codec is None:
            choices = ", ".join(repr(n) for n in by_name)
            raise ValueError(f"unknown compression codec {name!r}; choose from {choices}")
        if codec in ids:
            raise ValueError(f"compression codec {name!r} is listed twice")
        if not is_available(codec):
            raise ValueError(
                f"compression codec {name!r} needs the {_PACKAGES[codec]} package: "
                "pip install monte_trio[compression]"
            )
        ids.append(int(codec))
    return tuple(ids)


def agree(local: Sequence[int], peer: Sequence[int]) -> int | None:
    """The codec this side compresses with: the first of the peer's list (its order of
    preference) that this side's own list also holds and that is installed; ``None``:
    send everything uncompressed.

    Args:
        local: the ids this side announced (it compresses only if it offered to).
        peer: the ids the peer announced (what it can decompress); unknown ids are
            ignored.
    """
    for codec in peer:
        if codec in local and is_available(codec):
            return codec
    return None


@attrs.frozen
class Compressor:
    """How one side compresses the bodies it sends on one connection.

    Attributes:
        codec: the agreed codec id (:func:`agree`); its package must be installed.
        threshold: bodies shorter than this are sent as they are.
        level: the Zstandard level (LZ4 ignores it and uses its default mode).
    """

    codec: int = attrs.field()
    threshold: int = DEFAULT_THRESHOLD
    level: int = DEFAULT_ZSTD_LEVEL

    @codec.validator
    def _check_codec(self, _attribute: object, value: int) -> None:
        if not is_available(value):
            package = {int(k): v for k, v in _PACKAGES.items()}.get(value)
            hint = (
                f"install the {package} package: pip install monte_trio[compression]"
                if package
                else "no such codec"
            )
            raise ValueError(f"compression {codec_name(value)} is not available: {hint}")

    def compress(self, body: bytes) -> tuple[int, bytes]:
        """``(FLAG_COMPRESSED, envelope)``, or ``(0, body)`` when the body is shorter than
        the threshold or its compressed form (envelope included) is not smaller."""
        n = len(body)
        if n < self.threshold or n > _U32_MAX:
            return 0, body
        backend = _backend(self.codec)
        assert backend is not None  # checked at construction
        data = backend.compress(body, self.level)
        if data is None or ENVELOPE_SIZE + len(data) >= n:
            return 0, body
        return FLAG_COMPRESSED, ENVELOPE.pack(self.codec, n) + data


def compress(codec: int, body: bytes, level: int = DEFAULT_ZSTD_LEVEL) -> bytes | None:
    """The codec's output for ``body`` (no envelope, no threshold, no size check): what
    :meth:`Compressor.compress` wraps; ``None`` if the codec cannot take a body this large.

    Raises:
        ValueError: the codec is not installed or unknown.
    """
    backend = _backend(codec)
    if backend is None:
        raise ValueError(f"compression {codec_name(codec)} is not available")
    return backend.compress(body, level)


def decompress(codec: int, data: _Buffer, max_size: int) -> bytes:
    """Decompress one codec payload (no envelope) into at most ``max_size`` bytes.

    Never allocates more than ``max_size`` bytes for the output: LZ4 decodes into a
    buffer of that size and fails past it; a Zstandard frame must state its content size,
    checked against ``max_size`` before anything is allocated.

    Raises:
        CompressionError: the codec is not installed or unknown, the data is invalid, or
            it decompresses to more than ``max_size`` bytes.
    """
    backend = _backend(codec)
    if backend is None:
        raise CompressionError(f"the body uses {codec_name(codec)}, which is not available here")
    return backend.decompress(data, max_size)


def read_envelope(
    head: bytes, *, accepted: Collection[int], max_size: int, wire_size: int
) -> tuple[int, int]:
    """Check an envelope's header from a message's first frame; return ``(codec,
    size)``. A receiver calls it before buffering the message, and charges its window
    with ``size`` (the decompressed length), not ``wire_size``.

    Args:
        head: the start of the body (at least its first 5 bytes).
        accepted: the codec ids this side announced in its hello.
        max_size: the largest body this side accepts here (M, or a streaming call's
            message limit).
        wire_size: the length of the whole body on the wire, envelope included (the
            fragmented message's ``total``).

    Raises:
        CompressionError: the header is cut short (FRAME_SIZE), names a codec this side
            did not announce, declares a size over ``max_size`` (FRAME_SIZE), or one that
            is not larger than ``wire_size`` (a compressed body is always smaller).
    """
    if len(head) < ENVELOPE_SIZE:
        raise CompressionError(
            f"a compressed body of {len(head)} bytes, shorter than its envelope header",
            ErrorCode.FRAME_SIZE,
        )
    codec, size = ENVELOPE.unpack_from(head)
    if codec not in accepted:
        raise CompressionError(f"a body compressed with {codec_name(codec)}, never offered")
    if size > max_size:
        raise CompressionError(
            f"a compressed body declares {size} bytes, over the limit of {max_size}",
            ErrorCode.FRAME_SIZE,
        )
    if size <= wire_size:
        raise CompressionError(
            f"a compressed body of {wire_size} bytes declares {size}: not smaller"
        )
    return codec, size


def decompress_body(payload: bytes, *, accepted: Collection[int], max_size: int) -> bytes:
    """The body a complete envelope carries, of exactly the size it declares.

    Args:
        payload: the whole message body as received (envelope included).
        accepted: the codec ids this side announced in its hello.
        max_size: the largest body this side accepts here.

    Raises:
        CompressionError: as :func:`read_envelope`, or the data does not decompress to
            exactly the declared size (PROTOCOL).
    """
    codec, size = read_envelope(
        payload, accepted=accepted, max_size=max_size, wire_size=len(payload)
    )
    try:
        body = decompress(codec, memoryview(payload)[ENVELOPE_SIZE:], size)
    except CompressionError as exc:
        # The size was within limits (checked above): data that does not fit it is a
        # malformed body, whatever the codec said.
        exc.code = ErrorCode.PROTOCOL
        raise
    if len(body) != size:
        raise CompressionError(
            f"a compressed body declares {size} bytes and decompresses to {len(body)}"
        )
    return body
