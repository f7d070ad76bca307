"""Connected pairs for tests: two :class:`~monte_trio.Connection` objects over memory.

No sockets, no real time: the pair runs under :class:`trio.testing.MockClock` and
autojump like any trio code, so timing tests are deterministic. Other raw streams (a
socket pair, a :class:`~monte_trio.testing.FaultyNetwork` link) can be given instead.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
import trio.testing

from .._calls_api import CallHandler
from .._config import ConnectionConfig
from .._connection import Connection, Handler
from .._handshake import Handshake
from .._secure_stream import SecureStream
from .._streams import StreamHandler

__all__ = ["open_connection_pair", "secure_stream_pair"]


async def secure_stream_pair(
    handshake: Handshake,
    *,
    server_handshake: Handshake | None = None,
    client_config: ConnectionConfig | None = None,
    server_config: ConnectionConfig | None = None,
    transports: tuple[trio.abc.Stream, trio.abc.Stream] | None = None,
) -> tuple[SecureStream, SecureStream]:
    """Run ``handshake`` on both ends of a memory stream pair; return (client, server).

    Args:
        handshake: the dialing side's handshake (and the accepting side's, unless
            ``server_handshake`` is given).
        server_handshake: a different handshake for the accepting side.
        client_config: the dialing side's limits.
        server_config: the accepting side's limits.
        transports: ``(client, server)`` raw streams to use instead of a memory stream
            pair: for example a :func:`trio.socket.socketpair` wrapped in
            :class:`trio.SocketStream`, or two ends of a
            :class:`~monte_trio.testing.FaultyNetwork` link.
    """
    client_raw, server_raw = transports or trio.testing.memory_stream_pair()
    peer = "memory:0" if transports is None else "transport:0"
    results: dict[bool, SecureStream] = {}

    async def run(
        initiator: bool, hs: Handshake, raw: trio.abc.Stream, config: ConnectionConfig
    ) -> None:
        results[initiator] = await hs.handshake(
            raw, initiator=initiator, peer=peer if initiator else None, config=config
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, True, handshake, client_raw, client_config or ConnectionConfig())
        nursery.start_soon(
            run,
            False,
            server_handshake or handshake,
            server_raw,
            server_config or ConnectionConfig(),
        )
    return results[True], results[False]


@asynccontextmanager
async def open_connection_pair(
    handshake: Handshake,
    *,
    server_handshake: Handshake | None = None,
    client_handler: Handler | None = None,
    server_handler: Handler | None = None,
    client_stream_handler: StreamHandler | None = None,
    server_stream_handler: StreamHandler | None = None,
    client_call_handler: CallHandler | None = None,
    server_call_handler: CallHandler | None = None,
    config: ConnectionConfig | None = None,
    client_config: ConnectionConfig | None = None,
    server_config: ConnectionConfig | None = None,
    transports: tuple[trio.abc.Stream, trio.abc.Stream] | None = None,
) -> AsyncIterator[tuple[Connection, Connection]]:
    """Open two connected :class:`~monte_trio.Connection` objects over memory streams.

    Yields ``(client, server)``: the client dialed (odd request ids), the server accepted.
    Both are closed gracefully when the block ends.

    Args:
        handshake: the handshake both sides run (or the client's, with ``server_handshake``).
        server_handshake: a different handshake for the server side.
        client_handler: serves requests the server sends.
        server_handler: serves requests the client sends.
        client_stream_handler: serves streams the server opens (see
            :data:`~monte_trio.StreamHandler`).
        server_stream_handler: serves streams the client opens.
        client_call_handler: serves streaming calls the server opens (see
            :data:`~monte_trio.CallHandler`).
        server_call_handler: serves streaming calls the client opens.
        config: limits for both sides, unless overridden per side.
        client_config: the client's limits.
        server_config: the server's limits.
        transports: ``(client, server)`` raw streams to use instead of memory streams
            (see :func:`secure_stream_pair`).
    """
    client_config = client_config or config
    server_config = server_config or config
    client_stream, server_stream = await secure_stream_pair(
        handshake,
        server_handshake=server_handshake,
        client_config=client_config,
        server_config=server_config,
        transports=transports,
    )
    async with (
        Connection(
            client_stream,
            handler=client_handler,
            config=client_config,
            name="client",
            stream_handler=client_stream_handler,
            call_handler=client_call_handler,
        ) as client,
        Connection(
            server_stream,
            handler=server_handler,
            config=server_config,
            name="server",
            stream_handler=server_stream_handler,
            call_handler=server_call_handler,
        ) as server,
    ):
        yield client, server
