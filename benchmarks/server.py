"""``python -m benchmarks.server --peer NAME --port 0``: one peer's benchmark server.

Prints ``READY <port>`` once listening, serves until stdin closes or SIGTERM, then prints
``FINAL <json>`` (CPU seconds, peak RSS, messages counted). While running it answers control
requests (``benchmarks.common.CTL_*``) with the same figures.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import peers
from .common import PeerOptions, ServerState, raise_nofile_limit, watch_stdin_then_terminate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.server")
    ap.add_argument("--peer", required=True, choices=peers.known())
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--host", default="127.0.0.1", choices=["127.0.0.1", "::1"])
    ap.add_argument("--tls-dir", default=None, help="directory with cert.pem/key.pem")
    ap.add_argument("--big", action="store_true", help="configure for 1 MiB messages")
    ap.add_argument("--methods", default="", help="serve methods with this codec")
    ap.add_argument("--streams", action="store_true", help="also echo byte streams")
    args = ap.parse_args(argv)

    reason = peers.unavailable_reason(args.peer)
    if reason:
        print(f"UNAVAILABLE {reason}", flush=True)
        return 3
    nofile = raise_nofile_limit()
    peer = peers.load(args.peer)
    state = ServerState()
    opts = PeerOptions(
        host=args.host,
        tls_dir=args.tls_dir,
        big=args.big,
        methods=args.methods,
        streams=args.streams,
    )

    def ready(port: int) -> None:
        print(f"READY {port}", flush=True)
        # Only now: the peer's SIGTERM handling is installed before it calls ready().
        watch_stdin_then_terminate()

    peer.run_server(args.peer, args.port, opts, state, ready)
    final = state.stats()
    final["nofile_limit"] = nofile
    print("FINAL " + json.dumps(final), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
