"""``monte-trio serve``: an echo server that stops gracefully on SIGINT or SIGTERM.

It serves methods through a :class:`~monte_trio.Router`: ``echo`` (returns its argument,
or the list of its arguments if there are several) and ``info`` (the version, the uptime,
connection and request counts). Bodies that are not method calls (``bench``'s raw bytes)
go to the router's fallback, the raw :func:`echo` handler. On the native profile it also
echoes byte streams (:class:`StreamEcho`): every byte back, then the end of the stream
once the client has half-closed its own.

It handles its own signals (rather than through ``_interrupt.interruptible``)
because a service's stop is not an interruption: the first signal starts a graceful
shutdown (exit status 130 after SIGINT, 0 after SIGTERM), a second one stops at once.
"""

from __future__ import annotations

import argparse
import functools
import logging
import signal
from typing import Any

import trio

from .._config import ConnectionConfig
from .._connection import Request
from .._server import Server
from .._services._router import Router
from .._streams import Stream
from .._version import __version__
from ._errors import CommandFailed, describe
from ._options import Job, add_command, add_security_options, port, positive_int
from ._output import format_address, say
from ._security import Security, resolve_security

__all__ = ["StreamEcho", "add_parser", "echo", "run", "service_router"]

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_ECHO_READ = 256 * 1024
"""Bytes a stream echo reads at a time (what has arrived, up to this, is sent back at once)."""


async def echo(request: Request) -> bytes | None:
    """Reply to each request with its body (one-way messages are only counted)."""
    return None if request.oneway else request.body


class StreamEcho:
    """The stream handler of ``serve``: echoes every byte of each stream and counts them.

    Reading and writing take turns in one task, so a client that stops reading the echo
    stops the echo, which stops reading: flow control carries that back to the client's
    writer, and nothing accumulates here beyond the stream's window. A stream the client
    abandons (reset, or its connection lost) ends quietly: that is not the server's error.
    """

    def __init__(self) -> None:
        self.streams = 0
        """Streams echoed to their end (the client half-closed, the echo ended too)."""
        self.bytes = 0
        """Bytes echoed, on every stream."""

    async def __call__(self, stream: Stream) -> None:
        """Serve ``stream``: a :data:`~monte_trio.StreamHandler`."""
        try:
            while data := await stream.receive_some(_ECHO_READ):
                await stream.send_all(data)
                self.bytes += len(data)
            await stream.send_eof()
        except trio.BrokenResourceError:  # StreamReset included: the client gave up
            return
        self.streams += 1


def service_router(server: Server) -> Router:
    """The methods ``serve`` exposes: ``echo`` and ``info`` (about ``server``), with the raw
    :func:`echo` handler as the fallback for bodies that are not method calls."""
    router = Router(fallback=echo)
    started = trio.current_time()

    @router.method("echo")
    async def echo_method(*args: Any) -> Any:
        return args[0] if len(args) == 1 else list(args)

    @router.method("info")
    async def info() -> dict[str, Any]:
        stats = server.statistics()
        return {
            "version": __version__,
            "uptime": round(trio.current_time() - started, 3),
            "connections": {
                "active": stats.connections_active,
                "accepted": stats.connections_accepted,
                "refused": stats.connections_refused,
            },
            "requests": stats.requests_received,
            "messages": stats.messages_received,
        }

    return router


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``serve`` command and its options to ``commands``."""
    serve = add_command(
        commands,
        "serve",
        summary="run an echo server",
        description="An echo server: replies to each request with its body and counts "
        "one-way messages; serves the methods echo (returns its arguments) and info "
        "(version, uptime, connection counts) to 'call'; on the native profile, echoes "
        "every byte of each stream a client opens ('bench --mode stream'), then ends it "
        "when the client half-closes. The native profile needs --trust. "
        "SIGINT (Ctrl-C) or SIGTERM stops it gracefully (exit status 130 after SIGINT, 0 "
        "after SIGTERM).",
        run=run,
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=port, default=0, help="port to listen on (0: a free port)")
    add_security_options(serve, who="client")
    serve.add_argument(
        "--max-conns",
        type=positive_int,
        default=256,
        help="established connections served at once (each may hold up to about 15 MiB with "
        "the standard limits: see the Reliability page)",
    )
    serve.add_argument(
        "--max-handshakes",
        type=positive_int,
        default=128,
        help="sockets accepted but not yet connected; a new one evicts the oldest "
        "unfinished handshake",
    )
    serve.add_argument(
        "--max-record-size",
        type=positive_int,
        default=None,
        metavar="BYTES",
        help="largest record accepted (default: the profile's; monte-v1 uses 4096, so "
        "raise it to bench monte-v1 with --size above 4076)",
    )
    serve.add_argument(
        "--codec",
        choices=("json", "msgpack"),
        default="json",
        help="the codec of method calls (msgpack needs msgspec); clients must use the same",
    )
    serve.add_argument(
        "--log-level",
        choices=_LOG_LEVELS,
        type=str.upper,
        default=None,
        help="log the library's messages at this level and above on stderr (default: WARNING)",
    )
    serve.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log more: -v is --log-level INFO, -vv DEBUG",
    )


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Job:
    """Resolve the security options; return the work: serve until a signal."""
    security = resolve_security(parser, args, who="client")
    try:
        ConnectionConfig(codec=args.codec)
    except ValueError as exc:
        parser.error(f"--codec: {exc}")
    level = args.log_level or ("DEBUG" if args.verbose >= 2 else "INFO" if args.verbose else None)
    if level is not None:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("monte_trio").setLevel(level)
    return functools.partial(_serve, args, security)


def _listener_address(listener: trio.SocketListener) -> str:
    name = listener.socket.getsockname()
    return format_address(str(name[0]), int(name[1]))


async def _serve(args: argparse.Namespace, security: Security) -> int:
    config = ConnectionConfig(max_record_size=args.max_record_size, codec=args.codec)
    router = Router(fallback=echo)
    stream_echo = StreamEcho()
    server = Server(
        router,
        stream_handler=stream_echo,
        handshake=security.handshake,
        identity=security.identity,
        trust=security.trust,
        psk=security.psk,
        config=config,
        max_conns=args.max_conns,
        max_handshakes=args.max_handshakes,
    )
    router.include(service_router(server))
    status = 0
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            try:
                listeners = await nursery.start(server.serve, args.port, args.host)
            except OSError as exc:
                address = format_address(args.host, args.port)
                detail = describe(exc)
                if address in detail:
                    raise
                raise CommandFailed(f"cannot listen on {address}: {detail}") from exc
            say(f"listening on {_listener_address(listeners[0])}")
            if security.identity is not None:
                say(f"public key: {security.identity.public_key}")
            for extra in listeners[1:]:
                say(f"also listening on {_listener_address(extra)}")
            async for signum in signals:
                say(f"received {signal.Signals(signum).name}, shutting down gracefully")
                # Ctrl-C: the conventional status of an interrupted command; SIGTERM: the
                # normal way to stop a service, so a success.
                status = 130 if signum == signal.SIGINT else 0
                break

            async def shut_down(stopper: trio.Nursery) -> None:
                await server.shutdown()
                stopper.cancel_scope.cancel()

            async with trio.open_nursery() as stopper:
                stopper.start_soon(shut_down, stopper)
                async for signum in signals:
                    say(f"received {signal.Signals(signum).name} again, stopping now")
                    nursery.cancel_scope.cancel()
                    stopper.cancel_scope.cancel()
                    break
    stats = server.statistics()
    say(
        f"server stopped: {stats.connections_accepted} connections, "
        f"{stats.requests_received} requests, {stats.messages_received} one-way messages, "
        f"{stats.handshake_failures} failed handshakes, {stream_echo.streams} streams echoed"
    )
    return status
