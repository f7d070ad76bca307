"""Running a trio server until SIGTERM, and the trio Runtime for the workload drivers."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import trio

from ..common import EventLike, TaskGroup


def run_trio_server(
    serve: Callable[..., Awaitable[None]], ready: Callable[[int], None], *args: Any
) -> None:
    """Run ``serve(*args, task_status=...)`` until SIGTERM; ``ready(port)`` once listening."""

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                port = await nursery.start(serve, *args)
                ready(port)
                async for _ in signals:
                    break
                nursery.cancel_scope.cancel()

    trio.run(main)


class _NurseryGroup:
    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    def start_soon(self, fn: Callable[[], Awaitable[None]]) -> None:
        self._nursery.start_soon(fn)


class TrioRuntime:
    would_block: tuple[type[BaseException], ...] = (trio.WouldBlock,)

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)

    async def gather(self, fns: Sequence[Callable[[], Awaitable[None]]]) -> None:
        async with trio.open_nursery() as nursery:
            for fn in fns:
                nursery.start_soon(fn)

    def task_group(self) -> AbstractAsyncContextManager[TaskGroup]:
        return _trio_group()

    def event(self) -> EventLike:
        return trio.Event()

    def semaphore(self, n: int) -> AbstractAsyncContextManager[Any]:
        return trio.Semaphore(n)

    async def with_timeout(self, fn: Callable[[], Awaitable[Any]], seconds: float) -> Any:
        try:
            with trio.fail_after(seconds):
                return await fn()
        except trio.TooSlowError:
            raise TimeoutError(f"no answer within {seconds} s") from None


@asynccontextmanager
async def _trio_group() -> AsyncIterator[TaskGroup]:
    async with trio.open_nursery() as nursery:
        yield _NurseryGroup(nursery)
