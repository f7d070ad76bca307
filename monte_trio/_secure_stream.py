"""A :class:`trio.abc.Stream` of encrypted records over any trio Stream.

:class:`SecureStream` is what a handshake yields. It is a byte stream (``send_all`` splits
data into records, ``receive_some`` returns decrypted bytes) that passes
:func:`trio.testing.check_two_way_stream`, like :class:`trio.SSLStream`. A
:class:`~monte_trio.Connection` uses its record API instead: :meth:`SecureStream.send_records`
seals a whole batch of plaintexts into one ``send_all``, and
:meth:`SecureStream.receive_records` returns every record completed by one receive.

Transport errors are raised as trio's :class:`trio.BrokenResourceError`; a record that fails
authentication or framing raises :class:`~monte_trio.RemoteProtocolError` (or its subclass
:class:`~monte_trio.DecryptionError`) and leaves the stream broken.

Over a :class:`trio.SocketStream`, :meth:`SecureStream.send_records` is *record-safe*:
it writes through the socket's ``send``, which either sends some bytes or is cancelled
having sent none, so it always knows how much went out. If it is cancelled part-way, the
unsent tail is kept and written first by the next send, and the peer never sees a record
cut in half. Over other transports a cancelled send leaves the stream in an unknown state,
as trio's contract allows; :attr:`SecureStream.record_safe` tells which.
"""

from __future__ import annotations

import errno
import operator
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from ._proto._records import RecordOpener, RecordSealer
from ._util import ConflictDetector

if TYPE_CHECKING:
    from ._handshake import SessionFacts

__all__ = ["SecureStream"]

RECEIVE_SIZE = 256 * 1024
"""Bytes asked of the transport per receive: big enough to take a whole burst at once."""


class SecureStream(trio.abc.Stream):
    """Encrypted records over ``transport``, produced by a :class:`~monte_trio.Handshake`.

    Attributes:
        transport: the underlying stream (usually a :class:`trio.SocketStream`).
        facts: what the handshake agreed (profile, side, peer key, limits): the one
            place a :class:`~monte_trio.Connection` builds its session from.
    """

    def __init__(
        self,
        transport: trio.abc.Stream,
        sealer: RecordSealer,
        opener: RecordOpener,
        *,
        facts: SessionFacts,
        initial_records: list[bytes] | None = None,
    ) -> None:
        self.transport = transport
        self.facts = facts
        self._sealer = sealer
        self._opener = opener
        self._pending_records: list[bytes] = list(initial_records or ())
        # A record-safe transport's partial send, and what a cancelled send left unsent.
        self._send_some = (
            transport.socket.send if isinstance(transport, trio.SocketStream) else None
        )
        self._unsent = b""
        self._plain = bytearray()
        self._eof = False
        self._closed = False
        self._send_conflict = ConflictDetector("another task is already sending on this stream")
        self._receive_conflict = ConflictDetector(
            "another task is already receiving on this stream"
        )

    @property
    def max_plaintext(self) -> int:
        """The largest plaintext one record can carry towards the peer."""
        return self._sealer.max_plaintext

    @property
    def record_safe(self) -> bool:
        """Whether a cancelled :meth:`send_records` keeps its unsent bytes for the next one
        (the transport is a :class:`trio.SocketStream`), so no record is ever cut."""
        return self._send_some is not None

    @property
    def has_unsent(self) -> bool:
        """Whether a cancelled send left bytes that the next send will write first."""
        return bool(self._unsent)

    # -- record API (used by Connection) ---------------------------------------------------

    async def send_records(self, plaintexts: list[bytes | None]) -> None:
        """Seal ``plaintexts`` (skipping ``None``) and write them in one go.

        On a :attr:`record_safe` stream, bytes left unsent by an earlier cancelled call
        go first, and if this call is cancelled part-way its own unsent bytes are kept
        in turn (the records are sealed either way). An empty list just flushes them.
        """
        with self._send_conflict:
            if self._closed:
                raise trio.ClosedResourceError("the stream was closed")
            data = self._sealer.seal_many(plaintexts)
            if self._send_some is None:
                await self.transport.send_all(data)
                return
            if self._unsent:
                data, self._unsent = self._unsent + data, b""
            if not data:
                await trio.lowlevel.checkpoint()
                return
            await self._send_keeping_tail(data, self._send_some)

    async def _send_keeping_tail(
        self, data: bytes, send_some: Callable[[memoryview], Awaitable[int]]
    ) -> None:
        # trio's socket send is cancelled only before it has sent anything, so ``sent``
        # is exact when Cancelled arrives.
        sent = 0
        try:
            with memoryview(data) as view:
                while sent < len(data):
                    with view[sent:] as rest:
                        sent += await send_some(rest)
        except trio.Cancelled:
            self._unsent = data[sent:]
            raise
        except OSError as exc:
            if self._closed or exc.errno == errno.EBADF:
                raise trio.ClosedResourceError("the stream was closed") from None
            raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc

    async def receive_records(self) -> list[bytes]:
        """Return the plaintexts of the next records; an empty list means end of stream."""
        with self._receive_conflict:
            if self._closed:
                raise trio.ClosedResourceError("the stream was closed")
            if self._pending_records:
                records, self._pending_records = self._pending_records, []
                await trio.lowlevel.checkpoint()
                return records
            while not self._eof:
                data = await self.transport.receive_some(RECEIVE_SIZE)
                if not data:
                    self._eof = True
                records = self._opener.receive_data(data)
                if records:
                    return records
            return []

    # -- trio.abc.Stream -------------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` as one or more records (part of the byte-stream interface)."""
        size = self._sealer.max_plaintext
        view = memoryview(data)
        chunks: list[bytes | None] = [bytes(view[i : i + size]) for i in range(0, len(view), size)]
        if not chunks:
            with self._send_conflict:
                if self._closed:
                    raise trio.ClosedResourceError("the stream was closed")
                await trio.lowlevel.checkpoint()
            return
        await self.send_records(chunks)

    async def wait_send_all_might_not_block(self) -> None:
        with self._send_conflict:
            if self._closed:
                raise trio.ClosedResourceError("the stream was closed")
            await self.transport.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Return decrypted bytes: at least one, or ``b""`` at the end of the stream."""
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)  # TypeError for 1.5, as trio's streams
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
        if not self._plain:
            while True:
                records = await self.receive_records()
                if not records:
                    return b""
                self._plain = bytearray().join(records)
                if self._plain:
                    break
        else:
            with self._receive_conflict:
                if self._closed:
                    raise trio.ClosedResourceError("the stream was closed")
                await trio.lowlevel.checkpoint()
        if max_bytes is None or max_bytes >= len(self._plain):
            chunk = bytes(self._plain)
            self._plain = bytearray()
        else:
            chunk = bytes(self._plain[:max_bytes])
            del self._plain[:max_bytes]
        return chunk

    async def aclose(self) -> None:
        """Close the transport. Idempotent."""
        self._closed = True
        await self.transport.aclose()
