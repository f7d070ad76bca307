"""Benchmark suite for monte_trio.

Runs monte's six benchmarks (Send, SendNoWait, Request, ParallelSend, ParallelSendNoWait,
ParallelRequest; 1400-byte random payloads) plus 1 MiB requests, new connections per second
and memory per idle connection, with client and server in separate processes on loopback,
against monte_trio and the alternatives a user would pick. Entry point: ``python -m
benchmarks`` (see ``python -m benchmarks --help``).
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
ALL_WORKLOADS = MAIN_WORKLOADS + tuple(METHOD_WORKLOADS) + EXTRA_WORKLOADS

ALL_PEERS = ("monte-native", "monte-v1", "trio-plain", "trio-ssl", "grpc", "zmq")
BASELINE_PEER = "monte-native"
