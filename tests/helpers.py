"""Helpers shared by the tests: servers, handlers, connection pairs, subprocesses.

Tests import them as ``from helpers import ...`` (pytest puts ``tests/`` on ``sys.path``:
the default ``prepend`` import mode, ``tests/`` having no ``__init__.py``). Fixtures live in
``conftest.py``.
"""

from __future__ import annotations

import random
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import trio
import trio.testing

import monte_trio
from monte_trio import (
    Client,
    Connection,
    ConnectionConfig,
    Handler,
    Handshake,
    Request,
    Server,
)
from monte_trio.testing import FaultyNetwork, open_connection_pair, socket_stream

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack is Python 3.11+

LOCALHOST = "127.0.0.1"

PROFILES = ["monte-v1", "native"]


# -- tasks -----------------------------------------------------------------------------------


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


class WriterSteps(trio.abc.Instrument):
    """Counts the steps run by every connection's writer task (a call written directly by
    its caller costs the writer none)."""

    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith(" writer"):
            self.steps += 1


CREDIT_FLUSH_DELAY = 0.005
"""How long returned credit may wait for a write to ride on before the writer sends it
alone (monte_trio._connection)."""


async def assert_calls_written_by_callers(
    client: Connection, handshake: Handshake, rounds: int
) -> None:
    """Make ``rounds`` of a one-way message and a request (whose handler answers with the
    body reversed), one at a time on a quiet connection, and assert that the tasks that
    made them wrote them, and the handler's replies too: no connection's writer ran. The
    one exception is native credit: returned credit rides on the next write, and credit
    that found none is sent alone at most once per CREDIT_FLUSH_DELAY per connection (one
    wake-up, at most three steps each); writing the messages through the writers would
    take far more."""
    await trio.testing.wait_all_tasks_blocked()
    steps = WriterSteps()
    trio.lowlevel.add_instrument(steps)
    start = trio.current_time()
    try:
        for i in range(rounds):
            await client.send(b"note %d" % i)
            assert await client.request(b"abc%d" % i) == (b"abc%d" % i)[::-1]
    finally:
        trio.lowlevel.remove_instrument(steps)
    flushes = 2 * (1 + int((trio.current_time() - start) / CREDIT_FLUSH_DELAY))
    assert steps.steps <= (3 * flushes if is_native(handshake) else 0)


# -- subprocesses ----------------------------------------------------------------------------


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


@asynccontextmanager
async def spawn_process(
    argv: Sequence[str], *, stdin: int = subprocess.DEVNULL
) -> AsyncIterator[Proc]:
    """Start ``argv`` with its stdout and stderr piped; kill and reap it on the way out."""
    process = await trio.lowlevel.open_process(
        list(argv), stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        yield Proc(process)
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            for pipe in (process.stdin, process.stdout, process.stderr):
                if pipe is not None:
                    await pipe.aclose()


# -- handshakes and handlers -----------------------------------------------------------------


def make_handshake(name: str) -> Handshake:
    """A fresh handshake of the profile ``name`` (``"monte-v1"`` or ``"native"``); the
    native one has a fresh identity and accepts any key."""
    if name == "monte-v1":
        return monte_trio.MonteV1Handshake()
    return monte_trio.NativeHandshake(
        identity=monte_trio.Identity.generate(), trust=monte_trio.AcceptAnyKey()
    )


def is_native(handshake: Handshake) -> bool:
    return handshake.profile == "native"


async def echo(request: Request) -> bytes:
    """A handler that replies with the request body."""
    await trio.lowlevel.checkpoint()
    return request.body


class Recorder:
    """A server's handler: answers a request with ``b"re:" + body`` and counts what it was
    handed.

    Args:
        delay: seconds each request takes, or a function of the body that gives them.
        hang: requests never finish (until cancelled).

    A request whose body starts with ``slow`` sets :attr:`started`, then waits for
    :attr:`release` (shielded from cancellation if it starts with ``slow-shielded``).

    Attributes:
        seen: every body handed to the handler (requests and one-way messages).
        executions: request bodies handed to the handler.
        messages: one-way message bodies handed to the handler.
        cancelled: bodies of the requests whose handler was cancelled while it waited.
    """

    def __init__(
        self, *, delay: float | Callable[[bytes], float] = 0.0, hang: bool = False
    ) -> None:
        self.delay = delay
        self.hang = hang
        self.seen: Counter[bytes] = Counter()
        self.executions: Counter[bytes] = Counter()
        self.messages: Counter[bytes] = Counter()
        self.cancelled: list[bytes] = []
        self.started = trio.Event()
        self.release = trio.Event()

    async def __call__(self, request: Request) -> bytes | None:
        body = request.body
        self.seen[body] += 1
        if request.oneway:
            self.messages[body] += 1
            await trio.lowlevel.checkpoint()
            return None
        self.executions[body] += 1
        delay = self.delay(body) if callable(self.delay) else self.delay
        try:
            if body.startswith(b"slow"):
                self.started.set()
                with trio.CancelScope(shield=body.startswith(b"slow-shielded")):
                    await self.release.wait()
            elif self.hang:
                await trio.sleep_forever()
            elif delay:
                await trio.sleep(delay)
                return b"re:" + body
        except trio.Cancelled:
            self.cancelled.append(body)
            raise
        await trio.lowlevel.checkpoint()
        return b"re:" + body


# -- servers and clients ---------------------------------------------------------------------


@asynccontextmanager
async def running_server(
    handler: Handler,
    handshake: Handshake | None = None,
    *,
    port: int = 0,
    shutdown_grace: float = 1.0,
    **kwargs: Any,
) -> AsyncIterator[tuple[Server, int]]:
    """Serve ``handler`` on 127.0.0.1 (``port``, or a free one); yield ``(server, port)``.

    ``handshake`` and ``kwargs`` are :class:`~monte_trio.Server`'s. The server is shut down
    (within ``shutdown_grace`` seconds) when the block ends, if the block did not already.
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
                await server.shutdown(grace_period=shutdown_grace)
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def network_server(
    network: FaultyNetwork,
    handler: Handler,
    handshake: Handshake,
    config: ConnectionConfig | None = None,
    *,
    host: str = "server",
    **kwargs: Any,
) -> AsyncIterator[Server]:
    """Serve ``handler`` on the network's host ``host``; on exit, shut down gracefully (if
    the block did not) and assert that the shutdown kept within the grace period.

    ``kwargs`` are :class:`~monte_trio.Server`'s (``handshake_timeout``, ``max_conns``...).
    """
    config = config if config is not None else ConnectionConfig()
    server = Server(handler, handshake=handshake, config=config, **kwargs)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve_listeners, [network.listen(host)])
        try:
            yield server
        finally:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + config.grace_period + 5
                await server.shutdown()
            assert not scope.cancelled_caught, "Server.shutdown overran its grace period"
            nursery.cancel_scope.cancel()


def network_dialer(
    network: FaultyNetwork, host: str = "server"
) -> Callable[[], Awaitable[trio.abc.Stream]]:
    """A client's ``connect``: dial the network's host ``host``."""
    return lambda: network.connect(host)


@asynccontextmanager
async def network_client(
    network: FaultyNetwork,
    handshake: Handshake,
    config: ConnectionConfig,
    *,
    max_conns: int = 2,
    host: str = "server",
) -> AsyncIterator[Client]:
    """A client whose pool dials the network's host ``host``."""
    async with monte_trio.open_client(
        handshake=handshake,
        config=config,
        max_conns=max_conns,
        connect=lambda: network.connect(host),
    ) as client:
        yield client


# -- connection pairs ------------------------------------------------------------------------


class PairOptions(TypedDict, total=False):
    """What ``open_connection_pair`` takes besides the handshake and the transports."""

    client_handler: Handler | None
    server_handler: Handler | None
    config: ConnectionConfig | None
    client_config: ConnectionConfig | None
    server_config: ConnectionConfig | None


@asynccontextmanager
async def network_connection_pair(
    handshake: Handshake,
    net: FaultyNetwork,
    *,
    sockets: bool = False,
    **options: Unpack[PairOptions],
) -> AsyncIterator[tuple[Connection, Connection]]:
    """Like ``open_connection_pair``, over a link of ``net`` (host "client" to "server"),
    so that tests can stall, drop or cut it; with ``sockets``, each end is a
    ``trio.SocketStream`` over the link, so that direct writes are taken."""
    listener = net.listen("server")
    try:
        raw_client = await net.connect("server")
        raw_server = await listener.accept()
    finally:
        await listener.aclose()
    transports: tuple[trio.abc.Stream, trio.abc.Stream] = (raw_client, raw_server)
    if sockets:
        transports = (socket_stream(raw_client), socket_stream(raw_server))
    async with open_connection_pair(handshake, transports=transports, **options) as pair:
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


_ROOT = Path(__file__).resolve().parent.parent
"""The project's root: mypy runs there, with the project's configuration."""


async def run_mypy_strict(tmp_path: Path, source: str) -> tuple[int, str]:
    """Run ``mypy --strict`` on ``source`` (written to ``tmp_path/sample.py``) as a user
    would, from the project root; return its exit status and output."""
    sample = trio.Path(tmp_path / "sample.py")
    await sample.write_text(source)
    command = [sys.executable, "-m", "mypy", "--strict", str(sample)]
    with trio.fail_after(300):
        result = await trio.run_process(command, cwd=_ROOT, capture_stdout=True, check=False)
    return result.returncode, result.stdout.decode()


# -- bodies ---------------------------------------------------------------------------------


def json_body(size: int, seed: int = 0) -> bytes:
    """A JSON-like body of exactly ``size`` bytes that compresses (records with varied
    numbers), for ``size`` >= 2."""
    rng = random.Random(seed)
    parts = [b"["]
    n = 1
    while n < size:
        item = b'{"id": %d, "user": "user-%d", "score": %d, "tags": ["a", "b"]}, ' % (
            rng.randrange(10**6),
            rng.randrange(10**4),
            rng.randrange(1000),
        )
        parts.append(item)
        n += len(item)
    return b"".join(parts)[: size - 1] + b"]"
