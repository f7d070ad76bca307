"""Soak: many connections, many requests, connections cut at random all along.

Sizing (decided here, documented in docs/reliability.rst):

* ``MONTE_SOAK_CONNECTIONS`` (default 50): client connections, one per client
  (``max_conns=1``), each from its own host of the simulated network.
* ``MONTE_SOAK_REQUESTS`` (default 4,000): requests in total, each with a unique body.

The test runs over :class:`~monte_trio.testing.FaultyNetwork` (in memory) under trio's
MockClock, so the defaults take about a second of real time per profile and the test stays
in the default run (it is marked ``soak``: ``pytest -m soak -s`` runs only it and shows its
summary; ``nox -s tests`` and CI run it too). Raise the two variables for a longer soak:
``MONTE_SOAK_CONNECTIONS=200 MONTE_SOAK_REQUESTS=20000`` takes about 15 s per profile.

While the clients work, a chaos task (seeded) injects a fault every 0.2-2 virtual ms: most
often it drops a random link of the network, otherwise the server closes a random
connection gracefully (GOAWAY in the native profile). Every request must be accounted
for: answered with its own reply (then the server executed it exactly once), or failed with
:class:`~monte_trio.RequestNotProcessed` (executed zero times), :class:`ConnectionClosed`
(executed at most once: the outcome is unknown) or :class:`~monte_trio.HandshakeError` (the
redial it needed was broken: executed zero times). None is executed twice, none is lost.
"""

from __future__ import annotations

import os
import random
import resource
import sys
from collections import Counter
from contextlib import AsyncExitStack

import pytest
import trio
import trio.testing
from helpers import LiveTasks, is_native

import monte_trio
from monte_trio import (
    Client,
    ConnectionClosed,
    ConnectionConfig,
    Handshake,
    HandshakeError,
    Request,
    RequestNotProcessed,
    Server,
)
from monte_trio.testing import FaultyNetwork

CONNECTIONS = int(os.environ.get("MONTE_SOAK_CONNECTIONS", "50"))
REQUESTS = int(os.environ.get("MONTE_SOAK_REQUESTS", "4000"))
WORKERS_PER_CONNECTION = 4
SEED = int(os.environ.get("MONTE_SOAK_SEED", "20240601"))
CONFIG = ConnectionConfig(grace_period=0.05, keepalive_interval=1, keepalive_tolerance=3)


def max_rss_kib() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss // 1024 if sys.platform == "darwin" else rss  # bytes on macOS, KiB on Linux


@pytest.mark.soak
async def test_soak_random_cuts_lose_and_duplicate_nothing(
    autojump_clock: trio.testing.MockClock, profile: Handshake
) -> None:
    rss_before = max_rss_kib()
    live = LiveTasks()
    trio.lowlevel.add_instrument(live)
    network = FaultyNetwork(seed=SEED, latency=0.002, jitter=0.001)
    executions: Counter[bytes] = Counter()

    async def handler(request: Request) -> bytes:
        executions[request.body] += 1
        await trio.sleep(0.001)
        return b"ok:" + request.body

    outcomes: dict[bytes, str] = {}
    faults: Counter[str] = Counter()
    workers_done = trio.Event()
    server = Server(handler, handshake=profile, config=CONFIG, max_conns=10_000)

    async def work(client: Client, ids: range) -> None:
        for ident in ids:
            body = b"req-%08d" % ident
            try:
                reply = await client.request(body)
            except RequestNotProcessed:
                outcomes[body] = "RequestNotProcessed"
            except ConnectionClosed:
                outcomes[body] = "ConnectionClosed"
            except HandshakeError:
                outcomes[body] = "HandshakeError"
            else:
                assert reply == b"ok:" + body
                assert body not in outcomes, f"{body!r} answered twice"
                outcomes[body] = "answered"

    async def chaos(nursery: trio.Nursery) -> None:
        rng = random.Random(SEED)
        while not workers_done.is_set():  # bounded: the workers finish
            await trio.sleep(rng.uniform(0.0002, 0.002))
            if rng.random() < 0.8:
                links = network.links()
                if links and network.drop(rng.choice(links)):
                    faults["drop"] += 1
            else:
                conns = sorted(server.connections, key=lambda c: c.name)
                conns = [c for c in conns if not c.closed]
                if conns:
                    faults["goaway" if is_native(profile) else "close"] += 1
                    nursery.start_soon(rng.choice(conns).close_gracefully, 0.01)

    streams = len(range(CONNECTIONS * WORKERS_PER_CONNECTION))
    with trio.fail_after(3600):  # virtual seconds; the run takes a few
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve_listeners, [network.listen("server")])
            async with AsyncExitStack() as stack:
                clients = []
                for k in range(CONNECTIONS):
                    source = f"client{k:04d}"

                    async def connect(source: str = source) -> trio.abc.Stream:
                        return await network.connect("server", source=source)

                    clients.append(
                        await stack.enter_async_context(
                            monte_trio.open_client(
                                handshake=profile,
                                config=CONFIG,
                                max_conns=1,
                                connect=connect,
                            )
                        )
                    )
                nursery.start_soon(chaos, nursery)
                async with trio.open_nursery() as workers:
                    for stream in range(streams):
                        client = clients[stream % CONNECTIONS]
                        workers.start_soon(work, client, range(stream, REQUESTS, streams))
                workers_done.set()
            with trio.fail_after(10):
                await server.shutdown()
            nursery.cancel_scope.cancel()
    await trio.testing.wait_all_tasks_blocked()
    trio.lowlevel.remove_instrument(live)
    rss_after = max_rss_kib()

    kinds = Counter(outcomes.values())
    print(
        f"\nsoak[{profile.profile}]: {REQUESTS} requests over {CONNECTIONS} connections, "
        f"{sum(faults.values())} faults injected ({dict(faults)}), "
        f"{kinds['answered']} answered, failed: "
        f"RequestNotProcessed={kinds['RequestNotProcessed']} "
        f"ConnectionClosed={kinds['ConnectionClosed']} "
        f"HandshakeError={kinds['HandshakeError']}; "
        f"{network.statistics().connects} connects; "
        f"virtual time {trio.current_time():.2f} s; "
        f"peak RSS {rss_before} KiB before, {rss_after} KiB after"
    )
    # nothing lost silently, nothing answered twice
    assert len(outcomes) == REQUESTS
    assert sum(kinds.values()) == REQUESTS
    for body, outcome in outcomes.items():
        if outcome == "answered":
            assert executions[body] == 1, body
        elif outcome in ("RequestNotProcessed", "HandshakeError"):
            assert executions[body] == 0, body
        else:
            assert executions[body] <= 1, body
    assert not set(executions) - set(outcomes)  # the server ran nothing that was not sent
    assert faults["drop"] > 0
    assert kinds["answered"] > REQUESTS // 2
    # Calls a GOAWAY left unprocessed (native) are moved by the client's pool to another
    # connection, so they end answered (once, as checked above) rather than failed.
    if is_native(profile):
        assert faults["goaway"] > 0
    leaked = sorted(task.name for task in live.tasks)
    assert not leaked, leaked
