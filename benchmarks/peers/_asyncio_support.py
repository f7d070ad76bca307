"""The asyncio Runtime for the workload drivers, and running an asyncio server until SIGTERM."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from ..common import EventLike, TaskGroup


class WouldBlock(Exception):
    """Raised by an asyncio peer's ``send_nowait`` when it cannot queue without waiting."""


class _Group:
    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[None]] = []

    def start_soon(self, fn: Callable[[], Awaitable[None]]) -> None:
        async def run() -> None:
            await fn()

        self.tasks.append(asyncio.ensure_future(run()))


@asynccontextmanager
async def _group() -> AsyncIterator[TaskGroup]:
    group = _Group()
    try:
        yield group
    except BaseException:
        for t in group.tasks:
            t.cancel()
        raise
    finally:
        if group.tasks:
            results = await asyncio.gather(*group.tasks, return_exceptions=True)
            for r in results:
                if isinstance(r, Exception):
                    raise r


class AsyncioRuntime:
    would_block: tuple[type[BaseException], ...] = (WouldBlock,)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def gather(self, fns: Sequence[Callable[[], Awaitable[None]]]) -> None:
        tasks = [asyncio.ensure_future(_call(fn)) for fn in fns]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()

    def task_group(self) -> AbstractAsyncContextManager[TaskGroup]:
        return _group()

    def event(self) -> EventLike:
        return asyncio.Event()

    def semaphore(self, n: int) -> AbstractAsyncContextManager[Any]:
        return asyncio.Semaphore(n)

    async def with_timeout(self, fn: Callable[[], Awaitable[Any]], seconds: float) -> Any:
        try:
            return await asyncio.wait_for(fn(), seconds)
        except asyncio.TimeoutError:
            raise TimeoutError(f"no answer within {seconds} s") from None


async def _call(fn: Callable[[], Awaitable[None]]) -> None:
    await fn()


async def wait_for_sigterm() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
