"""Services: methods by name over the unary calls (Router, call, proxy, codecs, errors,
deadlines, middleware, the codec in the hello)."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import pytest
import trio
import trio.testing
from helpers import running_server

import monte_trio
from monte_trio import (
    AcceptAnyKey,
    CallInfo,
    CodecError,
    ConnectionConfig,
    HandshakeError,
    InvalidArguments,
    MethodErrorCode,
    MethodNotFound,
    NativeHandshake,
    RemoteMethodError,
    RemoteProtocolError,
    Request,
    Router,
)
from monte_trio._proto._wire2 import Codec, Hello2
from monte_trio.testing import FaultyNetwork, open_connection_pair

TIMEOUT = 10


def native() -> NativeHandshake:
    return NativeHandshake(trust=AcceptAnyKey())


def call_envelope(
    name: bytes, arguments: bytes, *, flags: int = 0, remaining_us: int | None = None
) -> bytes:
    """A call envelope built from docs/services.rst, byte by byte."""
    if remaining_us is not None:
        flags |= 0x02
    head = bytes([0xF5, 0x01, flags]) + struct.pack(">H", len(name)) + name
    if remaining_us is not None:
        head += struct.pack(">Q", remaining_us)
    return head + arguments


def error_code(reply: bytes) -> int:
    assert reply[:2] == b"\xf5\x04", reply
    code: int = struct.unpack_from(">H", reply, 2)[0]
    return code


@monte_trio.remote_error("test.NotFound")
class NotFound(Exception):
    pass


@monte_trio.remote_error("test.Detailed")
class Detailed(Exception):
    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.details = details


class KeyValue(Protocol):
    async def get(self, key: str) -> str: ...

    @monte_trio.idempotent
    async def put(self, key: str, value: str) -> None: ...


class Store:
    def __init__(self) -> None:
        self.data: dict[str, str] = {}

    async def get(self, key: str) -> str:
        if key not in self.data:
            raise NotFound(f"no key {key!r}")
        return self.data[key]

    async def put(self, key: str, value: str) -> None:
        self.data[key] = value


def make_router(**kwargs: Any) -> Router:
    router = Router(**kwargs)

    @router.method
    async def echo(*args: Any) -> Any:
        return args[0] if len(args) == 1 else list(args)

    @router.method("math.add")
    async def add(a: int, b: int = 1) -> int:
        return a + b

    @router.method
    async def boom() -> None:
        raise ZeroDivisionError("the secret is 42")

    @router.method
    async def detailed(details: Any) -> None:
        raise Detailed("with details", details)

    @router.method
    async def sleep(seconds: float) -> float:
        await trio.sleep(seconds)
        return seconds

    router.add_service(Store(), KeyValue, namespace="kv")
    return router


# -- methods by name -------------------------------------------------------------------------


async def test_methods_by_name_and_through_a_protocol(profile: monte_trio.Handshake) -> None:
    router = make_router()
    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(profile, server_handler=router) as (client, _):
            assert await client.call("echo", b"raw") == b"raw"
            assert await client.call("echo", "text", 2) == ["text", 2]
            assert await client.call("math.add", 2) == 3
            assert await client.call("math.add", 2, b=5) == 7
            kv = client.proxy(KeyValue, namespace="kv")
            await kv.put("k", "v")
            assert await kv.get("k") == "v"
    assert router.methods == ["boom", "detailed", "echo", "kv.get", "kv.put", "math.add", "sleep"]


async def test_refusals_are_typed_errors_and_the_connection_survives() -> None:
    router = make_router()
    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(native(), server_handler=router) as (client, _):
            with pytest.raises(MethodNotFound) as not_found:
                await client.call("nope")
            assert not_found.value.code is MethodErrorCode.NOT_FOUND
            with pytest.raises(MethodNotFound):
                await client.call("")  # the empty name is no method's
            with pytest.raises(InvalidArguments, match="missing a required argument"):
                await client.call("math.add")
            with pytest.raises(InvalidArguments, match="too many positional"):
                await client.call("math.add", 1, 2, 3)
            with pytest.raises(InvalidArguments, match="unexpected keyword"):
                await client.call("math.add", 1, c=2)
            # Arguments that are not JSON, not [array, map], nested beyond the decoder.
            for arguments in [b"{not json", b'{"a": 1}', b"[" * 100_000 + b"]" * 100_000]:
                reply = await client.request(call_envelope(b"math.add", arguments))
                assert error_code(reply) == MethodErrorCode.INVALID_ARGUMENTS
            # A truncated envelope, reserved flags; a name cut short where what is left
            # is another method's name ("echo" of "echoes").
            cut = b"\xf5\x01\x00\x00\x06echo"
            for body in [b"\xf5\x01\x00\x00", call_envelope(b"echo", b"[[],{}]", flags=0x80), cut]:
                assert error_code(await client.request(body)) == MethodErrorCode.INVALID_CALL
            # A name that is not UTF-8; a call marked idempotent to a method that is not.
            reply = await client.request(call_envelope(b"ech\xff", b"[[],{}]"))
            assert error_code(reply) == MethodErrorCode.INVALID_CALL
            reply = await client.request(call_envelope(b"echo", b"[[],{}]", flags=0x01))
            assert error_code(reply) == MethodErrorCode.NOT_IDEMPOTENT
            assert await client.call("math.add", 1) == 2  # still serving


async def test_method_names_at_the_limits() -> None:
    router = Router()
    longest = "m" * 0xFFFF

    async def method() -> str:
        return "ok"

    router.method(longest)(method)
    with pytest.raises(ValueError, match="at most 65535 bytes"):
        router.method("m" * 0x10000)(method)
    with pytest.raises(ValueError, match="cannot be empty"):
        router.method("")(method)
    with pytest.raises(ValueError, match="already registered"):
        router.method(longest)(method)
    with pytest.raises(TypeError, match="not async"):
        router.method("sync")(lambda: None)
    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(native(), server_handler=router) as (client, _):
            assert await client.call(longest) == "ok"
            with pytest.raises(ValueError, match="at most 65535 bytes"):
                await client.call("m" * 0x10000)  # 64 KiB: refused here, nothing sent
            assert client.statistics().requests_sent == 1


async def test_namespaces_and_included_routers() -> None:
    inner = Router()

    @inner.method
    async def ping() -> str:
        return "pong"

    outer = Router()
    outer.include(inner, namespace="a")
    outer.include(inner, namespace="b")
    outer.add_service(Store(), KeyValue, namespace="one")
    outer.add_service(Store(), KeyValue, namespace="two")
    with pytest.raises(ValueError, match="already registered"):
        outer.include(inner, namespace="a")
    with pytest.raises(TypeError, match="lacks get"):
        outer.add_service(object(), KeyValue, namespace="three")
    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(native(), server_handler=outer) as (client, _):
            assert await client.call("a.ping") == await client.call("b.ping") == "pong"
            one, two = (
                client.proxy(KeyValue, namespace="one"),
                client.proxy(KeyValue, namespace="two"),
            )
            await one.put("k", "1")
            with pytest.raises(NotFound):
                await two.get("k")


async def test_the_server_calls_the_client_back_through_a_protocol() -> None:
    client_router = Router()
    store = Store()
    client_router.add_service(store, KeyValue)
    server_router = Router()
    seen: list[monte_trio.CallInfo] = []

    @server_router.method
    async def remember(key: str, value: str) -> str:
        call = monte_trio.current_call()
        seen.append(call)
        peer = call.connection.proxy(KeyValue)  # the connection the call came on
        await peer.put(key, value)
        return await peer.get(key)

    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(
            native(), server_handler=server_router, client_handler=client_router
        ) as (client, server):
            assert await client.call("remember", "x", "y") == "y"
            with trio.move_on_after(TIMEOUT - 1):
                assert await client.call("remember", "z", "w") == "w"
    assert store.data == {"x": "y", "z": "w"}
    first, second = seen
    assert first.connection is server
    assert (first.method, first.args, first.side) == ("remember", ("x", "y"), "server")
    # The callers' deadlines crossed the wire: the second, 1 s tighter, ends first.
    assert second.deadline < first.deadline < math.inf


async def test_current_call_outside_a_method_says_where_it_works() -> None:
    with pytest.raises(RuntimeError, match="inside a method a Router is serving"):
        monte_trio.current_call()
    router = Router()

    @router.method
    async def who() -> str:
        return str(monte_trio.current_call().peer_public_key)

    identity = monte_trio.Identity.generate()
    handshake = NativeHandshake(identity=identity, trust=monte_trio.AcceptAnyKey())
    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(handshake, server_handler=router) as (client, _):
            assert await client.call("who") == str(identity.public_key)
    with pytest.raises(RuntimeError):
        monte_trio.current_call()  # reset once the method returned


async def test_bodies_that_are_not_calls_go_to_the_fallback() -> None:
    async def raw(request: Request) -> bytes | None:
        return None if request.oneway else b"raw:" + request.body

    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(native(), server_handler=make_router(fallback=raw)) as (
            client,
            _,
        ):
            assert await client.request(b"hello") == b"raw:hello"
            assert await client.call("echo", b"x") == b"x"
        async with open_connection_pair(native(), server_handler=make_router()) as (client, _):
            assert error_code(await client.request(b"hello")) == MethodErrorCode.INVALID_CALL
            await client.send(b"dropped")  # a one-way message that is no call: dropped
            assert await client.call("echo", 1) == 1


async def test_a_reply_that_is_not_a_method_reply_is_a_codec_error() -> None:
    async def raw(request: Request) -> bytes:
        return b"plain bytes"

    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(native(), server_handler=raw) as (client, _):
            with pytest.raises(CodecError, match="does the peer serve methods"):
                await client.call("echo", 1)


# -- typed errors ----------------------------------------------------------------------------


async def test_registered_errors_are_raised_as_themselves() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(native(), server_handler=make_router()) as (client, _):
            kv = client.proxy(KeyValue, namespace="kv")
            with pytest.raises(NotFound, match="no key 'missing'") as caught:
                await kv.get("missing")
            cause = caught.value.__cause__
            assert isinstance(cause, RemoteMethodError)
            assert (cause.code, cause.name) == (MethodErrorCode.APPLICATION, "test.NotFound")
            details = {"field": "key", "limits": [1, 2], "nested": {"deep": None}}
            with pytest.raises(Detailed) as detailed:
                await client.call("detailed", details)
            assert detailed.value.details == details


async def test_details_that_do_not_encode_are_left_out_with_a_note() -> None:
    router = Router()

    @router.method
    async def fail() -> None:
        raise Detailed("bad details", {"value": math.nan})

    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(native(), server_handler=router) as (client, _):
            with pytest.raises(Detailed, match="details could not be encoded") as caught:
                await client.call("fail")
            assert caught.value.details is None


@pytest.mark.parametrize(
    ("config", "expected", "hidden"),
    [
        (ConnectionConfig(), "ZeroDivisionError: the secret is 42", "Traceback"),
        (ConnectionConfig(expose_errors=False), "the method raised an exception", "secret"),
        (ConnectionConfig(expose_tracebacks=True), "Traceback (most recent call last)", "@@"),
    ],
    ids=["default", "hidden", "tracebacks"],
)
async def test_handler_bugs_are_internal_errors_without_tracebacks_by_default(
    config: ConnectionConfig, expected: str, hidden: str
) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(
            native(), server_handler=make_router(), server_config=config
        ) as (client, _):
            with pytest.raises(RemoteMethodError) as caught:
                await client.call("boom")
    error = caught.value
    assert type(error) is RemoteMethodError
    assert error.code is MethodErrorCode.INTERNAL
    assert error.name == ""
    assert expected in error.message
    assert hidden not in error.message


def test_remote_error_names_are_checked() -> None:
    with pytest.raises(ValueError, match="already names"):
        monte_trio.remote_error("test.NotFound")(KeyError)
    with pytest.raises(ValueError, match="1 to 65,535 bytes"):
        monte_trio.remote_error("")
    with pytest.raises(TypeError, match="exception classes"):
        monte_trio.remote_error("test.x")(int)  # type: ignore[type-var]


# -- codecs ----------------------------------------------------------------------------------


async def test_json_values_at_the_extremes() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(native(), server_handler=make_router()) as (client, _):
            huge = 2**200
            assert await client.call("echo", huge) == huge
            nested: Any = []
            for _ in range(200):
                nested = [nested]
            assert await client.call("echo", nested) == nested
            assert await client.call("echo", "ünïcode \x00 \u202e") == "ünïcode \x00 \u202e"
            for value in [math.nan, math.inf, 10**5000, b"bytes inside" and [b"x"], object()]:
                with pytest.raises(CodecError, match="cannot encode as JSON"):
                    await client.call("echo", value)
            deep: Any = []
            for _ in range(100_000):
                deep = [deep]
            with pytest.raises(CodecError):
                await client.call("echo", deep)
            assert client.statistics().requests_sent == 3  # nothing else was sent
            # NaN sent anyway (not by this library) is refused by the strict decoder.
            reply = await client.request(call_envelope(b"echo", b"[[NaN],{}]"))
            assert error_code(reply) == MethodErrorCode.INVALID_ARGUMENTS


@dataclasses.dataclass
class Point:
    x: int
    y: int


@attrs.define
class Box:
    low: Point
    high: Point


HAVE_MSGSPEC = importlib.util.find_spec("msgspec") is not None
if TYPE_CHECKING or HAVE_MSGSPEC:
    import msgspec

    class Item(msgspec.Struct):
        name: str
        tags: list[str]
        blob: bytes


class Geometry(Protocol):
    async def area(self, box: Box) -> int: ...

    async def corner(self, box: Box) -> Point: ...


class GeometryService:
    async def area(self, box: Box) -> int:
        assert isinstance(box, Box)
        assert isinstance(box.low, Point)
        return (box.high.x - box.low.x) * (box.high.y - box.low.y)

    async def corner(self, box: Box) -> Point:
        return box.high


async def test_msgpack_with_dataclasses_attrs_and_structs() -> None:
    if not HAVE_MSGSPEC:
        pytest.skip("msgspec is not installed")
    router = Router()
    router.add_service(GeometryService(), Geometry)

    @router.method
    async def first_tag(item: Item) -> Item:
        assert isinstance(item, Item)
        return Item(item.tags[0], [], item.blob[:1])

    config = ConnectionConfig(codec="msgpack")
    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(native(), server_handler=router, config=config) as (
            client,
            _,
        ):
            geometry = client.proxy(Geometry)
            box = Box(Point(1, 2), Point(4, 6))
            assert await geometry.area(box) == 12
            assert await geometry.corner(box) == Point(4, 6)  # converted to the annotation
            result = await client.call("first_tag", Item("n", ["a", "b"], b"\x00\xff"))
            assert result == {"name": "a", "tags": [], "blob": b"\x00"}  # untyped call
            with pytest.raises(InvalidArguments, match="argument 'box'"):
                await client.call("area", {"low": {"x": "not an int", "y": 0}, "high": None})
            with pytest.raises(CodecError, match="cannot encode as MessagePack"):
                await client.call("area", 2**70)


# -- the codec in the hello ------------------------------------------------------------------


def test_hello_codec_field_absent_means_json_and_unknown_ids_are_kept() -> None:
    default = Hello2()
    assert default.encode() == Hello2(codec=Codec.JSON).encode()
    assert b"\x00\x09\x00\x02" not in default.encode()  # never sent for the default
    assert Hello2.decode(default.encode()).codec == Codec.JSON
    msgpack = Hello2(codec=Codec.MSGPACK).encode()
    assert msgpack == default.encode() + bytes.fromhex("000900020002")
    assert Hello2.decode(msgpack).codec == Codec.MSGPACK
    unknown = default.encode() + bytes.fromhex("00090002ffff")
    assert Hello2.decode(unknown).codec == 0xFFFF
    with pytest.raises(RemoteProtocolError, match="codec has 1 bytes"):
        Hello2.decode(default.encode() + bytes.fromhex("0009000101"))
    with pytest.raises(RemoteProtocolError, match="codec appears twice"):
        Hello2.decode(msgpack + bytes.fromhex("000900020002"))
    # An unknown TLV type is skipped, as older peers skip this one.
    assert Hello2.decode(default.encode() + bytes.fromhex("00630003abcdef")) == default


async def test_a_codec_mismatch_fails_at_connect_naming_both_choices() -> None:
    if not HAVE_MSGSPEC:
        pytest.skip("msgspec is not installed")
    with trio.fail_after(TIMEOUT):
        async with running_server(
            make_router(), trust=AcceptAnyKey(), config=ConnectionConfig(codec="msgpack")
        ) as (server, port):
            with pytest.raises(HandshakeError) as caught:
                async with monte_trio.open_client("127.0.0.1", port, trust=AcceptAnyKey()):
                    pass  # pragma: no cover
            assert server.statistics().handshake_failures == 1
            async with monte_trio.open_client(
                "127.0.0.1", port, trust=AcceptAnyKey(), config=ConnectionConfig(codec="msgpack")
            ) as client:
                assert await client.call("echo", [1, b"2"]) == [1, b"2"]
    text = str(caught.value)
    assert "codec mismatch" in text
    assert "'json'" in text
    assert "'msgpack'" in text
    with pytest.raises(ValueError, match="codec must be one of"):
        ConnectionConfig(codec="xml")


# -- deadlines -------------------------------------------------------------------------------


async def test_the_deadline_crosses_the_wire(autojump_clock: trio.testing.MockClock) -> None:
    seen: list[float] = []
    router = Router()

    @router.method
    async def slow() -> None:
        seen.append(trio.current_effective_deadline() - trio.current_time())
        try:
            await trio.sleep(100)
        finally:
            seen.append(trio.current_time())

    async with open_connection_pair(native(), server_handler=router) as (client, _):
        start = trio.current_time()
        with trio.move_on_after(2.5):
            await client.call("slow")
        await trio.testing.wait_all_tasks_blocked()
        assert seen[0] == pytest.approx(2.5, abs=1e-3)  # the handler's own deadline
        assert seen[1] == pytest.approx(start + 2.5, abs=1e-3)  # cancelled then
        assert router.statistics()["slow"].errors == 1
        with trio.move_on_after(1e9):
            seen.clear()
            with trio.move_on_after(0.5):
                await client.call("slow")
            assert seen[0] == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("how", ["deadline", "cancelled"])
async def test_a_method_whose_caller_gave_up_after_200_ms_is_cancelled_within_200_ms(
    autojump_clock: trio.testing.MockClock, how: str
) -> None:
    """Over a link with 50 ms each way: the caller gives up after 200 ms, by its deadline
    (which crossed the wire) or by a cancellation without one (CANCEL); the method is
    cancelled 50 ms later, when the news has crossed the link."""
    network = FaultyNetwork(seed=1, latency=0.05)
    listener = network.listen("server")
    router = Router()
    cancelled = trio.Event()
    cancelled_at: list[float] = []

    @router.method
    async def slow() -> None:
        try:
            await trio.sleep(100)
        finally:
            cancelled_at.append(trio.current_time())
            cancelled.set()

    with trio.fail_after(60):
        client_raw = await network.connect("server")
        server_raw = await listener.accept()
        async with open_connection_pair(
            native(), server_handler=router, transports=(client_raw, server_raw)
        ) as (client, _):
            start = trio.current_time()
            if how == "deadline":
                with trio.move_on_after(0.2):
                    await client.call("slow")
            else:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client.call, "slow")  # no deadline: CANCEL
                    await trio.sleep(0.2)
                    nursery.cancel_scope.cancel()
            gave_up = trio.current_time()
            assert gave_up - start == pytest.approx(0.2, abs=1e-3)
            await cancelled.wait()
            assert cancelled_at[0] - gave_up == pytest.approx(0.05, abs=0.01)
            assert cancelled_at[0] - gave_up <= 0.2
            assert router.statistics()["slow"].errors == 1


async def test_deadlines_at_the_extremes(autojump_clock: trio.testing.MockClock) -> None:
    ran: list[float] = []
    router = Router()

    @router.method
    async def deadline() -> float:
        ran.append(trio.current_effective_deadline() - trio.current_time())
        return 0.0

    async with open_connection_pair(native(), server_handler=router) as (client, _):
        # A deadline of 0 (or one that had already passed: the remaining time is sent as
        # 0): the method is not run.
        reply = await client.request(call_envelope(b"deadline", b"[[],{}]", remaining_us=0))
        assert error_code(reply) == MethodErrorCode.DEADLINE_EXCEEDED
        assert ran == []
        with trio.move_on_after(1e9):
            await client.call("deadline")
        assert ran == [pytest.approx(1e9, rel=1e-6)]
        ran.clear()
        reply = await client.request(
            call_envelope(b"deadline", b"[[],{}]", remaining_us=2**64 - 1)
        )
        assert reply == b"\xf5\x020.0"
        assert ran == [pytest.approx((2**64 - 1) / 1e6)]
        ran.clear()
        await client.call("deadline")  # no deadline: none on the other side either
        assert ran == [math.inf]


async def test_one_handler_worker_serves_deadlines_one_after_another(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # One worker: its cancel scope carries each call's deadline in turn. A deadline that
    # passed must not cancel the calls after it; one that did not pass must not linger.
    router = Router()
    log: list[tuple[float, float]] = []  # (start, effective deadline) of each work()

    @router.method
    async def work(seconds: float) -> str:
        log.append((trio.current_time(), trio.current_effective_deadline()))
        await trio.sleep(seconds)
        return f"slept {seconds}"

    @router.method
    async def stubborn(seconds: float) -> str:
        try:
            await trio.sleep(seconds)
        except trio.Cancelled:
            pass  # ignores its deadline and answers anyway
        return "stubborn"

    def body(name: bytes, seconds: float, remaining: float | None) -> bytes:
        arguments = b"[[%.1f],{}]" % seconds
        if remaining is None:
            return call_envelope(name, arguments)
        return call_envelope(name, arguments, remaining_us=int(remaining * 1e6))

    config = monte_trio.ConnectionConfig(max_concurrent_handlers=1)
    with trio.fail_after(1000):
        test_deadline = trio.current_effective_deadline()
        async with open_connection_pair(native(), server_handler=router, config=config) as (
            client,
            server,
        ):
            await _deadlines_one_after_another(client, body)
            assert server.statistics().running_handlers == 0
    # Each call's own deadline, else only this test's (the server runs inside it).
    seen = [test_deadline if end == test_deadline else end - start for start, end in log]
    assert seen == [0.5, test_deadline, 30, test_deadline, test_deadline] * 3
    assert router.statistics()["work"].errors == 3


async def _deadlines_one_after_another(
    client: monte_trio.Connection, body: Callable[[bytes, float, float | None], bytes]
) -> None:
    replies: dict[bytes, bytes] = {}
    for _ in range(3):
        start = trio.current_time()
        reply = await client.request(body(b"work", 10, 0.5))  # its deadline passes
        assert error_code(reply) == MethodErrorCode.DEADLINE_EXCEEDED
        assert trio.current_time() - start == pytest.approx(0.5, abs=1e-3)
        start = trio.current_time()
        reply = await client.request(body(b"work", 2, None))  # no deadline
        assert reply == b'\xf5\x02"slept 2.0"'
        assert trio.current_time() - start == pytest.approx(2, abs=1e-3)
        reply = await client.request(body(b"work", 1, 30))  # one that does not pass
        assert reply == b'\xf5\x02"slept 1.0"'
        reply = await client.request(body(b"work", 40, None))  # ... and is gone after
        assert reply == b'\xf5\x02"slept 40.0"'
        # A method that outlives its deadline answers; the call queued behind it (served
        # next by the same worker) is unharmed.
        replies.clear()

        async def call(name: bytes, seconds: float, remaining: float | None) -> None:
            replies[name] = await client.request(body(name, seconds, remaining))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, b"stubborn", 10, 0.5)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(call, b"work", 3, None)
        assert replies == {b"stubborn": b'\xf5\x02"stubborn"', b"work": b'\xf5\x02"slept 3.0"'}


# -- middleware and statistics ---------------------------------------------------------------


async def test_middleware_on_both_sides_and_statistics(
    autojump_clock: trio.testing.MockClock,
) -> None:
    events: list[tuple[str, str, str, float]] = []

    def recorder(tag: str) -> monte_trio.Middleware:
        async def middleware(call: CallInfo, next: Callable[[], Awaitable[Any]]) -> Any:
            start = trio.current_time()
            try:
                result = await next()
            except Exception as exc:
                events.append(
                    (tag, call.method, type(exc).__name__, round(trio.current_time() - start, 2))
                )
                raise
            events.append((tag, call.method, "ok", round(trio.current_time() - start, 2)))
            assert call.peer_public_key is not None
            return result

        return middleware

    router = make_router(middleware=[recorder("server")])
    server_key = monte_trio.Identity.generate()
    async with (
        running_server(router, identity=server_key, trust=AcceptAnyKey()) as (_, port),
        monte_trio.open_client(
            "127.0.0.1", port, trust=AcceptAnyKey(), middleware=[recorder("client")]
        ) as client,
    ):
        assert await client.call("sleep", 1.5) == 1.5
        with pytest.raises(MethodNotFound):
            await client.call("nope")
        with pytest.raises(RemoteMethodError):
            await client.call("boom")
    assert events[:2] == [("server", "sleep", "ok", 1.5), ("client", "sleep", "ok", 1.5)]
    assert ("client", "nope", "MethodNotFound", 0.0) in events
    assert ("server", "boom", "ZeroDivisionError", 0.0) in events
    stats = router.statistics()["sleep"]
    assert (stats.calls, stats.errors) == (1, 0)
    assert stats.total_time == stats.max_time == pytest.approx(1.5, abs=0.01)
    stats = router.statistics()["boom"]
    assert (stats.calls, stats.errors) == (1, 1)
    assert "nope" not in router.statistics()


# -- metadata --------------------------------------------------------------------------------


def metadata_field(entries: list[tuple[bytes, bytes]]) -> bytes:
    """A call's metadata field built from docs/services.rst, byte by byte."""
    field = bytes([len(entries)])
    for key, value in entries:
        field += bytes([len(key)]) + key + struct.pack(">H", len(value)) + value
    return field


async def capture(seen: list[bytes], request: Request) -> bytes:
    """A raw handler that keeps each body (less its remaining time: the test's own
    deadline) and replies as a method returning ``None``."""
    body = request.body
    if body[2] & 0x02:
        end = 5 + struct.unpack_from(">H", body, 3)[0]
        assert struct.unpack_from(">Q", body, end)[0] > 0
        body = body[:2] + bytes([body[2] & ~0x02]) + body[3:end] + body[end + 8 :]
    seen.append(body)
    return b"\xf5\x02null"


async def test_metadata_on_the_wire_and_without_it_nothing_changes() -> None:
    bodies: list[bytes] = []
    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(
            native(), server_handler=lambda request: capture(bodies, request)
        ) as (client, _):
            await client.call("m", 1)
            with monte_trio.call_metadata({"traceparent": "00-ab-cd-01"}, tenant="blué"):
                await client.call("m", 1)
                with trio.move_on_after(1e6):
                    await client.notify("m", b"raw")
            with monte_trio.call_metadata({}):
                await client.call("m", 1)  # empty: no metadata field at all
    plain = call_envelope(b"m", b"[[1],{}]")
    entries = metadata_field([(b"traceparent", b"00-ab-cd-01"), (b"tenant", "blué".encode())])
    assert bodies[0] == bodies[3] == plain
    assert bodies[1] == call_envelope(b"m", entries + b"[[1],{}]", flags=0x08)
    # Flags 0x04 | 0x08 (and 0x02, taken out with the remaining time it adds): the
    # metadata, then the raw bytes.
    assert bodies[2] == call_envelope(b"m", entries + b"raw", flags=0x0C)


async def test_metadata_reaches_methods_and_middleware_on_both_sides() -> None:
    seen: list[tuple[str, dict[str, str], bool]] = []

    def recorder(side: str, add: dict[str, str]) -> monte_trio.Middleware:
        async def middleware(call: CallInfo, next: Callable[[], Awaitable[Any]]) -> Any:
            seen.append((side, dict(call.metadata), call.oneway))
            call.metadata.update(add)  # the client's changes go with the call
            return await next()

        return middleware

    router = Router(middleware=[recorder("server", {})])
    done = trio.Event()

    @router.method
    async def show() -> dict[str, str]:
        return monte_trio.current_call().metadata

    @router.method
    async def note() -> None:
        seen.append(("method", monte_trio.current_call().metadata, True))
        done.set()

    with trio.fail_after(TIMEOUT):
        async with (
            running_server(router, trust=AcceptAnyKey()) as (_, port),
            monte_trio.open_client(
                "127.0.0.1",
                port,
                trust=AcceptAnyKey(),
                middleware=[recorder("client", {"added": "by middleware"})],
            ) as client,
        ):
            assert await client.call("show") == {"added": "by middleware"}
            with monte_trio.call_metadata(a="1", b="2"):
                with monte_trio.call_metadata({"b": "inner", "x-id": "3"}):
                    shown = await client.call("show")
                    conn = await client.connection()
                    assert await conn.call("show") == {"a": "1", "b": "inner", "x-id": "3"}
                assert await client.call("show") == {"a": "1", "b": "2", "added": "by middleware"}
                await client.notify("note")
                await done.wait()
            assert await conn.call("show") == {}  # the block ended: nothing attached
    assert shown == {"a": "1", "b": "inner", "x-id": "3", "added": "by middleware"}
    assert seen[:2] == [("client", {}, False), ("server", {"added": "by middleware"}, False)]
    assert ("client", {"a": "1", "b": "2"}, True) in seen
    assert ("server", {"a": "1", "b": "2", "added": "by middleware"}, True) in seen
    assert ("method", {"a": "1", "b": "2", "added": "by middleware"}, True) in seen


async def test_metadata_limits_at_the_extremes_on_the_calling_side() -> None:
    router = Router()

    @router.method
    async def size() -> int:
        metadata = monte_trio.current_call().metadata
        return len(metadata) + sum(len(k) + len(v) for k, v in metadata.items())

    most = {f"k{index:02d}": "" for index in range(64)}
    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(native(), server_handler=router) as (client, _):
            with monte_trio.call_metadata(most):
                assert await client.call("size") == 64 + 64 * 3
                # 65 across two blocks: refused as well
                with pytest.raises(ValueError, match="has 65"), monte_trio.call_metadata(k64=""):
                    pass  # pragma: no cover
            with (
                pytest.raises(ValueError, match="at most 64 metadata entries; this one has 65"),
                monte_trio.call_metadata(most, k64=""),
            ):
                pass  # pragma: no cover
            with monte_trio.call_metadata({"k": "v" * 8191}):
                assert await client.call("size") == 1 + 8192
            with (
                pytest.raises(
                    ValueError, match="at most 8192 bytes of UTF-8; these add up to 8193"
                ),
                monte_trio.call_metadata(k="é" * 4096),
            ):
                pass  # pragma: no cover
            with monte_trio.call_metadata({"k" * 255: ""}):
                assert await client.call("size") == 1 + 255
            for bad_key in ["k" * 256, "", "\udc80"]:
                with (
                    pytest.raises(ValueError, match="metadata"),
                    monte_trio.call_metadata({bad_key: "v"}),
                ):
                    pass  # pragma: no cover
            for bad in [{"k": 1}, {2: "v"}, {"k": b"v"}]:
                with (
                    pytest.raises(TypeError, match="metadata keys and values are str"),
                    monte_trio.call_metadata(bad),  # type: ignore[arg-type]
                ):
                    pass  # pragma: no cover
            assert client.statistics().requests_sent == 3  # nothing else was sent


async def test_client_middleware_that_adds_too_much_metadata_sends_nothing() -> None:
    async def bloat(call: CallInfo, next: Callable[[], Awaitable[Any]]) -> Any:
        call.metadata.update({f"k{index}": "" for index in range(65)})
        return await next()

    with trio.fail_after(TIMEOUT):
        async with (
            running_server(make_router(), trust=AcceptAnyKey()) as (_, port),
            monte_trio.open_client(
                "127.0.0.1", port, trust=AcceptAnyKey(), middleware=[bloat]
            ) as client,
        ):
            with pytest.raises(ValueError, match="has 65"):
                await client.call("echo", 1)
            conn = await client.connection()
            assert conn.statistics().requests_sent == 0
            assert await conn.call("echo", 1) == 1  # no client middleware on a connection


@pytest.mark.parametrize(
    ("field", "message"),
    [
        (metadata_field([(b"k%02d" % i, b"") for i in range(65)]), "has 65 entries"),
        (metadata_field([(b"k", b"v" * 8192)]), "more than 8192 bytes"),
        (metadata_field([(b"k", b"v" * 4000), (b"l", b"v" * 4191)]), "more than 8192 bytes"),
        (metadata_field([(b"", b"v")]), "empty key"),
        (metadata_field([(b"k", b"1"), (b"k", b"2")]), "'k' appears twice"),
        (metadata_field([(b"\xff", b"v")]), "not UTF-8"),
        (metadata_field([(b"k", b"\xc3")]), "not UTF-8"),
        (b"", "truncated inside its metadata"),
        (b"\x01", "truncated inside its metadata"),
        (b"\x01\x05key", "truncated inside its metadata"),
        (b"\x01\x03key\x00\x05abc", "truncated inside its metadata"),
        (b"\x02" + metadata_field([(b"k", b"v")])[1:], "truncated inside its metadata"),
    ],
    ids=[
        "65-entries",
        "8193-bytes",
        "8193-bytes-in-two",
        "empty-key",
        "duplicate",
        "key-not-utf8",
        "value-not-utf8",
        "no-count",
        "no-key-length",
        "short-key",
        "short-value",
        "missing-entry",
    ],
)
async def test_metadata_over_its_limits_or_malformed_is_refused_unrun(
    field: bytes, message: str
) -> None:
    ran: list[str] = []
    router = Router()

    @router.method
    async def m(*args: Any) -> None:
        ran.append("m")

    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(native(), server_handler=router) as (client, _):
            # The same envelope with the most the limits allow is served.
            most = metadata_field(
                [(b"k%02d" % i, b"") for i in range(63)] + [(b"k63", b"v" * 8000)]
            )
            reply = await client.request(call_envelope(b"m", most + b"[[],{}]", flags=0x08))
            assert reply == b"\xf5\x02null"
            arguments = b"" if "truncated" in message else b"[[],{}]"
            reply = await client.request(call_envelope(b"m", field + arguments, flags=0x08))
            assert error_code(reply) == MethodErrorCode.INVALID_CALL
            assert message in reply.decode("utf-8", errors="replace")
            assert await client.call("m") is None  # the connection goes on
    assert ran == ["m", "m"]


# -- one-way calls ---------------------------------------------------------------------------


class Events(Protocol):
    @monte_trio.oneway
    async def record(self, event: str, *, count: int = 1) -> None: ...

    async def total(self) -> int: ...


class EventLog:
    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.arrived = trio.Event()

    async def record(self, event: str, *, count: int = 1) -> str:
        self.events.append((event, count))
        self.arrived.set()
        return "this result is dropped"

    async def total(self) -> int:
        return sum(count for _, count in self.events)


async def test_notify_runs_the_method_and_nothing_comes_back(
    profile: monte_trio.Handshake,
) -> None:
    log = EventLog()
    router = Router()
    router.add_service(log, Events, namespace="events")
    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(profile, server_handler=router) as (client, server):
            await client.notify("events.record", "start", count=2)
            await log.arrived.wait()
            log.arrived = trio.Event()
            events = client.proxy(Events, namespace="events")
            await events.record("proxy")  # a one-way message too
            await log.arrived.wait()
            assert await events.total() == 3
            stats = client.statistics()
            assert (stats.messages_sent, stats.requests_sent) == (2, 1)
            assert server.statistics().messages_received == 2
    assert log.events == [("start", 2), ("proxy", 1)]
    assert router.statistics()["events.record"].calls == 2


async def test_notify_failures_are_logged_at_the_server_never_sent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    router = make_router()
    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(native(), server_handler=router) as (client, server):
            await client.notify("nope")
            await client.notify("math.add")  # missing an argument
            await client.notify("boom")
            await client.notify("kv.get", "missing")
            assert await client.call("math.add", 1) == 2  # served after the four
            await trio.testing.wait_all_tasks_blocked()
            assert client.statistics().replies_received == 1
            assert server.statistics().messages_received == 4
    failures = [
        record.getMessage()
        for record in caplog.records
        if "a method called by a one-way message failed" in record.getMessage()
    ]
    assert len(failures) == 4, failures
    assert "(NOT_FOUND): no method named 'nope'" in failures[0]
    assert "(INVALID_ARGUMENTS)" in failures[1]
    assert "(INTERNAL): ZeroDivisionError: the secret is 42" in failures[2]
    assert "(APPLICATION): no key 'missing'" in failures[3]
    with pytest.raises(CodecError, match="cannot encode as JSON"):
        await client.notify("echo", object())


async def test_a_one_way_call_runs_under_its_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    router = Router()
    ended: list[float] = []

    @router.method
    async def slow() -> None:
        try:
            await trio.sleep(100)
        finally:
            ended.append(trio.current_time())

    async with open_connection_pair(native(), server_handler=router) as (client, _):
        start = trio.current_time()
        with trio.move_on_after(2.0):
            await client.notify("slow")  # returns once written
            await trio.sleep(50)
        await trio.testing.wait_all_tasks_blocked()
        assert ended == [pytest.approx(start + 2.0, abs=1e-3)]
        assert router.statistics()["slow"].errors == 1


async def test_the_server_notifies_the_client_back_on_the_same_connection() -> None:
    log = EventLog()
    client_router = Router()
    client_router.add_service(log, Events)
    server_router = Router()

    @server_router.method
    async def work() -> str:
        await monte_trio.current_call().connection.notify("record", "done")
        return "ok"

    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(
            native(), server_handler=server_router, client_handler=client_router
        ) as (client, _):
            assert await client.call("work") == "ok"
            await log.arrived.wait()
    assert log.events == [("done", 1)]


def test_oneway_is_for_methods_that_return_nothing() -> None:
    with pytest.raises(TypeError, match="annotate it -> None instead of -> int"):

        @monte_trio.oneway
        async def count() -> int:  # pragma: no cover
            return 1

    async def unannotated():  # type: ignore[no-untyped-def]  # pragma: no cover
        pass

    assert monte_trio.oneway(unannotated) is unannotated


def test_the_documented_metadata_example_is_the_layout() -> None:
    text = (Path(__file__).resolve().parent.parent / "docs" / "services.rst").read_text()
    example = text.rsplit("::\n\n", 1)[1]
    documented = bytes.fromhex(" ".join(example.split()))
    entries = metadata_field([(b"tenant", b"blue")])
    assert documented == call_envelope(b"math.add", entries + b'[[2],{"b":5}]', flags=0x08)


class Blobs(Protocol):
    async def size(self, data: bytes, extra: int) -> int: ...

    async def encoded(self) -> bytes: ...


class BlobService:
    async def size(self, data: bytes, extra: int) -> int:
        assert isinstance(data, bytes)
        return len(data) + extra

    async def encoded(self) -> bytes:
        return "YWJj"  # type: ignore[return-value]  # base64 text, as a JSON peer would send


async def test_msgpack_conversions_are_the_same_on_the_direct_way_and_the_general_one() -> None:
    """Arguments and results are decoded straight to their annotations where msgspec can;
    what that refuses still goes through msgspec.convert, which takes a little more (base64
    text for bytes), keyword arguments included."""
    if not HAVE_MSGSPEC:
        pytest.skip("msgspec is not installed")
    router = Router()
    router.add_service(BlobService(), Blobs)
    config = ConnectionConfig(codec="msgpack")
    with trio.fail_after(TIMEOUT):
        async with open_connection_pair(native(), server_handler=router, config=config) as (
            client,
            _,
        ):
            blobs = client.proxy(Blobs)
            assert await blobs.size(b"abcd", 1) == 5
            assert await client.call("size", "YWJj", 1) == 4  # base64 text: converted
            assert await client.call("size", extra=2, data=b"ab") == 4
            assert await blobs.encoded() == b"abc"  # the result converted the same way
            with pytest.raises(InvalidArguments, match="argument 'extra'"):
                await client.call("size", b"x", "not an int")
            with pytest.raises(InvalidArguments, match="too many positional"):
                await client.call("size", b"x", 1, 2)


@pytest.mark.parametrize("child", ["sleeps", "raises"])
async def test_a_method_with_a_nursery_stopped_by_its_deadline_still_answers(
    autojump_clock: trio.testing.MockClock, child: str
) -> None:
    """The deadline cancels the method's nursery, which raises a group of Cancelled (or
    of Cancelled and the error a child raised as it was cancelled): the caller gets
    DEADLINE_EXCEEDED (or the error), as from a scope of its own, and the worker serves
    on."""
    router = Router()

    async def sleeper() -> None:
        try:
            await trio.sleep_forever()
        finally:
            if child == "raises":
                raise ValueError("cleaning up failed")

    @router.method
    async def fan_out() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sleeper)
            nursery.start_soon(sleeper)

    @router.method
    async def ok() -> str:
        await trio.sleep(1)
        return "ok"

    config = monte_trio.ConnectionConfig(max_concurrent_handlers=1)
    with trio.fail_after(60):
        async with open_connection_pair(native(), server_handler=router, config=config) as (
            client,
            server,
        ):
            for _ in range(3):
                start = trio.current_time()
                body = call_envelope(b"fan_out", b"[[],{}]", remaining_us=500_000)
                reply = await client.request(body)
                assert trio.current_time() - start == pytest.approx(0.5, abs=1e-3)
                expected = (
                    MethodErrorCode.DEADLINE_EXCEEDED
                    if child == "sleeps"
                    else MethodErrorCode.INTERNAL
                )
                assert error_code(reply) == expected
                assert await client.call("ok") == "ok"  # the same worker, unharmed
            assert server.statistics().running_handlers == 0
