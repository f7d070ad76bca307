"""The writing half of a connection: the session's send queue to the socket.

Callers never touch the socket's order themselves: they put a message into the session
(``send_request``, ``send_oneway``, ``send_reply`` ...) and wake the :class:`Writer` if it
is parked. The writer asks the session for packed record plaintexts
(``records_to_send``, control frames first, at most ~128 KiB ahead of the socket), seals
them in one ``seal_many`` and performs one ``send_all``, so a burst of N messages costs one
wake-up, a few AEAD calls and one system call, not N of each.

``send`` callers wait for their bytes to be written: each leaves a :class:`_Written`
waiter whose *target* is how many body bytes must have been packed before its message is
(the session's ``send_queue_bytes`` counts the bodies still queued, so the writer knows
exactly how many it packed); the writer wakes them once the batch holding their message
is on the socket, or once the queue is empty.

One exception saves two task switches per call when the connection is quiet: a caller
that finds the writer parked, and nothing else in flight, packs and writes itself
(:meth:`Writer.write_directly`). The stream is record-safe (see
:class:`~monte_trio.SecureStream`): if that caller is cancelled part-way, the stream keeps
the unsent rest and the writer sends it next. The writer is not woken while such a *direct
write* is in progress; whatever was queued meanwhile is handed to it when the write ends.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from ._exceptions import LocalProtocolError

if TYPE_CHECKING:
    from ._proto._session import Session
    from ._proto._session_v1 import MonteV1Session
    from ._secure_stream import SecureStream

__all__ = ["CREDIT_DELAY", "CREDIT_SHARE", "WRITE_AHEAD", "WRITE_ERRORS", "Writer"]

CREDIT_DELAY = 0.005
"""Seconds a small credit return may wait for a write to ride on before the writer sends
it alone: a lone CREDIT frame costs a wake-up, a seal and a system call on this side and
a read on the peer's, as much as the message it pays for."""
CREDIT_SHARE = 4
"""Returned credit of at least 1/CREDIT_SHARE of the smaller window this side granted is
sent at once (the peer may be waiting for it); less rides on the next write, or goes
alone within CREDIT_DELAY. With the default windows (8 MiB and 4 MiB) a steady stream of
one-way messages is then credited by the timer rather than every 64 KiB."""
WRITE_AHEAD = 128 * 1024
"""Plaintext bytes the writer packs and seals ahead of the socket per write: a big sealed
batch is head-of-line blocking for control frames, a small one costs system calls."""

WRITE_ERRORS = (
    trio.TooSlowError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    OSError,
    LocalProtocolError,
)
"""What a failed write raises: each ends the connection."""


class _Written:
    """A caller waiting until ``target`` body bytes have been packed and written."""

    __slots__ = ("target", "task")

    def __init__(self, task: trio.lowlevel.Task, target: int) -> None:
        self.task: trio.lowlevel.Task | None = task
        self.target = target


class Writer:
    """Drains a session's send queue into a secure stream.

    Args:
        stream: the secure stream (the writer owns its sending half).
        session: the connection's session (native or monte-v1).
        write_timeout: seconds one write may block before the peer is declared dead.
        max_send_queue: queued body bytes above which senders wait for room.
        on_error: called with the exception and ``write_timeout`` when a write fails;
            it ends the connection.
        on_credit_held: called after a pack that left credit held back (below the
            session's floor): the connection must flush it within ``CREDIT_DELAY``.
    """

    __slots__ = (
        "_max_plaintext",
        "_on_credit_held",
        "_on_error",
        "_packed",
        "_record_safe",
        "_session",
        "_stream",
        "_waiters",
        "_write_timeout",
        "credit_now",
        "direct",
        "max_send_queue",
        "owed",
        "space",
        "task",
    )

    def __init__(
        self,
        stream: SecureStream,
        session: Session | MonteV1Session,
        *,
        write_timeout: float | None,
        max_send_queue: int,
        on_error: Callable[[BaseException, float | None], None],
        on_credit_held: Callable[[], None] = lambda: None,
    ) -> None:
        self._stream = stream
        self._session = session
        self._max_plaintext = stream.max_plaintext
        self._record_safe = stream.record_safe  # fixed by the transport
        self._write_timeout = write_timeout
        self._on_error = on_error
        self._on_credit_held = on_credit_held
        self._packed = 0  # body bytes packed so far (all time)
        self._waiters: deque[_Written] = deque()
        self.max_send_queue: int = max_send_queue
        self.task: trio.lowlevel.Task | None = None  # the writer, while parked
        self.direct: bool = False  # a caller is writing (see the module docstring)
        self.space: trio.lowlevel.ParkingLot = (
            trio.lowlevel.ParkingLot()
        )  # senders waiting for room
        self.owed: int = 0  # credit returned to the session since the last pack (bytes)
        self.credit_now: int = 64 * 1024  # owed credit sent at once (set from the windows)

    def wake(self) -> None:
        """Wake the writer if it is parked (and no direct write is in progress)."""
        task = self.task
        if task is not None and not self.direct:
            self.task = None
            trio.lowlevel.reschedule(task)

    @property
    def quiet(self) -> bool:
        """Whether a caller may write directly: the writer is parked, nobody waits for a
        write, and the stream is record-safe (a cancelled write cannot cut a record)."""
        return (
            self.task is not None
            and not self.direct
            and not self._waiters
            and self._record_safe
            and not self._stream.has_unsent
        )

    @property
    def busy(self) -> bool:
        """Whether anything is queued or being written."""
        return self.direct or self._session.send_queue_bytes > 0 or self.task is None

    def _pack(self, max_bytes: int | None) -> list[bytes]:
        session = self._session
        before = session.send_queue_bytes
        plaintexts = session.records_to_send(self._max_plaintext, max_bytes)
        if session.credit_owed:
            self._on_credit_held()  # small credit held back: flushed by the timer
        else:
            self.owed = 0  # records_to_send packed every credit update
        self._packed += before - session.send_queue_bytes
        if self.space and session.send_queue_bytes < self.max_send_queue:
            self.space.unpark_all()
        return plaintexts

    async def _send(self, plaintexts: list[bytes]) -> None:
        if self._write_timeout is None:
            await self._stream.send_records(plaintexts)  # type: ignore[arg-type]
        else:
            with trio.fail_after(self._write_timeout):
                await self._stream.send_records(plaintexts)  # type: ignore[arg-type]

    async def write_directly(self) -> None:
        """Pack and write everything queued from the calling task (the writer is parked).

        Raises:
            trio.BrokenResourceError, trio.TooSlowError, ...: the write failed (the
                caller ends the connection with :attr:`on_error`'s reason).
        """
        self.direct = True
        try:
            if self._write_timeout is None:
                await self._stream.send_records(self._pack(None))  # type: ignore[arg-type]
            else:
                await self._send(self._pack(None))
        finally:
            self.direct = False
            if self._session.wants_write or self._stream.has_unsent or self._waiters:
                self.wake()

    async def wait_written(self) -> None:
        """Wait until everything queued so far has been packed and written.

        If cancelled, the messages still go out (they are in the session's queue); the
        caller just stops waiting.
        """
        waiter = _Written(
            trio.lowlevel.current_task(), self._packed + self._session.send_queue_bytes
        )
        self._waiters.append(waiter)
        self.wake()

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            waiter.task = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    async def wait_for_space(self, closed: Callable[[], bool]) -> None:
        """Wait while the send queue holds ``max_send_queue`` bytes or more."""
        while self._session.send_queue_bytes >= self.max_send_queue and not closed():
            await self.space.park()

    def fail_waiters(self, make_error: Callable[[], BaseException]) -> None:
        """The connection ended: every ``send`` waiting for its write raises."""
        import outcome

        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            if waiter.task is not None:
                trio.lowlevel.reschedule(waiter.task, outcome.Error(make_error()))
                waiter.task = None
        self.space.unpark_all()

    def _release(self, count: int, drained: bool) -> None:
        waiters = self._waiters
        packed = self._packed
        while count and waiters and (drained or waiters[0].target <= packed):
            waiter = waiters.popleft()
            count -= 1
            if waiter.task is not None:
                trio.lowlevel.reschedule(waiter.task)
                waiter.task = None

    async def run(self) -> None:
        """The writer task: park until woken, then drain the session into the socket."""
        session = self._session
        stream = self._stream
        try:
            while True:
                if not session.wants_write and not stream.has_unsent:
                    if self._waiters:
                        self._release(len(self._waiters), True)
                    if session.credit_owed:
                        self._on_credit_held()  # returned while this task was writing
                    self.task = trio.lowlevel.current_task()

                    def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
                        self.task = None
                        return trio.lowlevel.Abort.SUCCEEDED

                    await trio.lowlevel.wait_task_rescheduled(abort)
                    continue
                count = len(self._waiters)
                plaintexts = self._pack(WRITE_AHEAD)
                drained = not session.wants_write
                if plaintexts or stream.has_unsent:
                    await self._send(plaintexts)
                elif not drained:
                    # Nothing packable (the session has ended): never spin.
                    self._release(count, True)
                    self.task = trio.lowlevel.current_task()

                    def abort2(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
                        self.task = None
                        return trio.lowlevel.Abort.SUCCEEDED

                    await trio.lowlevel.wait_task_rescheduled(abort2)
                    continue
                else:
                    await trio.lowlevel.checkpoint()
                if count:
                    self._release(count, drained)
        except WRITE_ERRORS as exc:
            self._on_error(exc, self._write_timeout)
