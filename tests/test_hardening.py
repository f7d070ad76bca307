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
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from helpers import LOCALHOST, running_server

import monte_trio
from monte_trio import (
    AcceptAnyKey,
    Connection,
    ConnectionClosed,
    ConnectionConfig,
    HandshakeError,
    Identity,
    NativeHandshake,
    RemoteError,
    Request,
    RequestNotProcessed,
    SecureStream,
    Server,
)
from monte_trio._handshake import SessionFacts
from monte_trio._proto import _native_hello as wire
from monte_trio._proto import _wire2 as wire2
from monte_trio._proto._noise import HandshakeState
from monte_trio._proto._session import Session
from monte_trio.testing import secure_stream_pair

_U16 = struct.Struct(">H")
U32_MAX = 2**32 - 1
K = wire2.Kind
ONEWAY, REQUEST, REPLY, ERROR, CONT = K.ONEWAY, K.REQUEST, K.REPLY, K.ERROR, K.CONTINUATION
CANCEL, PING, PONG, GOAWAY, CREDIT = K.CANCEL, K.PING, K.PONG, K.GOAWAY, K.CREDIT
Frame = tuple[int, int, bytes]
"""A frame as the raw peer reads it: (kind, id, payload); a fragmented message is
reassembled, an ERROR's and a GOAWAY's code is stripped, a nested request's parent too."""


# ---------------------------------------------------------------------------------------
# A raw native peer
# ---------------------------------------------------------------------------------------


def hello_bytes(max_record: int = wire2.MAX_RECORD, max_message: int = 2**20) -> bytes:
    """A version 2 (TLV) hello with any limits (unchecked here), windows at their floors."""
    return wire2.Hello2(
        max_record_size=max_record,
        max_message_size=max_message,
        request_window=wire2.default_request_window(max_message),
        reply_window=wire2.default_reply_window(max_message),
    ).encode()


def frame(kind: int, ident: int, payload: bytes = b"", flags: int = 0) -> bytes:
    """One wire v2 frame (a record's plaintext may hold several). A GOAWAY without a
    payload gets the 2-byte code NO_ERROR, an ERROR without one the code INTERNAL."""
    if kind == GOAWAY and not payload:
        payload = b"\x00\x00"
    return wire2.HEADER.pack(kind, flags, len(payload), ident) + payload


def error_frame(ident: int, text: bytes) -> bytes:
    """An ERROR answer: u16 code (INTERNAL) then the text."""
    return frame(ERROR, ident, int(wire2.ErrorCode.INTERNAL).to_bytes(2, "big") + text)


def first_fragment(ident: int, total: int, data: bytes, kind: int = REQUEST) -> bytes:
    """The first frame of a fragmented message: u32 total, then data; flagged MORE."""
    return frame(kind, ident, total.to_bytes(4, "big") + data, flags=wire2.FLAG_MORE)


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
    """The hostile end of a native connection: sends any frames, reads frames.

    It answers nothing by itself but credit: each answer it reads returns its reply
    window (as a well-behaved peer does when its caller takes the reply), so the real
    side can go on answering."""

    def __init__(self, secure: SecureStream, reply_window: int = 0) -> None:
        self.secure = secure
        self._frames: list[Frame] = []
        self._kept: list[Frame] = []
        self._partial: dict[int, tuple[int, bytearray]] = {}
        self._reply_limit = reply_window
        self.request_window = 0  # the latest request-window limit the real side granted

    def decode(self, plaintext: bytes) -> list[Frame]:
        """The complete frames (messages reassembled) of one record."""
        out: list[Frame] = []
        off = 0
        while off < len(plaintext):
            kind, flags, length, ident = wire2.HEADER.unpack_from(plaintext, off)
            payload = plaintext[off + 8 : off + 8 + length]
            off += 8 + length
            if kind == CONT:
                first_kind, buffer = self._partial[ident]
                buffer += payload
                if flags & wire2.FLAG_MORE:
                    continue
                del self._partial[ident]
                kind, payload = first_kind, bytes(buffer)
            else:
                if flags & wire2.FLAG_NESTED:
                    payload = payload[4:]
                if flags & wire2.FLAG_MORE:
                    self._partial[ident] = (kind, bytearray(payload[4:]))
                    continue
            if kind in (ERROR, GOAWAY):
                payload = payload[2:]
            if kind == CREDIT and ident == wire2.CreditLimit.REQUEST_WINDOW:
                self.request_window = int.from_bytes(payload, "big")
            out.append((kind, ident, payload))
        return out

    async def _credit(self, frames: list[Frame]) -> None:
        grant = sum(
            len(f[2]) + (2 if f[0] == ERROR else 0) + 64 for f in frames if f[0] in (REPLY, ERROR)
        )
        if grant and self._reply_limit:
            self._reply_limit += grant
            await self.send(
                frame(CREDIT, wire2.CreditLimit.REPLY_WINDOW, self._reply_limit.to_bytes(8, "big"))
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
                decoded = self.decode(record)
                self._frames.extend(decoded)
                await self._credit(decoded)
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
        prologue=wire2.prologue(name, preamble),
        s=Identity.generate().private_bytes(),
    )


def _secure(
    stream: trio.abc.Stream,
    state: HandshakeState,
    peer_hello: wire2.Hello2,
    initiator: bool,
    rest: bytes,
) -> tuple[SecureStream, list[bytes]]:
    first, second = state.split()
    send, receive = (first, second) if initiator else (second, first)
    sealer, opener = wire.transport(
        send, receive, peer_max_record=peer_hello.max_record_size, own_max_record=wire2.MAX_RECORD
    )
    facts = SessionFacts(profile="native", initiator=initiator)  # driven by hand, not a session
    secure = SecureStream(stream, sealer, opener, facts=facts)
    return secure, opener.receive_data(rest) if rest else []


def _reply_window(hello: bytes) -> int:
    try:
        return wire2.Hello2.decode(hello).reply_window
    except monte_trio.RemoteProtocolError:
        return 0


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
    server_hello = wire2.Hello2.decode(state.read_message(await reader.message()))
    msg3 = state.write_message(hello)
    await stream.send_all(_U16.pack(len(msg3)) + msg3)
    secure, records = _secure(stream, state, server_hello, True, bytes(reader.buffer))
    try:
        if not records:
            records = await secure.receive_records()  # the verdict: not a frame
            if not records:  # end of stream
                await stream.aclose()
                return None
    except trio.BrokenResourceError:
        await stream.aclose()
        return None
    assert wire.decode_verdict(records[0]) == (True, "")
    peer = RawPeer(secure, _reply_window(hello))
    for record in records[1:]:
        peer._frames.extend(peer.decode(record))
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
    client_hello = wire2.Hello2.decode(state.read_message(msg3))
    secure, _ = _secure(stream, state, client_hello, False, bytes(reader.buffer))
    await secure.send_records([wire.encode_verdict(True)])
    return RawPeer(secure, _reply_window(hello))


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


def serving(**kwargs: Any) -> AbstractAsyncContextManager[tuple[Server, int]]:
    """A native server of :func:`hardened_handler` on 127.0.0.1; yields ``(server, port)``."""
    return running_server(hardened_handler, trust=AcceptAnyKey(), **kwargs)


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
    kind, ident, payload = await peer.frame_of(REPLY, ERROR) or (0, 0, b"")
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
    assert len(ping[2]) <= wire2.MAX_CONTROL_PAYLOAD
    await peer.send(frame(REQUEST, 5, b"x" * 50))
    assert await peer.frame_of(REPLY, ERROR) == (REPLY, 5, b"x" * 50)


HELLO_CASES = [
    # (max_record_size, max_message_size, accepted)
    (0, 1024, False),
    (1, 1024, False),
    (wire2.MIN_RECORD_SIZE - 1, 1024, False),
    (wire2.MIN_RECORD_SIZE, 1024, True),
    (wire2.MAX_RECORD, 1024, True),
    (wire2.MAX_RECORD + 1, 1024, False),
    (U32_MAX, 1024, False),
    (wire2.MAX_RECORD, 0, False),
    (wire2.MAX_RECORD, 1, False),
    (wire2.MAX_RECORD, wire2.MIN_MESSAGE_SIZE - 1, False),
    (wire2.MAX_RECORD, U32_MAX, True),
    (wire2.MIN_RECORD_SIZE, U32_MAX, True),
]
KEEPALIVE = ConnectionConfig(keepalive_interval=0.05, keepalive_tolerance=10)


def test_the_floors_are_stated() -> None:
    # wire v2: a record holds an ERROR frame (8 + 2 + 998) and every control frame whole
    assert wire2.MIN_RECORD_SIZE == wire2.MIN_RECORD_SIZE == 1024
    assert wire2.MIN_MESSAGE_SIZE == 1024


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
        wire2.Hello2.decode(hello_bytes(wire2.MAX_RECORD, 1))
    with pytest.raises(
        monte_trio.RemoteProtocolError, match=r"max_record_size 1023, .*1024\.\.65535"
    ):
        wire2.Hello2.decode(hello_bytes(1023, 1024))


# Every frame kind, from a peer at the floors: (frames to send, the connection survives).
# Wire v2 rules: an answer or a CANCEL naming an id that was never opened is a protocol
# error (ids are allocated in order, so "never opened" is one comparison); calls may
# interleave their fragments, and control frames may come between fragments.
FRAME_CASES: dict[str, tuple[list[bytes], bool]] = {
    "oneway": ([frame(ONEWAY, 0, b"m")], True),
    "request": ([frame(REQUEST, 1, b"r")], True),
    "request-then-cancel": ([frame(REQUEST, 1, b"r"), frame(CANCEL, 1)], True),
    "reply-never-opened": ([frame(REPLY, 98, b"?")], False),
    "error-never-opened": ([error_frame(98, b"?")], False),
    "cancel-never-opened": ([frame(CANCEL, 99)], False),
    "ping": ([frame(PING, 1, b"12345678")], True),
    "ping-16": ([frame(PING, 1, bytes(16))], True),
    "ping-17": ([frame(PING, 1, bytes(17))], False),
    "ping-more": ([frame(PING, 1, b"a", flags=wire2.FLAG_MORE)], False),
    "pong": ([frame(PONG, 1, b"12345678")], True),
    "pong-17": ([frame(PONG, 1, bytes(17))], False),
    "kind-8": ([frame(8, 0)], False),
    "kind-255": ([frame(255, 0)], False),
    "extension-kind": ([frame(0x40, 0, b"skipped")], True),
    "short": ([b"\x01\x00\x00"], False),
    "empty-more": ([frame(REQUEST, 1, b"", flags=wire2.FLAG_MORE)], False),
    "interleaved": ([first_fragment(1, 2, b"a"), frame(REQUEST, 3, b"b")], True),
    "ping-in-fragments": ([first_fragment(1, 2, b"a"), frame(PING, 1, b"x")], True),
    "continuation-unknown": ([frame(CONT, 1, b"a")], False),
    "oversized": ([first_fragment(1, 20_000, bytes(996))], False),
    "over-total": ([first_fragment(1, 2, b"a"), frame(CONT, 1, b"bc")], False),
}


@pytest.mark.parametrize("case", sorted(FRAME_CASES))
async def test_every_frame_kind_against_a_real_server(case: str) -> None:
    frames, survives = FRAME_CASES[case]
    with trio.fail_after(20):
        async with serving(config=ConnectionConfig(max_message_size=8000)) as (_, port):
            peer = await raw_client(port, hello_bytes(wire2.MIN_RECORD_SIZE, 1024))
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
            peer = await raw_client(port, hello_bytes(wire2.MIN_RECORD_SIZE, 1024))
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
        finished.append(request.call_id)
        return request.body

    server = Server(handler, trust=AcceptAnyKey())
    # Wire v2: ids only grow (never wrap); near the top of the id space.
    a, b, c, d, last = U32_MAX - 8, U32_MAX - 6, U32_MAX - 4, U32_MAX - 2, U32_MAX
    ids = [a, b, c, d]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(server.serve, 0, LOCALHOST)
            port = listeners[0].socket.getsockname()[1]
            peer = await raw_client(port, hello_bytes())
            assert peer is not None
            await peer.send(*(frame(REQUEST, i, b"%d" % i) for i in ids))
            # Cancelled while queued or while running: either way, never answered.
            await peer.send(frame(CANCEL, b), frame(CANCEL, c))
            await peer.send(frame(PING, 1, b"sync"))  # read after the cancels
            assert await peer.frame_of(PONG) == (PONG, 1, b"sync")
            release.set()
            await peer.send(frame(REQUEST, last, b"last"))
            assert await peer.frame_of(REPLY, ident=last) == (REPLY, last, b"last")
            for ident in (a, d):
                assert await peer.frame_of(REPLY, ident=ident) == (REPLY, ident, b"%d" % ident)
            for ident in (b, c):  # each cancel is answered ERROR(CANCELLED), never REPLY
                assert await peer.frame_of(REPLY, ERROR, ident=ident) == (ERROR, ident, b"")
            await peer.aclose()
            await server.shutdown(grace_period=1.0)
            nursery.cancel_scope.cancel()
    assert sorted(finished) == [a, d, last]


@pytest.mark.parametrize(
    ("last", "not_processed"),
    [(0, [1, 3, 5]), (1, [3, 5]), (3, [5]), (5, [])],
)
async def test_goaway_fails_exactly_the_calls_above_its_last_id(
    last: int, not_processed: list[int]
) -> None:
    """A client's requests 1, 3, 5 against a GOAWAY announcing ``last`` (wire v2: ids
    never wrap, so the comparison is plain)."""
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
        # On the connection itself: the pool would move a call not processed to another
        # connection (to this same hostile server).
        conn = await client.connection()
        try:
            results[ident] = (await conn.request(b"%d" % ident)).decode()
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


@pytest.mark.parametrize("last", [0, 1])
async def test_a_nested_callback_survives_the_peers_goaway(last: int) -> None:
    """The server's callback (id 2, nested under the client's call 1) against the
    client's GOAWAY: wire v2 keeps nested calls outside GOAWAY (the client's handler
    serving call 1 needs its answer), so it is answered either way."""
    processed = True

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
            await peer.send(frame(GOAWAY, 0))
            assert last in (0, 1)
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
            # Over the burst (wire v2: the first GOAWAY is not charged, the others are).
            await peer.send(*(flood(i) for i in range(wire2.CONTROL_BURST + 10)))
            await peer.send(frame(REQUEST, 1, b"alive?"))
            assert await peer.frame_of(REPLY) is None
            await peer.aclose()
            await assert_served(port)


async def test_the_control_budget_refills_with_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The budget is measured with trio's clock: a steady rate under it is fine, a burst
    over it is not."""
    client_stream, server_stream = await secure_stream_pair(NativeHandshake(trust=AcceptAnyKey()))
    peer = RawPeer(client_stream)
    async with Connection(server_stream, handler=hardened_handler) as server:
        with trio.fail_after(600):
            for second in range(20):
                await peer.send(*(frame(PING, i, b"p") for i in range(wire2.CONTROL_RATE)))
                await trio.sleep(1.0)
                assert not server.closed, f"closed after {second} s at the allowed rate"
            await peer.send(*(frame(PING, i, b"p") for i in range(wire2.CONTROL_BURST + 1)))
            await server.wait_closed()
    assert "control-frame flood" in str(server.close_reason)
    await peer.aclose()


async def test_empty_more_fragments_are_refused_at_once() -> None:
    with trio.fail_after(20):
        async with serving() as (_, port):
            peer = await raw_client(port, hello_bytes())
            assert peer is not None
            # 100,000 empty fragments flagged MORE in one go: refused at the first one.
            empty = frame(REQUEST, 1, b"", flags=wire2.FLAG_MORE)
            sent = 0
            while await peer.send(*([empty] * 1000)):
                sent += 1
                assert sent < 100, "the server kept reading empty fragments"
            # Closed at once; wire v2 says why first, in a final GOAWAY (PROTOCOL).
            assert {f[0] for f in await peer.wait_closed()} <= {GOAWAY}
            await peer.aclose()
            await assert_served(port)


def test_a_fragmented_message_is_checked_against_its_total_before_buffering() -> None:
    """Wire v2: the first fragment announces the total; a total above M is refused before
    anything is buffered, and fragments beyond the total are refused (the session)."""
    local = wire2.Hello2(max_message_size=4096)
    session = Session(initiator=False, local=local, peer=wire2.Hello2())
    assert session.receive_records([first_fragment(1, 4096, b"x")]) == []
    for _ in range(4094):
        assert session.receive_records([frame(CONT, 1, b"x", flags=wire2.FLAG_MORE)]) == []
    events = session.receive_records([frame(CONT, 1, b"y")])
    assert [e[:3] for e in events] == [(1, 1, b"x" * 4095 + b"y")]
    with pytest.raises(monte_trio.RemoteProtocolError, match="4097 bytes exceeds M"):
        Session(initiator=False, local=local, peer=wire2.Hello2()).receive_records(
            [first_fragment(1, 4097, b"x")]
        )


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
        NativeHandshake(trust=AcceptAnyKey()), server_handler=sleeps, config=config
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
                config=ConnectionConfig(max_message_size=wire2.MIN_MESSAGE_SIZE),
            ) as client,
        ):
            with pytest.raises(RemoteError) as info:
                await client.request(b"raise")
            assert len(info.value.message.encode()) <= wire2.MIN_MESSAGE_SIZE
            with pytest.raises(RemoteError, match="could not be sent"):
                await client.request(b"big")
            assert await client.request(b"fine") == b"fine"


# ---------------------------------------------------------------------------------------
# Item 4: the per-connection memory budget (wire v2: the request window replaces
# max_held_bytes); item 3: error replies are bounded; peer text in RemoteError is escaped
# ---------------------------------------------------------------------------------------

MSG = 64 * 1024  # two records each
BUDGET = 256 * 1024
BUDGET_CONFIG = ConnectionConfig(max_message_size=MSG, request_window=BUDGET)
COST = MSG + wire2.MESSAGE_COST  # what one such request costs of the window


def request_records(ident: int, body: bytes) -> list[bytes]:
    """The record plaintexts of one REQUEST, split as a real sender splits it."""
    chunk = 60_000
    if len(body) <= chunk:
        return [frame(REQUEST, ident, body)]
    records = [first_fragment(ident, len(body), body[:chunk])]
    for start in range(chunk, len(body), chunk):
        more = wire2.FLAG_MORE if start + chunk < len(body) else 0
        records.append(frame(CONT, ident, body[start : start + chunk], flags=more))
    return records


@asynccontextmanager
async def serving_handler(
    handler: Callable[[Request], Awaitable[bytes]], config: ConnectionConfig
) -> AsyncIterator[int]:
    async with running_server(
        handler, trust=AcceptAnyKey(), config=config, shutdown_grace=0.5
    ) as (_, port):
        yield port


def test_the_budget_must_hold_one_message_of_the_largest_size() -> None:
    """Wire v2: the request window's floor is two messages of the largest size (one is
    the nested-call reserve), the reply window's one."""
    default = ConnectionConfig()
    assert default.effective_request_window == 2 * (default.max_message_size + 64)
    assert default.effective_reply_window == default.max_message_size + 64
    floor = 2 * COST
    assert ConnectionConfig(max_message_size=MSG, request_window=floor).request_window == floor
    with pytest.raises(ValueError, match=r"request_window \(131199\) must be at least "):
        ConnectionConfig(max_message_size=MSG, request_window=floor - 1)
    with pytest.raises(ValueError, match="raise it or lower max_message_size"):
        ConnectionConfig(request_window=1024)
    with pytest.raises(ValueError, match="reply_window"):
        ConnectionConfig(max_message_size=MSG, reply_window=COST - 1)
    with pytest.raises(ValueError, match="request_window"):
        ConnectionConfig(request_window=0)


async def test_a_flood_of_unread_big_requests_holds_at_most_the_budget() -> None:
    """The 16 MiB flood, scaled down: 40 requests of 64 KiB whose handlers do not finish.
    Wire v2: the peer may send only what the request window grants (budget / cost of
    one message), the server serves other clients meanwhile, and each request's credit
    comes back once its handler is done, which lets the next ones in."""
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
        async with serving_handler(holds, BUDGET_CONFIG) as port:
            peer = await raw_client(port, hello_bytes())
            assert peer is not None
            peer.request_window = BUDGET
            pending = list(bodies.items())
            used = 0

            async def send_what_fits() -> None:
                nonlocal used
                while pending and used + COST <= peer.request_window:
                    ident, body = pending.pop(0)
                    assert await peer.send(*request_records(ident, body))
                    used += COST

            await send_what_fits()
            await trio.testing.wait_all_tasks_blocked(cushion=0.1)
            assert started == BUDGET // COST  # 3: what the window holds
            await assert_served(port)  # another connection is served meanwhile
            assert started == BUDGET // COST
            release.set()
            for ident, body in bodies.items():
                got = await peer.frame_of(REPLY, ERROR, ident=ident)
                assert got == (REPLY, ident, body)
                await send_what_fits()  # CREDIT frames read meanwhile raised the window
            await peer.aclose()
    assert started == len(bodies)


async def test_a_message_as_large_as_the_budget_is_accepted() -> None:
    """The request window at its floor (two messages of the largest size): both are
    accepted and held; they are served as handlers finish."""
    config = ConnectionConfig(max_message_size=MSG, request_window=2 * COST)
    started: list[int] = []
    release = trio.Event()

    async def first_waits(request: Request) -> bytes:
        started.append(request.call_id)
        if request.call_id == 1:
            await release.wait()
        return request.body

    with trio.fail_after(20):
        async with serving_handler(first_waits, config) as port:
            peer = await raw_client(port, hello_bytes())
            assert peer is not None
            await peer.send(*request_records(1, b"a" * MSG), *request_records(3, b"b" * MSG))
            assert await peer.frame_of(REPLY, ident=3) == (REPLY, 3, b"b" * MSG)
            assert started == [1, 3]
            release.set()
            assert await peer.frame_of(REPLY, ident=1) == (REPLY, 1, b"a" * MSG)
            await peer.aclose()
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
                # Wire v2: at most max_calls (128) calls open; one more would be a
                # protocol violation. Error texts are cut to 998 bytes.
                for i in range(2):
                    batch = [frame(REQUEST, 2 * (64 * i + j) + 1, b"r") for j in range(64)]
                    if not await peer.send(*batch):
                        return  # pragma: no cover

            nursery.start_soon(flood)
            await trio.testing.wait_all_tasks_blocked(cushion=0.1)
            # Unbounded, 60 kB each would have been queued; now at most 128 x 1,000 bytes.
            assert started <= 128
            await assert_served(port)
            nursery.cancel_scope.cancel()
            await peer.aclose()


async def test_a_remote_error_text_is_escaped_and_cut() -> None:
    async def attack(peer: RawPeer) -> None:
        request = await peer.frame_of(REQUEST)
        assert request is not None
        # An ERROR frame carries at most 998 bytes of text (wire v2).
        text = b"\x1b[2J\x07bad\r\n" + b"A" * 600 + b"\x01" * 200
        await peer.send(error_frame(request[1], text))
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
    # Wire v2 bounds an ERROR's text at 998 bytes on the wire (a longer frame is a
    # protocol error), so it arrives whole: at most 4 printable characters per byte.
    assert text.endswith("\\x01" * 200)
    assert len(text) <= 4 * wire2.MAX_ERROR_TEXT
