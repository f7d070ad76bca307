"""The public API: exactly these names, each presented under its public module.

Adding or removing a public name is a decision: this test makes it a visible one (as trio's
``test_exports.py`` does). Everything else lives in private ``_x`` modules.
"""

from __future__ import annotations

import types

import pytest

import monte_trio
import monte_trio.testing

PUBLIC = {
    monte_trio: {
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
    },
    monte_trio.testing: {
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
    },
}


@pytest.mark.parametrize("module", list(PUBLIC), ids=lambda m: m.__name__)
def test_public_names_are_exactly_these(module: types.ModuleType) -> None:
    assert set(module.__all__) == PUBLIC[module]
    assert len(module.__all__) == len(set(module.__all__)), "a name is listed twice"
    public = {name for name in vars(module) if not name.startswith("_")}
    # Submodules (monte_trio.testing) are reachable as attributes, and are not in __all__.
    public -= {name for name, value in vars(module).items() if isinstance(value, types.ModuleType)}
    public.discard("annotations")  # from __future__ import annotations
    assert public == PUBLIC[module], "public attributes other than __all__"


@pytest.mark.parametrize("module", list(PUBLIC), ids=lambda m: m.__name__)
def test_classes_and_functions_say_their_public_module(module: types.ModuleType) -> None:
    # Tracebacks, reprs and the docs name monte_trio.X, never the private module it is
    # defined in.
    for name in module.__all__:
        value = getattr(module, name)
        if isinstance(value, types.GenericAlias):
            continue  # a type alias (Handler, AsyncHandler): Python 3.10 calls it a type
        if isinstance(value, type | types.FunctionType):
            assert value.__module__ == module.__name__, name


def test_help_points_to_the_documentation() -> None:
    assert monte_trio.__doc__ is not None
    assert "docs/" in monte_trio.__doc__
    assert monte_trio.__version__
