"""Shared fixtures and helpers of the core (Trio layer) tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypedDict

import pytest
import trio
import trio.testing

import monte_trio
from monte_trio import (
    Connection,
    ConnectionConfig,
    Handler,
    Handshake,
    Request,
    Server,
)
from monte_trio.testing import FaultyNetwork, open_connection_pair

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack is Python 3.11+

LOCALHOST = "127.0.0.1"

PROFILES = ["monte-v1", "native"]


class LiveTasks(trio.abc.Instrument):
    """The tasks spawned while this instrument is installed that have not exited yet."""

    def __init__(self) -> None:
        self.tasks: set[trio.lowlevel.Task] = set()

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.tasks.add(task)

    def task_exited(self, task: trio.lowlevel.Task) -> None:
        self.tasks.discard(task)


@asynccontextmanager
async def no_task_left() -> AsyncIterator[LiveTasks]:
    """Assert, on a clean exit, that every task spawned inside the block has exited."""
    live = LiveTasks()
    trio.lowlevel.add_instrument(live)
    try:
        yield live
        await trio.testing.wait_all_tasks_blocked()
        leaked = sorted(task.name for task in live.tasks)
        assert not leaked, f"tasks left running: {leaked}"
    finally:
        trio.lowlevel.remove_instrument(live)


class Proc:
    """A subprocess under test: its stdout read line by line, its stdin written to."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self._buffer = b""
        self.seen: list[str] = []

    async def readline(self) -> str:
        assert self.process.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self.process.stdout.receive_some(4096)
            if not chunk:
                raise AssertionError(f"EOF on stdout; the process printed {self.seen!r}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        text = line.decode()
        self.seen.append(text)
        return text

    async def expect(self, prefix: str) -> str:
        """Read lines until one starts with ``prefix``; return it."""
        while True:
            line = await self.readline()
            if line.startswith(prefix):
                return line

    async def type_line(self, text: str) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(text.encode() + b"\n")

    async def close_stdin(self) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.aclose()

    async def read_rest(self) -> str:
        """The rest of stdout, up to EOF."""
        assert self.process.stdout is not None
        chunks: list[bytes | bytearray] = [self._buffer]
        self._buffer = b""
        while chunk := await self.process.stdout.receive_some(4096):
            chunks.append(chunk)
        return b"".join(chunks).decode()

    async def read_stderr(self) -> str:
        """All of stderr, up to EOF."""
        assert self.process.stderr is not None
        chunks: list[bytes | bytearray] = []
        while chunk := await self.process.stderr.receive_some(4096):
            chunks.append(chunk)
        return b"".join(chunks).decode()

    async def finish(self) -> tuple[int, str, str]:
        """Wait for EOF and exit; return (status, rest of stdout, stderr)."""
        out = await self.read_rest()
        err = await self.read_stderr()
        return await self.process.wait(), out, err


def make_handshake(name: str) -> Handshake:
    """A fresh handshake of the profile ``name`` (``"monte-v1"`` or ``"native"``)."""
    if name == "monte-v1":
        return monte_trio.MonteV1Handshake()
    noise = getattr(monte_trio, "NoiseHandshake", None)
    if noise is None:
        pytest.skip("native profile not built yet")
    handshake: Handshake = noise(
        identity=monte_trio.Identity.generate(), trust=monte_trio.AcceptAnyKey()
    )
    return handshake


@pytest.fixture(params=PROFILES)
def profile(request: pytest.FixtureRequest) -> Handshake:
    """A Handshake of each wire profile; native is skipped until it exists."""
    name: str = request.param
    return make_handshake(name)


@pytest.fixture
def monte_v1() -> Handshake:
    """The monte-v1 handshake, for behaviour specific to that profile."""
    return monte_trio.MonteV1Handshake()


@pytest.fixture
def native() -> Handshake:
    """The native handshake, for behaviour specific to that profile."""
    return make_handshake("native")


def is_native(handshake: Handshake) -> bool:
    return handshake.profile == "native"


async def echo(request: Request) -> bytes:
    """A handler that replies with the request body."""
    await trio.lowlevel.checkpoint()
    return request.body


@asynccontextmanager
async def running_server(
    handler: Handler, handshake: Handshake, *, port: int = 0, **kwargs: Any
) -> AsyncIterator[tuple[Server, int]]:
    """Serve ``handler`` on 127.0.0.1 (``port``, or a free one); yield ``(server, port)``.

    The server is shut down gracefully when the block ends (if it was not already).
    """
    server = Server(handler, handshake=handshake, **kwargs)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(server.serve, port, LOCALHOST)
        port = listeners[0].socket.getsockname()[1]
        try:
            yield server, port
        finally:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + 10
                if not server._stopped.is_set():
                    await server.shutdown(grace_period=1.0)
            nursery.cancel_scope.cancel()


class PairOptions(TypedDict, total=False):
    """What ``open_connection_pair`` takes besides the handshake and the transports."""

    client_handler: Handler | None
    server_handler: Handler | None
    config: ConnectionConfig | None
    client_config: ConnectionConfig | None
    server_config: ConnectionConfig | None


@asynccontextmanager
async def network_connection_pair(
    handshake: Handshake, net: FaultyNetwork, **options: Unpack[PairOptions]
) -> AsyncIterator[tuple[Connection, Connection]]:
    """Like ``open_connection_pair``, over a link of ``net`` (host "client" to "server"),
    so that tests can stall, drop or cut it."""
    listener = net.listen("server")
    try:
        raw_client = await net.connect("server")
        raw_server = await listener.accept()
    finally:
        await listener.aclose()
    async with open_connection_pair(
        handshake, transports=(raw_client, raw_server), **options
    ) as pair:
        yield pair


def socket_stream_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """Two connected ``trio.SocketStream`` (a socket pair): real sockets, no network."""
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


@asynccontextmanager
async def socket_connection_pair(
    handshake: Handshake, **options: Unpack[PairOptions]
) -> AsyncIterator[tuple[Connection, Connection]]:
    """Like ``open_connection_pair``, over a socket pair, so that the paths that need a
    record-safe stream (direct writes) are taken."""
    async with open_connection_pair(handshake, transports=socket_stream_pair(), **options) as pair:
        yield pair
