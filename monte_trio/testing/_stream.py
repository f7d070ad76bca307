"""The two ends of a :class:`~monte_trio.testing.FaultyNetwork` connection, and its
listeners.

This module owns :class:`NetworkStream`, which implements the
:class:`trio.abc.HalfCloseableStream` contract (conflict detection, closing, waiting)
over the pipes of the engine (``_pipe.py``), and :class:`NetworkListener`, the backlog of
connections made to one host. Neither injects faults: the engine and the network do.
"""

from __future__ import annotations

import math
import operator
from collections import deque
from collections.abc import Callable

import attrs
import trio
from trio.lowlevel import ParkingLot, checkpoint

from .._util import ConflictDetector
from ._faults import Link
from ._pipe import LinkState, Pipe, PipeEngine

__all__ = ["NetworkListener", "NetworkStream"]


@attrs.define(eq=False)
class NetworkStream(trio.abc.HalfCloseableStream):
    """One end of a connection of a :class:`FaultyNetwork`.

    It implements the whole :class:`trio.abc.HalfCloseableStream` contract:

    * :meth:`send_all` returns once its bytes are in the link's buffer; it waits while
      ``buffer_size`` bytes are still undelivered.
    * :meth:`receive_some` returns bytes of at most one segment (so possibly fewer than
      were sent in one ``send_all``), ``b""`` once the peer has sent EOF or closed and
      everything before has been delivered.
    * :meth:`send_eof` half-closes; :meth:`aclose` closes both directions (the peer sees
      EOF when receiving and :class:`trio.BrokenResourceError` when sending).
    * Faults raise :class:`trio.BrokenResourceError`; use after local close raises
      :class:`trio.ClosedResourceError`; two tasks sending (or two receiving) at once
      raise :class:`trio.BusyResourceError`.

    Streams are made by :meth:`FaultyNetwork.connect` and
    :meth:`NetworkListener.accept`, never directly.

    Attributes:
        link: the connection this stream is an end of.
        local_host: the host name of this end.
        remote_host: the host name of the other end.
    """

    _engine: PipeEngine = attrs.field(alias="engine", repr=False)
    _state: LinkState = attrs.field(alias="state")
    _out: Pipe = attrs.field(alias="out")
    _in: Pipe = attrs.field(alias="in_")
    _closed: bool = attrs.field(default=False, init=False)
    _eof_sent: bool = attrs.field(default=False, init=False)
    _send_conflict: ConflictDetector = attrs.field(
        init=False,
        factory=lambda: ConflictDetector("another task is using this stream for send"),
    )
    _receive_conflict: ConflictDetector = attrs.field(
        init=False,
        factory=lambda: ConflictDetector("another task is already receiving on this stream"),
    )

    @property
    def link(self) -> Link:
        """The connection this stream is an end of."""
        return self._state.link

    @property
    def local_host(self) -> str:
        """The host name of this end."""
        return self._out.src

    @property
    def remote_host(self) -> str:
        """The host name of the other end."""
        return self._out.dst

    def __repr__(self) -> str:
        return f"<NetworkStream {self.local_host} of {self.link}>"

    def _check_can_send(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this stream was closed")
        if self._eof_sent:
            raise trio.ClosedResourceError("send_eof() was called on this stream")
        if self._state.broken:
            raise trio.BrokenResourceError(f"{self.link} is broken")
        if self._out.receiver_closed:
            raise trio.BrokenResourceError(f"the peer closed {self.link}")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data``, waiting while the link's buffer is full.

        Args:
            data: the bytes to send.

        Raises:
            trio.BusyResourceError: another task is sending on this stream.
            trio.BrokenResourceError: the link broke (a fault) or the peer closed.
            trio.ClosedResourceError: this stream was closed, or EOF was sent.
        """
        with self._send_conflict:
            self._check_can_send()
            await checkpoint()
            payload = bytes(data)
            engine = self._engine
            pos = 0
            size = 0  # of the next segment, once chosen
            while True:
                self._check_can_send()
                if pos == len(payload):
                    return
                if not size:
                    size = engine.segment_size(self._out, len(payload) - pos)
                if not engine.has_room(self._out, size):
                    await self._out.lot.park()
                    continue
                engine.push(self._state, self._out, payload[pos : pos + size])
                pos += size
                size = 0

    async def send_some(self, data: bytes | bytearray | memoryview) -> int:
        """Send the first bytes of ``data`` (at least one) and return how many, as a
        socket's ``send`` does: if it is cancelled, nothing was sent.

        It sends one segment, waiting while the link's buffer has no room for it.

        Raises:
            ValueError: ``data`` is empty.
            trio.BusyResourceError: another task is sending on this stream.
            trio.BrokenResourceError: the link broke (a fault) or the peer closed.
            trio.ClosedResourceError: this stream was closed, or EOF was sent.
        """
        if not data:
            raise ValueError("send_some needs at least one byte")
        with self._send_conflict:
            self._check_can_send()
            await trio.lowlevel.checkpoint_if_cancelled()
            engine = self._engine
            size = engine.segment_size(self._out, len(data))
            while not engine.has_room(self._out, size):
                await self._out.lot.park()  # cancelled here, it has sent nothing
                self._check_can_send()
            engine.push(self._state, self._out, bytes(memoryview(data)[:size]))
            await trio.lowlevel.cancel_shielded_checkpoint()
            return size

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until the link's buffer has room (or the link is broken).

        Raises:
            trio.BusyResourceError: another task is sending on this stream.
            trio.ClosedResourceError: this stream was closed, or EOF was sent.
        """
        with self._send_conflict:
            if self._closed or self._eof_sent:
                raise trio.ClosedResourceError("this stream is closed for sending")
            await checkpoint()
            while True:
                if self._closed or self._eof_sent:
                    raise trio.ClosedResourceError("this stream is closed for sending")
                out = self._out
                if self._state.broken or out.receiver_closed or self._engine.has_room(out, 1):
                    return
                await out.lot.park()

    async def send_eof(self) -> None:
        """Half-close: the peer receives ``b""`` after the data already sent.

        Calling it again is allowed and does nothing.

        Raises:
            trio.BusyResourceError: another task is sending on this stream.
            trio.ClosedResourceError: this stream was closed.
        """
        with self._send_conflict:
            if self._closed:
                raise trio.ClosedResourceError("this stream was closed")
            await checkpoint()
            self._send_eof_now()

    def _send_eof_now(self) -> None:
        if not self._eof_sent:
            self._eof_sent = True
            self._engine.send_eof(self._out)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Receive the next bytes, waiting for them to be sent and delivered.

        Args:
            max_bytes: return at most this many bytes (``None``: a whole segment).

        Returns:
            Some bytes, never more than ``max_bytes``; ``b""`` at end of stream.

        Raises:
            ValueError: ``max_bytes`` is less than 1.
            TypeError: ``max_bytes`` is not an integer.
            trio.BusyResourceError: another task is receiving on this stream.
            trio.BrokenResourceError: the link broke (a fault).
            trio.ClosedResourceError: this stream was closed.
        """
        with self._receive_conflict:
            if max_bytes is not None:
                max_bytes = operator.index(max_bytes)
                if max_bytes < 1:
                    raise ValueError("max_bytes must be >= 1")
            await checkpoint()
            pipe = self._in
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("this stream was closed")
                if pipe.broken_at is not None and pipe.delivered >= pipe.broken_at:
                    raise trio.BrokenResourceError(f"{self.link} is broken")
                deadline = math.inf
                if not pipe.held:
                    now = trio.current_time()
                    if pipe.segments:
                        head = pipe.segments[0]
                        if head.deliver_at <= now:
                            return self._engine.deliver(pipe, head, max_bytes)
                        deadline = head.deliver_at
                    elif pipe.eof_at is not None:
                        if pipe.eof_at <= now:
                            return b""
                        deadline = pipe.eof_at
                with trio.move_on_at(deadline):
                    await pipe.lot.park()

    async def aclose(self) -> None:
        """Close this end: the peer sees EOF when receiving, a broken link when sending.

        Idempotent; it closes even when cancelled.
        """
        self._close_now()
        await checkpoint()

    def _close_now(self) -> None:
        if not self._closed:
            self._closed = True
            self._engine.close_end(self._state, self._out, self._in)


@attrs.define(eq=False)
class NetworkListener(trio.abc.Listener[NetworkStream]):
    """Accepts the connections made to one host of a :class:`FaultyNetwork`.

    Made by :meth:`FaultyNetwork.listen`. Connections wait in an unbounded backlog until
    accepted; closing the listener closes the ones still waiting and frees the host name
    for another :meth:`FaultyNetwork.listen`.

    Attributes:
        host: the host name this listener accepts connections for.
    """

    host: str
    _on_close: Callable[[NetworkListener], None] = attrs.field(alias="on_close", repr=False)
    _backlog: deque[NetworkStream] = attrs.field(init=False, repr=False, factory=deque)
    _lot: ParkingLot = attrs.field(init=False, repr=False, factory=ParkingLot)
    _closed: bool = attrs.field(init=False, repr=False, default=False)

    async def accept(self) -> NetworkStream:
        """Wait for the next connection to this host.

        Returns:
            The host's end of the connection.

        Raises:
            trio.ClosedResourceError: the listener was closed.
        """
        await checkpoint()
        while True:
            if self._closed:
                raise trio.ClosedResourceError("this listener was closed")
            if self._backlog:
                return self._backlog.popleft()
            await self._lot.park()

    async def aclose(self) -> None:
        """Stop accepting; close connections not yet accepted. Idempotent."""
        if not self._closed:
            self._closed = True
            self._on_close(self)
            while self._backlog:
                self._backlog.popleft()._close_now()
            self._lot.unpark_all()
        await checkpoint()

    def _enqueue(self, stream: NetworkStream) -> None:
        self._backlog.append(stream)
        self._lot.unpark_all()

    def _purge(self, host_links: set[int]) -> list[NetworkStream]:
        kept: deque[NetworkStream] = deque()
        purged: list[NetworkStream] = []
        for stream in self._backlog:
            (purged if stream.link.id in host_links else kept).append(stream)
        self._backlog = kept
        return purged
