"""Retry and idempotency: monte_trio.retry, idempotent calls moved to another connection
after a connection failure, and the client pool's dial backoff (MockClock)."""

from __future__ import annotations

import itertools
from typing import Protocol

import pytest
import trio
import trio.testing
from helpers import network_server

import monte_trio
from monte_trio import (
    AcceptAnyKey,
    ConnectError,
    ConnectionClosed,
    ConnectionConfig,
    NativeHandshake,
    RemoteMethodError,
    RequestNotProcessed,
    Router,
)
from monte_trio.testing import FaultyNetwork


class Flaky:
    """Fails with ``errors`` in turn, then returns "done"; records when it was called."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.times: list[float] = []

    async def __call__(self, value: str = "done") -> str:
        self.times.append(trio.current_time())
        await trio.lowlevel.checkpoint()
        if self.errors:
            raise self.errors.pop(0)
        return value


async def test_retry_after_request_not_processed_and_connect_errors(
    autojump_clock: trio.testing.MockClock,
) -> None:
    flaky = Flaky(RequestNotProcessed("a"), ConnectError("b", "peer"), RequestNotProcessed("c"))
    assert (
        await monte_trio.retry(flaky, "ok", attempts=4, initial_delay=1.0, max_delay=3.0) == "ok"
    )
    gaps = [b - a for a, b in itertools.pairwise(flaky.times)]
    assert len(gaps) == 3
    for n, gap in enumerate(gaps):  # full jitter below an exponential, capped ceiling
        assert 0 <= gap <= min(3.0, 1.0 * 2**n)


async def test_retry_gives_up_and_never_retries_other_errors(
    autojump_clock: trio.testing.MockClock,
) -> None:
    flaky = Flaky(*[RequestNotProcessed(str(i)) for i in range(5)])
    with pytest.raises(RequestNotProcessed, match="2"):
        await monte_trio.retry(flaky, attempts=3)
    assert len(flaky.times) == 3
    flaky = Flaky(RemoteMethodError("no"), RequestNotProcessed("x"))
    with pytest.raises(RemoteMethodError):
        await monte_trio.retry(flaky, attempts=3)
    # A broken connection: the call may have run; retried only when idempotent.
    flaky = Flaky(ConnectionClosed("lost"))
    with pytest.raises(ConnectionClosed):
        await monte_trio.retry(flaky, attempts=3)
    flaky = Flaky(ConnectionClosed("lost"))
    assert await monte_trio.retry(flaky, attempts=3, idempotent=True) == "done"
    with pytest.raises(ValueError, match="at least 1"):
        await monte_trio.retry(flaky, attempts=0)


async def test_retry_never_sleeps_past_the_callers_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    flaky = Flaky(*[RequestNotProcessed(str(i)) for i in range(100)])
    start = trio.current_time()
    with trio.fail_after(5):
        with pytest.raises(RequestNotProcessed):
            await monte_trio.retry(flaky, attempts=100, initial_delay=1.0, max_delay=60.0)
    # It stopped before a sleep that would have ended past the deadline: the error is the
    # call's own, not trio.TooSlowError, and it came before the deadline.
    assert trio.current_time() - start < 5
    assert len(flaky.times) < 100


class Counter(Protocol):
    @monte_trio.idempotent
    async def read(self) -> int: ...

    async def bump(self) -> int: ...


class CounterService:
    def __init__(self, network: FaultyNetwork) -> None:
        self.network = network
        self.calls = 0

    async def read(self) -> int:
        return await self.bump()

    async def bump(self) -> int:
        self.calls += 1
        if self.calls == 1:
            self.network.drop("server")  # the first call's connection breaks under it
            await trio.sleep_forever()
        return self.calls


@pytest.mark.parametrize("idempotent", [True, False])
async def test_idempotent_calls_move_to_another_connection_after_a_failure(
    autojump_clock: trio.testing.MockClock, idempotent: bool
) -> None:
    network = FaultyNetwork()
    service = CounterService(network)
    router = Router()
    router.add_service(service, Counter)
    handshake = NativeHandshake(trust=AcceptAnyKey())
    config = ConnectionConfig(grace_period=0.5)
    async with (
        network_server(network, router, handshake, config),
        monte_trio.open_client(
            handshake=handshake, config=config, connect=lambda: network.connect("server")
        ) as client,
    ):
        counter = client.proxy(Counter)
        if idempotent:
            assert await counter.read() == 2  # run again on a new connection
            assert client.statistics().dials == 2
        else:
            with pytest.raises(ConnectionClosed):
                await counter.bump()
            assert client.statistics().dials == 1


async def test_consecutive_dial_failures_back_off(autojump_clock: trio.testing.MockClock) -> None:
    network = FaultyNetwork()
    handshake = NativeHandshake(trust=AcceptAnyKey())
    attempts: list[float] = []
    failing = False

    async def connect() -> trio.abc.Stream:
        attempts.append(trio.current_time())
        if failing:
            raise OSError("refused")
        return await network.connect("server")

    async def echo(request: monte_trio.Request) -> bytes:
        return request.body

    async with (
        network_server(network, echo, handshake),
        monte_trio.open_client(
            handshake=handshake, connect=connect, dial_backoff=1.0, max_dial_backoff=4.0
        ) as client,
    ):
        await client.connections[0].aclose()
        failing = True
        for _ in range(8):
            with pytest.raises(ConnectError):
                await client.request(b"x")
        failing = False
        assert await client.request(b"y") == b"y"
        failing = True
        await client.connections[0].aclose()
        with pytest.raises(ConnectError):
            await client.request(b"z")
        with pytest.raises(ConnectError):
            await client.request(b"z")
    gaps = [b - a for a, b in itertools.pairwise(attempts[1:])]
    # The first failure is followed by a wait below 1 s, then 2, 4, 4, 4 ... (capped).
    ceilings = [min(4.0, 2.0**n) for n in range(8)]
    for gap, ceiling in zip(gaps[:8], ceilings, strict=False):
        assert 0 <= gap <= ceiling
    assert sum(gaps[:8]) > 0.5  # without the backoff every attempt is at the same instant
    assert 0 <= gaps[-1] <= 1.0  # a successful dial reset the ceiling
    assert client.statistics().dial_failures == 10
