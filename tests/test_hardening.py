"""Hardening (issue 9): a hostile peer can end only its own connection, and nothing it
sends grows memory without a bound.

The hostile peers are hand-driven with the sans-IO pieces of ``monte_trio._proto``: a
native handshake with any hello, then raw frames. Every attack on a real server (127.0.0.1)
ends with a well-behaved client that must still be served by the same server. Only public
behaviour is observed: bytes on the wire, the public API.

Waiting on a real server's reaction to socket events uses the same bounded reads as
tests/test_hostile.py (every wait under ``trio.fail_after``).
"""

from __future__ import annotations

import functools
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

import monte_trio
from monte_trio import (
    AcceptAnyKey,
    Connection,
    ConnectionClosed,
    ConnectionConfig,
    HandshakeError,
    Identity,
    NoiseHandshake,
    RemoteError,
    Request,
    RequestNotProcessed,
    SecureStream,
    Server,
)
from monte_trio._proto import _native as wire
from monte_trio._proto._frames import Frame
from monte_trio._proto._noise import HandshakeState
from monte_trio.testing import secure_stream_pair

LOCALHOST = "127.0.0.1"
_U16 = struct.Struct(">H")
U32_MAX = 2**32 - 1
ONEWAY, REQUEST, REPLY, ERROR, CANCEL, PING, PONG, GOAWAY = range(8)


# ---------------------------------------------------------------------------------------
# A raw native peer
# ---------------------------------------------------------------------------------------


def hello_bytes(max_record: int = wire.MAX_RECORD, max_message: int = 2**20) -> bytes:
    """A version 1 hello with any limits (u32 fields, unchecked here)."""
    return struct.pack(">BBIII", wire.VERSION, 0, max_record, max_message, 0)


def frame(kind: int, ident: int, payload: bytes = b"", flags: int = 0) -> bytes:
    """One record's plaintext: the frame header then the payload."""
    return wire.HEADER.pack(kind, flags, ident) + payload


class _Bytes:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError
            self.buffer += data
        chunk = bytes(self.buffer[:n])
        del self.buffer[:n]
        return chunk

    async def message(self) -> bytes:
        (length,) = _U16.unpack(await self.exactly(2))
        return await self.exactly(length)


class RawPeer:
    """The hostile end of a native connection: sends any record plaintext, reads frames."""

    def __init__(self, secure: SecureStream) -> None:
        self.secure = secure
        self._frames: list[Frame] = []
        self._kept: list[Frame] = []
        self._decoder = wire.NativeCodec(
            max_record_size=wire.MAX_RECORD, send_limit=U32_MAX, receive_limit=U32_MAX
        )

    async def send(self, *plaintexts: bytes) -> bool:
        """Send records; ``False`` if the real peer has already closed the connection."""
        try:
            await self.secure.send_records(list(plaintexts))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    async def next_frame(self) -> Frame | None:
        """The next frame from the real peer; ``None`` once it has closed."""
        while not self._frames:
            try:
                records = await self.secure.receive_records()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            if not records:
                return None
            for record in records:
                decoded = self._decoder.decode(record)
                if decoded is not None:
                    self._frames.append(decoded)
        return self._frames.pop(0)

    async def frame_of(self, *kinds: int, ident: int | None = None) -> Frame | None:
        """The first frame of one of ``kinds`` (and ``ident``, if given); others are kept
        for later calls. ``None`` once the real peer has closed."""

        def wanted(f: Frame) -> bool:
            return f[0] in kinds and (ident is None or f[1] == ident)

        for i, kept in enumerate(self._kept):
            if wanted(kept):
                return self._kept.pop(i)
        for _ in range(100_000):
            got = await self.next_frame()
            if got is None or wanted(got):
                return got
            self._kept.append(got)
        raise AssertionError("too many frames")  # pragma: no cover

    async def wait_closed(self) -> list[Frame]:
        """Read until the real peer closes; return the frames it sent meanwhile."""
        seen: list[Frame] = []
        for _ in range(1_000_000):
            got = await self.next_frame()
            if got is None:
                return seen
            seen.append(got)
        raise AssertionError("never closed")  # pragma: no cover

    async def aclose(self) -> None:
        await self.secure.aclose()


def _state(initiator: bool, preamble: bytes) -> HandshakeState:
    name = wire.protocol_name(psk=False)
    return HandshakeState(
        name,
        initiator=initiator,
        prologue=wire.prologue(name, preamble),
        s=Identity.generate().private_bytes(),
    )


def _secure(
    stream: trio.abc.Stream,
    state: HandshakeState,
    peer_hello: wire.Hello,
    initiator: bool,
    rest: bytes,
) -> tuple[SecureStream, list[bytes]]:
    first, second = state.split()
    send, receive = (first, second) if initiator else (second, first)
    sealer, opener = wire.transport(
        send, receive, peer_max_record=peer_hello.max_record_size, own_max_record=wire.MAX_RECORD
    )
    codec = wire.NativeCodec(
        max_record_size=peer_hello.max_record_size, send_limit=U32_MAX, receive_limit=U32_MAX
    )
    secure = SecureStream(stream, sealer, opener, profile="native", codec=codec, initiator=True)
    return secure, opener.receive_data(rest) if rest else []


async def raw_client(port: int, hello: bytes) -> RawPeer | None:
    """Handshake with a real server announcing ``hello``: the raw peer, or ``None`` if
    the server closed the connection instead of accepting (it refused the hello)."""
    stream = await trio.open_tcp_stream(LOCALHOST, port)
    preamble = wire.encode_preamble(0)
    state = _state(True, preamble)
    msg1 = state.write_message(b"")
    await stream.send_all(preamble + _U16.pack(len(msg1)) + msg1)
    reader = _Bytes(stream)
    await reader.exactly(wire.PREAMBLE_SIZE)
    server_hello = wire.Hello.decode(state.read_message(await reader.message()))
    msg3 = state.write_message(hello)
    await stream.send_all(_U16.pack(len(msg3)) + msg3)
    secure, records = _secure(stream, state, server_hello, True, bytes(reader.buffer))
    try:
        while not records:
            data = await stream.receive_some(65536)
            if not data:
                await stream.aclose()
                return None
            records = secure._opener.receive_data(data)  # the verdict: not a frame
    except trio.BrokenResourceError:
        await stream.aclose()
        return None
    assert wire.decode_verdict(records[0]) == (True, "")
    peer = RawPeer(secure)
    for record in records[1:]:
        decoded = peer._decoder.decode(record)
        if decoded is not None:
            peer._frames.append(decoded)
    return peer


async def raw_server_accept(stream: trio.abc.Stream, hello: bytes) -> RawPeer | None:
    """The responder's side of a handshake announcing ``hello``; ``None`` if the real
    client gave up (it refused the hello)."""
    reader = _Bytes(stream)
    preamble = await reader.exactly(wire.PREAMBLE_SIZE)
    state = _state(False, preamble)
    state.read_message(await reader.message())
    msg2 = state.write_message(hello)
    await stream.send_all(wire.encode_preamble(0) + _U16.pack(len(msg2)) + msg2)
    try:
        msg3 = await reader.message()
    except (EOFError, trio.BrokenResourceError):
        return None
    if not msg3:
        return None
    client_hello = wire.Hello.decode(state.read_message(msg3))
    secure, _ = _secure(stream, state, client_hello, False, bytes(reader.buffer))
    await secure.send_records([wire.encode_verdict(True)])
    return RawPeer(secure)


@asynccontextmanager
async def hostile_server(
    hello: bytes, attack: Callable[[RawPeer], Awaitable[None]]
) -> AsyncIterator[int]:
    """A raw native server on 127.0.0.1 that runs ``attack`` on each client; yields the
    port."""

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            peer = await raw_server_accept(stream, hello)
            if peer is not None:
                await attack(peer)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, host=LOCALHOST), handle, 0
        )
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------------------
# The real server
# ---------------------------------------------------------------------------------------

LONG_TEXT = "é" * 3000  # 6,000 bytes of two-byte characters


async def hardened_handler(request: Request) -> bytes:
    if request.body == b"raise":
        raise ValueError(LONG_TEXT)
    if request.body == b"big":
        return bytes(2000)  # more than a peer at the floor accepts
    if request.body == b"wait":
        await trio.sleep_forever()
    return request.body


@asynccontextmanager
async def serving(**kwargs: object) -> AsyncIterator[tuple[Server, int]]:
    server = Server(hardened_handler, trust=AcceptAnyKey(), **kwargs)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(server.serve, 0, LOCALHOST)
        try:
            yield server, listeners[0].socket.getsockname()[1]
        finally:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + 10
                await server.shutdown(grace_period=1.0)
            nursery.cancel_scope.cancel()


async def assert_served(port: int) -> None:
    """A well-behaved client completes a round trip with the same server."""
    with trio.fail_after(5):
        async with monte_trio.open_client(LOCALHOST, port, trust=AcceptAnyKey()) as client:
            assert await client.request(b"still served") == b"still served"


def check_text(payload: bytes, limit: int) -> str:
    assert len(payload) <= limit
    return payload.decode("utf-8")  # cut on a character boundary: decodes strictly


async def attack_server_paths(peer: RawPeer, max_message: int) -> None:
    """Every path on which the server writes on behalf of the protocol, towards a peer
    that accepts only ``max_message`` bytes: pong, error reply, "reply could not be
    sent", keepalive ping."""
    await peer.send(frame(PING, 7, b"12345678"))
    assert await peer.frame_of(PONG) == (PONG, 7, b"12345678")
    await peer.send(frame(REQUEST, 1, b"raise"))
    kind, ident, payload = await peer.frame_of(REPLY, ERROR) or (None, 0, b"")
    assert (kind, ident) == (ERROR, 1)
    assert check_text(payload, max_message).startswith("ValueError: éé")
    await peer.send(frame(REQUEST, 3, b"big"))
    got = await peer.frame_of(REPLY, ERROR)
    expect_error = max_message < 2000
    assert got is not None
    assert got[:2] == ((ERROR, 3) if expect_error else (REPLY, 3))
    if expect_error:
        assert "the reply could not be sent" in check_text(got[2], max_message)
    # The server's own keepalive PING (interval 0.05 s): answered, and it fits.
    ping = await peer.frame_of(PING)
    assert ping is not None
    assert len(ping[2]) <= wire.MAX_CONTROL_PAYLOAD
    await peer.send(frame(REQUEST, 5, b"x" * 50))
    assert await peer.frame_of(REPLY, ERROR) == (REPLY, 5, b"x" * 50)


HELLO_CASES = [
    # (max_record_size, max_message_size, accepted)
    (0, 1024, False),
    (1, 1024, False),
    (wire.MIN_RECORD_SIZE - 1, 1024, False),
    (wire.MIN_RECORD_SIZE, 1024, True),
    (wire.MAX_RECORD, 1024, True),
    (wire.MAX_RECORD + 1, 1024, False),
    (U32_MAX, 1024, False),
    (wire.MAX_RECORD, 0, False),
    (wire.MAX_RECORD, 1, False),
    (wire.MAX_RECORD, wire.MIN_MESSAGE_SIZE - 1, False),
    (wire.MAX_RECORD, U32_MAX, True),
    (wire.MIN_RECORD_SIZE, U32_MAX, True),
]
KEEPALIVE = ConnectionConfig(keepalive_interval=0.05, keepalive_tolerance=10)


def test_the_floors_are_stated() -> None:
    assert wire.MIN_RECORD_SIZE == 65
    assert wire.MIN_MESSAGE_SIZE == 1024


@pytest.mark.parametrize(("max_record", "max_message", "accepted"), HELLO_CASES)
async def test_hello_extremes_against_a_real_server(
    max_record: int, max_message: int, accepted: bool
) -> None:
    with trio.fail_after(20):
        async with serving(config=KEEPALIVE) as (_, port):
            peer = await raw_client(port, hello_bytes(max_record, max_message))
            if not accepted:
                assert peer is None  # refused in the handshake: no verdict, closed
            else:
                assert peer is not None
                await attack_server_paths(peer, max_message)
                await peer.aclose()
            await assert_served(port)


@pytest.mark.parametrize(("max_record", "max_message", "accepted"), HELLO_CASES)
async def test_hello_extremes_against_a_real_client(
    max_record: int, max_message: int, accepted: bool
) -> None:
    outcome: dict[str, object] = {}
    closed = trio.Event()

    async def attack(peer: RawPeer) -> None:
        # The client's handler (below) raises long errors and returns big replies.
        await peer.send(frame(PING, 9, b"abcdefgh"))
        outcome["pong"] = await peer.frame_of(PONG)
        await peer.send(frame(REQUEST, 2, b"raise"), frame(REQUEST, 4, b"big"))
        outcome["error"] = await peer.frame_of(ERROR, REPLY)
        outcome["big"] = await peer.frame_of(ERROR, REPLY)
        outcome["ping"] = await peer.frame_of(PING)  # the client's keepalive
        request = await peer.frame_of(REQUEST)
        assert request is not None
        await peer.send(frame(REPLY, request[1], b"ok"))
        await peer.send(frame(8, 0))  # an unknown kind: the client closes
        outcome["closed"] = await peer.wait_closed() is not None
        closed.set()

    with trio.fail_after(20):
        async with hostile_server(hello_bytes(max_record, max_message), attack) as port:
            if not accepted:
                with pytest.raises(HandshakeError, match=r"max_(record|message)_size"):
                    async with monte_trio.open_client(
                        LOCALHOST, port, trust=AcceptAnyKey(), handler=hardened_handler
                    ):
                        pass  # pragma: no cover
                return
            async with monte_trio.open_client(
                LOCALHOST, port, trust=AcceptAnyKey(), handler=hardened_handler, config=KEEPALIVE
            ) as client:
                assert await client.request(b"call") == b"ok"
                await closed.wait()  # the client ended that connection, and only that
    assert outcome["pong"] == (PONG, 9, b"abcdefgh")
    error = outcome["error"]
    assert isinstance(error, tuple)
    assert error[:2] == (ERROR, 2)
    assert check_text(error[2], max_message).startswith("ValueError")
    big = outcome["big"]
    assert isinstance(big, tuple)
    assert big[1] == 4
    assert big[0] == (ERROR if max_message < 2000 else REPLY)
    assert outcome["closed"]


async def test_a_hello_below_the_floor_names_field_value_and_floor() -> None:
    with pytest.raises(monte_trio.RemoteProtocolError, match=r"max_message_size 1, .*1024"):
        wire.Hello.decode(hello_bytes(wire.MAX_RECORD, 1))
    with pytest.raises(monte_trio.RemoteProtocolError, match=r"max_record_size 64, .*65\.\.65535"):
        wire.Hello.decode(hello_bytes(64, 1024))


# Every frame kind, from a peer at the floors: (frames to send, the connection survives).
FRAME_CASES: dict[str, tuple[list[bytes], bool]] = {
    "oneway": ([frame(ONEWAY, 0, b"m")], True),
    "request": ([frame(REQUEST, 1, b"r")], True),
    "reply-unknown": ([frame(REPLY, 99, b"?")], True),
    "error-unknown": ([frame(ERROR, 99, b"?")], True),
    "cancel-unknown": ([frame(CANCEL, 99)], True),
    "ping": ([frame(PING, 1, b"12345678")], True),
    "ping-16": ([frame(PING, 1, bytes(16))], True),
    "ping-17": ([frame(PING, 1, bytes(17))], False),
    "ping-more": ([frame(PING, 1, b"a", flags=wire.FLAG_MORE)], False),
    "pong": ([frame(PONG, 1, b"12345678")], True),
    "pong-17": ([frame(PONG, 1, bytes(17))], False),
    "kind-8": ([frame(8, 0)], False),
    "kind-255": ([frame(255, 0)], False),
    "short": ([b"\x01\x00\x00"], False),
    "empty-more": ([frame(REQUEST, 1, b"", flags=wire.FLAG_MORE)], False),
    "interleaved": (
        [frame(REQUEST, 1, b"a", flags=wire.FLAG_MORE), frame(REQUEST, 3, b"b")],
        False,
    ),
    "ping-in-fragments": (
        [frame(REQUEST, 1, b"a", flags=wire.FLAG_MORE), frame(PING, 1, b"x")],
        False,
    ),
    "oversized": ([frame(REQUEST, 1, bytes(1000), flags=wire.FLAG_MORE)] * 20, False),
}


@pytest.mark.parametrize("case", sorted(FRAME_CASES))
async def test_every_frame_kind_against_a_real_server(case: str) -> None:
    frames, survives = FRAME_CASES[case]
    with trio.fail_after(20):
        async with serving(config=ConnectionConfig(max_message_size=8000)) as (_, port):
            peer = await raw_client(port, hello_bytes(wire.MIN_RECORD_SIZE, 1024))
            assert peer is not None
            await peer.send(*frames)
            await peer.send(frame(REQUEST, 11, b"alive?"))
            got = await peer.frame_of(REPLY, ERROR, ident=11)
            if survives:
                assert got == (REPLY, 11, b"alive?")
            else:
                assert got is None
            await peer.aclose()
            await assert_served(port)


async def test_goaway_from_a_raw_client_is_answered_and_nothing_new_is_processed() -> None:
    with trio.fail_after(20):
        async with serving() as (_, port):
            peer = await raw_client(port, hello_bytes(wire.MIN_RECORD_SIZE, 1024))
            assert peer is not None
            await peer.send(frame(REQUEST, 1, b"before"), frame(GOAWAY, 0))
            await peer.send(frame(REQUEST, 3, b"after"))
            assert await peer.frame_of(REPLY, ident=1) == (REPLY, 1, b"before")
            assert await peer.frame_of(GOAWAY) == (GOAWAY, 1, b"")
            await peer.aclose()  # the server's connection ends with ours
            await assert_served(port)


# ---------------------------------------------------------------------------------------
# Item 7: duplicate request ids; id comparisons across the whole u32 space
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("ident", [1, U32_MAX - 2, U32_MAX])
async def test_a_duplicate_request_id_in_flight_closes_the_connection(ident: int) -> None:
    with trio.fail_after(20):
        async with serving() as (_, port):
            peer = await raw_client(port, hello_bytes())
            assert peer is not None
            await peer.send(frame(REQUEST, ident, b"wait"), frame(REQUEST, ident, b"again"))
            seen = await peer.wait_closed()
            # No reply, no error reply (once 'KeyError: 5'): the connection just ends.
            assert [f for f in seen if f[0] in (REPLY, ERROR)] == []
            await peer.aclose()
            await assert_served(port)


async def test_a_duplicate_request_id_towards_a_client_closes_only_that_connection() -> None:
    seen: list[Frame] = []

    async def attack(peer: RawPeer) -> None:
        ident = U32_MAX - 1  # the responder's ids are even
        await peer.send(frame(REQUEST, ident, b"wait"), frame(REQUEST, ident, b"again"))
        seen.extend(await peer.wait_closed())

    with trio.fail_after(20):
        async with (
            hostile_server(hello_bytes(), attack) as port,
            monte_trio.open_client(
                LOCALHOST, port, trust=AcceptAnyKey(), handler=hardened_handler
            ) as client,
        ):
            with pytest.raises(ConnectionClosed):
                await client.request(b"never answered")
    assert [f for f in seen if f[0] in (REPLY, ERROR)] == []


async def test_cancel_hits_only_its_own_request_near_the_end_of_the_id_space() -> None:
    finished: list[int] = []
    release = trio.Event()

    async def handler(request: Request) -> bytes:
        await release.wait()
        finished.append(request.id)
        return request.body

    server = Server(handler, trust=AcceptAnyKey())
    ids = [U32_MAX - 2, U32_MAX, 1, 3]  # odd, wrapping around
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(server.serve, 0, LOCALHOST)
            port = listeners[0].socket.getsockname()[1]
            peer = await raw_client(port, hello_bytes())
            assert peer is not None
            await peer.send(*(frame(REQUEST, i, b"%d" % i) for i in ids))
            # Cancelled while queued or while running: either way, never answered.
            await peer.send(frame(CANCEL, U32_MAX), frame(CANCEL, 1))
            await peer.send(frame(PING, 1, b"sync"))  # read after the cancels
            assert await peer.frame_of(PONG) == (PONG, 1, b"sync")
            release.set()
            await peer.send(frame(REQUEST, 5, b"last"))
            assert await peer.frame_of(REPLY, ident=5) == (REPLY, 5, b"last")
            for ident in (U32_MAX - 2, 3):
                assert await peer.frame_of(REPLY, ident=ident) == (REPLY, ident, b"%d" % ident)
            await peer.aclose()
            await server.shutdown(grace_period=1.0)
            nursery.cancel_scope.cancel()
    assert sorted(finished) == [3, 5, U32_MAX - 2]


@pytest.mark.parametrize(
    ("last", "not_processed"),
    [(0, [1, 3, 5]), (U32_MAX, [1, 3, 5]), (U32_MAX - 2, [1, 3, 5]), (1, [3, 5]), (5, [])],
)
async def test_goaway_compares_ids_across_wraparound_initiator(
    last: int, not_processed: list[int]
) -> None:
    """A client's requests 1, 3, 5 against a GOAWAY announcing ``last``: with ids
    compared in serial-number order, 1 comes after 2**32 - 1."""
    results: dict[int, str] = {}

    async def attack(peer: RawPeer) -> None:
        for _ in range(3):
            await peer.frame_of(REQUEST)
        await peer.send(frame(GOAWAY, last))
        await peer.frame_of(GOAWAY)  # the client's answer
        for ident in (1, 3, 5):
            if ident not in not_processed:
                await peer.send(frame(REPLY, ident, b"done"))
        await peer.wait_closed()

    async def call(client: monte_trio.Client, ident: int) -> None:
        try:
            results[ident] = (await client.request(b"%d" % ident)).decode()
        except RequestNotProcessed:
            results[ident] = "not processed"
        except ConnectionClosed:
            results[ident] = "closed"

    with trio.fail_after(20):
        async with (
            hostile_server(hello_bytes(), attack) as port,
            monte_trio.open_client(LOCALHOST, port, trust=AcceptAnyKey(), max_conns=1) as client,
            trio.open_nursery() as nursery,
        ):
            for ident in (1, 3, 5):
                nursery.start_soon(call, client, ident)
                await trio.testing.wait_all_tasks_blocked()
    assert results == {i: "not processed" if i in not_processed else "done" for i in (1, 3, 5)}


@pytest.mark.parametrize(("last", "processed"), [(0, False), (U32_MAX - 1, False), (2, True)])
async def test_goaway_compares_ids_across_wraparound_acceptor(last: int, processed: bool) -> None:
    """The server's callback request (id 2, even) against the client's GOAWAY."""

    async def calls_back(request: Request) -> bytes:
        try:
            return await request.connection.request(b"callback")
        except RequestNotProcessed:
            return b"not processed"

    server = Server(calls_back, trust=AcceptAnyKey())
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(server.serve, 0, LOCALHOST)
            peer = await raw_client(listeners[0].socket.getsockname()[1], hello_bytes())
            assert peer is not None
            await peer.send(frame(REQUEST, 1, b"go"))
            assert await peer.frame_of(REQUEST) == (REQUEST, 2, b"callback")
            await peer.send(frame(GOAWAY, last))
            if processed:
                await peer.send(frame(REPLY, 2, b"answered"))
            expected = b"answered" if processed else b"not processed"
            assert await peer.frame_of(REPLY) == (REPLY, 1, expected)
            await peer.aclose()
            await server.shutdown(grace_period=1.0)
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------------------
# Items 2 and 3: pings, pongs, control floods, empty fragments
# ---------------------------------------------------------------------------------------


async def test_unread_pings_owe_one_pong_the_latest() -> None:
    with trio.fail_after(20):
        async with serving() as (_, port):
            peer = await raw_client(port, hello_bytes())
            assert peer is not None
            # 900 pings (within the burst) sent before reading anything.
            await peer.send(*(frame(PING, i, b"%8d" % i) for i in range(1, 901)))
            await peer.send(frame(REQUEST, 1, b"sync"))
            assert await peer.frame_of(REPLY) == (REPLY, 1, b"sync")
            pongs = []
            for _ in range(900):
                got = await peer.frame_of(PONG)
                assert got is not None
                pongs.append(got)
                if got[1] == 900:
                    break
            # Far fewer pongs than pings, and the last answers the last ping.
            assert len(pongs) < 100
            assert pongs[-1] == (PONG, 900, b"%8d" % 900)
            await peer.aclose()
            await assert_served(port)


@pytest.mark.parametrize(
    "flood",
    [
        lambda i: frame(PING, i, b"12345678"),
        lambda i: frame(CANCEL, 2 * i + 1),
        lambda i: frame(PONG, i, b"x"),
        lambda i: frame(GOAWAY, 0),
    ],
    ids=["ping", "cancel-unknown", "pong", "goaway"],
)
async def test_a_control_frame_flood_is_disconnected(flood: Callable[[int], bytes]) -> None:
    with trio.fail_after(20):
        async with serving() as (_, port):
            peer = await raw_client(port, hello_bytes())
            assert peer is not None
            await peer.send(*(flood(i) for i in range(wire.CONTROL_BURST + 1)))
            await peer.send(frame(REQUEST, 1, b"alive?"))
            assert await peer.frame_of(REPLY) is None
            await peer.aclose()
            await assert_served(port)


async def test_the_control_budget_refills_with_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The budget is measured with trio's clock: a steady rate under it is fine, a burst
    over it is not."""
    client_stream, server_stream = await secure_stream_pair(NoiseHandshake(trust=AcceptAnyKey()))
    peer = RawPeer(client_stream)
    async with Connection(server_stream, handler=hardened_handler) as server:
        with trio.fail_after(600):
            for second in range(20):
                await peer.send(*(frame(PING, i, b"p") for i in range(wire.CONTROL_RATE)))
                await trio.sleep(1.0)
                assert not server.closed, f"closed after {second} s at the allowed rate"
            await peer.send(*(frame(PING, i, b"p") for i in range(wire.CONTROL_BURST + 1)))
            await server.wait_closed()
    assert "control frames" in str(server.close_reason)
    await peer.aclose()


async def test_empty_more_fragments_are_refused_at_once() -> None:
    with trio.fail_after(20):
        async with serving() as (_, port):
            peer = await raw_client(port, hello_bytes())
            assert peer is not None
            # 100,000 empty fragments flagged MORE in one go: refused at the first one.
            empty = frame(REQUEST, 1, b"", flags=wire.FLAG_MORE)
            sent = 0
            while await peer.send(*([empty] * 1000)):
                sent += 1
                assert sent < 100, "the server kept reading empty fragments"
            assert await peer.next_frame() is None
            await peer.aclose()
            await assert_served(port)


def test_reassembly_memory_is_the_payload_whatever_the_fragment_sizes() -> None:
    codec = wire.NativeCodec(max_record_size=wire.MAX_RECORD, send_limit=2**20, receive_limit=4096)
    for i in range(4095):
        assert codec.decode(frame(REQUEST, 1, b"x", flags=wire.FLAG_MORE)) is None
        assert codec.reassembling == i + 1
    assert codec.decode(frame(REQUEST, 1, b"y")) == (REQUEST, 1, b"x" * 4095 + b"y")
    assert codec.reassembling == 0
    for _ in range(4096):
        codec.decode(frame(REQUEST, 3, b"x", flags=wire.FLAG_MORE))
    with pytest.raises(monte_trio.RemoteProtocolError, match="max_message_size"):
        codec.decode(frame(REQUEST, 3, b"x", flags=wire.FLAG_MORE))


def test_a_verdict_reason_is_at_most_1024_bytes() -> None:
    assert wire.decode_verdict(b"\x01" + b"r" * 1024) == (False, "r" * 1024)
    with pytest.raises(monte_trio.RemoteProtocolError, match="1025 bytes"):
        wire.decode_verdict(b"\x01" + b"r" * 1025)


def test_error_texts_are_cut_on_a_character_boundary() -> None:
    assert wire.fit_text("é" * 10, 5) == "éé".encode()
    assert wire.fit_text("abc", 3) == b"abc"
    assert wire.fit_text("€", 2) == b""


# ---------------------------------------------------------------------------------------
# Item 5: our own back-pressure is not the peer's silence
# ---------------------------------------------------------------------------------------


async def test_back_pressure_is_not_silence(autojump_clock: trio.testing.MockClock) -> None:
    config = ConnectionConfig(keepalive_interval=15, keepalive_tolerance=45)

    async def sleeps(request: Request) -> bytes:
        await trio.sleep(60)  # longer than keepalive_tolerance
        return request.body

    replies: list[bytes] = []
    async with monte_trio.testing.open_connection_pair(
        NoiseHandshake(trust=AcceptAnyKey()), server_handler=sleeps, config=config
    ) as (client, _):

        async def call(i: int) -> None:
            replies.append(await client.request(b"%d" % i))

        with trio.fail_after(3600):
            async with trio.open_nursery() as nursery:
                for i in range(300):
                    nursery.start_soon(call, i)
    assert sorted(replies) == sorted(b"%d" % i for i in range(300))


async def test_remote_error_text_fits_the_callers_limit() -> None:
    """A client at the floor gets a cut, valid error text, and the server goes on."""
    with trio.fail_after(20):
        async with (
            serving() as (_, port),
            monte_trio.open_client(
                LOCALHOST,
                port,
                trust=AcceptAnyKey(),
                config=ConnectionConfig(max_message_size=wire.MIN_MESSAGE_SIZE),
            ) as client,
        ):
            with pytest.raises(RemoteError) as info:
                await client.request(b"raise")
            assert len(info.value.message.encode()) <= wire.MIN_MESSAGE_SIZE
            with pytest.raises(RemoteError, match="could not be sent"):
                await client.request(b"big")
            assert await client.request(b"fine") == b"fine"


# ---------------------------------------------------------------------------------------
# Item 4: the per-connection memory budget (max_held_bytes); item 3: error replies are
# bounded; peer text in RemoteError is escaped
# ---------------------------------------------------------------------------------------

MSG = 64 * 1024  # two records each
BUDGET = 256 * 1024
BUDGET_CONFIG = ConnectionConfig(max_message_size=MSG, max_held_bytes=BUDGET)


def request_records(ident: int, body: bytes) -> list[bytes]:
    """The record plaintexts of one REQUEST, split as a real sender splits it."""
    encoder = wire.NativeCodec(
        max_record_size=wire.MAX_RECORD, send_limit=U32_MAX, receive_limit=U32_MAX
    )
    records: list[bytes | None] = []
    encoder.encode(REQUEST, ident, body, records)
    return [r for r in records if r is not None]


@asynccontextmanager
async def serving_handler(
    handler: Callable[[Request], Awaitable[bytes]], config: ConnectionConfig
) -> AsyncIterator[int]:
    server = Server(handler, trust=AcceptAnyKey(), config=config)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(server.serve, 0, LOCALHOST)
        try:
            yield listeners[0].socket.getsockname()[1]
        finally:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + 10
                await server.shutdown(grace_period=0.5)
            nursery.cancel_scope.cancel()


def test_the_budget_must_hold_one_message_of_the_largest_size() -> None:
    default = ConnectionConfig()
    assert default.max_held_bytes >= default.max_message_size
    assert ConnectionConfig(max_message_size=MSG, max_held_bytes=MSG).max_held_bytes == MSG
    with pytest.raises(ValueError, match=r"max_held_bytes \(1048576\) must be at least "):
        ConnectionConfig(max_message_size=2 * 1024 * 1024, max_held_bytes=1024 * 1024)
    with pytest.raises(ValueError, match="raise max_held_bytes or lower max_message_size"):
        ConnectionConfig(max_held_bytes=1024)
    with pytest.raises(ValueError, match="max_held_bytes"):
        ConnectionConfig(max_held_bytes=0)


async def test_a_flood_of_unread_big_requests_holds_at_most_the_budget() -> None:
    """The 16 MiB flood, scaled down: 40 requests of 64 KiB that are never answered
    (their replies never read). The server's connection starts handlers for at most
    budget / message size of them, serves other clients meanwhile, and answers them all
    once they can finish."""
    started = 0
    release = trio.Event()

    async def holds(request: Request) -> bytes:
        nonlocal started
        if request.body != b"still served":  # assert_served's request
            started += 1
            await release.wait()
        return request.body

    bodies = {2 * i + 1: bytes([i]) * MSG for i in range(40)}
    with trio.fail_after(20):
        async with serving_handler(holds, BUDGET_CONFIG) as port, trio.open_nursery() as nursery:
            peer = await raw_client(port, hello_bytes())
            assert peer is not None

            async def flood() -> None:
                for ident, body in bodies.items():
                    if not await peer.send(*request_records(ident, body)):
                        return  # pragma: no cover (the server closed it: the test fails)

            nursery.start_soon(flood)
            await trio.testing.wait_all_tasks_blocked(cushion=0.1)
            assert 1 <= started <= BUDGET // MSG + 1
            await assert_served(port)  # another connection is served meanwhile
            assert started <= BUDGET // MSG + 1
            release.set()
            for ident, body in bodies.items():
                assert await peer.frame_of(REPLY, ERROR, ident=ident) == (REPLY, ident, body)
            await peer.aclose()
    assert started == len(bodies)


async def test_a_message_as_large_as_the_budget_is_accepted() -> None:
    """budget == max_message_size: one such message is always accepted; a second one
    waits (its reading is paused) until the first is done, then is served too."""
    config = ConnectionConfig(max_message_size=MSG, max_held_bytes=MSG)
    started: list[int] = []
    release = trio.Event()

    async def first_waits(request: Request) -> bytes:
        started.append(request.id)
        if request.id == 1:
            await release.wait()
        return request.body

    with trio.fail_after(20):
        async with serving_handler(first_waits, config) as port:
            peer = await raw_client(port, hello_bytes())
            assert peer is not None
            await peer.send(*request_records(1, b"a" * MSG), *request_records(3, b"b" * MSG))
            await trio.testing.wait_all_tasks_blocked(cushion=0.1)
            assert started == [1]
            release.set()
            assert await peer.frame_of(REPLY, ident=1) == (REPLY, 1, b"a" * MSG)
            assert await peer.frame_of(REPLY, ident=3) == (REPLY, 3, b"b" * MSG)
            await peer.aclose()
            assert started == [1, 3]
            # A real client with the same limits, both ways.
            async with monte_trio.open_client(
                LOCALHOST, port, trust=AcceptAnyKey(), config=config
            ) as client:
                assert await client.request(b"c" * MSG) == b"c" * MSG


async def test_unread_error_replies_are_bounded() -> None:
    """A peer that never reads cannot make the server queue error replies without bound:
    they wait for room like replies, so the handlers that raise stop being started."""
    started = 0

    async def raises(request: Request) -> bytes:
        nonlocal started
        if request.body == b"still served":  # assert_served's request
            return request.body
        started += 1
        raise ValueError("x" * 60_000)  # a 60 kB error reply each

    with trio.fail_after(20):
        async with serving_handler(raises, BUDGET_CONFIG) as port, trio.open_nursery() as nursery:
            peer = await raw_client(port, hello_bytes())
            assert peer is not None

            async def flood() -> None:
                for i in range(20):
                    batch = [frame(REQUEST, 2 * (100 * i + j) + 1, b"r") for j in range(100)]
                    if not await peer.send(*batch):
                        return  # pragma: no cover

            nursery.start_soon(flood)
            await trio.testing.wait_all_tasks_blocked(cushion=0.1)
            # 2,000 requests; unbounded, 120 MB of error replies would have been queued.
            # What is started is what the socket buffers took, plus the budget.
            assert started < 1000
            await assert_served(port)
            nursery.cancel_scope.cancel()
            await peer.aclose()


async def test_a_remote_error_text_is_escaped_and_cut() -> None:
    async def attack(peer: RawPeer) -> None:
        request = await peer.frame_of(REQUEST)
        assert request is not None
        await peer.send(frame(ERROR, request[1], b"\x1b[2J\x07bad\r\n" + b"A" * 5000))
        await peer.frame_of(GOAWAY)
        await peer.send(frame(GOAWAY, 0))
        await peer.wait_closed()

    with trio.fail_after(20):
        async with (
            hostile_server(hello_bytes(), attack) as port,
            monte_trio.open_client(LOCALHOST, port, trust=AcceptAnyKey()) as client,
        ):
            with pytest.raises(RemoteError) as info:
                await client.request(b"x")
    text = info.value.message
    assert str(info.value) == text
    assert text.startswith("\\x1b[2J\\x07bad\\x0d\\x0aAAA")
    assert not any(ord(c) < 32 or 127 <= ord(c) < 160 for c in text)
    assert text.endswith("... [cut at 1024 characters]")
    assert len(text) < 1100
