"""Per-connection configuration: the limits and timers a caller cannot express itself.

Timeouts on individual calls are not configuration: wrap the call in a cancel scope
(``with trio.fail_after(2): await conn.request(b"...")``), as everywhere in Trio.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from ._proto import _compression
from ._proto._wire2 import MAX_STREAM_WINDOW as _MAX_STREAM_WINDOW
from ._proto._wire2 import MIN_MESSAGE_SIZE as _MIN_MESSAGE_SIZE
from ._proto._wire2 import MIN_STREAM_WINDOW as _MIN_STREAM_WINDOW

__all__ = ["ConnectionConfig"]

_KEEPALIVE_INTERVAL: float | None = 15.0
_MIN_RECORD_SIZE = 65
_DEFAULT_MESSAGE_SIZE = 4 * 1024 * 1024
_MESSAGE_COST = 64  # what each message costs of a window on top of its body (wire v2)
_CODECS = ("json", "msgpack")


def _check_codec(_instance: object, _attribute: object, value: str) -> None:
    if value not in _CODECS:
        raise ValueError(f"codec must be one of {', '.join(map(repr, _CODECS))}, got {value!r}")
    if value == "msgpack":
        try:
            __import__("msgspec")
        except ImportError:
            raise ValueError(
                "codec 'msgpack' needs msgspec: pip install monte_trio[msgspec]"
            ) from None


def _codec_names(value: Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        raise TypeError(
            f"compression takes a sequence of codec names, such as ({value!r},), not a string"
        )
    return tuple(value)


def _check_compression(_instance: object, _attribute: object, value: tuple[str, ...]) -> None:
    _compression.resolve(value)  # a ValueError names the problem and the pip extra


@attrs.frozen(kw_only=True)
class ConnectionConfig:
    """Limits and timers of one connection. Both ends of a connection have their own.

    Attributes:
        max_record_size: the largest record (ciphertext and tag) accepted from the peer and
            sent to it. A larger length prefix closes the connection before any of the
            record is buffered. ``None`` takes the profile's value: 65,535 (the Noise limit)
            for native (at least 1,024 there), 4,096 for monte-v1 (Go monte's default read
            buffer; raise it on both sides to send monte-v1 messages larger than 4,076
            bytes).
        max_message_size: the largest message body sent or accepted (1,024 bytes, the
            protocol's floor, to below 4 GiB; default 4 MiB). Native messages larger than
            a record are split and reassembled up to this size; monte-v1 messages must fit
            in one record.
        request_window: native only: W, the bytes of request and one-way bodies (each
            plus 64) the peer may have outstanding at this side: queued for a handler,
            being reassembled or in a running handler. Credit returns when a handler is
            done with a body. ``None`` (default) takes the floor ``2 * (max_message_size
            + 64)``, one message plus the reserve for a nested call. With the reply
            window and the send queue it is the connection's memory budget (see
            docs/reliability.rst, "Memory budget").
        reply_window: native only: W_r, the bytes of replies (each plus 64) to this
            side's calls the peer may send before their callers take them. ``None``
            (default) takes the floor ``max_message_size + 64``.
        max_calls: native only: S, the peer's calls (not counting nested calls) that
            may be open at this side at once; the peer waits for a slot beyond it.
        nested_allowance: native only: k, calls a handler serving one of the peer's
            calls may make back to the peer on the same connection at once, outside
            ``max_calls`` (they cannot deadlock on slots or handlers).
        max_pending_requests: outgoing requests awaiting a reply at once on this
            connection; one more waits for room, in order of arrival, as ``send`` waits
            for the send queue (nested calls are bounded by ``nested_allowance``
            instead).
        max_send_queue: bytes of queued, not yet written records above which
            ``send_nowait`` raises :class:`trio.WouldBlock` and ``send``/``request`` wait.
        max_concurrent_handlers: handlers running at once for this connection's incoming
            requests and messages; further ones wait in the handler queue. Native: the
            reader keeps reading and credit (``max_calls``, ``request_window``) bounds the
            queue; nested calls run outside this cap. monte-v1 (no credit): at the limit
            the connection stops reading from the socket, so a fast peer is slowed by TCP.
        grace_period: seconds a graceful close lets in-flight work finish before it
            cancels what remains.
        write_timeout: seconds one write to the socket may block before the peer is
            declared dead (it stopped reading); ``None`` waits forever.
        idle_timeout: seconds without receiving anything after which the connection is
            closed; ``None`` keeps idle connections (the native profile's keepalive
            detects dead peers instead).
        keepalive_interval: native only: seconds between keepalive pings (sent whether or
            not the connection is busy); ``None`` disables keepalive.
        keepalive_tolerance: native only: seconds without hearing from the peer after
            which it is declared dead and every waiter fails.
        expose_errors: native only: send a handler's exception type and message to the
            caller (default); when ``False`` the caller only learns that the handler failed.
        expose_tracebacks: native only: also send the handler's traceback. Never enable
            this towards untrusted peers.
        codec: how service calls (:class:`~monte_trio.Router`, ``call``, ``proxy``)
            encode arguments and results: ``"json"`` (the standard library's, default) or
            ``"msgpack"`` (MessagePack through msgspec, with typed arguments and results:
            ``pip install monte_trio[msgspec]``). Native: announced in the handshake, and
            both sides must choose the same (else the handshake fails, naming both
            choices); monte-v1 has no hello, so it is a local choice both sides must make
            alike. Raw ``bytes`` arguments and results travel untouched with either.
        max_streams: native only: byte streams (:class:`~monte_trio.Stream`) the peer may
            have open at this side at once (0 to 2**31, default 100); one more waits at the
            peer (credit, not refusal). Announced in the hello: streams exist on a
            connection only when both sides announce more than 0, so 0 turns them off both
            ways (neither side can open one). A side without a ``stream_handler`` still
            announces it, so that it can open streams, and refuses the peer's.
        stream_window: native only: the initial window of each stream, in bytes: what the
            peer may send on one stream before this side's application reads it (1,024 to
            2**30, default 256 KiB). Credit returns as the application reads, never on
            receipt, so a stream nobody reads holds at most this much.
        data_window: native only: the connection-level window of stream data, in bytes
            (at least ``2 * stream_window``, default 16 MiB). It is returned as data enters
            its stream's buffer: it bounds what is in flight, not what is held.
        stream_window_max: native only: the largest a stream's window grows to (at least
            ``stream_window``, at most 2**30, default 4 MiB). A window doubles when the
            application reads faster than the window allows in a round trip (toward the
            bandwidth-delay product); it grows only while the application reads, and it
            bounds what one stream can hold (see docs/reliability.rst, "Memory budget").
            A larger cap lets one stream fill a long fat link (4 MiB carries 200 MB/s at
            a 20 ms round trip) but lets a bulk stream queue more bytes in the sockets
            ahead of the calls on the same connection (docs/benchmarks.rst, "Streams").
        compression: native only: the codecs that compress message bodies, by name in this
            side's order of preference: ``"lz4"``, ``"zstd"`` (their packages come with
            ``pip install monte_trio[compression]``; naming one that is not installed is
            a :exc:`ValueError`). Default: ``()``, off: a compressed message's length
            depends on its content, which can leak a secret sent next to data an attacker
            chooses (docs/security.rst, "Compression"); ``("lz4", "zstd")`` turns it on
            where that cannot happen. Announced in the hello as what this side
            decompresses; each side compresses with the first codec of the peer's list
            that its own list holds too, so ``()`` on either side turns compression off
            both ways. Bodies of requests, replies and one-way messages and the messages
            of streaming calls are compressed one by one (never byte streams, errors or
            control frames); a call opts out with ``compress=False``, a handler's reply
            with ``request.compress_reply = False`` (see docs/security.rst,
            "Compression").
        compression_threshold: native only: bodies shorter than this many bytes are sent
            as they are (default 1,024: below it compression saves little and costs more
            time than it saves on fast links); a body is also sent as it is when it does
            not shrink.
    """

    max_record_size: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.gt(0))
    )
    max_message_size: int = attrs.field(
        default=_DEFAULT_MESSAGE_SIZE,
        validator=[attrs.validators.ge(_MIN_MESSAGE_SIZE), attrs.validators.lt(2**32)],
    )
    request_window: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.gt(0))
    )
    reply_window: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.gt(0))
    )
    max_calls: int = attrs.field(
        default=128, validator=[attrs.validators.gt(0), attrs.validators.le(2**31)]
    )
    nested_allowance: int = attrs.field(
        default=1, validator=[attrs.validators.gt(0), attrs.validators.le(2**16)]
    )
    max_pending_requests: int = attrs.field(default=4096, validator=attrs.validators.gt(0))
    max_send_queue: int = attrs.field(default=1024 * 1024, validator=attrs.validators.gt(0))
    max_concurrent_handlers: int = attrs.field(default=128, validator=attrs.validators.gt(0))
    grace_period: float = attrs.field(default=5.0, validator=attrs.validators.gt(0.0))
    write_timeout: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.gt(0.0))
    )
    idle_timeout: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.gt(0.0))
    )
    keepalive_interval: float | None = attrs.field(
        default=_KEEPALIVE_INTERVAL, validator=attrs.validators.optional(attrs.validators.gt(0.0))
    )
    keepalive_tolerance: float = attrs.field(default=45.0, validator=attrs.validators.gt(0.0))
    expose_errors: bool = True
    expose_tracebacks: bool = False
    codec: str = attrs.field(default="json", validator=_check_codec)
    max_streams: int = attrs.field(
        default=100, validator=[attrs.validators.ge(0), attrs.validators.le(2**31)]
    )
    stream_window: int = attrs.field(
        default=256 * 1024,
        validator=[
            attrs.validators.ge(_MIN_STREAM_WINDOW),
            attrs.validators.le(_MAX_STREAM_WINDOW),
        ],
    )
    data_window: int = attrs.field(
        default=16 * 1024 * 1024,
        validator=[attrs.validators.gt(0), attrs.validators.le(2**62)],
    )
    stream_window_max: int = attrs.field(
        default=4 * 1024 * 1024,
        validator=[attrs.validators.gt(0), attrs.validators.le(_MAX_STREAM_WINDOW)],
    )
    compression: tuple[str, ...] = attrs.field(
        default=(), converter=_codec_names, validator=_check_compression
    )
    compression_threshold: int = attrs.field(
        default=_compression.DEFAULT_THRESHOLD,
        validator=[attrs.validators.ge(0), attrs.validators.lt(2**32)],
    )

    @property
    def effective_request_window(self) -> int:
        """The request window announced: ``request_window`` or its floor."""
        return self.request_window or 2 * (self.max_message_size + _MESSAGE_COST)

    @property
    def effective_reply_window(self) -> int:
        """The reply window announced: ``reply_window`` or its floor."""
        return self.reply_window or self.max_message_size + _MESSAGE_COST

    def __attrs_post_init__(self) -> None:
        floor = 2 * (self.max_message_size + _MESSAGE_COST)
        if self.request_window is not None and self.request_window < floor:
            raise ValueError(
                f"request_window ({self.request_window}) must be at least 2 x "
                f"(max_message_size + 64) = {floor}: one message of the largest size plus "
                "the reserve for a nested call; raise it or lower max_message_size"
            )
        if self.reply_window is not None and self.reply_window < floor // 2:
            raise ValueError(
                f"reply_window ({self.reply_window}) must be at least max_message_size + 64 "
                f"= {floor // 2}: one reply of the largest size; raise it or lower "
                "max_message_size"
            )
        if self.max_record_size is not None and self.max_record_size < _MIN_RECORD_SIZE:
            raise ValueError(
                f"max_record_size must be at least {_MIN_RECORD_SIZE} bytes (the protocol's "
                f"floor), got {self.max_record_size}"
            )
        if (
            self.keepalive_interval is not None
            and self.keepalive_tolerance <= self.keepalive_interval
        ):
            raise ValueError("keepalive_tolerance must be longer than keepalive_interval")
        if self.data_window < 2 * self.stream_window:
            raise ValueError(
                f"data_window ({self.data_window}) must be at least 2 x stream_window = "
                f"{2 * self.stream_window}, so that two streams can be in flight at once; "
                "raise it or lower stream_window"
            )
        if self.stream_window_max < self.stream_window:
            raise ValueError(
                f"stream_window_max ({self.stream_window_max}) must be at least stream_window "
                f"({self.stream_window}): windows start at stream_window and only grow"
            )
