"""``monte-trio bench HOST:PORT --mode stream``: bytes over one stream and back, checked.

The client opens one :class:`~monte_trio.Stream` to the server's stream echo (``serve``
has one), writes ``--size`` bytes in one task while another reads the echo, half-closes
once everything is written, and reads until the echo ends. What came back is checked with
SHA-256 against what was sent: the data is generated (a random block, each piece starting
with its index, so a piece lost, repeated or reordered changes the digest), and the digest
of what is sent is computed before the clock starts (in a worker thread, so that Ctrl-C
still interrupts it), so the timed part hashes only what comes back.

MB/s counts both directions (``2 x size / time``), as the benchmark suite's 1 MiB
requests do, so the two figures compare.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from collections.abc import Iterator

import trio

from .._client import open_client
from .._config import ConnectionConfig
from .._streams import Stream
from ._errors import CommandFailed, describe
from ._options import format_size
from ._output import format_address, say
from ._security import Security

__all__ = ["bench_stream", "digest_of", "pieces"]

PIECE = 256 * 1024
"""Bytes per ``send_all`` (the stream cuts them into frames)."""
_READ = 256 * 1024
"""Bytes asked of ``receive_some`` at a time."""


def pieces(total: int, block: bytes) -> Iterator[bytes]:
    """The ``total`` bytes to send, as pieces of at most ``len(block)`` bytes: ``block``
    with the piece's index (8 bytes, big-endian) in place of its first 8 bytes."""
    size = len(block)
    for index, offset in enumerate(range(0, total, size)):
        length = min(size, total - offset)
        if length >= 8:
            yield index.to_bytes(8, "big") + block[8:length]
        else:
            yield block[:length]


def digest_of(total: int, block: bytes) -> bytes:
    """The SHA-256 of :func:`pieces` (blocking: run it in a thread)."""
    digest = hashlib.sha256()
    for piece in pieces(total, block):
        digest.update(piece)
    return digest.digest()


def _broken(what: str, exc: trio.BrokenResourceError) -> CommandFailed:
    """A stream that failed, as the command's error (the server reset it, or the
    connection was lost)."""
    return CommandFailed(f"the stream failed while {what}: {describe(exc)}")


async def bench_stream(
    args: argparse.Namespace, security: Security, interrupt: trio.CancelScope
) -> int:
    """Run ``bench --mode stream``; return the exit status (1 if the echo differs)."""
    host, port = args.address
    total: int = args.size
    block = os.urandom(min(PIECE, max(total, 1)))
    amount = format_size(total)
    if not amount.endswith(" bytes"):
        amount += f" ({total:,} bytes)"
    say(
        f"bench stream: {amount} over one stream to {format_address(host, port)} and back, "
        f"profile {security.profile}"
    )
    received = 0
    digest = hashlib.sha256()

    async def write(stream: Stream) -> None:
        try:
            for piece in pieces(total, block):
                await stream.send_all(piece)
            await stream.send_eof()
        except trio.BrokenResourceError as exc:
            raise _broken("sending", exc) from exc

    async def read(stream: Stream) -> None:
        nonlocal received
        try:
            while data := await stream.receive_some(_READ):
                digest.update(data)
                received += len(data)
        except trio.BrokenResourceError as exc:
            raise _broken("receiving the echo", exc) from exc

    async with open_client(
        host,
        port,
        handshake=security.handshake,
        identity=security.identity,
        trust=security.trust,
        psk=security.psk,
        config=ConnectionConfig(),
        max_conns=1,
    ) as client:
        with interrupt:
            expected = await trio.to_thread.run_sync(
                digest_of, total, block, abandon_on_cancel=True
            )
            async with await client.open_stream() as stream:
                start = time.perf_counter()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(write, stream)
                    await read(stream)
                elapsed = time.perf_counter() - start
    if interrupt.cancel_called:
        return 130
    rate = 2 * total / elapsed / 1e6 if elapsed > 0 else float("inf")
    say(
        f"stream: {format_size(total)} each way in {elapsed:.3f} s: {rate:,.2f} MB/s "
        "(both directions counted)"
    )
    if received != total or digest.digest() != expected:
        raise CommandFailed(
            f"the echo differs from what was sent: {received} bytes back for {total} sent; "
            f"SHA-256 {digest.hexdigest()} back, {expected.hex()} sent"
        )
    say(f"bench stream ok: SHA-256 of the echo matches what was sent ({digest.hexdigest()})")
    return 0
