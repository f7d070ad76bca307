"""Tools for testing code that uses monte_trio, without sockets or real time.

* :func:`open_connection_pair` and :func:`secure_stream_pair`: two connected ends over
  memory streams.
* :class:`FaultyNetwork`: a simulated network of named hosts whose links can be delayed,
  dropped, stalled, cut mid-record, corrupted and partitioned, on demand or at random from a
  seed, deterministically under :class:`trio.testing.MockClock`.
"""

from __future__ import annotations

from ._network import ChaosConfig as ChaosConfig
from ._network import FaultEvent as FaultEvent
from ._network import FaultKind as FaultKind
from ._network import FaultyNetwork as FaultyNetwork
from ._network import Link as Link
from ._network import NetworkListener as NetworkListener
from ._network import NetworkStatistics as NetworkStatistics
from ._network import NetworkStream as NetworkStream
from ._pairs import open_connection_pair as open_connection_pair
from ._pairs import secure_stream_pair as secure_stream_pair

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
]
