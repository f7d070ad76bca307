"""Streaming methods: methods whose results, arguments or both are streams of items,
served and called over the streaming calls (:mod:`monte_trio._calls_api`).

A streaming method's call is one streaming call: its first message is the call envelope
(:mod:`._envelope`: name, arguments, deadline, metadata), then each item is one message,
``F5 02`` and the codec's encoding of the item, or ``F5 03`` and a ``bytes`` item
untouched (the prefixes of a unary reply). The serving side's last message may be an
error reply (``F5 04 ...``): the caller raises it as a unary call's error. So items and
errors keep their order, and an error carries its registered name and details, which
the streaming call's own ERROR frame cannot.

Which call shape carries which kind of method:

=====================  ===========================  =====================================
method                 its call                     caller's side
=====================  ===========================  =====================================
server-streaming       download (or bidirectional)  :class:`MethodStream`
client-streaming       bidirectional (or upload)    :class:`MethodCall` (``finish()``)
bidirectional          bidirectional                :class:`MethodCall`
=====================  ===========================  =====================================

The serving side (:func:`serve_streaming_call`) is :meth:`Router.call_handler
<monte_trio.Router.call_handler>`; the calling side opens the call with the envelope as
its first message (:class:`_MethodOpening`), through client middleware, and wraps it.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, aclosing
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar, final

import trio

from .._calls_api import Call, CallShape, DownloadCall, IncomingCall, connection_opening
from .._exceptions import (
    CallCancelled,
    ConnectionClosed,
    LocalProtocolError,
    MonteError,
    RequestNotProcessed,
)
from .._util import NoPublicConstructor
from . import _envelope as env
from ._caller import UNTYPED, _metadata, client_info, decode_reply, encode_call
from ._codecs import Codec, get_codec
from ._errors import CodecError, MethodErrorCode, RemoteMethodError
from ._router import (
    BIDIRECTIONAL,
    CLIENT_STREAMING,
    SERVER_STREAMING,
    UNARY,
    CallInfo,
    Middleware,
    Router,
    _arguments,
    _arrived_late,
    _cut_short,
    _error,
    _exception_reply,
    _Method,
    _not_idempotent,
    _Refusal,
    _served_info,
    _serving,
    run_middleware,
)

if TYPE_CHECKING:
    from .._client import Client
    from .._connection import Connection

__all__ = [
    "MethodCall",
    "MethodStream",
    "Opener",
    "ProxyResults",
    "client_opener",
    "connection_opener",
    "serve_streaming_call",
]

_T = TypeVar("_T")
_C = TypeVar("_C")

# The shapes each kind of method is served on.
_SHAPES = {
    UNARY: (),
    SERVER_STREAMING: (CallShape.DOWNLOAD, CallShape.BIDIRECTIONAL),
    CLIENT_STREAMING: (CallShape.UPLOAD, CallShape.BIDIRECTIONAL),
    BIDIRECTIONAL: (CallShape.BIDIRECTIONAL,),
}
_HOW = {
    UNARY: "call it with call() (or a proxy)",
    SERVER_STREAMING: "call it with stream() (or a proxy)",
    CLIENT_STREAMING: "call it with stream_call() (or a proxy)",
    BIDIRECTIONAL: "call it with stream_call()",
}
_REASSIGNMENTS = 3


# -- the serving side ------------------------------------------------------------------------


def _encode_item(codec: Codec, item: object) -> bytes:
    """An item's message (a result's for a client-streaming method's result).

    Raises:
        CodecError: it does not encode.
    """
    if isinstance(item, bytes | bytearray | memoryview):
        return env.RAW_PREFIX + bytes(item)
    if item is None:
        return env.RESULT_PREFIX + codec.null
    return env.RESULT_PREFIX + codec.encode(item)


class _Items:
    """The caller's items, as a client-streaming or bidirectional method iterates them:
    each message decoded (and, with a typed codec, converted to the item type)."""

    __slots__ = ("_call", "_codec", "_count", "_name", "_type")

    def __init__(self, call: IncomingCall, codec: Codec, item_type: Any, name: str) -> None:
        self._call = call
        self._codec = codec
        self._type = item_type
        self._name = name
        self._count = 0

    def __aiter__(self) -> _Items:
        return self

    async def __anext__(self) -> Any:
        try:
            message = await self._call.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
        self._count += 1
        prefix = message[:2]
        if prefix == env.RAW_PREFIX:
            return message[2:]
        if prefix != env.RESULT_PREFIX:
            raise _Refusal(
                MethodErrorCode.INVALID_CALL,
                f"message {self._count} after the call envelope of {self._name!r} is not "
                "an item (F5 02 or F5 03)",
            )
        codec = self._codec
        data = message[2:]
        item_type = self._type
        try:
            if not codec.typed or item_type is Any:
                return codec.decode(data)
            decoder = codec.typed_decoder(item_type)
            if decoder is not None:
                try:
                    return decoder(data)
                except Exception:
                    pass  # the general way says why
            return codec.convert(codec.decode(data), item_type)
        except CodecError as exc:
            raise _Refusal(
                MethodErrorCode.INVALID_ARGUMENTS,
                f"item {self._count} streamed to {self._name!r}: {exc}",
            ) from exc


async def _send(call: IncomingCall, message: bytes, name: str) -> None:
    try:
        await call.send(message)
    except LocalProtocolError as exc:
        raise _Refusal(
            MethodErrorCode.INTERNAL,
            f"a message of {name!r} ({len(message)} bytes) is larger than the largest "
            f"message on a streaming call ({call.max_message_size} bytes): send smaller items",
        ) from exc


async def _run(
    method: _Method,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    call: IncomingCall,
    codec: Codec,
) -> Any:
    """Run the method: send each item an async generator method yields (waiting for the
    caller's credit), or return a client-streaming method's result."""
    if method.kind == CLIENT_STREAMING:
        return await method.func(*args, **kwargs)
    name = method.name
    async with aclosing(method.func(*args, **kwargs)) as results:
        async for item in results:
            try:
                message = _encode_item(codec, item)
            except CodecError as exc:
                raise _Refusal(
                    MethodErrorCode.INTERNAL,
                    f"an item {name!r} yielded could not be encoded: {exc}",
                ) from exc
            await _send(call, message, name)
    return None


async def serve_streaming_call(router: Router, call: IncomingCall) -> None:
    """Serve one streaming call with ``router``'s methods; send the last message (a
    client-streaming method's result, or an error reply), if any."""
    codec = get_codec(call.connection._config.codec)
    try:
        last = await _serve(router, call, codec)
    except (CallCancelled, ConnectionClosed):
        return  # the caller cancelled, or the connection ended: nobody to tell
    if last is None:
        return
    try:
        await call.send(last)
    except (trio.BrokenResourceError, trio.ClosedResourceError, MonteError):
        pass  # the caller has gone: nobody to tell


async def _serve(router: Router, call: IncomingCall, codec: Codec) -> bytes | None:
    try:
        first = await call.receive()
    except trio.EndOfChannel:
        return _error(MethodErrorCode.INVALID_CALL, "the streaming call carries no call envelope")
    if first[:2] != env.CALL_MARK:
        return _error(
            MethodErrorCode.INVALID_CALL,
            "the first message of this streaming call is not a method call",
        )
    found = router._look_up(first)
    del first
    if isinstance(found, bytes):
        return found
    method, flags, remaining, metadata, payload = found
    name = method.name
    if call.shape not in _SHAPES[method.kind]:
        return _error(
            MethodErrorCode.INVALID_CALL,
            f"{name!r} is a {method.kind} method, and this is a {call.shape.name.lower()} "
            f"call: {_HOW[method.kind]}; it was not run",
        )
    refused = _not_idempotent(method, flags)
    if refused is not None:
        return refused
    conn = call.connection
    start = trio.current_time()
    failed = True
    try:
        if remaining is not None and remaining <= 0:
            return _arrived_late(name)
        try:
            args, kwargs = _arguments(method, flags, payload, codec)
            if method.stream is not None:
                items = _Items(call, codec, method.item_type() if codec.typed else Any, name)
                args, kwargs = method.with_stream(args, kwargs, items)
        except _Refusal as refusal:
            return _error(refusal.code, refusal.message)
        del payload
        deadline = math.inf if remaining is None else start + remaining
        token = _serving.set(
            (name, args, kwargs, conn, flags, deadline, metadata, False, method.kind)
        )
        try:
            with trio.move_on_at(deadline) as scope:
                if router._middleware:
                    info = _served_info(
                        name, args, kwargs, conn, flags, deadline, metadata, False, method.kind
                    )

                    async def last() -> Any:
                        return await _run(method, args, kwargs, call, codec)

                    result = await run_middleware(router._middleware, info, last)
                else:
                    result = await _run(method, args, kwargs, call, codec)
            if scope.cancelled_caught:
                assert remaining is not None  # only a deadline cancels this scope
                return _cut_short(name, remaining)
        except _Refusal as refusal:
            return _error(refusal.code, refusal.message)
        except (CallCancelled, ConnectionClosed):
            raise  # the caller cancelled, or the connection ended
        except Exception as exc:
            return _exception_reply(exc, name, conn, codec)
        finally:
            _serving.reset(token)
        if method.kind != CLIENT_STREAMING:
            failed = False
            return None
        try:
            encoded = _encode_item(codec, result)
        except CodecError as exc:
            return _error(
                MethodErrorCode.INTERNAL, f"the result of {name!r} could not be encoded: {exc}"
            )
        failed = False
        return encoded
    finally:
        method.record(failed, trio.current_time() - start)


# -- the calling side ------------------------------------------------------------------------


class _MethodChannel(metaclass=NoPublicConstructor):
    _get_one_with = "stream() or stream_call() on a Connection or Client"
    __slots__ = ()
    _raw: Call | DownloadCall
    _name: str

    @property
    def method(self) -> str:
        """The method's full name."""
        return self._name

    @property
    def connection(self) -> Connection:
        """The connection the call runs over."""
        return self._raw.connection

    def __repr__(self) -> str:
        return f"<monte_trio.{type(self).__name__} {self._name!r} on {self.connection.name!r}>"


@final
class MethodStream(_MethodChannel, trio.abc.ReceiveChannel[Any]):
    """The results of a server-streaming method, as they come: a
    :class:`trio.abc.ReceiveChannel`, so ``async for result in results:``.

    Get one with ``async with client.stream("method", *args) as results:`` (or on a
    :class:`~monte_trio.Connection`). Results are decoded as ``call``'s (untyped: what
    the codec decodes; ``bytes`` untouched). The method sends each one as the caller
    takes the previous ones, within the call's window: a slow reader slows the method
    down, and nothing else. Leaving the block before the last result cancels the method
    at the peer.

    Raises (from :meth:`receive` and ``async for``), after the results sent before it:
    the method's error, as ``call`` raises it (the registered exception, or a
    :exc:`~monte_trio.RemoteMethodError`: :exc:`~monte_trio.MethodNotFound`...), and the
    errors of the streaming call (:class:`~monte_trio.DownloadCall`'s).
    """

    __slots__ = ("_codec", "_name", "_raw", "_type")

    def __init__(self, raw: Call | DownloadCall, name: str, codec: Codec, item_type: Any) -> None:
        self._raw = raw
        self._name = name
        self._codec = codec
        self._type = item_type

    async def receive(self) -> Any:
        """The next result.

        Raises:
            trio.EndOfChannel: the method has returned (all its results were received).
        """
        message = await self._raw.receive()
        return decode_reply(self._codec, self._name, message, self._type)

    async def aclose(self) -> None:
        """Close the call: if the method has not finished, it is cancelled at the peer."""
        await self._raw.aclose()


@final
class MethodCall(_MethodChannel, trio.abc.Channel[Any]):
    """A call of a client-streaming or bidirectional method: a :class:`trio.abc.Channel`
    of items both ways.

    Get one with ``async with client.stream_call("method", *args) as call:``;
    :meth:`send` each item (encoded as ``call``'s arguments are), then
    :meth:`send_eof`; a bidirectional method's results are :meth:`receive`\\ d (or
    ``async for``), a client-streaming method's one result is what :meth:`finish`
    returns. :meth:`send` waits for the call's credit, which the method returns as it
    takes each item. Leaving the block before the end cancels the method at the peer.

    The method's error (as ``call`` raises it) is raised by :meth:`receive` and
    :meth:`finish` after the results sent before it, and by a :meth:`send` made once
    the method has finished with an error.
    """

    __slots__ = ("_codec", "_done", "_name", "_pending", "_raw", "_type")
    _raw: Call

    def __init__(self, raw: Call, name: str, codec: Codec, item_type: Any) -> None:
        self._raw = raw
        self._name = name
        self._codec = codec
        self._type = item_type
        self._pending: list[bytes] = []
        self._done = False

    async def send(self, value: Any) -> None:
        """Send one item, waiting for the call's credit.

        Raises:
            CodecError: the item does not encode (nothing was sent).
            trio.BrokenResourceError: the method has finished and takes no more items
                (its result, if any, is still received).
            trio.ClosedResourceError: the call was closed, or :meth:`send_eof` called.
            RemoteMethodError: (or the registered exception) the method has finished
                with this error.
        """
        message = _encode_item(self._codec, value)
        try:
            await self._raw.send(message)
        except trio.BrokenResourceError as exc:
            # The method has finished: what it sent last says whether with an error.
            while not self._done:
                try:
                    self._pending.append(await self._raw.receive())
                except trio.EndOfChannel:
                    self._done = True
            if self._pending and self._pending[-1][:2] == bytes([env.MARK, env.ERROR]):
                decode_reply(self._codec, self._name, self._pending.pop(), UNTYPED)
            raise exc

    async def send_items(self, items: AsyncIterator[Any]) -> None:
        """:meth:`send` each of ``items``, then :meth:`send_eof`; stop quietly if the
        method finishes first (its result or error is then received)."""
        try:
            async for item in items:
                await self._raw.send(_encode_item(self._codec, item))
            await self._raw.send_eof()
        except trio.BrokenResourceError:
            pass

    async def send_eof(self) -> None:
        """End the items: the method's iteration of them ends. Receiving goes on."""
        try:
            await self._raw.send_eof()
        except trio.BrokenResourceError:
            pass  # the method has finished already

    async def receive(self) -> Any:
        """The method's next result (a client-streaming method has one).

        Raises:
            trio.EndOfChannel: the method has returned (all its results were received).
        """
        if self._pending:
            message = self._pending.pop(0)
        elif self._done:
            raise trio.EndOfChannel
        else:
            message = await self._raw.receive()
        return decode_reply(self._codec, self._name, message, self._type)

    async def finish(self) -> Any:
        """End the items and return the method's result (a client-streaming method's).

        Raises:
            RemoteMethodError: (or the registered exception) the method's error; or the
                method returned no result (a bidirectional method that sent none).
        """
        await self.send_eof()
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise RemoteMethodError(
                f"{self._name!r} ended without a result: is it a bidirectional method? "
                "receive() its results instead",
                code=MethodErrorCode.INVALID_CALL,
            ) from None

    async def aclose(self) -> None:
        """Close the call: if the method has not finished, it is cancelled at the peer."""
        await self._raw.aclose()


class _MethodOpening(Generic[_C]):
    """``async with``: encode the envelope (under the caller's deadline), open the call
    with it as its first message (through client middleware), close it on the way out."""

    __slots__ = ("_args", "_kind", "_kwargs", "_name", "_opener", "_opening", "_type", "_wrap")

    def __init__(
        self,
        opener: Opener,
        kind: str,
        name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        item_type: Any,
        wrap: Callable[..., _C],
    ) -> None:
        self._opener = opener
        self._kind = kind
        self._name = name
        self._args = args
        self._kwargs = kwargs
        self._type = item_type
        self._wrap = wrap
        self._opening: AbstractAsyncContextManager[Any] | None = None

    async def __aenter__(self) -> _C:
        if self._opening is not None:
            raise RuntimeError("this call was already opened: open a new one")
        opener = self._opener
        shape = CallShape.DOWNLOAD if self._kind == SERVER_STREAMING else CallShape.BIDIRECTIONAL
        for attempt in range(_REASSIGNMENTS + 1):
            conn = await opener.pick()
            try:
                self._opening, raw = await self._open(conn, shape)
                break
            except MonteError as exc:
                if not opener.reassign(attempt, exc):
                    raise
        return self._wrap(raw, self._name, opener.codec, self._type)

    async def _open(
        self, conn: Connection, shape: CallShape
    ) -> tuple[AbstractAsyncContextManager[Any], Any]:
        codec = self._opener.codec
        middleware = self._opener.middleware
        name, args, kwargs = self._name, self._args, self._kwargs
        opened: list[AbstractAsyncContextManager[Any]] = []
        info: CallInfo | None = None
        if middleware:
            info = client_info(name, args, kwargs, conn, False, kind=self._kind)

        async def last() -> Any:
            if info is None:
                current = _metadata.get()
                metadata = b"" if current is None else current[1]
            else:
                metadata = env.encode_metadata(info.metadata) if info.metadata else b""
            body = encode_call(codec, name, args, kwargs, False, metadata)
            opening = connection_opening(conn, shape, body, True)
            raw = await opening.__aenter__()
            opened.append(opening)
            return raw

        try:
            raw = await (last() if info is None else run_middleware(middleware, info, last))
        except BaseException as exc:
            if opened:
                await opened[0].__aexit__(type(exc), exc, exc.__traceback__)
            raise
        if not opened:
            raise RuntimeError(
                f"client middleware returned without awaiting next() for {name!r}: a "
                "streaming call is opened by it"
            )
        return opened[0], raw

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._opening is not None
        await self._opening.__aexit__(exc_type, exc, tb)


class Opener:
    """Where the streaming methods of a connection or a client open their calls.

    Args:
        pick: the connection for the next attempt.
        reassign: after attempt ``n`` failed with this error before anything was sent,
            whether to make another (it raises the error itself when it may not).
        codec: the connection's codec.
        middleware: client middleware.
    """

    __slots__ = ("codec", "middleware", "pick", "reassign")

    def __init__(
        self,
        pick: Callable[[], Awaitable[Connection]],
        reassign: Callable[[int, BaseException], bool],
        codec: Codec,
        middleware: Sequence[Middleware] = (),
    ) -> None:
        self.pick = pick
        self.reassign = reassign
        self.codec = codec
        self.middleware = middleware

    def stream(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], item_type: Any = UNTYPED
    ) -> _MethodOpening[MethodStream]:
        """``stream()``: a server-streaming method's call."""
        return _MethodOpening(
            self, SERVER_STREAMING, name, args, kwargs, item_type, MethodStream._create
        )

    def stream_call(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], item_type: Any = UNTYPED
    ) -> _MethodOpening[MethodCall]:
        """``stream_call()``: a client-streaming or bidirectional method's call."""
        return _MethodOpening(
            self, BIDIRECTIONAL, name, args, kwargs, item_type, MethodCall._create
        )

    def results(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], item_type: Any
    ) -> ProxyResults:
        """A proxy's server-streaming method: its results, the call made at the first."""
        return ProxyResults(self.stream(name, args, kwargs, item_type))

    async def upload(
        self,
        name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        items: AsyncIterator[Any],
        result_type: Any,
    ) -> Any:
        """A proxy's client-streaming method: send ``items`` (in a task of its own),
        return the method's result."""
        async with (
            self.stream_call(name, args, kwargs, result_type) as call,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(call.send_items, items)
            try:
                result = await call.receive()
            except trio.EndOfChannel:
                result = await call.finish()  # raises: no result came
            nursery.cancel_scope.cancel()
        return result


@final
class ProxyResults(AsyncIterator[Any]):
    """What a proxy's server-streaming method returns: the method's results, for ``async
    for``. The call is made when the iteration starts (under the deadline then in
    effect) and closed when it ends, fails or is cancelled, or by :meth:`aclose`."""

    __slots__ = ("_opening", "_stream")

    def __init__(self, opening: _MethodOpening[MethodStream]) -> None:
        self._opening: _MethodOpening[MethodStream] | None = opening
        self._stream: MethodStream | None = None

    def __aiter__(self) -> ProxyResults:
        return self

    async def __anext__(self) -> Any:
        stream = self._stream
        if stream is None:
            if self._opening is None:
                raise StopAsyncIteration
            stream = self._stream = await self._opening.__aenter__()
        try:
            return await stream.receive()
        except trio.EndOfChannel:
            await self._close(None)
            raise StopAsyncIteration from None
        except BaseException as exc:
            await self._close(exc)
            raise

    async def _close(self, exc: BaseException | None) -> None:
        opening, self._opening = self._opening, None
        self._stream = None
        if opening is not None and opening._opening is not None:
            await opening.__aexit__(
                None if exc is None else type(exc), exc, None if exc is None else exc.__traceback__
            )

    async def aclose(self) -> None:
        """End the call (cancelling the method at the peer if it has not finished)."""
        await self._close(None)

    async def __aenter__(self) -> ProxyResults:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close(exc)


def connection_opener(conn: Connection) -> Opener:
    """The :class:`Opener` of one connection (no middleware, no moving)."""

    async def pick() -> Connection:
        return conn

    def reassign(attempt: int, exc: BaseException) -> bool:
        return False

    return Opener(pick, reassign, get_codec(conn._config.codec))


def client_opener(client: Client) -> Opener:
    """The :class:`Opener` of a client: a pooled connection, client middleware, and a
    call refused before anything was sent moved to another connection (as ``request()``
    moves one)."""

    def reassign(attempt: int, exc: BaseException) -> bool:
        if not isinstance(exc, RequestNotProcessed):
            return False
        client._reassigning(attempt, exc)
        return True

    return Opener(client._pick, reassign, get_codec(client._config.codec), client._middleware)
