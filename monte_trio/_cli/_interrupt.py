"""The interrupt guard of the commands that run to completion (``bench`` and ``demo``).

SIGINT (Ctrl-C) or SIGTERM becomes a cancellation of the command's ``interrupt`` scope
rather than a :exc:`KeyboardInterrupt` raised wherever the program happens to be, so the
command still closes its connections gracefully; the exit status is then 130. A second
signal cancels everything at once.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Awaitable, Callable

import trio

from ._output import PROG

__all__ = ["interruptible"]


async def interruptible(command: Callable[[trio.CancelScope], Awaitable[int]]) -> int:
    """Run ``command(interrupt)``; SIGINT or SIGTERM cancels ``interrupt`` (exit status 130).

    The command wraps its interruptible work in ``interrupt`` *inside* its client's block,
    so that connections still close gracefully; a second signal cancels everything.
    Signals become cancellations rather than a KeyboardInterrupt raised wherever the
    program happens to be.
    """
    interrupt = trio.CancelScope()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if not interrupt.cancel_called:
                        print(f"{PROG}: {name}: interrupted", file=sys.stderr, flush=True)
                        interrupt.cancel()
                    else:
                        print(f"{PROG}: {name} again: stopping now", file=sys.stderr, flush=True)
                        nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            status = await command(interrupt)
            nursery.cancel_scope.cancel()
    return 130 if interrupt.cancel_called else status
