"""The calling side: a call's envelope, its reply turned into a result or an exception,
the metadata calls carry, and proxies that make a Protocol's methods calls.

A proxy is an instance of a class made once per Protocol, whose methods call
``invoke(full_name, args, kwargs, idempotent, result_type)`` (or, for a one-way method,
``notify(full_name, args, kwargs)``): a connection's or a client's (the client's moves a
call to another connection when it may).

A call without client middleware takes the shortest way: its envelope's first bytes are
made once per method name and flags, the metadata once per :func:`call_metadata` block,
and a reply of ``None`` is recognised without decoding.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import math
import typing
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import trio

from .._util import escape_peer_text
from . import _envelope as env
from ._codecs import Codec, get_codec
from ._errors import CodecError, error_class, library_error
from ._router import (
    UNARY,
    CallInfo,
    Middleware,
    _is_async_generator,
    _is_idempotent,
    _is_oneway,
    _is_stream_annotation,
    protocol_methods,
    run_middleware,
    stream_item_type,
    stream_parameter,
)

if TYPE_CHECKING:
    from .._connection import Connection
    from ._streaming import Opener

__all__ = [
    "Invoke",
    "Notify",
    "call_metadata",
    "call_on",
    "client_info",
    "connection_invoke",
    "connection_notify",
    "current_metadata",
    "decode_reply",
    "encode_call",
    "make_proxy",
    "notify_on",
]

UNTYPED: Any = object()
"""The result type of an untyped call (``call``): the value as the codec decodes it."""


class Invoke(Protocol):
    """What a proxy's methods call."""

    def __call__(
        self,
        name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        idempotent: bool,
        result_type: Any,
    ) -> Awaitable[Any]: ...


class Notify(Protocol):
    """What a proxy's one-way methods call."""

    def __call__(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Awaitable[None]: ...


# -- metadata --------------------------------------------------------------------------------

_metadata: contextvars.ContextVar[tuple[dict[str, str], bytes] | None] = contextvars.ContextVar(
    "monte_trio_call_metadata", default=None
)
"""The metadata of :func:`call_metadata` blocks: the entries and their encoding."""


@contextlib.contextmanager
def call_metadata(metadata: Mapping[str, str] | None = None, /, **entries: str) -> Iterator[None]:
    """Attach metadata to the method calls made inside the block.

    Each ``call``, ``notify`` and proxy method call made in the block (on a
    :class:`~monte_trio.Client` or a :class:`~monte_trio.Connection`), and in the tasks
    started from it, carries these entries; the method reads them as
    ``current_call().metadata``, middleware on both sides as ``CallInfo.metadata``.
    Blocks nest: an inner block adds its entries to the outer ones, replacing those of
    the same key::

        with monte_trio.call_metadata({"traceparent": traceparent}, tenant="blue"):
            await kv.put("key", "value")

    Keys and values are text (the peer's text: treat it as untrusted). A call carries at
    most 64 entries, keys of 1 to 255 bytes of UTF-8, keys and values adding up to at most
    8,192 bytes (the server refuses more: :attr:`~monte_trio.MethodErrorCode.INVALID_CALL`).

    Args:
        metadata: entries whose keys are not Python identifiers (``"x-request-id"``).
        entries: more entries, as keywords.

    Raises:
        TypeError: a key or value is not a ``str``.
        ValueError: the entries (with those of the enclosing blocks) go over a limit.
    """
    outer = _metadata.get()
    merged = dict(outer[0]) if outer is not None else {}
    if metadata is not None:
        merged.update(metadata)
    merged.update(entries)
    token = _metadata.set((merged, env.encode_metadata(merged)) if merged else None)
    try:
        yield
    finally:
        _metadata.reset(token)


def current_metadata() -> bytes:
    """The encoded metadata of the :func:`call_metadata` blocks in effect (``b""``: none)."""
    current = _metadata.get()
    return b"" if current is None else current[1]


def _client_metadata() -> dict[str, str]:
    """A fresh copy of the metadata in effect, for client middleware to change."""
    current = _metadata.get()
    return {} if current is None else dict(current[0])


def client_info(
    name: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    conn: Connection,
    idempotent: bool,
    oneway: bool = False,
    kind: str = UNARY,
) -> CallInfo:
    """The :class:`CallInfo` of a call this side is about to make on ``conn`` (under the
    caller's deadline, with a copy of the metadata in effect)."""
    return CallInfo(
        name,
        args,
        kwargs,
        conn,
        "client",
        idempotent,
        trio.current_effective_deadline(),
        _client_metadata(),
        oneway,
        kind,
    )


# -- the envelope ----------------------------------------------------------------------------

_PREFIXES: dict[str, list[bytes]] = {}
"""Per method name: the envelope's first bytes per flags, as made, then the name's UTF-8
bytes (for up to 1,024 names of up to 200 characters: a few MiB at most)."""
_NAMES_CACHED = 1024
_LONGEST_CACHED = 200
_FLAG_SETS = 16


def _prefix(name: str, flags: int) -> bytes:
    """The envelope's first bytes for method ``name`` with ``flags``.

    Raises:
        ValueError: the name is longer than 65,535 bytes.
    """
    prefixes = _PREFIXES.get(name)
    if prefixes is None:
        encoded = env.encode_name(name)
        prefixes = [b""] * _FLAG_SETS + [encoded]
        if len(_PREFIXES) < _NAMES_CACHED and len(name) <= _LONGEST_CACHED:
            _PREFIXES[name] = prefixes
    prefix = prefixes[flags]
    if not prefix:
        prefix = prefixes[flags] = env.call_prefix(prefixes[_FLAG_SETS], flags)
    return prefix


def encode_call(
    codec: Codec,
    name: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    idempotent: bool,
    metadata: bytes = b"",
) -> bytes:
    """The call's envelope, with the remaining time of the caller's deadline and
    ``metadata`` (:func:`~._envelope.encode_metadata`'s encoding; empty: none).

    Raises:
        CodecError: the arguments do not encode.
        ValueError: the name is longer than 65,535 bytes.
    """
    flags = env.FLAG_IDEMPOTENT if idempotent else 0
    if len(args) == 1 and not kwargs and type(args[0]) is bytes:
        flags |= env.FLAG_RAW
        payload: bytes = args[0]
    else:
        payload = codec.encode((args, kwargs))
    deadline = trio.current_effective_deadline()
    if deadline == math.inf:
        if not metadata:
            return _prefix(name, flags) + payload
        return b"".join((_prefix(name, flags | env.FLAG_METADATA), metadata, payload))
    remaining = env.remaining_field(deadline - trio.current_time())
    if metadata:
        flags |= env.FLAG_METADATA
    return b"".join((_prefix(name, flags | env.FLAG_DEADLINE), remaining, metadata, payload))


def decode_reply(codec: Codec, name: str, reply: bytes, result_type: Any) -> Any:
    """The result a reply carries, or the exception its error raises.

    Raises:
        RemoteMethodError: (or a subclass, or the registered exception) an error reply.
        CodecError: the reply does not decode, or does not match ``result_type``.
    """
    if reply[:2] == env.RESULT_PREFIX:
        data = reply[2:]
        if result_type is UNTYPED or not codec.typed:
            return None if data == codec.null else codec.decode(data)
        decoder = codec.typed_decoder(result_type)
        if decoder is not None:
            try:
                return decoder(data)
            except Exception:
                pass  # the general way says why
        value = codec.decode(data)
        try:
            return codec.convert(value, result_type)
        except CodecError as exc:
            raise CodecError(
                f"the result of {name!r} does not match its annotation: {exc}"
            ) from exc
    if len(reply) < 2 or reply[0] != env.MARK:
        raise CodecError(
            f"the reply to {name!r} is not a method reply; does the peer serve methods "
            "(a monte_trio.Router)?"
        )
    kind = reply[1]
    if kind == env.RAW_RESULT:
        return reply[2:]
    if kind == env.ERROR:
        try:
            code, remote_name, message, details_bytes = env.decode_error(reply)
        except env.EnvelopeError as exc:
            raise CodecError(f"the error reply to {name!r} is invalid: {exc}") from None
        raise _error(codec, code, remote_name, message, details_bytes)
    raise CodecError(f"the reply to {name!r} is of an unknown kind ({kind:#04x})")


def _error(codec: Codec, code: int, name: str, message: str, details_bytes: bytes) -> Exception:
    message = escape_peer_text(message)
    name = escape_peer_text(name)
    details: Any = None
    if details_bytes:
        try:
            details = codec.decode(details_bytes)
        except CodecError:
            message += " (its details did not decode)"
    remote = library_error(code, message, name, details)
    cls = error_class(code, name)
    if cls is None or not issubclass(cls, Exception):
        return remote
    try:
        exc = cls(message)
    except Exception:
        return remote
    try:
        exc.details = details  # type: ignore[attr-defined]
    except AttributeError:
        pass
    exc.__cause__ = remote
    return exc


async def call_on(
    conn: Connection,
    codec: Codec,
    name: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    idempotent: bool,
    result_type: Any = UNTYPED,
    middleware: Sequence[Middleware] = (),
) -> Any:
    """Call method ``name`` over ``conn``, through ``middleware``."""
    if not middleware:
        body = encode_call(codec, name, args, kwargs, idempotent, current_metadata())
        return decode_reply(codec, name, await conn.request(body), result_type)
    info = client_info(name, args, kwargs, conn, idempotent)

    async def last() -> Any:
        metadata = env.encode_metadata(info.metadata) if info.metadata else b""
        body = encode_call(codec, name, args, kwargs, idempotent, metadata)
        return decode_reply(codec, name, await conn.request(body), result_type)

    return await run_middleware(middleware, info, last)


async def notify_on(
    conn: Connection,
    codec: Codec,
    name: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    middleware: Sequence[Middleware] = (),
) -> None:
    """Call method ``name`` over ``conn`` as a one-way message, through ``middleware``."""
    if not middleware:
        await conn.send(encode_call(codec, name, args, kwargs, False, current_metadata()))
        return
    info = client_info(name, args, kwargs, conn, False, oneway=True)

    async def last() -> None:
        metadata = env.encode_metadata(info.metadata) if info.metadata else b""
        await conn.send(encode_call(codec, name, args, kwargs, False, metadata))

    await run_middleware(middleware, info, last)


async def connection_invoke(
    conn: Connection,
    name: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    idempotent: bool,
    result_type: Any = UNTYPED,
) -> Any:
    """A call on one connection, with its codec (no middleware)."""
    codec = get_codec(conn._config.codec)
    body = encode_call(codec, name, args, kwargs, idempotent, current_metadata())
    return decode_reply(codec, name, await conn.request(body), result_type)


async def connection_notify(
    conn: Connection, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """A one-way call on one connection, with its codec (no middleware)."""
    await notify_on(conn, get_codec(conn._config.codec), name, args, kwargs)


def _result_type(declared: Callable[..., Any]) -> Any:
    try:
        return typing.get_type_hints(declared).get("return", Any)
    except Exception:  # an annotation that does not resolve: no conversion
        return Any


class _ProxyBase:
    __slots__ = ("_invoke", "_names", "_notify", "_opener")

    def __init__(
        self, invoke: Invoke, notify: Notify, names: dict[str, str], opener: Opener | None
    ) -> None:
        self._invoke = invoke
        self._notify = notify
        self._names = names
        self._opener = opener

    def _streams(self) -> Opener:
        if self._opener is None:
            raise RuntimeError("this proxy cannot call streaming methods")
        return self._opener


def _item_type(declared: Callable[..., Any]) -> Any:
    try:
        return stream_item_type(typing.get_type_hints(declared).get("return", Any))
    except Exception:  # an annotation that does not resolve: no conversion
        return Any


def _streaming_proxy_method(
    name: str, declared: Callable[..., Any], results: bool, stream: str | None
) -> Callable[..., Any]:
    """A proxy's method for a streaming method of the Protocol."""
    if results and stream is not None:

        def bidirectional(self: _ProxyBase, *args: Any, **kwargs: Any) -> Any:
            raise TypeError(
                f"{name}() is a bidirectional method: a proxy does not call those; use "
                f"stream_call({self._names[name]!r}, ...) on the client or connection"
            )

        method: Callable[..., Any] = bidirectional
    elif results:
        item_type: list[Any] = []

        def open_results(self: _ProxyBase, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if not item_type:
                item_type.append(_item_type(declared))
            return self._streams().results(self._names[name], args, kwargs, item_type[0])

        if inspect.iscoroutinefunction(declared):  # declared async def ... -> AsyncIterator

            async def awaited_results(self: _ProxyBase, *args: Any, **kwargs: Any) -> Any:
                return open_results(self, args, kwargs)

            method = awaited_results
        else:

            def plain_results(self: _ProxyBase, *args: Any, **kwargs: Any) -> Any:
                return open_results(self, args, kwargs)

            method = plain_results
    else:
        assert stream is not None
        signature = inspect.signature(declared)
        rest = signature.replace(
            parameters=[p for p in list(signature.parameters.values())[1:] if p.name != stream]
        )
        result_type: list[Any] = []

        async def upload(self: _ProxyBase, *args: Any, **kwargs: Any) -> Any:
            if not result_type:
                result_type.append(_result_type(declared))
            bound = signature.bind(None, *args, **kwargs)
            items = bound.arguments.pop(stream)
            arguments = {k: v for k, v in bound.arguments.items() if k in rest.parameters}
            call = inspect.BoundArguments(rest, arguments)
            return await self._streams().upload(
                self._names[name], call.args, call.kwargs, items, result_type[0]
            )

        method = upload
    method.__name__ = method.__qualname__ = name
    method.__doc__ = declared.__doc__
    return method


def _proxy_method(name: str, declared: Callable[..., Any]) -> Callable[..., Any]:
    results = _is_async_generator(declared) or _is_stream_annotation(
        getattr(declared, "__annotations__", {}).get("return"), results=True
    )
    try:
        stream = stream_parameter(inspect.signature(declared), f"{name}()")
    except ValueError:
        stream = None
    if results or stream is not None:
        return _streaming_proxy_method(name, declared, results, stream)
    if _is_oneway(declared):

        async def notify(self: _ProxyBase, *args: Any, **kwargs: Any) -> None:
            await self._notify(self._names[name], args, kwargs)

        notify.__name__ = notify.__qualname__ = name
        notify.__doc__ = declared.__doc__
        return notify

    idempotent = _is_idempotent(declared)
    result_type: list[Any] = []

    def method(self: _ProxyBase, *args: Any, **kwargs: Any) -> Awaitable[Any]:
        # Not async itself: it returns the call's coroutine (one coroutine less per call).
        if not result_type:
            result_type.append(_result_type(declared))
        return self._invoke(self._names[name], args, kwargs, idempotent, result_type[0])

    method.__name__ = method.__qualname__ = name
    method.__doc__ = declared.__doc__
    return method


@functools.lru_cache(maxsize=256)
def _proxy_class(protocol: type) -> tuple[type[_ProxyBase], tuple[str, ...]]:
    methods = protocol_methods(protocol)
    namespace: dict[str, Any] = {"__slots__": ()}
    for name, declared in methods.items():
        namespace[name] = _proxy_method(name, declared)
    cls = type(f"{protocol.__name__}Proxy", (_ProxyBase,), namespace)
    return cls, tuple(methods)


def make_proxy(
    protocol: Any,
    namespace: str,
    invoke: Invoke,
    notify: Notify,
    opener: Opener | None = None,
) -> Any:
    """A proxy whose methods are ``protocol``'s, calling ``namespace.method`` (one-way
    methods through ``notify``, streaming methods through ``opener``).

    Raises:
        TypeError: ``protocol`` is not a class with public methods.
    """
    if not isinstance(protocol, type):
        raise TypeError(f"proxy() takes a Protocol class, not {protocol!r}")
    cls, names = _proxy_class(protocol)
    full = {name: f"{namespace}.{name}" if namespace else name for name in names}
    return cls(invoke, notify, full, opener)
