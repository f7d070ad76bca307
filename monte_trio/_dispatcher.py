"""The routing of answers to the callers waiting for them.

Each outstanding request owns a :class:`ReplyChannel`, a one-shot
:class:`trio.abc.ReceiveChannel`: the reader task delivers the reply into it without
blocking, the caller's task receives it. It costs one task wake-up, about half of a memory
channel hand-off, which matters when replies arrive by the tens of thousands per second.

When a connection ends, :meth:`Dispatcher.fail_all` fails every channel, so no caller can
be left waiting for a reply that will never come. A reply whose id is unknown (its caller
gave up, or the peer is confused) is dropped and counted.
"""

from __future__ import annotations

from collections.abc import Callable

import outcome
import trio

__all__ = ["Dispatcher", "Reply", "ReplyChannel"]

Reply = tuple[int, bytes, object]
"""What a call receives: ``(event, body, detail)``: the session's EV_REPLY with the body,
or EV_ERROR with the error text (UTF-8) and the error code."""


class ReplyChannel(trio.abc.ReceiveChannel[Reply]):
    """A receive channel that carries exactly one reply (or one error) to one caller."""

    __slots__ = ("_closed", "_result", "_task")

    def __init__(self) -> None:
        self._task: trio.lowlevel.Task | None = None
        self._result: outcome.Outcome[Reply] | None = None
        # Equivalent mutant (None): _closed is only ever tested for truth.
        self._closed = False  # pragma: no mutate

    def _set(self, result: outcome.Outcome[Reply]) -> bool:
        if self._result is not None or self._closed:
            return False
        task = self._task
        if task is not None:
            # Only drops the reference: _closed, set with it, guards every later use.
            self._task = None  # pragma: no mutate
            self._closed = True
            trio.lowlevel.reschedule(task, result)
        else:
            self._result = result
        return True

    def deliver(self, reply: Reply) -> bool:
        """Hand the reply to the receiver; ``False`` if one was already delivered."""
        return self._set(outcome.Value(reply))

    def fail(self, exc: BaseException) -> bool:
        """Make the receiver raise ``exc``; ``False`` if a result was already set."""
        return self._set(outcome.Error(exc))

    async def receive(self) -> Reply:
        """Wait for the reply.

        Raises:
            trio.EndOfChannel: the reply was already received.
            ConnectionClosed: the connection ended first.
        """
        if self._result is not None:
            # Cancellation first: a receive that raises Cancelled must not consume the reply.
            await trio.lowlevel.checkpoint_if_cancelled()
            result, self._result = self._result, None
            self._closed = True
            await trio.lowlevel.cancel_shielded_checkpoint()
            return result.unwrap()
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise trio.EndOfChannel
        if self._task is not None:
            raise trio.BusyResourceError("another task is already waiting for this reply")
        self._task = trio.lowlevel.current_task()

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            self._task = None
            return trio.lowlevel.Abort.SUCCEEDED

        reply: Reply = await trio.lowlevel.wait_task_rescheduled(abort)
        return reply

    async def aclose(self) -> None:
        """Give up on the reply; a later delivery is ignored."""
        self._closed = True
        self._result = None
        await trio.lowlevel.checkpoint()


class Dispatcher:
    """Routes answers to the :class:`ReplyChannel` of each call in flight.

    Call ids are allocated by the session (it owns their parity and order); the
    dispatcher only maps an id to the channel its caller receives on (the connection
    bounds how many are pending: ``max_pending_requests``).
    """

    __slots__ = ("_pending", "dropped")

    def __init__(self) -> None:
        self._pending: dict[int, ReplyChannel] = {}
        self.dropped = 0
        """Answers that arrived for no pending call (late, after a cancel)."""

    def __len__(self) -> int:
        return len(self._pending)

    def __bool__(self) -> bool:
        return bool(self._pending)

    def add(self, ident: int) -> ReplyChannel:
        """Return the channel the answer of call ``ident`` will arrive on."""
        channel = ReplyChannel()
        self._pending[ident] = channel
        return channel

    def deliver(self, ident: int, reply: Reply) -> bool:
        """Route an answer; ``False`` (and counted in :attr:`dropped`) if nobody waits."""
        channel = self._pending.pop(ident, None)
        if channel is None or not channel.deliver(reply):
            self.dropped += 1
            return False
        return True

    def discard(self, ident: int) -> bool:
        """Forget a call whose caller gave up; ``True`` if it was still pending."""
        return self._pending.pop(ident, None) is not None

    def fail(self, ident: int, exc: BaseException) -> bool:
        """Fail one pending call with ``exc``; ``False`` if it was not pending."""
        channel = self._pending.pop(ident, None)
        return channel is not None and channel.fail(exc)

    def pending_ids(self) -> list[int]:
        """The ids awaiting answers, oldest first."""
        return list(self._pending)

    def fail_all(self, make_error: Callable[[int], BaseException]) -> None:
        """Fail every pending call with ``make_error(ident)`` and forget them all."""
        pending, self._pending = self._pending, {}
        for ident, channel in pending.items():
            channel.fail(make_error(ident))
