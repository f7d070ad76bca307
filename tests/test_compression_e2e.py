"""Compression end to end: connections over loopback TCP with LZ4, Zstandard or nothing
on either side; a 1 MiB JSON-like body arrives intact, and the bytes on the wire (counted
by a wrapping transport) say whether it travelled compressed. Also the configuration, the
per-call opt-out (``compress=False``) and a handler's ``request.compress_reply``. Tests
that need a codec's package skip without it (``pip install monte_trio[compression]``)."""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
from helpers import LOCALHOST, json_body, make_handshake, running_server

import monte_trio
from monte_trio import Connection, ConnectionConfig, Handler, Request
from monte_trio._proto import _compression as comp
from monte_trio.testing import open_connection_pair

HAS = {"lz4": comp.is_available(1), "zstd": comp.is_available(2)}
needs_both = pytest.mark.skipif(
    not all(HAS.values()), reason="needs lz4 and zstandard (monte_trio[compression])"
)
MIB = 1024 * 1024
TIMEOUT = 30


BODY = json_body(MIB)


class Counting(trio.abc.Stream):
    """A transport that counts the bytes written through it."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.sent = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sent += len(data)
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def echo_unless_raw(request: Request) -> bytes:
    """Echo; a body starting with ``raw:`` gets its reply uncompressed."""
    if request.body.startswith(b"raw:"):
        request.compress_reply = False
    await trio.lowlevel.checkpoint()
    return request.body


@monte_trio.inline
def inline_echo_unless_raw(request: Request) -> bytes:
    if request.body.startswith(b"raw:"):
        request.compress_reply = False
    return request.body


@asynccontextmanager
async def loopback_pair(
    client_config: ConnectionConfig,
    server_config: ConnectionConfig,
    handler: Handler = echo_unless_raw,
    profile: str = "native",
) -> AsyncIterator[tuple[Connection, Connection, Counting, Counting]]:
    """Two connections over real loopback TCP: ``(client, server, client's transport,
    server's transport)``; the transports count what each side writes."""
    (listener,) = await trio.open_tcp_listeners(0, host=LOCALHOST)
    port = listener.socket.getsockname()[1]
    try:
        raw_client = await trio.open_tcp_stream(LOCALHOST, port)
        raw_server = await listener.accept()
    finally:
        await listener.aclose()
    ends = Counting(raw_client), Counting(raw_server)
    async with open_connection_pair(
        make_handshake(profile),
        transports=ends,
        client_config=client_config,
        server_config=server_config,
        server_handler=handler,
    ) as (client, server):
        yield client, server, ends[0], ends[1]


async def wire_bytes(end: Counting, action: Callable[[], Awaitable[object]]) -> int:
    """What ``end`` wrote while ``action`` ran."""
    before = end.sent
    await action()
    return end.sent - before


def config(*codecs: str) -> ConnectionConfig:
    return ConnectionConfig(compression=codecs, keepalive_interval=None)


CODEC_SETS = [("lz4",), ("zstd",), ()]


@needs_both
@pytest.mark.parametrize("server_codecs", CODEC_SETS, ids=lambda c: "+".join(c) or "none")
@pytest.mark.parametrize("client_codecs", CODEC_SETS, ids=lambda c: "+".join(c) or "none")
async def test_a_large_body_travels_compressed_only_with_a_codec_in_common(
    client_codecs: tuple[str, ...], server_codecs: tuple[str, ...]
) -> None:
    """Same codec on both sides: about a third of the bytes each way. Different codecs,
    or none on one side: the body travels as it is, and nothing fails."""
    compressed = bool(client_codecs) and client_codecs == server_codecs
    with trio.fail_after(TIMEOUT):
        async with loopback_pair(config(*client_codecs), config(*server_codecs)) as (
            client,
            _,
            client_end,
            server_end,
        ):
            replies: list[bytes] = []

            async def call() -> None:
                replies.append(await client.request(BODY))

            before = server_end.sent
            up = await wire_bytes(client_end, call)
            down = server_end.sent - before
            assert replies == [BODY]
            if compressed:
                assert up < len(BODY) // 2
                assert down < len(BODY) // 2
            else:
                assert up > len(BODY)
                assert down > len(BODY)
            assert client.facts.local_hello is not None
            assert client.facts.local_hello.compression == comp.resolve(client_codecs)
            assert client.facts.peer_hello is not None
            assert client.facts.peer_hello.compression == comp.resolve(server_codecs)


@needs_both
@pytest.mark.parametrize(
    "handler",
    [
        echo_unless_raw,
        inline_echo_unless_raw,
        monte_trio.Router(fallback=echo_unless_raw),
        monte_trio.Router(fallback=inline_echo_unless_raw),
    ],
    ids=["async", "inline", "router-fallback-async", "router-fallback-inline"],
)
async def test_compress_false_and_compress_reply_send_bodies_as_they_are(
    handler: Handler,
) -> None:
    raw = b"raw:" + BODY
    with trio.fail_after(TIMEOUT):
        async with loopback_pair(config("lz4", "zstd"), config("zstd", "lz4"), handler) as (
            client,
            _,
            client_end,
            server_end,
        ):
            replies: list[bytes] = []

            async def call(body: bytes, compress: bool) -> None:
                replies.append(await client.request(body, compress=compress))

            # Compressed both ways.
            before = server_end.sent
            up = await wire_bytes(client_end, lambda: call(BODY, True))
            assert (up < len(BODY) // 2, server_end.sent - before < len(BODY) // 2) == (
                True,
                True,
            )
            # The request as it is; the reply compressed.
            before = server_end.sent
            up = await wire_bytes(client_end, lambda: call(BODY, False))
            assert (up > len(BODY), server_end.sent - before < len(BODY) // 2) == (True, True)
            # The request compressed; the handler sends its reply as it is.
            before = server_end.sent
            up = await wire_bytes(client_end, lambda: call(raw, True))
            assert (up < len(BODY) // 2, server_end.sent - before > len(BODY)) == (True, True)
            assert replies == [BODY, BODY, raw]


@needs_both
async def test_one_way_messages_compress_unless_told_not_to() -> None:
    got: list[bytes] = []
    done = trio.Semaphore(0)

    async def handler(request: Request) -> None:
        got.append(request.body)
        done.release()

    with trio.fail_after(TIMEOUT):
        async with loopback_pair(config("lz4"), config("lz4"), handler) as (
            client,
            _,
            client_end,
            _,
        ):
            sizes = []
            for compress in (True, False):
                sizes.append(
                    await wire_bytes(client_end, partial(client.send, BODY, compress=compress))
                )
                await done.acquire()
            client.send_nowait(BODY, compress=False)
            await done.acquire()
            client.send_nowait(BODY)
            await done.acquire()
            assert sizes[0] < len(BODY) // 2 < len(BODY) < sizes[1]
            assert got == [BODY] * 4


@needs_both
async def test_a_client_passes_compress_to_its_connection() -> None:
    ends: list[Counting] = []

    async def dial() -> trio.abc.Stream:
        end = Counting(await trio.open_tcp_stream(LOCALHOST, port))
        ends.append(end)
        return end

    got = trio.Semaphore(0)

    async def handler(request: Request) -> bytes:
        if request.oneway:
            got.release()
        return b"ok"

    with trio.fail_after(TIMEOUT):
        async with (
            running_server(handler, make_handshake("native"), config=config("lz4")) as (_, port),
            monte_trio.open_client(
                handshake=make_handshake("native"), config=config("lz4"), connect=dial, max_conns=1
            ) as client,
        ):
            assert await client.request(b"warm up") == b"ok"
            (end,) = ends
            sizes: dict[str, int] = {}
            for compress in (True, False):
                sizes[f"request {compress}"] = await wire_bytes(
                    end, partial(client.request, BODY, compress=compress)
                )

                async def send() -> None:
                    await client.send(BODY, compress=compress)  # noqa: B023
                    await got.acquire()

                sizes[f"send {compress}"] = await wire_bytes(end, send)

                async def send_nowait() -> None:
                    client.send_nowait(BODY, compress=compress)  # noqa: B023
                    await got.acquire()

                sizes[f"send_nowait {compress}"] = await wire_bytes(end, send_nowait)
            assert {k: v < len(BODY) // 2 for k, v in sizes.items()} == {
                k: k.endswith("True") for k in sizes
            }


async def test_monte_v1_takes_compress_and_sends_as_it_is() -> None:
    """Go monte's wire has no compression: the keyword is accepted and changes nothing."""
    body = json_body(3000)
    with trio.fail_after(TIMEOUT):
        async with loopback_pair(config(), config(), profile="monte-v1") as (
            client,
            _,
            client_end,
            _,
        ):
            for compress in (True, False):
                replies: list[bytes] = []

                async def call() -> None:
                    replies.append(await client.request(body, compress=compress))  # noqa: B023

                assert await wire_bytes(client_end, call) > len(body)
                assert replies == [body]


# -- configuration -------------------------------------------------------------------------


def test_compression_is_off_by_default() -> None:
    """Off unless asked for: a message's compressed length depends on its content."""
    assert ConnectionConfig().compression == ()
    assert ConnectionConfig().compression_threshold == 1024
    assert ConnectionConfig(compression=["zstd"] if HAS["zstd"] else []).compression == (
        ("zstd",) if HAS["zstd"] else ()
    )


def test_a_bad_codec_list_is_refused_with_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown compression codec 'gzip'; choose from"):
        ConnectionConfig(compression=("gzip",))
    with pytest.raises(TypeError, match=r"a sequence of codec names, such as \('lz4',\)"):
        ConnectionConfig(compression="lz4")
    with pytest.raises(ValueError, match="'compression_threshold' must be >= 0"):
        ConnectionConfig(compression_threshold=-1)
    # Without the zstandard package: refused by name, with the extra that brings it.
    monkeypatch.setattr(comp, "_BACKENDS", {})
    real = importlib.import_module

    def no_zstd(name: str, package: str | None = None) -> Any:
        if name == "zstandard":
            raise ImportError("No module named 'zstandard'")
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", no_zstd)
    with pytest.raises(
        ValueError, match=r"zstandard package: pip install monte_trio\[compression\]"
    ):
        ConnectionConfig(compression=("zstd",))


@needs_both
async def test_the_threshold_is_each_senders_own() -> None:
    """The client compresses bodies from 100 bytes; the server keeps the default 1 KiB."""
    body = json_body(900)
    low = ConnectionConfig(compression=("lz4",), compression_threshold=100)
    with trio.fail_after(TIMEOUT):
        async with loopback_pair(low, config("lz4")) as (client, _, client_end, server_end):
            before = server_end.sent
            assert await wire_bytes(client_end, lambda: client.request(body)) < len(body)
            assert server_end.sent - before > len(body)
