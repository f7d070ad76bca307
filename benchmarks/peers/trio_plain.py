"""Peer "trio-plain": plain trio TCP, monte's framing, no encryption (the ceiling)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio

from ..common import BenchClient, OpenClient, PeerOptions, ServerState
from ._trio_framing import open_framed_client, serve_framed
from ._trio_support import run_trio_server

FRAMEWORK = "trio"
NOTES: dict[str, dict[str, str]] = {}


def unavailable_reason(name: str) -> str | None:
    return None


def run_server(
    name: str, port: int, opts: PeerOptions, state: ServerState, ready: Callable[[int], None]
) -> None:
    run_trio_server(serve_framed, ready, state, port, opts.host, None)


def client_opener(name: str) -> OpenClient:
    @asynccontextmanager
    async def open_client(
        port: int, opts: PeerOptions, max_conns: int
    ) -> AsyncIterator[BenchClient]:
        async def dial() -> trio.abc.Stream:
            return await trio.open_tcp_stream(opts.host, port)

        async with open_framed_client(dial, max_conns) as client:
            yield client

    return open_client
