"""Length-prefixed framing over any trio Stream, written for speed (the trio peers' core).

Wire format of one record: u32 big-endian length L, then L bytes = u32 big-endian seq +
payload. seq 0 is a one-way message; odd seqs are client requests, and a reply carries its
request's seq (monte's message layer, without encryption; trio-ssl runs it inside TLS 1.3).

The design follows shared/design/performance.md:
- callers append (header, payload) to a plain list; a parked writer task is woken once,
  swaps the list out and sends up to 256 records in one ``send_all``;
- when the writer is idle and the queue empty, a caller writes its record directly (shielded,
  so a cancelled caller never cuts a record in half);
- the reader parses records straight out of each received chunk with memoryview slices and
  keeps only the partial tail;
- a caller waiting for a reply parks with ``wait_task_rescheduled`` and the reader wakes it
  with ``reschedule`` (no task, channel or checkpoint per message);
- the server answers requests inline in its reader and its replies go through the same
  batched writer.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import outcome
import trio
from trio.lowlevel import (
    Abort,
    ParkingLot,
    Task,
    current_task,
    reschedule,
    wait_task_rescheduled,
)

from ..common import ServerState

HDR = struct.Struct(">II")
LEN = struct.Struct(">I")
BATCH_RECORDS = 256
HIGH_WATER = 1024  # queued records above which send_nowait raises WouldBlock and send waits
RECV_SIZE = 256 * 1024
MAX_RECORD = (1 << 20) + 1024 * 1024  # 2 MiB: room for the 1 MiB workload


class ProtocolError(Exception):
    pass


class _Waiter:
    __slots__ = ("parked", "result", "task")

    def __init__(self, task: Task) -> None:
        self.task = task
        self.result: outcome.Outcome[bytes] | None = None
        self.parked = False


def _abort_ok(_: Any) -> Abort:
    return Abort.SUCCEEDED


class FramedConnection:
    """One framed connection: ``reader()`` and ``writer()`` run as two service tasks."""

    def __init__(self, stream: trio.abc.Stream, state: ServerState | None = None) -> None:
        self.stream = stream
        self.state = state  # set on the server side: requests are answered from it
        self._queue: list[bytes] = []  # header, payload, header, payload, ...
        self._enqueued = 0
        self._written = 0
        self._writing = False
        self._writer_task: Task | None = None
        self._written_lot = ParkingLot()
        self._space_lot = ParkingLot()
        self._pending: dict[int, _Waiter] = {}
        self._next_seq = 1
        self.error: BaseException | None = None

    # -- load, for the client's connection choice
    @property
    def idle(self) -> bool:
        return not self._writing and not self._queue

    @property
    def load(self) -> int:
        return len(self._queue) + len(self._pending)

    def _check(self) -> None:
        if self.error is not None:
            raise trio.BrokenResourceError("connection failed") from self.error

    def _kick(self) -> None:
        task = self._writer_task
        if task is not None and not self._writing:
            self._writer_task = None
            reschedule(task)

    async def _direct_write(self, data: bytes) -> None:
        self._writing = True
        self._enqueued += 1
        try:
            with trio.CancelScope(shield=True):
                await self.stream.send_all(data)
        except BaseException as exc:
            self._fail(exc)
            raise
        finally:
            self._writing = False
        self._written += 1
        if self._queue:
            self._kick()

    def _enqueue(self, seq: int, body: bytes) -> int:
        idx = self._enqueued
        self._enqueued = idx + 1
        q = self._queue
        q.append(HDR.pack(len(body) + 4, seq))
        q.append(body)
        self._kick()
        return idx

    # -- the three calls
    def send_nowait(self, body: bytes) -> None:
        self._check()
        if len(self._queue) >= 2 * HIGH_WATER:
            raise trio.WouldBlock
        self._enqueue(0, body)

    async def send(self, body: bytes) -> None:
        self._check()
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._writing and not self._queue:
            await self._direct_write(HDR.pack(len(body) + 4, 0) + body)
            return
        while len(self._queue) >= 2 * HIGH_WATER:
            await self._space_lot.park()
            self._check()
        idx = self._enqueue(0, body)
        while self._written <= idx:
            await self._written_lot.park()
            self._check()

    async def request(self, body: bytes) -> bytes:
        self._check()
        await trio.lowlevel.checkpoint_if_cancelled()
        seq = self._next_seq
        self._next_seq = (seq + 2) & 0xFFFFFFFF or 1
        waiter = _Waiter(current_task())
        self._pending[seq] = waiter
        try:
            if not self._writing and not self._queue:
                await self._direct_write(HDR.pack(len(body) + 4, seq) + body)
            else:
                while len(self._queue) >= 2 * HIGH_WATER:
                    await self._space_lot.park()
                    self._check()
                self._enqueue(seq, body)
            if waiter.result is None:
                waiter.parked = True

                def abort(_: Any) -> Abort:
                    self._pending.pop(seq, None)
                    return Abort.SUCCEEDED

                result: bytes = await wait_task_rescheduled(abort)
                return result
            return waiter.result.unwrap()
        finally:
            self._pending.pop(seq, None)

    # -- service tasks
    async def writer(self) -> None:
        stream = self.stream
        try:
            while True:
                if not self._queue or self._writing:
                    self._writer_task = current_task()
                    await wait_task_rescheduled(self._abort_writer)
                    continue
                q = self._queue
                if len(q) <= 2 * BATCH_RECORDS:
                    self._queue = []
                else:
                    self._queue = q[2 * BATCH_RECORDS :]
                    q = q[: 2 * BATCH_RECORDS]
                self._writing = True
                try:
                    await stream.send_all(b"".join(q))
                finally:
                    self._writing = False
                self._written += len(q) >> 1
                self._written_lot.unpark_all()
                if self._space_lot and len(self._queue) < HIGH_WATER:
                    self._space_lot.unpark_all()
        except BaseException as exc:
            self._fail(exc)
            raise

    def _abort_writer(self, _: Any) -> Abort:
        self._writer_task = None
        return Abort.SUCCEEDED

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        pending, self._pending = self._pending, {}
        for w in pending.values():
            w.result = outcome.Error(trio.BrokenResourceError("connection lost"))
            if w.parked:
                w.parked = False
                reschedule(w.task, w.result)
        self._written_lot.unpark_all()
        self._space_lot.unpark_all()

    async def reader(self) -> None:
        """Read records until EOF; client side wakes waiters, server side answers requests."""
        try:
            await self._read_loop()
        except BaseException as exc:
            self._fail(exc)
            raise
        self._fail(trio.EndOfChannel("peer closed"))

    async def _read_loop(self) -> None:
        stream = self.stream
        state = self.state
        pending = self._pending
        unpack = HDR.unpack_from
        tail = bytearray()
        need = 0  # bytes the partial record in ``tail`` needs before it can be parsed
        while True:
            chunk = await stream.receive_some(RECV_SIZE)
            if not chunk:
                return
            data: bytes | bytearray
            if tail:
                tail += chunk
                if len(tail) < need:
                    continue
                data, tail = tail, bytearray()
            else:
                data = chunk
            mv = memoryview(data)
            end = len(data)
            pos = 0
            replied = False
            need = 8
            while end - pos >= 8:
                length, seq = unpack(mv, pos)
                if length < 4 or length > MAX_RECORD:
                    raise ProtocolError(f"bad record length {length}")
                stop = pos + 4 + length
                if stop > end:
                    need = 4 + length
                    break
                if state is not None:
                    if seq == 0:
                        state.count += 1
                    else:
                        body = state.reply(mv[pos + 8 : stop])
                        q = self._queue
                        q.append(HDR.pack(len(body) + 4, seq))
                        q.append(body)
                        self._enqueued += 1
                        replied = True
                else:
                    w = pending.pop(seq, None)
                    if w is None:
                        raise ProtocolError(f"reply for unknown seq {seq}")
                    w.result = outcome.Value(bytes(mv[pos + 8 : stop]))
                    if w.parked:
                        w.parked = False
                        reschedule(w.task, w.result)
                pos = stop
            if pos < end:
                tail = bytearray(mv[pos:])
            mv.release()
            if replied:
                self._kick()


# --------------------------------------------------------------------------- client pool


class FramedClient:
    """Up to ``max_conns`` connections to one address, chosen like monte's client does."""

    def __init__(
        self,
        nursery: trio.Nursery,
        dial: Callable[[], Awaitable[trio.abc.Stream]],
        max_conns: int,
    ) -> None:
        self._nursery = nursery
        self._dial = dial
        self._max = max_conns
        self.conns: list[FramedConnection] = []
        self._dial_lock = trio.Lock()

    async def _add_conn(self) -> None:
        async with self._dial_lock:
            if len(self.conns) >= self._max:
                return
            stream = await self._dial()
            conn = FramedConnection(stream)
            self._nursery.start_soon(conn.reader)
            self._nursery.start_soon(conn.writer)
            self.conns.append(conn)

    async def _pick(self) -> FramedConnection:
        conns = self.conns
        for c in conns:
            if c.idle:
                return c
        if len(conns) < self._max and (not self._dial_lock.locked() or not conns):
            await self._add_conn()
            conns = self.conns
            for c in reversed(conns):
                if c.idle:
                    return c
        return min(conns, key=_load)

    async def request(self, body: bytes) -> bytes:
        return await (await self._pick()).request(body)

    async def send(self, body: bytes) -> None:
        await (await self._pick()).send(body)

    def send_nowait(self, body: bytes) -> None:
        conns = self.conns
        if not conns:
            raise trio.WouldBlock
        for c in conns:
            if c.idle:
                c.send_nowait(body)
                return
        if len(conns) < self._max:
            raise trio.WouldBlock  # let the caller's ``send`` dial another connection
        min(conns, key=_load).send_nowait(body)


def _load(c: FramedConnection) -> int:
    return c.load


@asynccontextmanager
async def open_framed_client(
    dial: Callable[[], Awaitable[trio.abc.Stream]], max_conns: int
) -> AsyncIterator[FramedClient]:
    async with trio.open_nursery() as nursery:
        client = FramedClient(nursery, dial, max_conns)
        try:
            yield client
        finally:
            nursery.cancel_scope.cancel()
            for c in client.conns:
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(1):
                        try:
                            await c.stream.aclose()
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            pass


# --------------------------------------------------------------------------- server


ECHO_MARKER = 0xFF
"""The first byte of a connection that asks for a raw echo (``streams`` servers only): a
framed connection's first byte is the high byte of a record length, 0 for any record
this framing accepts."""


class _Prefixed(trio.abc.Stream):
    """``stream`` with ``first`` (bytes already read from it) put back in front."""

    def __init__(self, stream: trio.abc.Stream, first: bytes) -> None:
        self._stream = stream
        self._first = first

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._first:
            first, self._first = self._first, b""
            return first
        return await self._stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._stream.aclose()


async def _echo(stream: trio.abc.Stream, first: bytes) -> None:
    """Echo every byte, in one task (read, then write it back), until the peer closes."""
    if first:
        await stream.send_all(first)
    while data := await stream.receive_some(RECV_SIZE):
        await stream.send_all(data)
    if isinstance(stream, trio.abc.HalfCloseableStream):
        await stream.send_eof()


async def serve_framed(
    state: ServerState,
    port: int,
    host: str,
    wrap: Callable[[trio.SocketStream], Awaitable[trio.abc.Stream]] | None,
    *,
    streams: bool = False,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the framed protocol; ``task_status.started(port)`` once listening.

    With ``streams``, a connection whose first byte is :data:`ECHO_MARKER` is a raw echo
    instead (the stream workloads' counterpart of monte_trio's streams); the others are
    framed as usual.
    """

    async def handle(sock: trio.SocketStream) -> None:
        try:
            stream: trio.abc.Stream = sock if wrap is None else await wrap(sock)
            if streams:
                first = await stream.receive_some(RECV_SIZE)
                if first[:1] == bytes([ECHO_MARKER]):
                    await _echo(stream, bytes(first[1:]))
                    return
                stream = _Prefixed(stream, bytes(first))
            conn = FramedConnection(stream, state)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(conn.writer)
                await conn.reader()
                nursery.cancel_scope.cancel()
        except Exception:
            pass
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                try:
                    await sock.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handle, port, host=host))
        task_status.started(listeners[0].socket.getsockname()[1])
