"""OpenTelemetry-style tracing spans from middleware, on both sides, with no dependency.

Run it (a server and a client in one process, on 127.0.0.1)::

    python examples/tracing.py

Each call makes two spans: the client's (``open_client(middleware=...)``) and the
server's (``Router(middleware=...)``), each with the method as its name, the peer's key,
the duration and the outcome. They share a trace id, and the server's span is a child of
the client's: the context travels in the call's metadata, where the client's middleware
writes a W3C ``traceparent`` before the call is encoded and the server's middleware reads
it (``CallInfo.metadata``); the methods themselves take no tracing argument. The spans are
printed, one line each, as they end (an exporter would send them instead)::

    span trace=4bf9... id=00f0... parent=5c6e... client price 11.1 ms peer=nLRLuqRA outcome=ok

Exits 0, 1 on an error, 130 if stopped with Ctrl-C.
"""

from __future__ import annotations

import contextvars
import secrets
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import attrs
import trio

import monte_trio

Next = Callable[[], Awaitable[object]]


@attrs.define
class Span:
    """One span: its ids, name and attributes (as OpenTelemetry has them)."""

    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_id: str | None
    name: str
    kind: str  # "client", "server" or "internal"
    start: float
    attributes: dict[str, str] = attrs.Factory(dict)

    @property
    def traceparent(self) -> str:
        """This span as a W3C ``traceparent`` header: its children's parent."""
        return f"00-{self.trace_id}-{self.span_id}-01"


current_span: contextvars.ContextVar[Span | None] = contextvars.ContextVar(
    "current_span", default=None
)


def parse_traceparent(header: object) -> tuple[str, str] | None:
    """``(trace_id, parent span_id)`` from a ``traceparent``, ``None`` if it is not one."""
    if not isinstance(header, str):
        return None
    parts = header.split("-")
    if len(parts) != 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    return parts[1], parts[2]


@contextmanager
def span(name: str, kind: str, parent: tuple[str, str] | None = None) -> Iterator[Span]:
    """Open a span, the current one (or ``parent``, from the wire) being its parent; make
    it current inside the block; print it when the block ends."""
    if parent is None:
        outer = current_span.get()
        parent = (outer.trace_id, outer.span_id) if outer is not None else None
    trace_id, parent_id = parent if parent is not None else (secrets.token_hex(16), None)
    new = Span(trace_id, secrets.token_hex(8), parent_id, name, kind, trio.current_time())
    token = current_span.set(new)
    try:
        yield new
    finally:
        current_span.reset(token)
        export(new, trio.current_time() - new.start)


def export(ended: Span, duration: float) -> None:
    """Print the span (an exporter would send it to a collector)."""
    shown = " ".join(f"{key}={value}" for key, value in ended.attributes.items())
    print(
        f"span trace={ended.trace_id} id={ended.span_id} parent={ended.parent_id or '-'} "
        f"{ended.kind} {ended.name} {duration * 1000:.1f} ms {shown}",
        flush=True,
    )


async def traced(
    kind: str, parent: tuple[str, str] | None, call: monte_trio.CallInfo, next: Next
) -> object:
    with span(call.method, kind, parent) as current:
        key = call.peer_public_key
        current.attributes["peer"] = str(key)[:8] if key is not None else "-"
        if kind == "client":  # pass this span on: the server's span is its child
            call.metadata["traceparent"] = current.traceparent
        try:
            result = await next()
        except Exception as exc:
            current.attributes["outcome"] = f"error:{type(exc).__name__}"
            raise
        current.attributes["outcome"] = "ok"
        return result


async def client_tracing(call: monte_trio.CallInfo, next: Next) -> object:
    """Client middleware: a client span, child of the caller's current span."""
    return await traced("client", None, call, next)


async def server_tracing(call: monte_trio.CallInfo, next: Next) -> object:
    """Server middleware: a server span, child of the client span named on the wire."""
    parent = parse_traceparent(call.metadata.get("traceparent"))
    return await traced("server", parent, call, next)


@monte_trio.remote_error("shop.OutOfStock")
class OutOfStock(Exception):
    """The item is not sold here."""


PRICES = {"tea": 3.5, "cake": 4.0}


def make_router() -> monte_trio.Router:
    router = monte_trio.Router(middleware=[server_tracing])

    @router.method
    async def price(item: str) -> float:
        await trio.sleep(0.01)  # the work the span measures
        if item not in PRICES:
            raise OutOfStock(f"no {item!r} here")
        return PRICES[item]

    return router


async def main() -> int:
    server = monte_trio.Server(make_router(), trust=monte_trio.AcceptAnyKey())
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(server.serve, 0, "127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        async with monte_trio.open_client(
            "127.0.0.1", port, trust=monte_trio.AcceptAnyKey(), middleware=[client_tracing]
        ) as client:
            with span("checkout", "internal") as root:  # the caller's own span
                root.attributes["items"] = "tea,cake,pie"
                total = 0.0
                for item in ("tea", "cake", "pie"):
                    try:
                        total += await client.call("price", item)
                    except OutOfStock as exc:
                        print(f"skipped: {exc}", flush=True)
                print(f"total: {total:.2f}", flush=True)
        nursery.cancel_scope.cancel()
    return 0


if __name__ == "__main__":
    try:
        status = trio.run(main)
    except monte_trio.MonteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        status = 130
    sys.exit(status)
