"""Benchmark suite for monte_trio.

Runs monte's six benchmarks (Send, SendNoWait, Request, ParallelSend, ParallelSendNoWait,
ParallelRequest; 1400-byte random payloads) plus 1 MiB requests, new connections per second
and memory per idle connection, byte streams (one stream echoing, many short streams, small
requests beside a bulk stream) and 1 KiB messages streamed over one call, with client and
server in separate processes on loopback, against monte_trio and the alternatives a user
would pick. Entry point: ``python -m benchmarks`` (see ``python -m benchmarks --help``).
"""

from __future__ import annotations

PAYLOAD_SIZE = 1400
BIG_SIZE = 1 << 20
PARALLEL_CALLERS = 64
MAX_CONNS = 4

MAIN_WORKLOADS = (
    "Send",
    "SendNoWait",
    "Request",
    "ParallelSend",
    "ParallelSendNoWait",
    "ParallelRequest",
)
EXTRA_WORKLOADS = ("Request1MiB", "Connect", "IdleConns")
METHOD_WORKLOADS = {"ParallelMethod": "json", "ParallelMethodStruct": "msgpack"}
"""Method calls (monte_trio's Router) as ParallelRequest runs them, and their codec; only
the peers that serve methods run them (see ``peers.supports``)."""
STREAM_WORKLOADS = ("StreamEcho", "ShortStreams", "LatencyUnderBulk", "ServerStreaming")
"""Byte streams (``benchmarks.streams``) and a server-streaming call
(``benchmarks.workloads.run_server_streaming``): only the peers whose module lists a
workload in ``STREAM_PEERS`` run it (see ``peers.supports``)."""
ALL_WORKLOADS = MAIN_WORKLOADS + tuple(METHOD_WORKLOADS) + EXTRA_WORKLOADS + STREAM_WORKLOADS

STREAM_SIZE = 256 << 20
"""StreamEcho: bytes sent over the stream (and echoed back), unless ``--stream-size``."""
BULK_SIZE = 1 << 30
"""LatencyUnderBulk: bytes of the bulk stream (each way), unless ``--bulk-size``."""
SHORT_STREAM_SIZE = 1024
"""ShortStreams: bytes each short stream sends (and gets back)."""
SHORT_STREAM_CALLERS = 1000
"""ShortStreams: concurrent tasks, each opening one stream after another."""
SMALL_REQUEST_SIZE = 64
"""LatencyUnderBulk: bytes of each small request (echoed)."""
STREAMED_MESSAGE_SIZE = 1024
"""ServerStreaming: bytes of each message the server streams."""

ALL_PEERS = ("monte-native", "monte-v1", "trio-plain", "trio-ssl", "grpc", "zmq")
BASELINE_PEER = "monte-native"
