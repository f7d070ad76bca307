"""Tools for testing code that uses monte_trio, without sockets or real time.

* :func:`open_connection_pair` and :func:`secure_stream_pair`: two connected ends over
  memory streams.
* :class:`FaultyNetwork`: a simulated network of named hosts whose links can be delayed,
  dropped, stalled, cut mid-record, corrupted and partitioned, on demand or at random from a
  seed, deterministically under :class:`trio.testing.MockClock`.
* :func:`socket_stream`: one end of a :class:`FaultyNetwork` connection as a
  :class:`trio.SocketStream`, so that paths kept for sockets (a secure stream's record-safe
  sends, a connection's direct writes) run on the faulty network too.
"""

from __future__ import annotations

from ._faults import ChaosConfig as ChaosConfig
from ._faults import FaultEvent as FaultEvent
from ._faults import FaultKind as FaultKind
from ._faults import Link as Link
from ._network import FaultyNetwork as FaultyNetwork
from ._network import NetworkStatistics as NetworkStatistics
from ._pairs import open_connection_pair as open_connection_pair
from ._pairs import secure_stream_pair as secure_stream_pair
from ._socket import socket_stream as socket_stream
from ._stream import NetworkListener as NetworkListener
from ._stream import NetworkStream as NetworkStream

__all__ = [
    "ChaosConfig",
    "FaultEvent",
    "FaultKind",
    "FaultyNetwork",
    "Link",
    "NetworkListener",
    "NetworkStatistics",
    "NetworkStream",
    "open_connection_pair",
    "secure_stream_pair",
    "socket_stream",
]


def _fixup_module_metadata() -> None:
    # Tracebacks, reprs and docs say monte_trio.testing.X, whichever private module
    # defines X (as trio does, and as monte_trio/__init__.py does for its own names).
    for name in __all__:
        obj = globals()[name]
        if getattr(obj, "__module__", "").startswith("monte_trio.testing._"):
            obj.__module__ = __name__


_fixup_module_metadata()
del _fixup_module_metadata
