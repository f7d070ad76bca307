"""The one exception tree of monte_trio.

Every error the library raises on purpose is a :class:`MonteError`. Foreign exceptions
(``OSError``, ``trio.BrokenResourceError``, ``cryptography.exceptions.InvalidTag``) are
translated once, at the boundary where they happen, with ``raise New(...) from exc``::

    MonteError
    ├── ConnectError                the server could not be reached (nothing was sent)
    ├── ConnectionClosed            the connection ended; the call did not complete
    │   └── RequestNotProcessed     the call was certainly not processed: retry it
    ├── ProtocolError               a peer broke the protocol
    │   ├── LocalProtocolError      we were asked to send something the protocol forbids
    │   └── RemoteProtocolError     the peer sent something invalid
    │       └── DecryptionError     a record failed authentication (tampered, replayed, ...)
    ├── HandshakeError              the secure channel could not be established
    │   ├── HandshakeTimeout        ... in the time allowed
    │   └── PeerRejected            ... because a trust policy refused a static key
    ├── RemoteError                 the remote handler raised while serving the call
    │   └── RemoteMethodError       a method call failed at the peer (code, name, details)
    │       ├── MethodNotFound      ... no such method
    │       └── InvalidArguments    ... the arguments did not fit or decode
    ├── StreamReset                 the peer aborted a stream (also a trio.BrokenResourceError)
    ├── CallCancelled               the peer cancelled a streaming call before its end
    ├── CodecError                  a value did not encode or decode with the codec
    └── KeyFileError                a key or known-keys file could not be read or written
"""

from __future__ import annotations

import trio

__all__ = [
    "CallCancelled",
    "ConnectError",
    "ConnectionClosed",
    "DecryptionError",
    "HandshakeError",
    "HandshakeTimeout",
    "KeyFileError",
    "LocalProtocolError",
    "MonteError",
    "PeerRejected",
    "ProtocolError",
    "RemoteError",
    "RemoteProtocolError",
    "RequestNotProcessed",
    "StreamReset",
]


class MonteError(Exception):
    """Base class of every error monte_trio raises on purpose."""


class ConnectError(MonteError):
    """The server could not be reached: its name did not resolve, the connection was
    refused, the host or network was unreachable, or no attempt completed within
    ``dial_timeout``.

    Nothing was sent, so retrying later is safe. Like httpcore's ``ConnectError``, it is
    not an :class:`OSError` and not a :class:`ConnectionClosed` (no connection ever
    existed); the last attempt's error (an :class:`OSError`, or :class:`trio.TooSlowError`
    for a timeout) is its ``__cause__``.

    Attributes:
        peer: the address dialed (``host:port``).
    """

    def __init__(self, message: str, peer: str) -> None:
        super().__init__(message)
        self.peer = peer


class ConnectionClosed(MonteError):
    """The connection is closed, or closed while the call was in flight.

    A request that fails with this error may or may not have been processed by the peer
    (unless it is the subclass :class:`RequestNotProcessed`). Open a new connection (a
    :class:`~monte_trio.Client` does so on the next call) and retry only if the call is
    idempotent.

    Attributes:
        reason: a human-readable description of why the connection ended.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RequestNotProcessed(ConnectionClosed):
    """The call was certainly not processed by the peer: it is safe to retry it on another
    connection.

    Raised when the call was refused before any of it was sent (the connection was
    closing or closed, or the peer had announced its shutdown with GOAWAY), and when the
    peer, shutting down, declared it never started processing the call. A
    :class:`~monte_trio.Client` retries such calls on another connection by itself, a few
    times, before it raises this.
    """


class ProtocolError(MonteError):
    """A protocol rule was broken, by us (:class:`LocalProtocolError`) or the peer."""


class LocalProtocolError(ProtocolError):
    """The call asked for something the protocol forbids, such as a message too large.

    Nothing was sent; the connection is still usable. (A failure that ends the connection,
    such as a record that cannot be sealed, reaches callers as
    :class:`ConnectionClosed` instead.)
    """


class RemoteProtocolError(ProtocolError):
    """The peer sent something invalid. The connection it came from has been closed."""


class DecryptionError(RemoteProtocolError):
    """A record failed authentication: it was tampered with, truncated, replayed,
    reordered or reflected. The connection it came from has been closed.

    Deliberately opaque, like :class:`cryptography.exceptions.InvalidTag`: which check
    failed is not revealed.
    """


class HandshakeError(MonteError):
    """The secure channel could not be established with the peer.

    Check that both sides use the same profile (native or monte-v1), the same pre-shared
    key if any, and trust each other's static keys.
    """


class HandshakeTimeout(HandshakeError):
    """The handshake did not complete within the configured handshake timeout."""


class PeerRejected(HandshakeError):
    """A trust policy refused a static key: ours by the peer, or the peer's by us.

    Attributes:
        public_key: the refused key's printable form, when known locally, else ``None``.
    """

    def __init__(self, message: str, public_key: str | None = None) -> None:
        super().__init__(message)
        self.public_key = public_key


class RemoteError(MonteError):
    """The peer's handler raised an exception while serving our request.

    The connection is still usable. ``message`` is what the peer chose to disclose: by
    default the exception's type name and message, never a traceback.

    Attributes:
        message: the text the peer sent.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class KeyFileError(MonteError):
    """A key file or known-keys file could not be read, parsed or written."""


class StreamReset(MonteError, trio.BrokenResourceError):
    """The peer aborted a :class:`~monte_trio.Stream`: its data may be incomplete.

    Raised by :meth:`Stream.receive_some <monte_trio.Stream.receive_some>` when the peer
    reset its sending half (what it sent may be truncated: the stream never reports a clean
    end), and by :meth:`Stream.send_all <monte_trio.Stream.send_all>` (and the other sending
    methods) when the peer stopped reading. The connection and its other streams are not
    affected. It is also a :exc:`trio.BrokenResourceError`, which generic stream code
    already handles.

    Attributes:
        code: the code the peer gave: 5 (CANCELLED) when it closed or cancelled its end
            without reading everything, 6 (INTERNAL) when its stream handler raised, 4
            (REFUSED) when it serves no streams (it has no ``stream_handler``) or was
            shutting down (nothing was processed: it is safe to open the stream again);
            other values are the peer application's own.
        stream_id: the stream's id on its connection.
    """

    def __init__(self, message: str, code: int, stream_id: int) -> None:
        super().__init__(message)
        self.code = code
        self.stream_id = stream_id


class CallCancelled(MonteError):
    """The peer cancelled a streaming call before its end.

    On the caller's side: the peer's handler was cancelled (its server shutting down, or
    its application gave up) before it finished; what it sent before is still received
    first, and whether the messages sent to it were processed is unknown. On the
    handler's side (:class:`~monte_trio.IncomingCall`): the caller cancelled the call or
    closed it early; the handler's cancel scope is cancelled at the same time, so a
    handler normally sees :exc:`trio.Cancelled` instead. The connection and its other
    calls are not affected.
    """
