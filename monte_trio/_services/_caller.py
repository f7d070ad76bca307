"""The calling side: a call's envelope, its reply turned into a result or an exception,
and proxies that make a Protocol's methods calls.

A proxy is an instance of a class made once per Protocol, whose methods call
``invoke(full_name, args, kwargs, idempotent, result_type)``: a connection's or a client's
(the client's moves a call to another connection when it may).
"""

from __future__ import annotations

import functools
import math
import typing
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import trio

from .._util import escape_peer_text
from . import _envelope as env
from ._codecs import Codec, get_codec
from ._errors import CodecError, error_class, library_error
from ._router import CallInfo, Middleware, _is_idempotent, protocol_methods, run_middleware

if TYPE_CHECKING:
    from .._connection import Connection

__all__ = ["Invoke", "call_on", "connection_invoke", "make_proxy"]

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


_NAMES: dict[str, bytes] = {}
_NAMES_CACHED = 4096


def _name_bytes(name: str) -> bytes:
    encoded = _NAMES.get(name)
    if encoded is None:
        encoded = env.encode_name(name)
        if len(_NAMES) < _NAMES_CACHED:
            _NAMES[name] = encoded
    return encoded


def encode_call(
    codec: Codec, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], idempotent: bool
) -> bytes:
    """The call's envelope, with the remaining time of the caller's deadline.

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
    remaining = None if deadline == math.inf else deadline - trio.current_time()
    return env.encode_call(_name_bytes(name), flags, remaining, payload)


def decode_reply(codec: Codec, name: str, reply: bytes, result_type: Any) -> Any:
    """The result a reply carries, or the exception its error raises.

    Raises:
        RemoteMethodError: (or a subclass, or the registered exception) an error reply.
        CodecError: the reply does not decode, or does not match ``result_type``.
    """
    if len(reply) < 2 or reply[0] != env.MARK:
        raise CodecError(
            f"the reply to {name!r} is not a method reply; does the peer serve methods "
            "(a monte_trio.Router)?"
        )
    kind = reply[1]
    if kind == env.RAW_RESULT:
        return reply[2:]
    if kind == env.RESULT:
        value = codec.decode(reply[2:])
        if result_type is UNTYPED or not codec.typed:
            return value
        try:
            return codec.convert(value, result_type)
        except CodecError as exc:
            raise CodecError(
                f"the result of {name!r} does not match its annotation: {exc}"
            ) from exc
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

    async def last() -> Any:
        body = encode_call(codec, name, args, kwargs, idempotent)
        return decode_reply(codec, name, await conn.request(body), result_type)

    if not middleware:
        return await last()
    info = CallInfo(
        name, args, kwargs, conn, "client", idempotent, trio.current_effective_deadline()
    )
    return await run_middleware(middleware, info, last)


async def connection_invoke(
    conn: Connection,
    name: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    idempotent: bool,
    result_type: Any = UNTYPED,
) -> Any:
    """A call on one connection, with its codec."""
    codec = get_codec(conn._config.codec)
    return await call_on(conn, codec, name, args, kwargs, idempotent, result_type)


def _result_type(declared: Callable[..., Any]) -> Any:
    try:
        return typing.get_type_hints(declared).get("return", Any)
    except Exception:  # an annotation that does not resolve: no conversion
        return Any


class _ProxyBase:
    __slots__ = ("_invoke", "_names")

    def __init__(self, invoke: Invoke, names: dict[str, str]) -> None:
        self._invoke = invoke
        self._names = names


def _proxy_method(name: str, declared: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    idempotent = _is_idempotent(declared)
    result_type: list[Any] = []

    async def method(self: _ProxyBase, *args: Any, **kwargs: Any) -> Any:
        if not result_type:
            result_type.append(_result_type(declared))
        return await self._invoke(self._names[name], args, kwargs, idempotent, result_type[0])

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


def make_proxy(protocol: Any, namespace: str, invoke: Invoke) -> Any:
    """A proxy whose methods are ``protocol``'s, calling ``namespace.method``.

    Raises:
        TypeError: ``protocol`` is not a class with public methods.
    """
    if not isinstance(protocol, type):
        raise TypeError(f"proxy() takes a Protocol class, not {protocol!r}")
    cls, names = _proxy_class(protocol)
    full = {name: f"{namespace}.{name}" if namespace else name for name in names}
    return cls(invoke, full)
