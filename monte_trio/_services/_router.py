"""The serving side: :class:`Router`, methods by name, middleware and statistics.

A :class:`Router` is an async handler (pass it to :class:`~monte_trio.Server`,
:func:`~monte_trio.open_client` or any connection as ``handler=``). For each request whose
body is a call envelope (:mod:`._envelope`) it finds the method by name, decodes the
arguments with the connection's codec (:mod:`._codecs`), checks them against the method's
signature (and, with a typed codec, converts them to its annotations), runs the method
under the caller's deadline, through the middleware, and replies with the encoded result
or an error reply. Nothing the caller sends can end the connection: every refusal is an
error reply with a :class:`~monte_trio.MethodErrorCode`. Bodies that are not call
envelopes go to the ``fallback`` handler, if any. A call that came as a one-way message
runs the same way; its reply is not sent, and an error is logged instead. The call's
metadata reaches the method through :func:`current_call` and the middleware through
:class:`CallInfo`.

A call with no middleware takes the shortest way: no :class:`CallInfo` is made, no cancel
scope without a deadline, ``None`` results are encoded once per codec, and a typed codec
decodes positional arguments straight to the parameters' annotations with a decoder made
once per method (what it refuses goes the general way, which says why).

The module is about 700 lines, one class and its helpers: registration, dispatch,
argument checking, middleware and statistics all read the same method table.
"""

from __future__ import annotations

import collections.abc
import contextvars
import functools
import inspect
import logging
import math
import re
import traceback
import typing
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, overload

import attrs
import trio

from .._handlers import BodyHandler, Handler, InlineHandler, Request, without_cancelled
from .._util import printable
from . import _envelope as env
from ._codecs import Codec, get_codec
from ._errors import CodecError, MethodErrorCode, registered_name

if TYPE_CHECKING:
    from .._calls_api import IncomingCall
    from .._connection import Connection
    from .._keys import PublicKey

__all__ = [
    "CallInfo",
    "MethodStatistics",
    "Middleware",
    "Router",
    "current_call",
    "idempotent",
    "oneway",
    "protocol_methods",
    "run_middleware",
]

logger = logging.getLogger("monte_trio")

_F = TypeVar("_F", bound=Callable[..., Any])
_IDEMPOTENT = "__monte_trio_idempotent__"


def idempotent(func: _F) -> _F:
    """Declare a method idempotent: running it twice has the effect of running it once.

    On a Protocol's method, a proxy's calls of it are marked idempotent (a
    :class:`~monte_trio.Client` may then send it again on another connection after a
    connection failure); on a served method (a function given to :meth:`Router.method`,
    or a Protocol's method given to :meth:`Router.add_service`), the router accepts
    calls marked idempotent. A call marked idempotent for a method not declared so is
    refused with :attr:`~monte_trio.MethodErrorCode.NOT_IDEMPOTENT`, unrun.
    """
    setattr(func, _IDEMPOTENT, True)
    return func


def _is_idempotent(func: object) -> bool:
    return bool(getattr(func, _IDEMPOTENT, False))


_ONEWAY = "__monte_trio_oneway__"
_NO_RESULT = (None, "None", type(None))


def oneway(func: _F) -> _F:
    """Declare a Protocol's method one-way: a proxy sends its calls as one-way messages.

    The proxy's method then returns once the call is written, as
    :meth:`Client.notify <monte_trio.Client.notify>` does: the peer runs the method and
    discards its result; an error is logged at the peer, never sent back. It must be
    declared to return ``None``::

        class Log(Protocol):
            @monte_trio.oneway
            async def line(self, text: str) -> None: ...

    On the serving side it changes nothing: any method can be called either way.

    Raises:
        TypeError: the method is annotated to return something other than ``None``.
    """
    returns = getattr(func, "__annotations__", {}).get("return", None)
    if returns not in _NO_RESULT:
        raise TypeError(
            f"{getattr(func, '__qualname__', func)!r} is declared one-way, so nothing comes "
            f"back; annotate it -> None instead of -> {returns}"
        )
    setattr(func, _ONEWAY, True)
    return func


def _is_oneway(func: object) -> bool:
    return bool(getattr(func, _ONEWAY, False))


@attrs.frozen(eq=False)
class CallInfo:
    """One method call, as middleware sees it.

    Attributes:
        method: the method's full name (with its namespace).
        args: the positional arguments (decoded, on the serving side).
        kwargs: the keyword arguments.
        connection: the connection the call travels on.
        side: ``"server"`` for a call being served, ``"client"`` for a call being made.
        idempotent: whether the call is marked idempotent.
        deadline: the call's deadline on this side's clock (:func:`trio.current_time`),
            :data:`math.inf` if none.
        metadata: the call's metadata (text keys and values, for example a W3C
            ``traceparent``): on the serving side, what the caller sent; on the calling
            side, what :func:`~monte_trio.call_metadata` set, which client middleware may
            change before it calls ``next()`` (the call carries the dict as it is then).
        oneway: ``True`` for a one-way call (``notify``): no result comes back.
        kind: ``"unary"`` for a call with one result; for a streaming method (see
            :ref:`services-streaming`) ``"server-streaming"`` (many results),
            ``"client-streaming"`` (many items in, one result) or ``"bidirectional"``.
    """

    method: str
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    connection: Connection = attrs.field(repr=False)
    side: str
    idempotent: bool
    deadline: float
    metadata: dict[str, str] = attrs.Factory(dict)
    oneway: bool = False
    kind: str = "unary"

    @property
    def peer_public_key(self) -> PublicKey | None:
        """The peer's authenticated static key (native profile), else ``None``."""
        return self.connection.peer_public_key


_Serving = tuple[
    str,
    tuple[Any, ...],
    Mapping[str, Any],
    "Connection",
    int,
    float,
    "dict[str, str] | None",
    bool,
    str,
]
_serving: contextvars.ContextVar[_Serving | None] = contextvars.ContextVar(
    "monte_trio_serving", default=None
)


def current_call() -> CallInfo:
    """The call the running method serves: its name, arguments, deadline, metadata and
    connection.

    Inside a :class:`Router` method (and the tasks it starts), this is how a method
    reaches its caller, for example to call it back over the same connection with
    ``current_call().connection.proxy(SomeProtocol)``, or to authorise by
    ``current_call().peer_public_key``.

    Raises:
        RuntimeError: no method call is being served in this context.
    """
    serving = _serving.get()
    if serving is None:
        raise RuntimeError(
            "current_call() is only available inside a method a Router is serving "
            "(and the tasks it starts)"
        )
    return _served_info(*serving)


Next = Callable[[], Awaitable[Any]]
"""What a middleware awaits to run the rest of the chain (and at its end the call)."""

Middleware = Callable[[CallInfo, Next], Awaitable[Any]]
"""Runs around each call: ``async def middleware(call: CallInfo, next) -> result``.

It returns what ``await next()`` returned (or another result), and sees the call's
exception raised out of ``await next()``. Measure durations with
:func:`trio.current_time` around it; the router's own statistics are in
:meth:`Router.statistics`."""


async def run_middleware(middleware: Sequence[Middleware], info: CallInfo, last: Next) -> Any:
    """Run ``last`` through ``middleware``, the first one outermost."""

    def link(index: int) -> Next:
        if index == len(middleware):
            return last
        current = middleware[index]
        rest = link(index + 1)

        def step() -> Awaitable[Any]:
            return current(info, rest)

        return step

    return await link(0)()


@attrs.frozen
class MethodStatistics:
    """A method's counters (see :meth:`Router.statistics`); durations on trio's clock.

    Attributes:
        calls: calls that reached the method (its arguments were decoded, or refused).
        errors: those that ended in an error reply (or were cancelled).
        total_time: seconds spent in them in all.
        max_time: the longest one, in seconds.
    """

    calls: int
    errors: int
    total_time: float
    max_time: float


class _Refusal(Exception):
    """An error reply decided before the method ran."""

    def __init__(self, code: MethodErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


UNARY = "unary"
SERVER_STREAMING = "server-streaming"
CLIENT_STREAMING = "client-streaming"
BIDIRECTIONAL = "bidirectional"


def _served_info(
    name: str,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    conn: Connection,
    flags: int,
    deadline: float,
    metadata: dict[str, str] | None,
    oneway: bool,
    kind: str,
) -> CallInfo:
    """The :class:`CallInfo` of a call this side serves."""
    return CallInfo(
        name,
        args,
        kwargs,
        conn,
        "server",
        bool(flags & env.FLAG_IDEMPOTENT),
        deadline,
        {} if metadata is None else metadata,
        oneway,
        kind,
    )


_ASYNC_ITERABLES = (collections.abc.AsyncIterator, collections.abc.AsyncIterable)
_ASYNC_RESULTS = (*_ASYNC_ITERABLES, collections.abc.AsyncGenerator)
_ITERABLE_TEXT = re.compile(r"(?:[\w.]+\.)?Async(?:Iterator|Iterable)(?:\[|$)")
_RESULT_TEXT = re.compile(r"(?:[\w.]+\.)?Async(?:Iterator|Iterable|Generator)(?:\[|$)")


def _is_stream_annotation(annotation: object, results: bool = False) -> bool:
    """Whether an annotation (resolved, or the text of a postponed one) is an
    ``AsyncIterator[T]`` or ``AsyncIterable[T]`` (for ``results``, also an
    ``AsyncGenerator[T, ...]``)."""
    if isinstance(annotation, str):
        return (_RESULT_TEXT if results else _ITERABLE_TEXT).match(annotation.strip()) is not None
    origin = typing.get_origin(annotation) or annotation
    return origin in (_ASYNC_RESULTS if results else _ASYNC_ITERABLES)


def stream_item_type(annotation: object) -> Any:
    """``T`` of ``AsyncIterator[T]`` (or ``AsyncIterable[T]``, ``AsyncGenerator[T, ...]``);
    ``Any`` when it says nothing more."""
    args = typing.get_args(annotation)
    return args[0] if args else Any


def _is_async_generator(func: object) -> bool:
    while isinstance(func, functools.partial):
        func = func.func
    return inspect.isasyncgenfunction(func) or inspect.isasyncgenfunction(
        getattr(func, "__call__", None)  # noqa: B004 - an object with an async __call__
    )


def stream_parameter(signature: inspect.Signature, what: str) -> str | None:
    """The parameter annotated ``AsyncIterator[T]`` or ``AsyncIterable[T]`` (the items
    the caller streams), if any.

    Raises:
        TypeError: more than one, or a ``*args`` or ``**kwargs`` one.
    """
    found: str | None = None
    for param in signature.parameters.values():
        if not _is_stream_annotation(param.annotation):
            continue
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(
                f"{what}: the stream of items is one parameter, not *{param.name} or "
                f"**{param.name}"
            )
        if found is not None:
            raise TypeError(
                f"{what} takes two streams of items ({found!r} and {param.name!r}); a "
                "streaming method takes at most one"
            )
        found = param.name
    return found


@attrs.define(eq=False)
class _Method:
    name: str
    func: Callable[..., Any]
    idempotent: bool
    kind: str = UNARY
    signature: inspect.Signature | None = None
    arity: int | None = None  # the plain positional parameters, when that is all there is
    hints: dict[str, Any] | None = None
    typed_arguments: dict[str, Callable[[bytes], Any] | None] = attrs.Factory(dict)
    stream: str | None = None  # the parameter that takes the caller's items, if any
    full_signature: inspect.Signature | None = None  # with that parameter
    calls: int = 0
    errors: int = 0
    total_time: float = 0.0
    max_time: float = 0.0

    def __attrs_post_init__(self) -> None:
        results = _is_async_generator(self.func)
        try:
            self.signature = inspect.signature(self.func)
        except (TypeError, ValueError):
            self.kind = SERVER_STREAMING if results else UNARY
            return  # no signature: arguments are passed as they come
        self.stream = stream_parameter(self.signature, f"method {self.name!r}")
        if self.stream is None:
            self.kind = SERVER_STREAMING if results else UNARY
        else:
            self.kind = BIDIRECTIONAL if results else CLIENT_STREAMING
            self.full_signature = self.signature
            self.signature = self.signature.replace(
                parameters=[p for p in self.signature.parameters.values() if p.name != self.stream]
            )
        params = list(self.signature.parameters.values())
        if all(
            p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
            for p in params
        ):
            self.arity = len(params)

    def annotations(self) -> dict[str, Any]:
        if self.hints is None:
            try:
                target: Any = self.func
                while isinstance(target, functools.partial):
                    target = target.func
                if not (inspect.isfunction(target) or inspect.ismethod(target)):
                    target = type(target).__call__
                hints = typing.get_type_hints(target)
            except Exception as exc:
                raise _Refusal(
                    MethodErrorCode.INTERNAL,
                    f"the annotations of {self.name!r} could not be resolved: {exc}",
                ) from exc
            hints.pop("return", None)
            self.hints = hints
        return self.hints

    def arguments_decoder(self, codec: Codec) -> Callable[[bytes], Any] | None:
        """A typed codec's decoder of positional arguments straight to the parameters'
        annotations, when the method takes plain positional parameters only; else
        ``None``. Whatever it refuses goes the general way, which says why."""
        try:
            return self.typed_arguments[codec.name]
        except KeyError:
            pass
        decoder = None
        if self.arity is not None and self.signature is not None:
            try:
                hints = self.annotations()
            except _Refusal:
                pass  # the general way refuses the call, saying why
            else:
                decoder = codec.arguments_decoder(
                    tuple(hints.get(name, Any) for name in self.signature.parameters)
                )
        self.typed_arguments[codec.name] = decoder
        return decoder

    def item_type(self) -> Any:
        """The type of the items the caller streams (``Any`` if unannotated)."""
        assert self.stream is not None
        return stream_item_type(self.annotations().get(self.stream, Any))

    def with_stream(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], items: object
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The arguments (bound to :attr:`signature`) with ``items`` added where the
        stream parameter goes."""
        assert self.stream is not None
        assert self.signature is not None
        assert self.full_signature is not None
        given = self.signature.bind(*args, **kwargs).arguments
        arguments = {}
        for name in self.full_signature.parameters:
            if name == self.stream:
                arguments[name] = items
            elif name in given:
                arguments[name] = given[name]
        bound = inspect.BoundArguments(self.full_signature, arguments)
        return bound.args, bound.kwargs

    def record(self, failed: bool, duration: float) -> None:
        self.calls += 1
        self.errors += failed
        self.total_time += duration
        self.max_time = max(self.max_time, duration)


def protocol_methods(protocol: type) -> dict[str, Callable[..., Any]]:
    """The public methods a Protocol class declares (its bases' too), by name.

    Raises:
        TypeError: ``protocol`` is not a class, or declares no public method.
    """
    if not isinstance(protocol, type):
        raise TypeError(f"expected a Protocol class, got {protocol!r}")
    members: dict[str, Callable[..., Any]] = {}
    for klass in reversed(protocol.__mro__):
        if klass is object or klass.__module__ in ("typing", "typing_extensions"):
            continue
        for name, value in vars(klass).items():
            if not name.startswith("_") and inspect.isfunction(value):
                members[name] = value
    if not members:
        raise TypeError(f"{protocol.__qualname__} declares no public method")
    return members


def _full_name(namespace: str, name: str) -> str:
    return f"{namespace}.{name}" if namespace else name


def _is_async(func: object) -> bool:
    return (
        inspect.iscoroutinefunction(func)
        or inspect.iscoroutinefunction(
            getattr(func, "__call__", None)  # noqa: B004 - an object with an async __call__
        )
        or _is_async_generator(func)
    )


class Router(BodyHandler):
    """Methods by name: an async handler that serves calls made with ``call`` or ``proxy``.

    Register ``async def`` functions with :meth:`method`, or an object implementing a
    Protocol with :meth:`add_service`, then pass the router as ``handler=`` to a
    :class:`~monte_trio.Server`, :func:`~monte_trio.open_client` or a connection::

        router = monte_trio.Router()

        @router.method
        async def add(a: int, b: int) -> int:
            return a + b

        server = monte_trio.Server(router, trust=...)

    Streaming methods (``async def`` generators, and methods taking an
    ``AsyncIterator[T]``) are served over streaming calls: pass
    :meth:`call_handler` too (``call_handler=router.call_handler``).

    Args:
        middleware: run around each call that reaches a method, the first outermost (see
            :data:`Middleware`).
        fallback: serves the requests and one-way messages whose body is not a call
            envelope (raw bytes for an older handler, for example). Without it, such a
            request gets an error reply (:attr:`~monte_trio.MethodErrorCode.INVALID_CALL`)
            and such a one-way message is dropped (logged).
    """

    def __init__(
        self, *, middleware: Sequence[Middleware] = (), fallback: Handler | None = None
    ) -> None:
        self._methods: dict[str, _Method] = {}
        # the unary methods by the UTF-8 name a call envelope carries (_serve_body's
        # lookup without decoding the name)
        self._unary: dict[bytes, _Method] = {}
        self._middleware = tuple(middleware)
        self._fallback = fallback

    def __repr__(self) -> str:
        return f"<monte_trio.Router with {len(self._methods)} method(s)>"

    @property
    def methods(self) -> list[str]:
        """The registered methods' full names, sorted."""
        return sorted(self._methods)

    # -- registering -----------------------------------------------------------------------

    @overload
    def method(self, func: _F, /) -> _F: ...

    @overload
    def method(
        self, name: str | None = None, /, *, idempotent: bool = False
    ) -> Callable[[_F], _F]: ...

    def method(
        self, func_or_name: Any = None, /, *, idempotent: bool = False
    ) -> Callable[[_F], _F] | Any:
        """Register an ``async def`` function as a method; use it as a decorator.

        ``@router.method`` names the method after the function; ``@router.method("name")``
        names it explicitly; ``idempotent=True`` declares it idempotent (as
        :func:`~monte_trio.idempotent` does).

        Raises:
            TypeError: the function is not async.
            ValueError: the name is empty, longer than 65,535 bytes, or taken.
        """
        if callable(func_or_name):
            self._add(func_or_name.__name__, func_or_name, idempotent)
            return func_or_name
        name: str | None = func_or_name

        def register(func: _F) -> _F:
            self._add(name if name is not None else func.__name__, func, idempotent)
            return func

        return register

    def add_service(self, service: object, protocol: type, *, namespace: str = "") -> None:
        """Register ``service``'s methods that ``protocol`` declares, as
        ``namespace.method`` (or ``method`` without a namespace).

        A method is idempotent if the Protocol's or the service's declaration is marked
        with :func:`~monte_trio.idempotent`.

        Raises:
            TypeError: ``service`` lacks one of the methods, or one is not async.
            ValueError: a name is taken.
        """
        for name, declared in protocol_methods(protocol).items():
            func = getattr(service, name, None)
            if func is None:
                raise TypeError(
                    f"{type(service).__qualname__} lacks {name}(), which "
                    f"{protocol.__qualname__} declares"
                )
            self._add(
                _full_name(namespace, name), func, _is_idempotent(declared) or _is_idempotent(func)
            )

    def include(self, router: Router, *, namespace: str = "") -> None:
        """Add ``router``'s methods (as registered now), under ``namespace`` if given.

        Raises:
            ValueError: a name is taken.
        """
        for name, method in router._methods.items():
            self._add(_full_name(namespace, name), method.func, method.idempotent)

    def _add(self, name: str, func: Callable[..., Any], idempotent: bool) -> None:
        if not _is_async(func):
            raise TypeError(
                f"method {name!r}: {func!r} is not async; register an async def function"
            )
        if not name:
            raise ValueError("a method name cannot be empty")
        env.encode_name(name)
        if name in self._methods:
            raise ValueError(f"a method named {name!r} is already registered")
        method = _Method(name, func, idempotent or _is_idempotent(func))
        self._methods[name] = method
        if method.kind == UNARY:
            self._unary[name.encode("utf-8")] = method

    # -- statistics ------------------------------------------------------------------------

    def statistics(self) -> dict[str, MethodStatistics]:
        """Each registered method's counters, by full name."""
        return {
            name: MethodStatistics(m.calls, m.errors, m.total_time, m.max_time)
            for name, m in sorted(self._methods.items())
        }

    # -- serving ---------------------------------------------------------------------------

    def __call__(self, request: Request) -> Awaitable[bytes | None]:
        """Serve one request or one-way message (the handler's interface): return the
        awaitable of the reply (a plain method, so a call costs one coroutine less)."""
        served = self._dispatch(request.body, request.oneway, request.connection)
        return self._not_a_call(request) if served is None else served

    def _serve_body(
        self, body: bytes, call_id: int, connection: Connection
    ) -> Awaitable[bytes | None] | None:
        """As :meth:`__call__`, given the request's parts (the connection's handler
        workers call this: no :class:`~monte_trio.Request` to make); ``None`` for a body
        that is not a call envelope (the fallback's, given a Request)."""
        return self._dispatch(body, not call_id, connection)

    def _dispatch(
        self, body: bytes, oneway: bool, connection: Connection
    ) -> Awaitable[bytes | None] | None:
        """The awaitable that serves ``body``, or ``None`` if it is not a call."""
        if body[:2] != env.CALL_MARK:
            return None
        if oneway:
            return self._serve_oneway(body, connection)
        # The common call (no deadline, no metadata, a unary method it may run) is
        # looked at here, with no coroutine of its own; the rest takes _serve's way.
        if len(body) >= _HEAD_SIZE:
            _, _, flags, size = env.CALL_HEAD.unpack_from(body)
            end = _HEAD_SIZE + size
            if not flags & _NOT_PLAIN and len(body) >= end:
                method = self._unary.get(body[_HEAD_SIZE:end])
                if method is not None and (method.idempotent or not flags & env.FLAG_IDEMPOTENT):
                    return self._run(method, flags, None, None, body[end:], connection, False)
        return self._serve(body, connection, False)

    async def call_handler(self, call: IncomingCall) -> None:
        """Serve one streaming call: the :data:`~monte_trio.CallHandler` of the router's
        streaming methods (:ref:`services-streaming`).

        Pass it as ``call_handler=router.call_handler`` beside ``handler=router`` (to a
        :class:`~monte_trio.Server`, :func:`~monte_trio.open_client` or a connection).
        The call's first message is the call envelope; each item travels as one
        message, encoded with the connection's codec; a refusal or the method's
        exception is the call's last message, an error reply as a unary call's.
        """
        from ._streaming import serve_streaming_call

        await serve_streaming_call(self, call)

    async def _not_a_call(self, request: Request) -> bytes | None:
        fallback = self._fallback
        if fallback is not None:
            if isinstance(fallback, InlineHandler):
                return fallback.func(request)
            return await fallback(request)
        if request.oneway:
            logger.warning(
                "%s: dropped a one-way message that is not a method call",
                request.connection.name,
            )
            return None
        return _error(MethodErrorCode.INVALID_CALL, "this body is not a method call")

    async def _serve_oneway(self, body: bytes, conn: Connection) -> None:
        reply = await self._serve(body, conn, True)
        if reply[1] == env.ERROR:
            code, _, message, _ = env.decode_error(reply)
            logger.warning(
                "%s: a method called by a one-way message failed (%s): %s",
                conn.name,
                MethodErrorCode(code).name,
                message,
            )

    async def _serve(self, body: bytes, conn: Connection, oneway: bool) -> bytes:
        """The reply to one call envelope (for a one-way call, only its outcome)."""
        found = self._look_up(body)
        if isinstance(found, bytes):
            return found
        method, flags, remaining, metadata, payload = found
        if method.kind != UNARY:
            return _error(
                MethodErrorCode.INVALID_CALL,
                f"{method.name!r} is a {method.kind} method: call it with stream() or "
                "stream_call(), not call(); it was not run",
            )
        refused = _not_idempotent(method, flags)
        if refused is not None:
            return refused
        return await self._run(method, flags, remaining, metadata, payload, conn, oneway)

    def _look_up(
        self, body: bytes
    ) -> tuple[_Method, int, float | None, dict[str, str] | None, bytes] | bytes:
        """The method a call envelope names, and the envelope's flags, remaining time,
        metadata and arguments; or the error reply that refuses it (the envelope is
        malformed, or no method has that name)."""
        try:
            name, flags, remaining, metadata, payload = env.decode_call(body)
        except env.EnvelopeError as exc:
            return _error(MethodErrorCode.INVALID_CALL, str(exc))
        method = self._methods.get(name)
        if method is None:
            shown = name if len(name) <= 200 else name[:200] + "..."
            return _error(MethodErrorCode.NOT_FOUND, f"no method named {shown!r}")
        return method, flags, remaining, metadata, payload

    async def _run(
        self,
        method: _Method,
        flags: int,
        remaining: float | None,
        metadata: dict[str, str] | None,
        payload: bytes,
        conn: Connection,
        oneway: bool,
    ) -> bytes:
        """The reply of a unary method the call may run (its statistics recorded)."""
        name = method.name
        start = trio.current_time()
        failed = True
        try:
            if remaining is not None and remaining <= 0:
                return _arrived_late(name)
            codec = get_codec(conn._config.codec)
            try:
                args, kwargs = _arguments(method, flags, payload, codec)
            except _Refusal as refusal:
                return _error(refusal.code, refusal.message)
            del payload
            deadline = math.inf if remaining is None else start + remaining
            token = _serving.set(
                (method.name, args, kwargs, conn, flags, deadline, metadata, oneway, UNARY)
            )
            try:
                if remaining is None:  # no cancel scope to pay for
                    if self._middleware:
                        result = await self._through_middleware(
                            method, args, kwargs, conn, flags, deadline, metadata, oneway
                        )
                    elif kwargs:
                        result = await method.func(*args, **kwargs)
                    else:
                        result = await method.func(*args)
                else:
                    pool = conn._handlers
                    worker_scope = pool.deadline_scope(deadline)
                    if worker_scope is None:
                        with trio.move_on_at(deadline) as scope:
                            result = await self._through_middleware(
                                method, args, kwargs, conn, flags, deadline, metadata, oneway
                            )
                        passed = scope.cancelled_caught
                    else:  # the handler worker's scope carries the deadline
                        passed = False
                        try:
                            result = await self._through_middleware(
                                method, args, kwargs, conn, flags, deadline, metadata, oneway
                            )
                        except Exception:
                            raise
                        except BaseException as exc:  # Cancelled, or a group holding it
                            if not pool.deadline_passed(worker_scope):
                                raise
                            # Caught as move_on_at would have: the cancellation, not
                            # what else the method raised with it.
                            rest = without_cancelled(exc)
                            if rest is not None:
                                raise rest from None
                            passed = True
                        finally:
                            pool.end_deadline(worker_scope)
                    if passed:
                        return _cut_short(name, remaining)
            except Exception as exc:
                return _exception_reply(exc, name, conn, codec)
            finally:
                _serving.reset(token)
            if result is None:
                failed = False
                return env.RESULT_PREFIX + codec.null
            if isinstance(result, bytes | bytearray | memoryview):
                failed = False
                return env.RAW_PREFIX + bytes(result)
            try:
                encoded = codec.encode(result)
            except CodecError as exc:
                return _error(
                    MethodErrorCode.INTERNAL, f"the result of {name!r} could not be encoded: {exc}"
                )
            failed = False
            return env.RESULT_PREFIX + encoded
        finally:
            method.record(failed, trio.current_time() - start)

    async def _through_middleware(
        self,
        method: _Method,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        conn: Connection,
        flags: int,
        deadline: float,
        metadata: dict[str, str] | None,
        oneway: bool,
    ) -> Any:
        """Run the method through the middleware (if any)."""
        if not self._middleware:
            return await method.func(*args, **kwargs)
        info = _served_info(
            method.name, args, kwargs, conn, flags, deadline, metadata, oneway, UNARY
        )

        async def last() -> Any:
            return await method.func(*args, **kwargs)

        return await run_middleware(self._middleware, info, last)


_HEAD_SIZE = env.CALL_HEAD.size
_NOT_PLAIN = env.FLAG_DEADLINE | env.FLAG_METADATA | env.FLAGS_RESERVED
"""The flags that take a call the general way (:meth:`Router._serve`)."""


def _error(code: MethodErrorCode, message: str, name: str = "", details: bytes = b"") -> bytes:
    return env.encode_error(code, name, message, details)


def _not_idempotent(method: _Method, flags: int) -> bytes | None:
    """The refusal of a call marked idempotent to a method not declared so, if it is one."""
    if flags & env.FLAG_IDEMPOTENT and not method.idempotent:
        return _error(
            MethodErrorCode.NOT_IDEMPOTENT,
            f"{method.name!r} is not declared idempotent here, but the call was marked "
            "idempotent; it was not run",
        )
    return None


def _arrived_late(name: str) -> bytes:
    """The refusal of a call whose deadline had passed when it arrived."""
    return _error(
        MethodErrorCode.DEADLINE_EXCEEDED,
        f"the caller's deadline had passed when {name!r} arrived; it was not run",
    )


def _cut_short(name: str, remaining: float) -> bytes:
    """The reply of a method its caller's deadline cancelled."""
    return _error(
        MethodErrorCode.DEADLINE_EXCEEDED,
        f"the caller's deadline passed while {name!r} ran ({remaining:.6f} s); it was cancelled",
    )


def _arguments(
    method: _Method, flags: int, payload: bytes, codec: Codec
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call's arguments, decoded and checked against the method's parameters."""
    if flags & env.FLAG_RAW:
        args: tuple[Any, ...] = (payload,)
        kwargs: dict[str, Any] = {}
    else:
        if codec.typed:
            decoder = method.arguments_decoder(codec)
            if decoder is not None:
                try:
                    decoded_args, _ = decoder(payload)
                except Exception:
                    pass  # the general way below refuses it, saying why (or takes it)
                else:
                    return decoded_args, {}
        try:
            decoded = codec.decode(payload)
        except CodecError as exc:
            raise _Refusal(MethodErrorCode.INVALID_ARGUMENTS, f"the arguments: {exc}") from exc
        if (
            not isinstance(decoded, list | tuple)
            or len(decoded) != 2
            or not isinstance(decoded[0], list | tuple)
            or not isinstance(decoded[1], dict)
            or (decoded[1] and not all(isinstance(key, str) for key in decoded[1]))
        ):
            raise _Refusal(
                MethodErrorCode.INVALID_ARGUMENTS,
                "the arguments are not [positional array, keyword map]",
            )
        args, kwargs = tuple(decoded[0]), decoded[1]
    signature = method.signature
    if signature is None:
        return args, kwargs
    if method.arity == len(args) and not kwargs and not codec.typed:
        return args, kwargs
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise _Refusal(
            MethodErrorCode.INVALID_ARGUMENTS,
            f"{method.name!r} cannot take these arguments: {exc}",
        ) from None
    if codec.typed:
        hints = method.annotations()
        for pname, value in bound.arguments.items():
            annotation = hints.get(pname)
            if annotation is None:
                continue
            kind = signature.parameters[pname].kind
            try:
                if kind is inspect.Parameter.VAR_POSITIONAL:
                    converted: Any = tuple(codec.convert(v, annotation) for v in value)
                elif kind is inspect.Parameter.VAR_KEYWORD:
                    converted = {k: codec.convert(v, annotation) for k, v in value.items()}
                else:
                    converted = codec.convert(value, annotation)
            except CodecError as exc:
                raise _Refusal(
                    MethodErrorCode.INVALID_ARGUMENTS, f"argument {pname!r}: {exc}"
                ) from exc
            bound.arguments[pname] = converted
    return bound.args, bound.kwargs


def _exception_reply(exc: Exception, method: str, conn: Connection, codec: Codec) -> bytes:
    """The error reply for the exception a method raised."""
    name = registered_name(exc)
    details: Any = None
    if name is not None:
        code = MethodErrorCode.APPLICATION
        message = str(exc)
        details = getattr(exc, "details", None)
    else:
        code = MethodErrorCode.INTERNAL
        name = ""
        logger.error("%s: method %s raised", conn.name, printable(method[:200]), exc_info=exc)
        config = conn._config
        if not config.expose_errors:
            message = "the method raised an exception"
        elif config.expose_tracebacks:
            message = "".join(traceback.format_exception(exc))
        else:
            message = f"{type(exc).__name__}: {exc}"
    encoded = b""
    if details is not None:
        try:
            encoded = codec.encode(details)
        except CodecError as error:
            message += f" (its details could not be encoded: {error})"
    return _error(code, message, name, encoded)
