"""Peer "zmq": pyzmq DEALER (client, zmq.asyncio) / ROUTER (server) with CURVE encryption.

Messages are two frames: u32 big-endian seq (0 = one-way) and the body; a reply carries its
request's seq. The server is a plain blocking pyzmq loop (the fastest way to drive a ROUTER
from Python; it needs no event loop), the client uses zmq.asyncio so 64 callers can share it.

Semantics: zmq has no "written to the socket" notion: a send returns once the message is
queued for zmq's I/O thread. So Send runs like SendNoWait (it awaits only when the high-water
mark is reached); the table says so. "up to 4 connections" = up to 4 DEALER sockets.
"""

from __future__ import annotations

import asyncio
import signal
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from ..common import BenchClient, OpenClient, PeerOptions, ServerState
from ._asyncio_support import WouldBlock

FRAMEWORK = "asyncio"
_QUEUED = "returns once queued in zmq (zmq has no written-to-socket point): SendNoWait semantics"
NOTES: dict[str, dict[str, str]] = {
    "zmq": {"Send": _QUEUED, "ParallelSend": _QUEUED},
}
SEQ = struct.Struct(">I")
ONEWAY = SEQ.pack(0)
HWM = 10_000
# The server's key pair is fixed for the run (derived by both sides from this seed would need
# libsodium; instead the server prints nothing extra and the client gets it via --tls-dir).
_KEYFILE = "zmq_server.key"


def unavailable_reason(name: str) -> str | None:
    try:
        import zmq
    except ImportError as exc:
        return f"pyzmq is not installed ({exc}); pip install pyzmq"
    if not zmq.has("curve"):
        return "this libzmq has no CURVE support"
    return None


def _server_keys(opts: PeerOptions) -> tuple[bytes, bytes]:
    """The server's CURVE key pair, stored next to the TLS material of the run."""
    import os

    import zmq

    from ..common import tls_files

    directory = tls_files(opts.tls_dir).cert.parent
    path = directory / _KEYFILE
    if not path.exists():
        public, secret = zmq.curve_keypair()
        tmp = directory / (_KEYFILE + f".{os.getpid()}")
        tmp.write_bytes(public + b"\n" + secret + b"\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    public, secret = path.read_bytes().split()[:2]
    return public, secret


def run_server(
    name: str, port: int, opts: PeerOptions, state: ServerState, ready: Callable[[int], None]
) -> None:
    import zmq

    public, secret = _server_keys(opts)
    stop = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    ctx = zmq.Context()
    ctx.MAX_SOCKETS = 32_768
    sock = ctx.socket(zmq.ROUTER)
    try:
        sock.curve_server = True
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # block instead of silently dropping
        sock.setsockopt(zmq.SNDHWM, HWM)
        sock.setsockopt(zmq.RCVHWM, HWM)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(f"tcp://{opts.host}:{port}")
        endpoint = str(sock.getsockopt_string(zmq.LAST_ENDPOINT))
        ready(int(endpoint.rsplit(":", 1)[1]))
        recv = sock.recv_multipart
        send = sock.send_multipart
        noblock = zmq.NOBLOCK
        again = zmq.Again
        for _ in range(10**12):
            if stop:
                break
            if not sock.poll(100):
                continue
            for _ in range(4096):  # drain what is there, then poll again
                try:
                    frames = recv(noblock)
                except again:
                    break
                if len(frames) != 3:
                    continue
                ident, seq, body = frames
                if seq == ONEWAY:
                    state.count += 1
                else:
                    try:
                        send([ident, seq, state.reply(body)])
                    except zmq.ZMQError:  # that client has gone away
                        pass
    finally:
        sock.close(0)
        ctx.term()


class ZmqClient:
    def __init__(self, ctx: Any, endpoint: str, keys: tuple[bytes, bytes], max_conns: int):
        import zmq
        import zmq.asyncio

        self._zmq = zmq
        self._ctx = ctx
        self._endpoint = endpoint
        self._server_public = keys[0]
        self._max = max_conns
        self._socks: list[Any] = []
        self._readers: list[asyncio.Task[None]] = []
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._seq = 1
        self._next = 0
        self._error: BaseException | None = None

    def _sock(self) -> Any:
        """Round-robin over the sockets, opening a new one while under max_conns."""
        zmq = self._zmq
        if len(self._socks) < self._max:
            s = self._ctx.socket(zmq.DEALER)
            public, secret = zmq.curve_keypair()
            s.curve_serverkey = self._server_public
            s.curve_publickey = public
            s.curve_secretkey = secret
            s.setsockopt(zmq.SNDHWM, HWM)
            s.setsockopt(zmq.RCVHWM, HWM)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(self._endpoint)
            self._socks.append(s)
            self._readers.append(asyncio.ensure_future(self._reader(s)))
            return s
        i = self._next
        self._next = (i + 1) % len(self._socks)
        return self._socks[i]

    async def _reader(self, sock: Any) -> None:
        pending = self._pending
        try:
            while True:
                frames = await sock.recv_multipart()
                if len(frames) != 2:
                    continue
                fut = pending.pop(SEQ.unpack(frames[0])[0], None)
                if fut is None:
                    raise RuntimeError("reply for an unknown seq")
                if not fut.done():
                    fut.set_result(frames[1])
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._error = exc
            for f in pending.values():
                if not f.done():
                    f.set_exception(exc)
            pending.clear()
            raise

    async def request(self, body: bytes) -> bytes:
        if self._error is not None:
            raise RuntimeError("connection failed") from self._error
        seq = self._seq
        self._seq = (seq + 2) & 0xFFFFFFFF or 1
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[seq] = fut
        try:
            await self._sock().send_multipart([SEQ.pack(seq), body])
            return await fut
        finally:
            self._pending.pop(seq, None)

    async def send(self, body: bytes) -> None:
        await self._sock().send_multipart([ONEWAY, body])

    def send_nowait(self, body: bytes) -> None:
        f = self._sock().send_multipart([ONEWAY, body], flags=self._zmq.NOBLOCK)
        if f.done():
            exc = f.exception()
            if exc is None:
                return
            if isinstance(exc, self._zmq.Again):
                raise WouldBlock
            raise exc
        # queued behind an awaiting send: withdraw it and let the caller await ``send``
        f.cancel()
        raise WouldBlock

    async def close(self) -> None:
        for t in self._readers:
            t.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        for s in self._socks:
            s.close(0)


def client_opener(name: str) -> OpenClient:
    import zmq
    import zmq.asyncio

    ctx_holder: list[Any] = []

    def context() -> Any:
        if not ctx_holder:
            ctx = zmq.asyncio.Context()
            ctx.MAX_SOCKETS = 32_768  # idle-connection workload: thousands of sockets
            ctx_holder.append(ctx)
        return ctx_holder[0]

    @asynccontextmanager
    async def open_client(
        port: int, opts: PeerOptions, max_conns: int
    ) -> AsyncIterator[BenchClient]:
        keys = _server_keys(opts)
        host = opts.host if ":" not in opts.host else f"[{opts.host}]"
        client = ZmqClient(context(), f"tcp://{host}:{port}", keys, max_conns)
        try:
            yield client
        finally:
            await client.close()

    return open_client
