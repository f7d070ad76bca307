"""Retrying calls: :func:`retry`, and the backoff with full jitter both it and the client
pool's dialing use."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from .._exceptions import ConnectError, ConnectionClosed, RequestNotProcessed

__all__ = ["backoff", "retry"]

_T = TypeVar("_T")
_random = random.Random()


def backoff(failures: int, initial: float, maximum: float) -> float:
    """Seconds to wait after ``failures`` consecutive failures (at least 1): exponential,
    capped, with full jitter (uniform between 0 and ``min(maximum, initial * 2**(failures
    - 1))``)."""
    ceiling = min(maximum, initial * 2.0 ** min(failures - 1, 64))
    return _random.uniform(0.0, ceiling)


async def retry(
    func: Callable[..., Awaitable[_T]],
    *args: object,
    attempts: int = 3,
    initial_delay: float = 0.1,
    max_delay: float = 5.0,
    idempotent: bool = False,
) -> _T:
    """Await ``func(*args)``, retrying after failures that allow it.

    Retried: :class:`~monte_trio.RequestNotProcessed` (the call was certainly not
    processed) and :class:`~monte_trio.ConnectError` (nothing was sent), always;
    :class:`~monte_trio.ConnectionClosed` (the call may have been processed) only if
    ``idempotent`` is true. Anything else is raised at once. Between attempts it sleeps
    an exponential backoff with full jitter: a random time between 0 and ``min(max_delay,
    initial_delay * 2**n)`` after the n-th failure (n from 0). It honours the caller's
    deadline: a sleep that would end past the enclosing cancel scopes' deadline is not
    started, and the last error is raised instead::

        with trio.fail_after(10):
            value = await monte_trio.retry(kv.get, "key", attempts=5, idempotent=True)

    Args:
        func: an async function, called as ``func(*args)`` at each attempt.
        args: its positional arguments.
        attempts: how many times to try, at least 1.
        initial_delay: the ceiling of the first sleep, in seconds.
        max_delay: the largest ceiling of a sleep, in seconds.
        idempotent: whether a call may run twice (then a broken connection is retried).

    Raises:
        ValueError: ``attempts`` below 1 or a negative delay.
    """
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    if initial_delay < 0 or max_delay < 0:
        raise ValueError("delays cannot be negative")
    retried: tuple[type[BaseException], ...] = (
        (ConnectError, ConnectionClosed) if idempotent else (ConnectError, RequestNotProcessed)
    )
    failures = 0
    while True:
        try:
            return await func(*args)
        except retried:
            failures += 1
            if failures >= attempts:
                raise
            delay = backoff(failures, initial_delay, max_delay)
            if trio.current_time() + delay >= trio.current_effective_deadline():
                raise
        await trio.sleep(delay)
