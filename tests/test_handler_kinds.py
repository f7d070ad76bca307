"""Handler kinds are chosen explicitly: anything returning an awaitable runs in a worker;
a plain function runs inline only when wrapped with ``monte_trio.inline``."""

from __future__ import annotations

import functools
import logging
import textwrap
from collections.abc import Awaitable
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing
from helpers import is_native, run_mypy_strict

import monte_trio
from monte_trio import (
    ConnectionClosed,
    Handshake,
    InlineHandler,
    RemoteError,
    Request,
    inline,
)
from monte_trio.testing import open_connection_pair

TIMEOUT = 30  # seconds
FIX = "monte_trio.inline"  # what the error for an unwrapped plain function names
# mypy runs from the project's root: its configuration, and its cache (so that monte_trio
# itself is not checked again from scratch).


async def _upper(request: Request) -> bytes:
    await trio.lowlevel.checkpoint()
    return request.body.upper()


class _AsyncCallable:
    async def __call__(self, request: Request) -> bytes:
        return await _upper(request)


class _ReturnsAwaitable:
    """A plain ``__call__`` that returns an awaitable: an async handler all the same."""

    def __call__(self, request: Request) -> Awaitable[bytes]:
        return _upper(request)


@pytest.mark.parametrize(
    "handler",
    [
        _upper,
        lambda request: _upper(request),
        functools.partial(_upper),
        _AsyncCallable(),
        _ReturnsAwaitable(),
    ],
    ids=["async def", "lambda", "partial", "async __call__", "__call__ returning a coroutine"],
)
async def test_anything_returning_an_awaitable_is_an_async_handler(
    profile: Handshake, handler: monte_trio.AsyncHandler
) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(profile, server_handler=handler) as (client, server):
            assert await client.request(b"abc") == b"ABC"
            await client.send(b"note")
            assert await client.request(b"") == b""
            stats = server.statistics()
            assert (stats.requests_received, stats.messages_received) == (2, 1)


async def test_a_lambda_calling_back_over_its_connection(native: Handshake) -> None:
    # A lambda returning a coroutine runs in a worker, so it may await a call back to the
    # peer over the same connection (inline, this would be impossible).
    async def call_back(request: Request) -> bytes:
        return b"server got " + await request.connection.request(b"back")

    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(
            native,
            server_handler=lambda request: call_back(request),
            client_handler=lambda request: _upper(request),
        ) as (client, _):
            assert await client.request(b"x") == b"server got BACK"


def test_inline_wraps_a_plain_function() -> None:
    def answer(request: Request) -> bytes:
        return request.body

    handler = inline(answer)
    assert isinstance(handler, InlineHandler)
    assert handler.func is answer
    assert handler == inline(answer)  # frozen attrs: compared by value
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        handler.func = answer  # type: ignore[misc]
    with pytest.raises(TypeError, match="already inline"):
        inline(handler)
    with pytest.raises(TypeError, match="takes a function"):
        inline(b"not callable")  # type: ignore[arg-type]


async def test_an_inline_handler_runs_in_order_in_the_reader(profile: Handshake) -> None:
    seen: list[bytes] = []
    running: list[int] = []

    def answer(request: Request) -> bytes | None:
        seen.append(request.body)
        # An inline handler is never a running worker: nothing is counted while it runs.
        running.append(request.connection.statistics().running_handlers)
        if request.oneway:
            return None
        return b"re:" + request.body

    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(profile, server_handler=inline(answer)) as (
            client,
            server,
        ):
            for i in range(20):
                client.send_nowait(b"n%02d" % i)
            replies: list[bytes] = []
            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(_call, client, b"q%02d" % i, replies)
                    # each caller writes its request before the next one starts
                    await trio.testing.wait_all_tasks_blocked()
            assert server.statistics().running_handlers == 0
    assert seen == [b"n%02d" % i for i in range(20)] + [b"q%02d" % i for i in range(20)]
    assert sorted(replies) == [b"re:q%02d" % i for i in range(20)]
    assert running == [0] * 40


async def _call(client: monte_trio.Connection, body: bytes, into: list[bytes]) -> None:
    into.append(await client.request(body))


async def test_an_unwrapped_plain_function_fails_with_the_fix(
    profile: Handshake, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[bytes] = []

    def plain(request: Request) -> bytes:
        calls.append(request.body)
        return request.body

    caplog.set_level(logging.ERROR, logger="monte_trio")
    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(profile, server_handler=plain) as (client, server):  # type: ignore[arg-type]
            if is_native(profile):
                with pytest.raises(RemoteError, match=FIX) as info:
                    await client.request(b"a")
                assert "not an awaitable" in info.value.message
                # the connection goes on; each call fails the same way, logged once
                with pytest.raises(RemoteError, match=FIX):
                    await client.request(b"b")
                assert not client.closed
            else:  # monte-v1 has no error reply: the connection closes, saying why
                with pytest.raises(ConnectionClosed):
                    await client.request(b"a")
                assert FIX in str(server.close_reason)
    assert calls[:1] == [b"a"]
    errors = [r.getMessage() for r in caplog.records if FIX in r.getMessage()]
    assert len(errors) == 1, errors
    assert "returned a bytes, not an awaitable" in errors[0]


async def test_an_unwrapped_plain_function_on_one_way_messages_is_logged(
    native: Handshake, caplog: pytest.LogCaptureFixture
) -> None:
    def plain(request: Request) -> None:
        return None

    caplog.set_level(logging.ERROR, logger="monte_trio")
    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(native, server_handler=plain) as (client, _):  # type: ignore[arg-type]
            await client.send(b"x")
            await client.send(b"y")
            # the connection goes on
            with pytest.raises(RemoteError, match=FIX):
                await client.request(b"z")
    assert any("returned a NoneType, not an awaitable" in r.getMessage() for r in caplog.records)


MYPY_SAMPLE = textwrap.dedent(
    """
    import monte_trio

    def plain(request: monte_trio.Request) -> bytes:
        return request.body

    async def coroutine(request: monte_trio.Request) -> bytes:
        return request.body

    ok_async = monte_trio.Server(coroutine)
    ok_lambda = monte_trio.Server(lambda request: coroutine(request))
    ok_inline = monte_trio.Server(monte_trio.inline(plain))
    refused = monte_trio.Server(plain)  # line 13
    """
)


async def test_mypy_rejects_an_unwrapped_plain_function(tmp_path: Path) -> None:
    returncode, out = await run_mypy_strict(tmp_path, MYPY_SAMPLE)
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert len(errors) == 1, out
    # (mypy's cache may name the file of an identical earlier sample)
    assert 'sample.py:13: error: Argument 1 to "Server"' in errors[0], out
    assert returncode == 1
