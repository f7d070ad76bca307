"""A simulated trio socket over one end of a :class:`FaultyNetwork` connection.

:func:`socket_stream` wraps a :class:`~monte_trio.testing.NetworkStream` as a real
:class:`trio.SocketStream`, so that code which takes a path only for sockets takes it on
the faulty network too: a :class:`~monte_trio.SecureStream` over a socket stream is
*record-safe* (it writes through the socket's ``send``, which sends some bytes or is
cancelled having sent none), and a :class:`~monte_trio.Connection` over such a stream
writes from the calling task when its writer is quiet (a *direct write*).

The socket's ``send`` keeps the contract trio's socket ``send`` has: it sends at least one
byte and returns how many, or it is cancelled before sending anything. Faults surface as
the errors a real socket gives (``ECONNRESET``, ``EPIPE``; ``EBADF`` once closed), which
:class:`trio.SocketStream` turns into :class:`trio.BrokenResourceError` and
:class:`trio.ClosedResourceError`.
"""

from __future__ import annotations

import errno
import socket as _stdlib_socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import trio

from ._stream import NetworkStream

__all__ = ["socket_stream"]

_fake_fds = iter(range(1_000_000, 2**31))


@contextmanager
def _as_socket_errors() -> Iterator[None]:
    try:
        yield
    except trio.ClosedResourceError as exc:
        raise OSError(errno.EBADF, f"Bad file descriptor ({exc})") from exc
    except trio.BrokenResourceError as exc:
        raise OSError(errno.ECONNRESET, f"Connection reset by peer ({exc})") from exc


class NetworkSocket(trio.socket.SocketType):
    """A ``SOCK_STREAM`` trio socket whose bytes travel over a :class:`NetworkStream`.

    Only what :class:`trio.SocketStream` uses is implemented; options are accepted and
    ignored.
    """

    def __init__(self, stream: NetworkStream) -> None:
        super().__init__()
        self._stream = stream
        self._fd = next(_fake_fds)
        self._shut_wr = False

    # -- what trio.SocketStream asks of a socket ---------------------------------------------

    @property
    def family(self) -> _stdlib_socket.AddressFamily:
        return _stdlib_socket.AF_INET

    @property
    def type(self) -> _stdlib_socket.SocketKind:
        return _stdlib_socket.SOCK_STREAM

    @property
    def proto(self) -> int:
        return 0

    @property
    def did_shutdown_SHUT_WR(self) -> bool:
        return self._shut_wr

    def fileno(self) -> int:
        return self._fd

    def setsockopt(self, *args: Any) -> None:
        """Options are accepted and ignored."""

    def getsockname(self) -> tuple[str, int]:
        return (self._stream.local_host, self._stream.link.id)

    def getpeername(self) -> tuple[str, int]:
        return (self._stream.remote_host, self._stream.link.id)

    async def send(self, data: Any, flags: int = 0) -> int:
        """Send some of ``data`` (at least one byte); cancelled, it has sent nothing."""
        if self._fd == -1:
            await trio.lowlevel.checkpoint()
            raise OSError(errno.EBADF, "Bad file descriptor")
        if self._shut_wr:
            await trio.lowlevel.checkpoint()
            raise OSError(errno.EPIPE, "Broken pipe (shut down for writing)")
        with _as_socket_errors():
            return await self._stream.send_some(data)

    async def recv(self, buflen: int, flags: int = 0) -> bytes:
        if self._fd == -1:
            await trio.lowlevel.checkpoint()
            raise OSError(errno.EBADF, "Bad file descriptor")
        with _as_socket_errors():
            return await self._stream.receive_some(buflen)

    async def wait_writable(self) -> None:
        with _as_socket_errors():
            await self._stream.wait_send_all_might_not_block()

    def shutdown(self, flag: int) -> None:
        if flag in (_stdlib_socket.SHUT_WR, _stdlib_socket.SHUT_RDWR) and not self._shut_wr:
            self._shut_wr = True
            self._stream._send_eof_now()

    def close(self) -> None:
        self._fd = -1
        self._stream._close_now()

    def is_readable(self) -> bool:
        return False


def socket_stream(stream: NetworkStream) -> trio.SocketStream:
    """Wrap one end of a :class:`FaultyNetwork` connection as a :class:`trio.SocketStream`.

    The result behaves as a socket stream of a real TCP connection would (errors included)
    and takes every path code keeps for sockets, such as a
    :class:`~monte_trio.SecureStream`'s record-safe sends; the faults of the network
    apply to it as to ``stream``. Use it instead of ``stream`` from then on::

        client = socket_stream(await network.connect("server"))
        server = socket_stream(await listener.accept())
    """
    return trio.SocketStream(NetworkSocket(stream))
