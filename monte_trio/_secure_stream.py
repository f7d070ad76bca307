"""A :class:`trio.abc.Stream` of encrypted records over any trio Stream.

:class:`SecureStream` is what a handshake yields. It is a byte stream (``send_all`` splits
data into records, ``receive_some`` returns decrypted bytes) that passes
:func:`trio.testing.check_two_way_stream`, like :class:`trio.SSLStream`. A
:class:`~monte_trio.Connection` uses its record API instead: :meth:`SecureStream.send_records`
seals a whole batch of plaintexts into one ``send_all``, and
:meth:`SecureStream.receive_records` returns every record completed by one receive.

Like :class:`trio.SSLStream`, a secure stream is in one of three states, checked in one
place at the start of every operation:

* **open**: everything works;
* **broken**: an operation failed in a way that leaves the stream unusable: the
  transport failed (raised as :class:`trio.BrokenResourceError`), or a record failed
  authentication or framing (that first failure raises
  :class:`~monte_trio.RemoteProtocolError`, or its subclass
  :class:`~monte_trio.DecryptionError`). Every later operation but :meth:`~SecureStream.aclose`
  raises :class:`trio.BrokenResourceError`;
* **closed**: after :meth:`~SecureStream.aclose` (which always ends here, even if closing
  the transport fails or is cancelled), every operation raises
  :class:`trio.ClosedResourceError`.

Over a :class:`trio.SocketStream`, :meth:`SecureStream.send_records` is *record-safe*:
it writes through the socket's ``send``, which either sends some bytes or is cancelled
having sent none, so it always knows how much went out. If it is cancelled part-way, the
unsent tail is kept and written first by the next send, and the peer never sees a record
cut in half. Over other transports a cancelled send leaves the stream in an unknown state,
as trio's contract allows; :attr:`SecureStream.record_safe` tells which.
"""

from __future__ import annotations

import enum
import errno
import operator
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, NoReturn

import trio

from ._exceptions import RemoteProtocolError
from ._proto._records import RecordOpener, RecordSealer
from ._util import ConflictDetector

if TYPE_CHECKING:
    from ._handshake import SessionFacts

__all__ = ["SecureStream"]

RECEIVE_SIZE = 256 * 1024
"""Bytes asked of the transport per receive: big enough to take a whole burst at once."""

_TRANSPORT_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
"""What a failing transport raises (ClosedResourceError: closed under us, not by aclose)."""


class _State(enum.Enum):
    OK = "open"
    BROKEN = "broken"
    CLOSED = "closed"


class SecureStream(trio.abc.Stream):
    """Encrypted records over ``transport``, produced by a :class:`~monte_trio.Handshake`.

    Get one from a handshake, over any connected :class:`trio.abc.Stream`, as one wraps a
    stream in a :class:`trio.SSLStream`::

        secure = await monte_trio.NativeHandshake(identity, trust=trust).handshake(
            stream, initiator=True
        )

    Its constructor is private: it takes the handshake's record keys.

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
        self._state = _State.OK
        self._broken_by = ""
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

    # -- the state: checked here, changed by _broken and aclose ----------------------------

    def _check_state(self) -> None:
        """Raise unless the stream is open: the one check every operation starts with."""
        if self._state is _State.OK:
            return
        if self._state is _State.CLOSED:
            raise trio.ClosedResourceError("this secure stream was closed")
        raise trio.BrokenResourceError(
            f"this secure stream is broken ({self._broken_by}); close it and open a new one"
        )

    def _broken(self, exc: BaseException) -> NoReturn:
        """A transport failure: raise it as trio.BrokenResourceError, broken for good (or
        as trio.ClosedResourceError if aclose closed the transport under this call)."""
        if self._state is _State.CLOSED:
            raise trio.ClosedResourceError("this secure stream was closed") from None
        self._state = _State.BROKEN
        self._broken_by = f"the transport failed: {exc}"
        if isinstance(exc, trio.BrokenResourceError):
            raise exc
        raise trio.BrokenResourceError(f"the transport failed: {exc}") from exc

    # -- record API (used by Connection) ---------------------------------------------------

    async def send_records(self, plaintexts: list[bytes | None]) -> None:
        """Seal ``plaintexts`` (skipping ``None``) and write them in one go.

        On a :attr:`record_safe` stream, bytes left unsent by an earlier cancelled call
        go first, and if this call is cancelled part-way its own unsent bytes are kept
        in turn (the records are sealed either way). An empty list just flushes them.

        Raises:
            trio.BrokenResourceError: the transport failed (now or before).
            trio.ClosedResourceError: the stream was closed.
            trio.BusyResourceError: another task is sending.
        """
        with self._send_conflict:
            self._check_state()
            data = self._sealer.seal_many(plaintexts)
            if self._send_some is None:
                try:
                    await self.transport.send_all(data)
                except _TRANSPORT_ERRORS as exc:
                    self._broken(exc)
                return
            if self._unsent:
                data, self._unsent = self._unsent + data, b""
            if not data:
                await trio.lowlevel.checkpoint()
                return
            await self._send_keeping_tail(data, self._send_some)

    async def _send_keeping_tail(
        self, data: bytes, send_some: Callable[[bytes | memoryview], Awaitable[int]]
    ) -> None:
        # trio's socket send is cancelled only before it has sent anything, so ``sent``
        # is exact when Cancelled arrives.
        sent = 0
        try:
            sent = await send_some(data)  # usually all of it: no view needed
            if sent < len(data):
                with memoryview(data) as view:
                    while sent < len(data):
                        with view[sent:] as rest:
                            sent += await send_some(rest)
        except trio.Cancelled:
            self._unsent = data[sent:]
            raise
        except _TRANSPORT_ERRORS as exc:
            if isinstance(exc, OSError) and exc.errno == errno.EBADF:
                exc = trio.ClosedResourceError("the socket was closed")
            self._broken(exc)

    async def receive_records(self) -> list[bytes]:
        """Return the plaintexts of the next records; an empty list means end of stream.

        Raises:
            RemoteProtocolError: a record failed framing (or, as its subclass
                :class:`~monte_trio.DecryptionError`, authentication); the stream is
                broken from then on.
            trio.BrokenResourceError: the transport failed (now or before), or an earlier
                record was invalid.
            trio.ClosedResourceError: the stream was closed.
            trio.BusyResourceError: another task is receiving.
        """
        with self._receive_conflict:
            self._check_state()
            if self._pending_records:
                records, self._pending_records = self._pending_records, []
                await trio.lowlevel.checkpoint()
                return records
            while not self._eof:
                try:
                    data = await self.transport.receive_some(RECEIVE_SIZE)
                except _TRANSPORT_ERRORS as exc:
                    self._broken(exc)
                if not data:
                    self._eof = True
                try:
                    records = self._opener.receive_data(data)
                except RemoteProtocolError as exc:
                    self._state = _State.BROKEN
                    self._broken_by = f"an invalid record was received: {exc}"
                    raise
                if records:
                    return records
            await trio.lowlevel.checkpoint()
            return []

    # -- trio.abc.Stream -------------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` as one or more records (part of the byte-stream interface)."""
        size = self._sealer.max_plaintext
        view = memoryview(data)
        chunks: list[bytes | None] = [bytes(view[i : i + size]) for i in range(0, len(view), size)]
        await self.send_records(chunks)

    async def wait_send_all_might_not_block(self) -> None:
        with self._send_conflict:
            self._check_state()
            try:
                await self.transport.wait_send_all_might_not_block()
            except _TRANSPORT_ERRORS as exc:
                self._broken(exc)

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
                self._check_state()
                await trio.lowlevel.checkpoint()
        if max_bytes is None or max_bytes >= len(self._plain):
            chunk = bytes(self._plain)
            self._plain = bytearray()
        else:
            chunk = bytes(self._plain[:max_bytes])
            del self._plain[:max_bytes]
        return chunk

    async def aclose(self) -> None:
        """Close the transport; the stream is closed when this returns or raises.

        Idempotent: closing a closed stream only checkpoints. Closing a broken stream
        closes its transport too.
        """
        if self._state is _State.CLOSED:
            await trio.lowlevel.checkpoint()
            return
        self._state = _State.CLOSED
        self._plain = bytearray()
        self._pending_records = []
        self._unsent = b""
        await self.transport.aclose()
