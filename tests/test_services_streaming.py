"""Streaming methods (Router over streaming calls; stream(), stream_call(), proxies): each
kind, typed items, errors mid-stream, cancellation both ways, back-pressure, deadlines,
refusals, middleware and statistics."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any, Protocol

import msgspec
import pytest
import trio
import trio.testing
from helpers import make_handshake, running_server, socket_stream_pair
from test_docs import run_in_process

import monte_trio
from monte_trio import (
    CallInfo,
    Connection,
    ConnectionClosed,
    ConnectionConfig,
    InvalidArguments,
    MethodErrorCode,
    MethodNotFound,
    RemoteMethodError,
    Router,
)
from monte_trio.testing import open_connection_pair

TIMEOUT = 20


@monte_trio.remote_error("streaming.Gone")
class Gone(Exception):
    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.details = details


class Line(msgspec.Struct):
    number: int
    text: str


class Lines(Protocol):
    def tail(self, name: str, count: int) -> AsyncIterator[Line]: ...

    async def count(self, lines: AsyncIterator[Line]) -> int: ...


class Service:
    """Implements :class:`Lines` (typed items)."""

    def __init__(self) -> None:
        self.received: list[object] = []

    async def tail(self, name: str, count: int) -> AsyncIterator[Line]:
        for number in range(count):
            yield Line(number, f"{name} {number}")

    async def count(self, lines: AsyncIterator[Line]) -> int:
        total = 0
        async for line in lines:
            self.received.append(line)
            total += line.number
        return total


def make_router() -> Router:
    router = Router()

    @router.method
    async def numbers(count: int) -> AsyncIterator[int]:
        for number in range(count):
            yield number

    @router.method
    async def total(items: AsyncIterator[int]) -> int:
        return sum([item async for item in items])

    @router.method
    async def shout(prefix: str, words: AsyncIterator[str]) -> AsyncIterator[str]:
        async for word in words:
            yield prefix + word.upper()

    @router.method
    async def failing(count: int) -> AsyncIterator[int]:
        for number in range(count):
            yield number
        raise Gone("the file was removed", details={"after": count})

    @router.method
    async def refuse_after(limit: int, items: AsyncIterator[int]) -> int:
        seen = 0
        async for _ in items:
            seen += 1
            if seen == limit:
                raise Gone(f"no more than {limit}")
        return seen

    @router.method
    async def add(a: int, b: int) -> int:
        return a + b

    return router


@asynccontextmanager
async def pair(
    router: Router, *, codec: str = "json", socket: bool = True
) -> AsyncIterator[tuple[Connection, Connection]]:
    async with open_connection_pair(
        make_handshake("native"),
        server_handler=router,
        server_call_handler=router.call_handler,
        config=ConnectionConfig(codec=codec),
        transports=socket_stream_pair() if socket else None,
    ) as connections:
        yield connections


# -- each kind ---------------------------------------------------------------------------------


async def test_server_streaming_method() -> None:
    async with pair(make_router()) as (client, _):
        with trio.fail_after(TIMEOUT):
            async with client.stream("numbers", 5) as results:
                assert isinstance(results, monte_trio.MethodStream)
                assert [r async for r in results] == [0, 1, 2, 3, 4]
            async with client.stream("numbers", 0) as results:
                assert [r async for r in results] == []


async def test_client_streaming_method() -> None:
    async with pair(make_router()) as (client, _):
        with trio.fail_after(TIMEOUT):
            async with client.stream_call("total") as call:
                assert isinstance(call, monte_trio.MethodCall)
                for item in range(100):
                    await call.send(item)
                assert await call.finish() == sum(range(100))


async def test_bidirectional_method() -> None:
    async with pair(make_router()) as (client, _):
        with trio.fail_after(TIMEOUT):
            async with client.stream_call("shout", "> ") as call:
                for word in ("a", "b", "c"):
                    await call.send(word)
                    assert await call.receive() == "> " + word.upper()
                await call.send_eof()
                with pytest.raises(trio.EndOfChannel):
                    await call.receive()


async def test_the_server_streams_to_the_client_too() -> None:
    """A Router on the client side serves the server's streaming calls."""
    router = make_router()
    async with open_connection_pair(
        make_handshake("native"), client_handler=router, client_call_handler=router.call_handler
    ) as (_, server):
        with trio.fail_after(TIMEOUT):
            async with server.stream("numbers", 3) as results:
                assert [r async for r in results] == [0, 1, 2]


# -- typed items (msgspec) -------------------------------------------------------------------


async def test_typed_items_through_a_proxy() -> None:
    router = Router()
    service = Service()
    router.add_service(service, Lines, namespace="lines")
    async with pair(router, codec="msgpack") as (client, _):
        with trio.fail_after(TIMEOUT):
            lines = client.proxy(Lines, namespace="lines")
            got = [line async for line in lines.tail("log", 3)]
            assert got == [Line(0, "log 0"), Line(1, "log 1"), Line(2, "log 2")]
            assert all(type(line) is Line for line in got)

            async def produce() -> AsyncIterator[Line]:
                for number in range(4):
                    yield Line(number, "x")

            assert await lines.count(produce()) == 6
            assert service.received == [Line(n, "x") for n in range(4)]
            assert all(type(line) is Line for line in service.received)


async def test_an_item_of_the_wrong_type_is_invalid_arguments() -> None:
    router = Router()
    router.add_service(Service(), Lines)
    async with pair(router, codec="msgpack") as (client, _):
        with trio.fail_after(TIMEOUT):
            async with client.stream_call("count") as call:
                await call.send({"number": 1, "text": "ok"})
                await call.send({"number": "one", "text": "bad"})
                with pytest.raises(InvalidArguments, match="item 2"):
                    await call.finish()


async def test_untyped_stream_of_structs_decodes_to_plain_values() -> None:
    router = Router()
    router.add_service(Service(), Lines)
    async with pair(router, codec="msgpack") as (client, _):
        with trio.fail_after(TIMEOUT):
            async with client.stream("tail", "a", 1) as results:
                assert [r async for r in results] == [{"number": 0, "text": "a 0"}]


class Ticker(Protocol):
    def ticks(self) -> AsyncGenerator[int, None]: ...


async def test_a_proxy_loop_left_early_under_aclosing_cancels_the_method() -> None:
    router = Router()
    ended = trio.Event()

    @router.method
    async def ticks() -> AsyncIterator[int]:
        try:
            number = 0
            while True:
                yield number
                number += 1
        finally:
            ended.set()

    async with pair(router) as (client, _):
        with trio.fail_after(TIMEOUT):
            ticker = client.proxy(Ticker)
            async with aclosing(ticker.ticks()) as stream_of_ticks:
                async for tick in stream_of_ticks:
                    if tick == 2:
                        break
            await ended.wait()


# -- errors ------------------------------------------------------------------------------------


async def test_an_error_mid_stream_is_the_registered_type() -> None:
    async with pair(make_router()) as (client, _):
        with trio.fail_after(TIMEOUT):
            got: list[int] = []

            async def read_all() -> None:
                async with client.stream("failing", 3) as results:
                    async for result in results:
                        got.append(result)

            with pytest.raises(Gone, match="the file was removed") as info:
                await read_all()
            assert got == [0, 1, 2]
            assert info.value.details == {"after": 3}
            assert isinstance(info.value.__cause__, RemoteMethodError)
            assert info.value.__cause__.code == MethodErrorCode.APPLICATION


async def test_a_client_streaming_error_reaches_send() -> None:
    """The method fails while the caller still sends: a send raises its error."""
    async with pair(make_router()) as (client, _):
        with trio.fail_after(TIMEOUT):
            sent = 0

            async def send_many() -> None:
                nonlocal sent
                async with client.stream_call("refuse_after", 3) as call:
                    for item in range(10_000):
                        await call.send(item)
                        sent += 1

            with pytest.raises(Gone, match="no more than 3"):
                await send_many()
            assert 3 <= sent < 10_000


async def test_an_unregistered_exception_is_internal(caplog: pytest.LogCaptureFixture) -> None:
    router = Router()

    @router.method
    async def buggy() -> AsyncIterator[int]:
        yield 1
        raise KeyError("oops")

    async with pair(router) as (client, _):
        with trio.fail_after(TIMEOUT):
            async with client.stream("buggy") as results:
                assert await results.receive() == 1
                with pytest.raises(RemoteMethodError) as info:
                    await results.receive()
    assert info.value.code == MethodErrorCode.INTERNAL
    assert "KeyError" in info.value.message
    assert "Traceback" not in info.value.message
    assert "method buggy raised" in caplog.text


async def test_unknown_streaming_method_is_method_not_found() -> None:
    async with pair(make_router()) as (client, _):
        with trio.fail_after(TIMEOUT):
            async with client.stream("nope") as results:
                with pytest.raises(MethodNotFound, match="no method named 'nope'"):
                    await results.receive()
            async with client.stream_call("nope") as call:
                with pytest.raises(MethodNotFound):
                    await call.finish()
            # The connection is still usable.
            assert await client.call("add", 1, 2) == 3


async def test_kinds_that_do_not_match_are_refused() -> None:
    async with pair(make_router()) as (client, _):
        with trio.fail_after(TIMEOUT):
            with pytest.raises(RemoteMethodError, match="server-streaming method") as info:
                await client.call("numbers", 1)
            assert info.value.code == MethodErrorCode.INVALID_CALL
            async with client.stream("add", 1, 2) as results:
                with pytest.raises(RemoteMethodError, match="unary method") as info:
                    await results.receive()
            assert info.value.code == MethodErrorCode.INVALID_CALL
            async with client.stream("total") as results:
                with pytest.raises(RemoteMethodError, match="client-streaming method"):
                    await results.receive()
            async with client.stream("numbers", "three") as results:
                with pytest.raises(RemoteMethodError):
                    await results.receive()


def test_registration_refuses_two_streams() -> None:
    router = Router()

    async def two(a: AsyncIterator[int], b: AsyncIterator[int]) -> int:
        return 0

    with pytest.raises(TypeError, match="two streams"):
        router.method(two)


# -- cancellation ------------------------------------------------------------------------------


async def test_leaving_the_block_early_cancels_the_method() -> None:
    router = Router()
    ended = trio.Event()
    yielded: list[int] = []

    @router.method
    async def forever() -> AsyncIterator[int]:
        try:
            number = 0
            while True:
                yielded.append(number)
                yield number
                number += 1
        finally:
            ended.set()

    async with pair(router) as (client, _):
        with trio.fail_after(TIMEOUT):
            async with client.stream("forever") as results:
                assert await results.receive() == 0
                assert await results.receive() == 1
            await ended.wait()
            assert router.statistics()["forever"].calls == 1
            assert len(yielded) < 1000  # it stopped, rather than ran on unread


async def test_caller_cancel_scope_cancels_a_client_streaming_method() -> None:
    router = Router()
    entered = trio.Event()
    cancelled = trio.Event()

    @router.method
    async def hold(items: AsyncIterator[int]) -> int:
        entered.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.set()
            raise

    async with pair(router) as (client, _):
        with trio.fail_after(TIMEOUT):
            with trio.CancelScope() as scope:
                async with client.stream_call("hold") as call:
                    await entered.wait()
                    scope.cancel()
                    await call.finish()
            await cancelled.wait()
            assert router.statistics()["hold"].errors == 1


async def test_the_serving_side_ending_reaches_the_caller() -> None:
    """The server's connection closes mid-stream: the caller's iteration fails."""
    router = Router()
    started = trio.Event()

    @router.method
    async def slow() -> AsyncIterator[int]:
        yield 1
        started.set()
        await trio.sleep(1000)
        yield 2  # pragma: no cover

    async with pair(router) as (client, server):
        with trio.fail_after(TIMEOUT):
            async with client.stream("slow") as results:
                assert await results.receive() == 1
                await started.wait()
                await server.aclose()
                with pytest.raises((ConnectionClosed, monte_trio.CallCancelled)):
                    await results.receive()


# -- back-pressure -----------------------------------------------------------------------------


async def test_a_slow_consumer_blocks_the_generator() -> None:
    router = Router()
    produced = 0

    @router.method
    async def flood() -> AsyncIterator[bytes]:
        nonlocal produced
        while True:
            produced += 1
            yield b"x" * 1000

    config = ConnectionConfig(stream_window=64 * 1024)
    async with open_connection_pair(
        make_handshake("native"),
        server_handler=router,
        server_call_handler=router.call_handler,
        config=config,
    ) as (client, _):
        with trio.fail_after(TIMEOUT):
            async with client.stream("flood") as results:
                assert await results.receive() == b"x" * 1000
                await trio.testing.wait_all_tasks_blocked()
                stalled = produced
                # Bounded by the call's window: 64 KiB / (1000 + 2 + 64) messages at most.
                assert 0 < stalled <= (64 * 1024) // (1000 + 2 + 64) + 2
                await trio.testing.wait_all_tasks_blocked()
                assert produced == stalled  # the generator waits at its yield
                for _ in range(200):
                    await results.receive()
                assert produced > stalled + 100


# -- deadlines ---------------------------------------------------------------------------------


async def test_the_deadline_crosses_the_wire(autojump_clock: trio.testing.MockClock) -> None:
    router = Router()
    seen: list[float] = []

    @router.method
    async def ticks() -> AsyncIterator[int]:
        seen.append(trio.current_effective_deadline() - trio.current_time())
        seen.append(monte_trio.current_call().deadline - trio.current_time())
        try:
            yield 0
            await trio.sleep(100)
        finally:
            seen.append(trio.current_time())

    async with pair(router, socket=False) as (client, _):
        start = trio.current_time()
        with trio.move_on_after(2.5):
            async with client.stream("ticks") as results:
                async for _ in results:
                    pass
        await trio.testing.wait_all_tasks_blocked()
        assert seen[0] == pytest.approx(2.5, abs=1e-3)  # the method's own deadline
        assert seen[1] == pytest.approx(2.5, abs=1e-3)
        assert seen[2] == pytest.approx(start + 2.5, abs=1e-3)  # cancelled then
        assert router.statistics()["ticks"].errors == 1


async def test_a_deadline_passing_at_the_server_is_deadline_exceeded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The caller's own scope is shielded from its deadline: the server's error comes."""
    router = Router()

    @router.method
    async def stuck() -> AsyncIterator[int]:
        await trio.sleep(100)
        yield 0  # pragma: no cover

    async with pair(router, socket=False) as (client, _):
        with trio.move_on_after(1.0):
            async with client.stream("stuck") as results:
                with trio.CancelScope(shield=True), pytest.raises(RemoteMethodError) as info:
                    await results.receive()
        assert info.value.code == MethodErrorCode.DEADLINE_EXCEEDED


# -- middleware and statistics -----------------------------------------------------------------


async def test_middleware_and_statistics_see_streaming_calls() -> None:
    seen: list[tuple[str, str, str, object]] = []

    async def record(call: CallInfo, next: Any) -> Any:
        result = await next()
        seen.append((call.side, call.method, call.kind, result))
        return result

    router = make_router()
    server_router = Router(middleware=[record])
    server_router.include(router)
    handshake = make_handshake("native")
    async with (
        running_server(server_router, handshake, call_handler=server_router.call_handler) as (
            _,
            port,
        ),
        monte_trio.open_client("127.0.0.1", port, handshake=handshake, middleware=[record]) as c,
    ):
        with trio.fail_after(TIMEOUT):
            with monte_trio.call_metadata(tenant="blue"):
                async with c.stream("numbers", 2) as results:
                    assert [r async for r in results] == [0, 1]
            async with c.stream_call("total") as call:
                await call.send(5)
                assert await call.finish() == 5
            async with c.stream_call("shout", "") as call:
                await call.send_eof()
                assert [r async for r in call] == []
    kinds = [(side, method, kind) for side, method, kind, _ in seen]
    assert ("server", "numbers", "server-streaming") in kinds
    assert ("server", "total", "client-streaming") in kinds
    assert ("server", "shout", "bidirectional") in kinds
    assert ("client", "numbers", "server-streaming") in kinds
    assert ("server", "total", "client-streaming", 5) in seen
    stats = server_router.statistics()
    assert stats["numbers"].calls == 1
    assert stats["total"].calls == 1
    assert stats["numbers"].errors == 0


async def test_current_call_in_a_streaming_method() -> None:
    router = Router()

    @router.method
    async def whoami() -> AsyncIterator[str]:
        info = monte_trio.current_call()
        yield info.kind
        yield info.metadata.get("tenant", "")

    async with pair(router) as (client, _):
        with trio.fail_after(TIMEOUT):
            with monte_trio.call_metadata(tenant="green"):
                async with client.stream("whoami") as results:
                    assert [r async for r in results] == ["server-streaming", "green"]


# -- the docs ----------------------------------------------------------------------------------


async def test_the_services_page_streaming_example_runs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    await run_in_process("services.rst", "services-streaming")
    assert capsys.readouterr().out.splitlines() == [
        "app.log 0: started",
        "app.log 1: started",
        "app.log 2: started",
        "total: 10",
        "refused: NotFound: no file 'missing.log'",
    ]
