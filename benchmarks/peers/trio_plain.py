"""Peer "trio-plain": plain trio TCP, monte's framing, no encryption (the ceiling)."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio

from ..common import BenchClient, OpenClient, PeerOptions, ServerState
from ._trio_framing import ECHO_MARKER, open_framed_client, serve_framed
from ._trio_support import run_trio_server

FRAMEWORK = "trio"
NOTES: dict[str, dict[str, str]] = {}
STREAM_PEERS = {"trio-plain": ("StreamEcho",)}
"""StreamEcho moves the same bytes over a connection of its own, echoed raw."""


def unavailable_reason(name: str) -> str | None:
    return None


def run_server(
    name: str, port: int, opts: PeerOptions, state: ServerState, ready: Callable[[int], None]
) -> None:
    serve = functools.partial(serve_framed, streams=opts.streams)
    run_trio_server(serve, ready, state, port, opts.host, None)


async def _dial(port: int, opts: PeerOptions) -> trio.abc.Stream:
    return await trio.open_tcp_stream(opts.host, port)


def client_opener(name: str) -> OpenClient:
    @asynccontextmanager
    async def open_client(
        port: int, opts: PeerOptions, max_conns: int
    ) -> AsyncIterator[BenchClient]:
        async with open_framed_client(functools.partial(_dial, port, opts), max_conns) as client:
            yield client

    return open_client


async def open_echo_stream(client: BenchClient, port: int, opts: PeerOptions) -> trio.abc.Stream:
    """A TCP connection of its own that the server echoes raw (the stream workloads)."""
    stream = await _dial(port, opts)
    await stream.send_all(bytes([ECHO_MARKER]))
    return stream
