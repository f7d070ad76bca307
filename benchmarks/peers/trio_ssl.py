"""Peer "trio-ssl": trio.SSLStream (TLS 1.3 only, verified self-signed cert), same framing."""

from __future__ import annotations

import functools
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio

from ..common import BenchClient, OpenClient, PeerOptions, ServerState, tls_files
from ._trio_framing import ECHO_MARKER, open_framed_client, serve_framed
from ._trio_support import run_trio_server

FRAMEWORK = "trio"
NOTES: dict[str, dict[str, str]] = {}
STREAM_PEERS = {"trio-ssl": ("StreamEcho",)}
"""StreamEcho moves the same bytes over a connection of its own, echoed raw."""


def unavailable_reason(name: str) -> str | None:
    if not getattr(ssl, "HAS_TLSv1_3", False):
        return "this Python's ssl module has no TLS 1.3"
    return None


@functools.lru_cache(maxsize=4)
def server_context(opts: PeerOptions) -> ssl.SSLContext:
    files = tls_files(opts.tls_dir)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(files.cert, files.key)
    return ctx


@functools.lru_cache(maxsize=4)
def client_context(opts: PeerOptions) -> ssl.SSLContext:
    files = tls_files(opts.tls_dir)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(files.cert))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def run_server(
    name: str, port: int, opts: PeerOptions, state: ServerState, ready: Callable[[int], None]
) -> None:
    ctx = server_context(opts)

    async def wrap(sock: trio.SocketStream) -> trio.abc.Stream:
        stream = trio.SSLStream(sock, ctx, server_side=True)
        with trio.fail_after(10):
            await stream.do_handshake()
        return stream

    serve = functools.partial(serve_framed, streams=opts.streams)
    run_trio_server(serve, ready, state, port, opts.host, wrap)


async def _dial(port: int, opts: PeerOptions) -> trio.abc.Stream:
    sock = await trio.open_tcp_stream(opts.host, port)
    stream = trio.SSLStream(sock, client_context(opts), server_hostname="localhost")
    with trio.fail_after(10):
        await stream.do_handshake()
    return stream


def client_opener(name: str) -> OpenClient:
    @asynccontextmanager
    async def open_client(
        port: int, opts: PeerOptions, max_conns: int
    ) -> AsyncIterator[BenchClient]:
        async with open_framed_client(functools.partial(_dial, port, opts), max_conns) as client:
            yield client

    return open_client


async def open_echo_stream(client: BenchClient, port: int, opts: PeerOptions) -> trio.abc.Stream:
    """A TLS connection of its own that the server echoes raw (the stream workloads)."""
    stream = await _dial(port, opts)
    await stream.send_all(bytes([ECHO_MARKER]))
    return stream
