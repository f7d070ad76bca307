"""Peers "monte-native" and "monte-v1": monte_trio itself.

Written against the API described in the benchmark brief (Server, open_client, Request,
ConnectionConfig, MonteV1Handshake, NativeHandshake, Identity, AcceptAnyKey). If that API is
not importable, ``unavailable_reason`` says what is missing and the suite skips these peers;
no figure is ever made up for them.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from .. import BIG_SIZE, STREAMED_MESSAGE_SIZE
from ..common import (
    STREAMED_DISTINCT,
    BenchClient,
    OpenClient,
    PeerOptions,
    ServerState,
    parse_streaming_request,
    streamed_payloads,
)
from ._trio_support import run_trio_server

FRAMEWORK = "trio"
NOTES: dict[str, dict[str, str]] = {
    "monte-native": {
        "ParallelMethod": "Router method, json codec, one 1400 B str argument",
        "ParallelMethodStruct": "Router method via a proxy, msgpack, a 6-field Struct",
        "ServerStreaming": "a download call; the handler is an async generator",
    }
}
METHOD_PEERS = ("monte-native",)
"""The peers that run the method workloads (the others have no counterpart of them)."""
STREAM_PEERS = {
    "monte-native": ("StreamEcho", "ShortStreams", "LatencyUnderBulk", "ServerStreaming")
}
"""The stream workloads each peer runs (monte-v1 has no streams)."""
_ECHO_READ = 256 * 1024

_NEEDED = {
    "monte-v1": ("Server", "open_client", "ConnectionConfig", "MonteV1Handshake"),
    "monte-native": (
        "Server",
        "open_client",
        "ConnectionConfig",
        "NativeHandshake",
        "Identity",
        "AcceptAnyKey",
    ),
}
SERVER_MAX_CONNS = 20_000
_BIG_LIMIT = BIG_SIZE + 64 * 1024  # room for the 1 MiB body plus framing


def unavailable_reason(name: str) -> str | None:
    try:
        import monte_trio
    except ImportError as exc:
        return f"monte_trio is not importable ({exc})"
    missing = [a for a in _NEEDED[name] if not hasattr(monte_trio, a)]
    if missing:
        return "monte_trio does not provide " + ", ".join(missing) + " yet"
    return None


@functools.lru_cache(maxsize=2)
def _handshake(name: str) -> Any:
    """One handshake object (so one identity) per process, reused by every connection."""
    import monte_trio

    if name == "monte-v1":
        return monte_trio.MonteV1Handshake()
    return monte_trio.NativeHandshake(
        identity=monte_trio.Identity.generate(), trust=monte_trio.AcceptAnyKey()
    )


def _config(name: str, big: bool, codec: str = "") -> Any:
    """A ConnectionConfig that admits 1 MiB messages (one record on monte-v1), or that
    uses ``codec`` for method calls."""
    import monte_trio

    if codec:
        return monte_trio.ConnectionConfig(codec=codec)
    if not big:
        return monte_trio.ConnectionConfig()
    if name == "monte-v1":
        return monte_trio.ConnectionConfig(max_record_size=_BIG_LIMIT, max_message_size=_BIG_LIMIT)
    # native: records stay at most 64 KiB, a 1 MiB message spans several of them
    return monte_trio.ConnectionConfig(max_message_size=_BIG_LIMIT)


def run_server(
    name: str, port: int, opts: PeerOptions, state: ServerState, ready: Callable[[int], None]
) -> None:
    import monte_trio

    reply = state.reply

    # A plain function, wrapped with monte_trio.inline: monte_trio runs it inline in the
    # connection's reader (it never awaits), as the trio peers answer inline in theirs and
    # Go monte runs its handlers.
    def answer(req: Any) -> bytes | None:
        if req.oneway:
            state.count += 1
            return None
        return reply(req.body)

    handler: Any = monte_trio.inline(answer)
    if opts.methods:
        handler = _method_router(state, handler)

    async def echo_stream(stream: Any) -> None:
        # Every byte back as it arrives, then the end once the client has half-closed.
        try:
            while data := await stream.receive_some(_ECHO_READ):
                await stream.send_all(data)
            await stream.send_eof()
        except trio.BrokenResourceError:
            pass  # the client gave up on the stream (a failed run says why on its side)

    async def stream_messages(call: Any) -> AsyncIterator[bytes]:
        # ServerStreaming: a download call's handler, an async generator.
        count, seed = parse_streaming_request(await call.receive())
        payloads = streamed_payloads(seed, STREAMED_MESSAGE_SIZE)
        mask = STREAMED_DISTINCT - 1
        for i in range(count):
            yield payloads[i & mask]

    async def serve(*, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        kwargs: dict[str, Any] = {}
        if "max_conns" in inspect.signature(monte_trio.Server).parameters:
            # the default (1024, like Go monte) would refuse the 10,000 idle connections
            kwargs["max_conns"] = SERVER_MAX_CONNS
        if opts.streams:
            kwargs["stream_handler"] = echo_stream
            kwargs["call_handler"] = stream_messages
        server = monte_trio.Server(
            handler,
            handshake=_handshake(name),
            config=_config(name, opts.big, opts.methods),
            **kwargs,
        )
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(server.serve, port, opts.host)
            task_status.started(listeners[0].socket.getsockname()[1])
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await server.shutdown(grace_period=0.5)

    run_trio_server(serve, ready)


def client_opener(name: str) -> OpenClient:
    import monte_trio

    @asynccontextmanager
    async def open_client(
        port: int, opts: PeerOptions, max_conns: int
    ) -> AsyncIterator[BenchClient]:
        async with monte_trio.open_client(
            opts.host,
            port,
            handshake=_handshake(name),
            max_conns=max_conns,
            config=_config(name, opts.big, opts.methods),
        ) as client:
            yield client

    return open_client


async def open_echo_stream(client: Any, port: int, opts: PeerOptions) -> Any:
    """A stream to the server's stream echo, on the client's connection."""
    return await client.open_stream()


def open_download(client: Any, request: bytes) -> Any:
    """ServerStreaming: a download call on the client's connection (``async for``)."""
    return client.download(request)


def _method_router(state: ServerState, fallback: Any) -> Any:
    """The method workloads' server: ``benchmarks.methods``' Router, whose ``store``
    method counts the call; control requests (raw bodies) go to ``fallback``."""
    from ..methods import make_router

    def count() -> None:
        state.requests += 1

    return make_router(count, fallback)


__all__ = [
    "client_opener",
    "open_download",
    "open_echo_stream",
    "run_server",
    "unavailable_reason",
]
