"""A two-peer chat: each peer listens AND dials the other; lines typed go across.

Run one peer per terminal::

    python examples/chat.py --listen 5001 --peer 127.0.0.1:5002
    python examples/chat.py --listen 5002 --peer 127.0.0.1:5001

Each line typed on stdin reaches the other peer as a one-way message, which prints it as
``<peer>: line`` (``<peer>`` being the address given with ``--peer``; control characters and
terminal escapes in the line are shown escaped). End a peer with EOF (Ctrl-D), or stop it
with Ctrl-C (exit status 130). A peer keeps dialing the other, with backoff, until it is up
(at most ``--connect-timeout`` seconds).

Authenticated chat (native profile): give each peer a key and pin the other's::

    python -m monte_trio keygen alice.key      # prints alice's public key
    python -m monte_trio keygen bob.key        # prints bob's public key
    python examples/chat.py --listen 5001 --peer 127.0.0.1:5002 \\
        --identity alice.key --trust pin:<bob's key>
    python examples/chat.py --listen 5002 --peer 127.0.0.1:5001 \\
        --identity bob.key --trust pin:<alice's key>

Or trust on first use: each peer records the other's key in its FILE the first time and
refuses a different key afterwards (``--trust tofu:alice.known`` and
``--trust tofu:bob.known``). ``--trust any`` accepts any key (encrypted, not authenticated)
and says so; the native profile needs one of the three, as ``monte-trio serve`` does.
``--profile monte-v1`` speaks Go monte's protocol (no authentication at all).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import unicodedata
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

import trio

import monte_trio


def parse_trust(spec: str) -> monte_trio.TrustPolicy:
    """``any``, ``pin:KEY[,KEY...]`` or ``tofu:FILE`` (as ``monte-trio --trust``)."""
    kind, _, arg = spec.partition(":")
    if spec == "any":
        return monte_trio.AcceptAnyKey()
    if kind == "pin" and arg:
        return monte_trio.PinnedKeys(key for key in arg.split(",") if key)
    if kind == "tofu" and arg:
        return monte_trio.KnownKeysFile(arg)
    raise argparse.ArgumentTypeError(f"expected any, pin:KEY[,KEY...] or tofu:FILE: {spec!r}")


def address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


class Options:
    """How this peer secures its connections (the same for listening and dialing)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.monte_v1 = args.profile == "monte-v1"
        self.identity: monte_trio.Identity | None = None
        self.trust: monte_trio.TrustPolicy | None = None
        if self.monte_v1:
            print("chat: warning: monte-v1: peers are not authenticated", file=sys.stderr)
        else:
            self.identity = (
                monte_trio.Identity.load(args.identity)
                if args.identity
                else monte_trio.Identity.generate()
            )
            self.trust = args.trust
            if isinstance(self.trust, monte_trio.AcceptAnyKey):
                print(
                    "chat: warning: --trust any: accepting any peer key (not authenticated)",
                    file=sys.stderr,
                    flush=True,
                )

    def handshake(self) -> monte_trio.Handshake | None:
        # A fresh MonteV1Handshake per use; None means the native profile.
        return monte_trio.MonteV1Handshake() if self.monte_v1 else None


async def dial(
    stack: AsyncExitStack, host: str, port: int, options: Options, patience: float
) -> monte_trio.Client:
    """Dial the peer, retrying with backoff until it is up or ``patience`` seconds pass."""
    delay = 0.05
    deadline = trio.current_time() + patience
    while True:
        try:
            return await stack.enter_async_context(
                monte_trio.open_client(
                    host,
                    port,
                    handshake=options.handshake(),
                    identity=options.identity,
                    trust=options.trust,
                    max_conns=1,
                )
            )
        except monte_trio.ConnectError:  # not up yet (a HandshakeError is not retried)
            if trio.current_time() + delay > deadline:
                raise
        await trio.sleep(delay)
        delay = min(delay * 2, 1.0)


def printable(text: str) -> str:
    """``text`` with control characters escaped, so that a peer cannot drive our terminal."""
    return "".join(
        char.encode("unicode_escape").decode("ascii")
        if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp")
        else char
        for char in text
    )


async def until_ctrl_c(main: Callable[[], Awaitable[int]]) -> int:
    """Run ``main()``; Ctrl-C (SIGINT) cancels it, and the exit status is then 130.

    Trio delivers SIGINT as a KeyboardInterrupt raised wherever the program happens to be
    (inside an ExceptionGroup, if that is in a nursery); receiving the signal turns it into a
    plain cancellation instead.
    """
    interrupted = False
    status = 130
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def on_ctrl_c() -> None:
                nonlocal interrupted
                async for _ in signals:
                    interrupted = True
                    nursery.cancel_scope.cancel()

            nursery.start_soon(on_ctrl_c)
            status = await main()
            nursery.cancel_scope.cancel()
    return 130 if interrupted else status


async def read_lines(stream: trio.abc.ReceiveStream, send: trio.MemorySendChannel[str]) -> None:
    """Split what arrives on ``stream`` into lines; close ``send`` at EOF."""
    async with send:
        pending = b""
        while chunk := await stream.receive_some(4096):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                await send.send(line.decode(errors="replace"))
        if pending:
            await send.send(pending.decode(errors="replace"))


async def converse(host: str, port: int, options: Options, patience: float) -> None:
    """Dial the peer, then send it each line read from stdin until EOF."""
    async with AsyncExitStack() as stack:
        client = await dial(stack, host, port, options, patience)
        print(f"chat: connected to {host}:{port}; type lines, end with EOF", flush=True)
        # Read stdin without blocking the event loop (POSIX only).
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        send, receive = trio.open_memory_channel[str](0)
        async with stdin, trio.open_nursery() as readers:
            readers.start_soon(read_lines, stdin, send)
            async for line in receive:
                try:
                    await client.send(line.encode())
                except monte_trio.MonteError as exc:  # e.g. the peer has left
                    print(f"chat: not delivered: {exc}", file=sys.stderr, flush=True)


async def chat(args: argparse.Namespace, options: Options) -> int:
    peer_host, peer_port = args.peer
    peer_name = f"{peer_host}:{peer_port}"

    async def show(request: monte_trio.Request) -> bytes | None:
        # Called for every message the peer sends us.
        print(f"{peer_name}: {printable(request.body.decode(errors='replace'))}", flush=True)
        return None

    server = monte_trio.Server(
        show, handshake=options.handshake(), identity=options.identity, trust=options.trust
    )
    async with trio.open_nursery() as nursery:
        try:
            await nursery.start(server.serve, args.listen, args.host)
            print(f"chat: listening on {args.host}:{args.listen}", flush=True)
            if options.identity is not None:
                print(f"chat: my public key: {options.identity.public_key}", flush=True)
            await converse(peer_host, peer_port, options, args.connect_timeout)
        except (monte_trio.MonteError, OSError) as exc:  # port taken, peer down or refused
            print(f"chat: error: {printable(str(exc))}", file=sys.stderr, flush=True)
            nursery.cancel_scope.cancel()
            return 1
        # EOF: our connection to the peer is closed; stop serving, gracefully.
        await server.shutdown()
    print("chat: bye", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description="A two-peer monte_trio chat.")
    parser.add_argument("--listen", type=int, required=True, metavar="PORT")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--peer", type=address, required=True, metavar="HOST:PORT", help="the other peer"
    )
    parser.add_argument("--profile", choices=["native", "monte-v1"], default="native")
    parser.add_argument("--identity", metavar="FILE", help="this peer's private key file")
    parser.add_argument(
        "--trust",
        type=parse_trust,
        metavar="SPEC",
        help="which peer keys to accept (native profile: required): pin:KEY[,KEY] (exactly "
        "these), tofu:FILE (trust on first use, recorded in FILE) or any (no authentication)",
    )
    parser.add_argument("--connect-timeout", type=float, default=20.0, metavar="SECONDS")
    args = parser.parse_args()
    if args.profile == "native" and args.trust is None:
        parser.error("the native profile needs --trust pin:KEY[,KEY], tofu:FILE or any")
    try:
        options = Options(args)
        status = trio.run(until_ctrl_c, lambda: chat(args, options))
    except monte_trio.MonteError as exc:  # e.g. an unreadable key file
        print(f"chat: error: {printable(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before until_ctrl_c was listening for it
        status = 130
    if status == 130:
        print("chat: interrupted", file=sys.stderr, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
