"""One module per peer; each exposes the same small interface (see ``load``)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from .. import METHOD_WORKLOADS, STREAM_WORKLOADS
from ..common import OpenClient, PeerOptions, ServerState

# peer name -> (module, extra keyword for its functions)
_MODULES = {
    "monte-native": "monte",
    "monte-v1": "monte",
    "trio-plain": "trio_plain",
    "trio-ssl": "trio_ssl",
    "grpc": "grpc_aio",
    "grpc-insecure": "grpc_aio",
    "zmq": "zmq_curve",
}

DESCRIPTIONS = {
    "monte-native": "monte_trio, native profile (Noise XX, AES-256-GCM)",
    "monte-v1": "monte_trio, monte-v1 profile (Go monte's wire format)",
    "trio-plain": "plain trio TCP, same framing, no encryption (the ceiling)",
    "trio-ssl": "trio.SSLStream TLS 1.3, same framing",
    "grpc": "grpcio grpc.aio over TLS, raw-bytes generic handlers",
    "grpc-insecure": "grpcio grpc.aio without TLS (not in the default set)",
    "zmq": "pyzmq DEALER/ROUTER with CURVE",
}


@dataclass(frozen=True)
class Peer:
    name: str
    framework: str  # "trio" or "asyncio"
    run_server: Callable[[str, int, PeerOptions, ServerState, Callable[[int], None]], None]
    open_client: Callable[[str], OpenClient]
    notes: dict[str, str] = field(default_factory=dict)
    open_echo_stream: Any = None
    """The stream workloads' ``open_echo_stream(client, port, opts)`` (see
    ``benchmarks.streams``), for the peers that run them."""
    open_download: Any = None
    """ServerStreaming's ``open_download(client, request)`` (see
    ``benchmarks.workloads.run_server_streaming``), for the peers that run it."""


def known() -> tuple[str, ...]:
    return tuple(_MODULES)


def unavailable_reason(name: str) -> str | None:
    """Why ``name`` cannot run here (missing dependency or API), or None."""
    if name not in _MODULES:
        return f"unknown peer {name!r}"
    try:
        mod = importlib.import_module(f".{_MODULES[name]}", __name__)
    except ImportError as exc:
        return f"cannot import: {exc}"
    reason: str | None = mod.unavailable_reason(name)
    return reason


def supports(name: str, workload: str) -> bool:
    """Whether peer ``name`` runs ``workload``: every peer runs monte's workloads; only
    those whose module lists them in ``METHOD_PEERS`` run the method workloads, and only
    those whose module's ``STREAM_PEERS`` maps them to a workload run that stream
    workload."""
    if workload in METHOD_WORKLOADS:
        mod = importlib.import_module(f".{_MODULES[name]}", __name__)
        return name in getattr(mod, "METHOD_PEERS", ())
    if workload in STREAM_WORKLOADS:
        mod = importlib.import_module(f".{_MODULES[name]}", __name__)
        return workload in getattr(mod, "STREAM_PEERS", {}).get(name, ())
    return True


def load(name: str) -> Peer:
    mod: ModuleType = importlib.import_module(f".{_MODULES[name]}", __name__)
    return Peer(
        name=name,
        framework=mod.FRAMEWORK,
        run_server=mod.run_server,
        open_client=mod.client_opener,
        notes=dict(mod.NOTES.get(name, {})),
        open_echo_stream=getattr(mod, "open_echo_stream", None),
        open_download=getattr(mod, "open_download", None),
    )
