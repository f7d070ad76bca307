"""Peers "grpc" (TLS) and "grpc-insecure": grpcio's grpc.aio with raw-bytes generic handlers.

Mapping of monte's workloads (no protoc: request/response (de)serializers are None, so the
handlers see and return ``bytes``):
- Request / ParallelRequest: unary-unary call ``/bench.Bench/Req`` (empty reply).
- Send / ParallelSend: client streaming ``/bench.Bench/Stream``; one stream per calling task,
  ``await call.write(body)`` returns once grpc core has accepted the message for sending.
- SendNoWait / ParallelSendNoWait: grpc.aio has no non-waiting write, so these run exactly
  like Send (marked in the table).
- ServerStreaming: unary-stream call ``/bench.Bench/Download``; the handler is an async
  generator yielding the messages, the client iterates the call (``async for``).
- "up to 4 connections": up to 4 channels (local subchannel pools, so one TCP connection
  each), chosen round-robin per call / per stream.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from .. import STREAMED_MESSAGE_SIZE
from ..common import (
    STREAMED_DISTINCT,
    BenchClient,
    OpenClient,
    PeerOptions,
    ServerState,
    parse_streaming_request,
    streamed_payloads,
    tls_files,
)
from ._asyncio_support import WouldBlock, wait_for_sigterm

FRAMEWORK = "asyncio"
_NOWAIT = "= Send: grpc.aio has no non-waiting write"
_ONEWAY = "client streaming; write() returns when grpc core took the message"
NOTES: dict[str, dict[str, str]] = {
    name: {
        "Send": _ONEWAY,
        "ParallelSend": _ONEWAY + "; one stream per caller",
        "SendNoWait": _NOWAIT,
        "ParallelSendNoWait": _NOWAIT,
        "Request": "unary call",
        "ParallelRequest": "unary calls",
        "ServerStreaming": "unary-stream call; the handler is an async generator",
    }
    for name in ("grpc", "grpc-insecure")
}
STREAM_PEERS = dict.fromkeys(("grpc", "grpc-insecure"), ("ServerStreaming",))
"""The stream workloads each peer runs: server streaming only (no byte streams)."""
_SERVICE = "bench.Bench"
_MAX_MSG = 4 << 20
_OPTIONS = [
    ("grpc.max_receive_message_length", _MAX_MSG),
    ("grpc.max_send_message_length", _MAX_MSG),
]


def unavailable_reason(name: str) -> str | None:
    try:
        import grpc
        import grpc.aio  # noqa: F401
    except ImportError as exc:
        return f"grpcio is not installed ({exc}); pip install grpcio"
    return None


def run_server(
    name: str, port: int, opts: PeerOptions, state: ServerState, ready: Callable[[int], None]
) -> None:
    import grpc
    import grpc.aio

    async def req(body: bytes, context: Any) -> bytes:
        return state.reply(body)

    async def stream(requests: AsyncIterator[bytes], context: Any) -> bytes:
        async for _ in requests:
            state.count += 1
        return b""

    async def download(body: bytes, context: Any) -> AsyncIterator[bytes]:
        count, seed = parse_streaming_request(body)
        payloads = streamed_payloads(seed, STREAMED_MESSAGE_SIZE)
        mask = STREAMED_DISTINCT - 1
        for i in range(count):
            yield payloads[i & mask]

    async def main() -> None:
        server = grpc.aio.server(options=[*_OPTIONS, ("grpc.so_reuseport", 0)])
        handler = grpc.method_handlers_generic_handler(
            _SERVICE,
            {
                "Req": grpc.unary_unary_rpc_method_handler(req),
                "Stream": grpc.stream_unary_rpc_method_handler(stream),
                "Download": grpc.unary_stream_rpc_method_handler(download),
            },
        )
        server.add_generic_rpc_handlers((handler,))
        addr = f"{opts.host}:{port}" if ":" not in opts.host else f"[{opts.host}]:{port}"
        if name == "grpc":
            files = tls_files(opts.tls_dir)
            creds = grpc.ssl_server_credentials([(files.key_pem, files.cert_pem)])
            bound = server.add_secure_port(addr, creds)
        else:
            bound = server.add_insecure_port(addr)
        await server.start()
        try:
            stop = asyncio.ensure_future(wait_for_sigterm())
            await asyncio.sleep(0)  # let the signal handlers be installed
            ready(bound)
            await stop
        finally:
            await server.stop(grace=0.5)

    asyncio.run(main())


@functools.lru_cache(maxsize=4)
def _channel_credentials(tls_dir: str | None) -> Any:
    import grpc

    return grpc.ssl_channel_credentials(root_certificates=tls_files(tls_dir).cert_pem)


class GrpcClient:
    def __init__(self, channels: list[Any]) -> None:
        self._channels = channels
        self._unary = [ch.unary_unary(f"/{_SERVICE}/Req") for ch in channels]
        self._stream = [ch.stream_unary(f"/{_SERVICE}/Stream") for ch in channels]
        self.download = channels[0].unary_stream(f"/{_SERVICE}/Download")
        self._next = 0
        self._streams: dict[asyncio.Task[Any] | None, Any] = {}

    async def request(self, body: bytes) -> bytes:
        i = self._next
        self._next = (i + 1) % len(self._unary)
        reply: bytes = await self._unary[i](body)
        return reply

    async def send(self, body: bytes) -> None:
        task = asyncio.current_task()
        call = self._streams.get(task)
        if call is None:
            i = self._next
            self._next = (i + 1) % len(self._stream)
            call = self._streams[task] = self._stream[i]()
        await call.write(body)

    def send_nowait(self, body: bytes) -> None:
        raise WouldBlock  # grpc.aio cannot queue a message without awaiting

    async def close(self) -> None:
        streams, self._streams = self._streams, {}
        for call in streams.values():
            try:
                await call.done_writing()
                await call
            except Exception:
                call.cancel()
        for ch in self._channels:
            await ch.close()


@asynccontextmanager
async def open_download(client: GrpcClient, request: bytes) -> AsyncIterator[Any]:
    """ServerStreaming: a unary-stream call (``async for`` its messages), cancelled on
    the way out if it has not ended."""
    call = client.download(request)
    try:
        yield call
    finally:
        if not call.done():
            call.cancel()


def client_opener(name: str) -> OpenClient:
    @asynccontextmanager
    async def open_client(
        port: int, opts: PeerOptions, max_conns: int
    ) -> AsyncIterator[BenchClient]:
        import grpc
        import grpc.aio

        # a local subchannel pool per channel: each channel gets its own TCP connection
        options = [*_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
        target = f"{opts.host}:{port}" if ":" not in opts.host else f"[{opts.host}]:{port}"
        channels = []
        for _ in range(max_conns):
            if name == "grpc":
                channels.append(
                    grpc.aio.secure_channel(
                        target,
                        _channel_credentials(opts.tls_dir),
                        options=[*options, ("grpc.ssl_target_name_override", "localhost")],
                    )
                )
            else:
                channels.append(grpc.aio.insecure_channel(target, options=options))
        client = GrpcClient(channels)
        try:
            yield client
        finally:
            await client.close()

    return open_client
