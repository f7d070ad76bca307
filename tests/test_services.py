"""Services: methods by name over the unary calls (Router, call, proxy, codecs, errors,
deadlines, middleware, the codec in the hello)."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import struct
from collections.abc import Awaitable, Callable
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
from monte_trio.testing import open_connection_pair

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
            # A truncated envelope, reserved flags.
            for body in [b"\xf5\x01\x00\x00", call_envelope(b"echo", b"[[],{}]", flags=0x80)]:
                assert error_code(await client.request(body)) == MethodErrorCode.INVALID_CALL
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
