"""A proxy is typed as its Protocol: mypy --strict finds a wrong argument or result type in
a user's code."""

from __future__ import annotations

import textwrap
from pathlib import Path

from helpers import run_mypy_strict

SAMPLE = textwrap.dedent(
    """\
    from typing import AsyncIterator, Protocol

    import monte_trio


    class KeyValue(Protocol):
        async def get(self, key: str) -> bytes: ...


    async def use(client: monte_trio.Client, conn: monte_trio.Connection) -> None:
        kv = client.proxy(KeyValue, namespace="kv")
        value: bytes = await kv.get("key")
        await kv.get(42)  # line 13: a wrong argument type
        wrong: int = await kv.get("key")  # line 14: a wrong result type
        back = conn.proxy(KeyValue)
        await back.get("key", "extra")  # line 16: too many arguments
        untyped = await client.call("kv.get", "key")
        reveal_type(untyped)  # line 18
        del value, wrong, untyped


    class Log(Protocol):
        @monte_trio.oneway
        async def line(self, text: str) -> None: ...


    async def notify(client: monte_trio.Client, conn: monte_trio.Connection) -> None:
        log = client.proxy(Log)
        await log.line("text")
        await log.line(1)  # line 30: a wrong argument type
        with monte_trio.call_metadata({"x-request-id": "1"}, tenant="blue"):
            await client.notify("log.line", "text")
            await conn.notify("log.line", text="text")
        with monte_trio.call_metadata(tenant=2):  # line 34: metadata values are str
            pass


    class Tail(Protocol):
        def tail(self, name: str) -> AsyncIterator[bytes]: ...


    async def stream(client: monte_trio.Client, conn: monte_trio.Connection) -> None:
        tail = conn.proxy(Tail)
        async for line in client.proxy(Tail).tail("log"):
            ok: bytes = line
            wrong: int = line  # line 46: a wrong item type
            del ok, wrong
        async for item in tail.tail(1):  # line 48: a wrong argument type
            del item
        async with client.stream("tail", "log") as results:
            async for value in results:
                reveal_type(value)  # line 52
        async with conn.stream_call("total") as call:
            await call.send(1)
            total = await call.finish()
            reveal_type(total)  # line 56
    """
)


async def test_mypy_checks_calls_through_a_proxy(tmp_path: Path) -> None:
    returncode, out = await run_mypy_strict(tmp_path, SAMPLE)
    lines = [
        line.split("sample.py:", 1)[-1]
        for line in out.splitlines()
        if ": error:" in line or ": note:" in line
    ]
    errors = [line for line in lines if ": error:" in line]
    assert len(errors) == 7, out
    assert errors[0].startswith(
        '13: error: Argument 1 to "get" of "KeyValue" has incompatible type "int"'
    ), out
    assert errors[1].startswith(
        '14: error: Incompatible types in assignment (expression has type "bytes"'
    ), out
    assert errors[2].startswith('16: error: Too many arguments for "get" of "KeyValue"'), out
    assert errors[3].startswith(
        '30: error: Argument 1 to "line" of "Log" has incompatible type'
    ), out
    assert errors[4].startswith('34: error: Argument "tenant" to "call_metadata"'), out
    assert errors[5].startswith(
        '46: error: Incompatible types in assignment (expression has type "bytes"'
    ), out
    assert errors[6].startswith(
        '48: error: Argument 1 to "tail" of "Tail" has incompatible type "int"'
    ), out
    assert '52: note: Revealed type is "Any"' in lines, out
    assert '56: note: Revealed type is "Any"' in lines, out
    assert '18: note: Revealed type is "Any"' in lines, out
    assert returncode == 1
