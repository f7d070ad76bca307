"""monte_trio: fast, fully-encrypted, bidirectional RPC over TCP for Trio.

Start with :func:`open_client` (a client and its pool of connections) and :class:`Server`
(or :func:`serve`); handlers receive a :class:`Request`. The documentation, in ``docs/``
of the source distribution (build it with ``nox -s docs``), has a quick start, the API
reference, the command line (``python -m monte_trio --help``), the security model, the
limits and what callers see on each fault (the Reliability page), and the wire
specification.

The public API is re-exported here; everything else is private.
"""

from __future__ import annotations

from ._calls_api import Call as Call
from ._calls_api import CallHandler as CallHandler
from ._calls_api import CallShape as CallShape
from ._calls_api import DownloadCall as DownloadCall
from ._calls_api import IncomingCall as IncomingCall
from ._calls_api import UploadCall as UploadCall
from ._client import Client as Client
from ._client import ClientStatistics as ClientStatistics
from ._client import ConnectionState as ConnectionState
from ._client import open_client as open_client
from ._config import ConnectionConfig as ConnectionConfig
from ._connection import AsyncHandler as AsyncHandler
from ._connection import Connection as Connection
from ._connection import ConnectionStatistics as ConnectionStatistics
from ._connection import Handler as Handler
from ._connection import InlineHandler as InlineHandler
from ._connection import Request as Request
from ._exceptions import CallCancelled as CallCancelled
from ._exceptions import ConnectError as ConnectError
from ._exceptions import ConnectionClosed as ConnectionClosed
from ._exceptions import DecryptionError as DecryptionError
from ._exceptions import HandshakeError as HandshakeError
from ._exceptions import HandshakeTimeout as HandshakeTimeout
from ._exceptions import KeyFileError as KeyFileError
from ._exceptions import LocalProtocolError as LocalProtocolError
from ._exceptions import MonteError as MonteError
from ._exceptions import PeerRejected as PeerRejected
from ._exceptions import ProtocolError as ProtocolError
from ._exceptions import RemoteError as RemoteError
from ._exceptions import RemoteProtocolError as RemoteProtocolError
from ._exceptions import RequestNotProcessed as RequestNotProcessed
from ._exceptions import StreamReset as StreamReset
from ._handlers import inline as inline
from ._handshake import Handshake as Handshake
from ._handshake import MonteV1Handshake as MonteV1Handshake
from ._keys import Identity as Identity
from ._keys import PublicKey as PublicKey
from ._known_keys import KnownKey as KnownKey
from ._known_keys import KnownKeysFile as KnownKeysFile
from ._native_handshake import NativeHandshake as NativeHandshake
from ._secure_stream import SecureStream as SecureStream
from ._server import Server as Server
from ._server import ServerStatistics as ServerStatistics
from ._server import serve as serve
from ._services._caller import call_metadata as call_metadata
from ._services._errors import CodecError as CodecError
from ._services._errors import InvalidArguments as InvalidArguments
from ._services._errors import MethodErrorCode as MethodErrorCode
from ._services._errors import MethodNotFound as MethodNotFound
from ._services._errors import RemoteMethodError as RemoteMethodError
from ._services._errors import remote_error as remote_error
from ._services._retry import retry as retry
from ._services._router import CallInfo as CallInfo
from ._services._router import MethodStatistics as MethodStatistics
from ._services._router import Middleware as Middleware
from ._services._router import Router as Router
from ._services._router import current_call as current_call
from ._services._router import idempotent as idempotent
from ._services._router import oneway as oneway
from ._services._streaming import MethodCall as MethodCall
from ._services._streaming import MethodStream as MethodStream
from ._streams import Stream as Stream
from ._streams import StreamHandler as StreamHandler
from ._trust import AcceptAnyKey as AcceptAnyKey
from ._trust import PinnedKeys as PinnedKeys
from ._trust import TrustPolicy as TrustPolicy
from ._version import __version__ as __version__

__all__ = [
    "AcceptAnyKey",
    "AsyncHandler",
    "Call",
    "CallCancelled",
    "CallHandler",
    "CallInfo",
    "CallShape",
    "Client",
    "ClientStatistics",
    "CodecError",
    "ConnectError",
    "Connection",
    "ConnectionClosed",
    "ConnectionConfig",
    "ConnectionState",
    "ConnectionStatistics",
    "DecryptionError",
    "DownloadCall",
    "Handler",
    "Handshake",
    "HandshakeError",
    "HandshakeTimeout",
    "Identity",
    "IncomingCall",
    "InlineHandler",
    "InvalidArguments",
    "KeyFileError",
    "KnownKey",
    "KnownKeysFile",
    "LocalProtocolError",
    "MethodCall",
    "MethodErrorCode",
    "MethodNotFound",
    "MethodStatistics",
    "MethodStream",
    "Middleware",
    "MonteError",
    "MonteV1Handshake",
    "NativeHandshake",
    "PeerRejected",
    "PinnedKeys",
    "ProtocolError",
    "PublicKey",
    "RemoteError",
    "RemoteMethodError",
    "RemoteProtocolError",
    "Request",
    "RequestNotProcessed",
    "Router",
    "SecureStream",
    "Server",
    "ServerStatistics",
    "Stream",
    "StreamHandler",
    "StreamReset",
    "TrustPolicy",
    "UploadCall",
    "call_metadata",
    "current_call",
    "idempotent",
    "inline",
    "oneway",
    "open_client",
    "remote_error",
    "retry",
    "serve",
]


def _fixup_module_metadata() -> None:
    # Tracebacks and docs say monte_trio.X rather than monte_trio._module.X (as trio does).
    for name in __all__:
        obj = globals()[name]
        if getattr(obj, "__module__", "").startswith("monte_trio._"):
            try:
                obj.__module__ = "monte_trio"
            except (AttributeError, TypeError):  # pragma: no cover - type aliases
                pass


_fixup_module_metadata()
del _fixup_module_metadata
