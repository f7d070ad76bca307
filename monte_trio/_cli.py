"""The ``monte-trio`` command line: ``keygen``, ``serve``, ``bench`` and ``demo``.

Every subcommand prepares its options synchronously (reading key, passphrase and PSK files,
parsing trust specifications), so that bad usage is reported by argparse (exit status 2)
before any event loop starts, then runs one :func:`trio.run`.

Exit statuses: 0 success (``serve`` stopped by SIGTERM included); 1 a
:class:`~monte_trio.MonteError` or :class:`OSError` (one line on stderr,
``monte-trio: error: ...``, no traceback) or a failed check; 2 bad usage (a missing
``serve --trust`` included); 130 interrupted (Ctrl-C, or SIGTERM for the commands other than
``serve``).

Text that a peer chose (a remote error's message, a refusal's reason) is printed with its
control characters and terminal escape sequences escaped (``monte_trio._util.printable``).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import shlex
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence

import attrs
import trio

from ._client import Client, open_client
from ._config import ConnectionConfig
from ._connection import Request
from ._exceptions import KeyFileError, MonteError
from ._handshake import Handshake, MonteV1Handshake
from ._keys import Identity, PublicKey, read_secret_file
from ._server import Server
from ._trust import AcceptAnyKey, PinnedKeys, TrustPolicy, parse_trust
from ._util import printable
from ._version import __version__

__all__ = ["main"]

PROG = "monte-trio"
NATIVE = "native"
MONTE_V1 = "monte-v1"
PROFILES = (NATIVE, MONTE_V1)
MODES = ("request", "send", "send-nowait")

# A monte-v1 record holds a 4-byte sequence number, the payload and a 16-byte tag.
_MONTE_V1_OVERHEAD = 4 + 16
_MONTE_V1_DEFAULT_RECORD = 4096
_MAX_BENCH_SIZE = ConnectionConfig().max_message_size  # what the peers accept by default
_PSK_SIZE = 32
_MAX_SAMPLES = 1_000_000
_DEMO_TIME_LIMIT = 5.0


class CommandFailed(Exception):
    """A check made by a subcommand failed (exit status 1)."""


def _say(*parts: object) -> None:
    print(*parts, flush=True)


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)


# Characters a terminal may act on: C0 and C1 controls (ESC starts an escape sequence), DEL,
# format characters (bidirectional overrides, zero-width joiners) and line/paragraph
# separators. Everything else prints as itself.
# -- option parsing --------------------------------------------------------------------------


def _port(text: str) -> int:
    try:
        port = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is out of range (0-65535)")
    return port


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` for integers of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _address(text: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` or ``[V6ADDR]:PORT``."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = _port(port_text)
    if port == 0:
        raise argparse.ArgumentTypeError(f"port 0 cannot be dialed: {text!r}")
    return host, port


def format_address(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _read_secret_file(
    parser: argparse.ArgumentParser, option: str, path: str, *, what: str
) -> bytes:
    """Read a psk or passphrase file (a usage error if it is unreadable or not private)."""
    try:
        return read_secret_file(path, what=what)
    except KeyFileError as exc:
        parser.error(f"{option} {path}: {exc}")


def _read_passphrase(parser: argparse.ArgumentParser, path: str | None) -> bytes | None:
    """The passphrase in ``path`` as bytes (one trailing newline dropped), or ``None``."""
    if path is None:
        return None
    data = _read_secret_file(parser, "--passphrase-file", path, what="passphrase file")
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        parser.error(f"--passphrase-file {path}: the passphrase is empty")
    return data


def _decode_psk(data: bytes) -> bytes | None:
    if len(data) == _PSK_SIZE:
        return data
    text = data.strip()
    if len(text) == 2 * _PSK_SIZE:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    return None


def read_psk(parser: argparse.ArgumentParser, path: str) -> bytes:
    """Read a pre-shared key file: 32 raw bytes, or 64 hexadecimal characters."""
    data = _read_secret_file(parser, "--psk", path, what="psk file")
    psk = _decode_psk(data)
    if psk is None:
        parser.error(
            f"--psk {path}: a pre-shared key file holds exactly {_PSK_SIZE} raw bytes or "
            f"{2 * _PSK_SIZE} hexadecimal characters (optionally followed by a newline); "
            f"this one holds {len(data)} bytes"
        )
    return psk


@attrs.frozen
class Security:
    """The handshake options of ``serve`` and ``bench``, resolved from the command line."""

    profile: str
    handshake: Handshake | None  # None: the native profile, built from the fields below
    identity: Identity | None
    trust: TrustPolicy | None
    psk: bytes | None


_TRUST_CHOICES = (
    "'pin:KEY[,KEY...]' accepts exactly these {who} keys; "
    "'tofu:FILE' trusts on first use: new {who} keys are learned into FILE (a read-only "
    "FILE admits only the keys already in it); "
    "'any' accepts every {who} key: the traffic is encrypted but {who}s are not authenticated"
)


def _add_security_options(parser: argparse.ArgumentParser, *, who: str) -> None:
    parser.add_argument(
        "--profile",
        choices=PROFILES,
        default=NATIVE,
        help="wire profile: native (Noise, authenticated) or monte-v1 (Go monte's protocol, "
        "unauthenticated: for talking to Go monte only)",
    )
    parser.add_argument(
        "--identity",
        metavar="FILE",
        help=f"native: this side's private key file (create one with '{PROG} keygen FILE') "
        "(default: a fresh key for this run)",
    )
    parser.add_argument(
        "--passphrase-file",
        metavar="FILE",
        help="the passphrase of the --identity file, if it is encrypted; FILE must be "
        "readable by its owner only (default: the key is not encrypted)",
    )
    if who == "client":  # serve: no default, the operator must choose
        trust_help = "native, required: which client keys to accept: " + _TRUST_CHOICES.format(
            who=who
        )
    else:
        trust_help = (
            f"native: which {who} keys to accept: "
            + _TRUST_CHOICES.format(who=who)
            + " (default: any, with a warning)"
        )
    parser.add_argument("--trust", metavar="SPEC", help=trust_help)
    parser.add_argument(
        "--psk",
        metavar="FILE",
        help="native: a pre-shared key both sides must hold; FILE holds 32 raw bytes or "
        "64 hexadecimal characters and is readable by its owner only (default: none)",
    )


def _identity_hint(path: str, message: str, passphrase_file: str | None) -> str:
    """The command-line fix for a key file that did not load (``""`` if none applies)."""
    text = message.lower()
    if "chmod" in text:  # the message already says what to run
        return ""
    if not os.path.lexists(path):
        if f"{PROG} keygen" in text:
            return ""
        return f"; create one with `{PROG} keygen {shlex.quote(path)}`"
    if "not encrypted" in text and passphrase_file is not None:
        return "; drop --passphrase-file"
    if "passphrase" in text or "encrypt" in text or "decrypt" in text:
        if passphrase_file is None:
            return "; pass --passphrase-file FILE (a file holding the passphrase, mode 0600)"
        return f"; check the passphrase in --passphrase-file {passphrase_file}"
    if f"{PROG} keygen" not in text and ("x25519" in text or "pem" in text or "pkcs" in text):
        return f"; is it the right file? `{PROG} keygen FILE` creates a key"
    return ""


def _load_identity(path: str, passphrase: bytes | None, passphrase_file: str | None) -> Identity:
    """:meth:`Identity.load`; its :class:`KeyFileError` names the flag that fixes it."""
    try:
        return Identity.load(path, passphrase=passphrase)
    except KeyFileError as exc:
        hint = _identity_hint(path, str(exc), passphrase_file)
        raise KeyFileError(f"--identity {path}: {exc}{hint}") from exc


def _resolve_security(
    parser: argparse.ArgumentParser, args: argparse.Namespace, *, who: str
) -> Security:
    if args.profile == MONTE_V1:
        given = [
            option
            for option, value in (
                ("--identity", args.identity),
                ("--passphrase-file", args.passphrase_file),
                ("--trust", args.trust),
                ("--psk", args.psk),
            )
            if value is not None
        ]
        if given:
            parser.error(
                f"{', '.join(given)}: only for the native profile; monte-v1 authenticates nobody"
            )
        _warn(
            "profile monte-v1 authenticates nobody and is weakly encrypted; use it only to "
            "talk to Go monte"
        )
        return Security(MONTE_V1, MonteV1Handshake(), None, None, None)
    if args.trust is None and who == "client":
        parser.error(
            "the native profile needs --trust, the policy deciding which clients may "
            "connect: " + _TRUST_CHOICES.format(who=who)
        )
    if args.passphrase_file is not None and args.identity is None:
        parser.error("--passphrase-file needs --identity")
    passphrase = _read_passphrase(parser, args.passphrase_file)
    psk = read_psk(parser, args.psk) if args.psk is not None else None
    if args.trust is None:
        _warn(
            f"no --trust given: accepting any {who} key, so {who}s are not authenticated "
            "(the traffic is still encrypted); pass --trust pin:KEY or --trust tofu:FILE"
        )
        trust: TrustPolicy = AcceptAnyKey()
    else:
        try:
            trust = parse_trust(args.trust)
        except ValueError as exc:
            parser.error(f"--trust: {exc}")
        if isinstance(trust, AcceptAnyKey):
            _warn(
                f"--trust any: accepting any {who} key, so {who}s are not authenticated "
                "(the traffic is still encrypted)"
            )
    identity = (
        _load_identity(args.identity, passphrase, args.passphrase_file)
        if args.identity is not None
        else Identity.generate()
    )
    return Security(NATIVE, None, identity, trust, psk)


# -- keygen ----------------------------------------------------------------------------------


def _keygen(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    passphrase = _read_passphrase(parser, args.passphrase_file)
    if os.path.lexists(args.path) and not args.force:
        raise CommandFailed(f"{args.path} already exists; pass --force to replace it")
    identity = Identity.generate()
    identity.save(args.path, passphrase=passphrase, overwrite=args.force)
    encrypted = "encrypted with the passphrase" if passphrase is not None else "unencrypted"
    _say(f"wrote private key to {args.path} (mode 0600, {encrypted})")
    _say(f"public key: {identity.public_key}")
    return 0


# -- serve -----------------------------------------------------------------------------------


async def echo(request: Request) -> bytes | None:
    """Reply to each request with its body (one-way messages are only counted)."""
    return None if request.oneway else request.body


def _listener_address(listener: trio.SocketListener) -> str:
    name = listener.socket.getsockname()
    return format_address(str(name[0]), int(name[1]))


async def _serve(args: argparse.Namespace, security: Security) -> int:
    config = ConnectionConfig(max_record_size=args.max_record_size)
    server = Server(
        echo,
        handshake=security.handshake,
        identity=security.identity,
        trust=security.trust,
        psk=security.psk,
        config=config,
        max_conns=args.max_conns,
        max_handshakes=args.max_handshakes,
    )
    status = 0
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            try:
                listeners = await nursery.start(server.serve, args.port, args.host)
            except OSError as exc:
                address = format_address(args.host, args.port)
                detail = _describe(exc)
                if address in detail:
                    raise
                raise CommandFailed(f"cannot listen on {address}: {detail}") from exc
            _say(f"listening on {_listener_address(listeners[0])}")
            if security.identity is not None:
                _say(f"public key: {security.identity.public_key}")
            for extra in listeners[1:]:
                _say(f"also listening on {_listener_address(extra)}")
            async for signum in signals:
                _say(f"received {signal.Signals(signum).name}, shutting down gracefully")
                # Ctrl-C: the conventional status of an interrupted command; SIGTERM: the
                # normal way to stop a service, so a success.
                status = 130 if signum == signal.SIGINT else 0
                break

            async def shut_down(stopper: trio.Nursery) -> None:
                await server.shutdown()
                stopper.cancel_scope.cancel()

            async with trio.open_nursery() as stopper:
                stopper.start_soon(shut_down, stopper)
                async for signum in signals:
                    _say(f"received {signal.Signals(signum).name} again, stopping now")
                    nursery.cancel_scope.cancel()
                    stopper.cancel_scope.cancel()
                    break
    stats = server.statistics()
    _say(
        f"server stopped: {stats.connections_accepted} connections, "
        f"{stats.requests_received} requests, {stats.messages_received} one-way messages, "
        f"{stats.handshake_failures} failed handshakes"
    )
    return status


# -- bench -----------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile of a non-empty sorted sequence."""
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f} ms"


async def _bench(args: argparse.Namespace, security: Security, interrupt: trio.CancelScope) -> int:
    host, port = args.address
    n, size, mode = args.n, args.size, args.mode
    max_record: int | None = None
    if security.profile == MONTE_V1 and size + _MONTE_V1_OVERHEAD > _MONTE_V1_DEFAULT_RECORD:
        max_record = size + _MONTE_V1_OVERHEAD  # the server needs --max-record-size too
    config = ConnectionConfig(max_record_size=max_record)
    # Distinct bodies: each starts with its index, so a reply delivered to the wrong caller
    # is caught; the rest is random bytes from a small pool.
    pool = [os.urandom(size) for _ in range(min(n, 64))]

    def body_of(i: int) -> bytes:
        base = pool[i % len(pool)]
        return i.to_bytes(8, "big") + base[8:] if size >= 8 else base

    # Keep at most _MAX_SAMPLES latencies (every stride-th message), whatever n is.
    stride = max(1, math.ceil(n / _MAX_SAMPLES))
    latencies = [0.0] * math.ceil(n / stride)
    next_index = 0
    fallbacks = 0

    async def request_worker(client: Client) -> None:
        nonlocal next_index
        while next_index < n:
            i = next_index
            next_index += 1
            body = body_of(i)
            start = time.perf_counter()
            reply = await client.request(body)
            if i % stride == 0:
                latencies[i // stride] = time.perf_counter() - start
            if reply != body:
                raise CommandFailed(
                    f"the reply to message {i} differs from what was sent "
                    f"({len(reply)} bytes back for {len(body)} sent)"
                )

    async def send_worker(client: Client) -> None:
        nonlocal next_index
        while next_index < n:
            i = next_index
            next_index += 1
            body = body_of(i)
            start = time.perf_counter()
            await client.send(body)
            if i % stride == 0:
                latencies[i // stride] = time.perf_counter() - start

    async def send_nowait_worker(client: Client) -> None:
        nonlocal next_index, fallbacks
        while next_index < n:
            i = next_index
            next_index += 1
            body = body_of(i)
            start = time.perf_counter()
            try:
                client.send_nowait(body)
            except trio.WouldBlock:
                fallbacks += 1
                await client.send(body)
            if i % stride == 0:
                latencies[i // stride] = time.perf_counter() - start
            if i % 64 == 63:
                await trio.lowlevel.checkpoint()  # let the writer run and honour cancellation

    worker = {"request": request_worker, "send": send_worker, "send-nowait": send_nowait_worker}[
        mode
    ]
    if max_record is not None:
        _say(
            f"note: monte-v1 messages of {size} bytes need records of {max_record} bytes; "
            f"the server must accept them (serve --max-record-size {max_record})"
        )
    _say(
        f"bench {mode}: {n} messages of {size} bytes to {format_address(host, port)}, "
        f"profile {security.profile}, {args.concurrency} tasks, up to {args.conns} connections"
    )
    async with open_client(
        host,
        port,
        handshake=security.handshake,
        identity=security.identity,
        trust=security.trust,
        psk=security.psk,
        handler=echo,
        config=config,
        max_conns=args.conns,
    ) as client:
        # Interrupted, the work stops here and the client still closes gracefully.
        with interrupt:
            start = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for _ in range(args.concurrency):
                    nursery.start_soon(worker, client)
            if mode != "request":
                # One request per connection: its reply comes after every message sent
                # before it on that connection has been read by the server.
                connections = client.connections
                if not connections:
                    raise CommandFailed("no connection left open to check delivery")
                for conn in connections:
                    probe = os.urandom(max(size, 1))
                    if await conn.request(probe) != probe:
                        raise CommandFailed("the final delivery check's reply differs")
            elapsed = time.perf_counter() - start
        conns_used = client.statistics().dials
    if interrupt.cancel_called:
        return 130
    rate = n / elapsed if elapsed > 0 else float("inf")
    ordered = sorted(latencies)
    if mode == "send-nowait":
        figures = (
            f"enqueue time p50 {_ms(percentile(ordered, 50))}, p99 {_ms(percentile(ordered, 99))} "
            f"(send_nowait call, {fallbacks} fell back to send; per-message latency n/a)"
        )
    else:
        kind = "round trip" if mode == "request" else "until written"
        figures = (
            f"latency p50 {_ms(percentile(ordered, 50))}, p99 {_ms(percentile(ordered, 99))} "
            f"({kind})"
        )
    _say(
        f"{mode}: {n} msgs in {elapsed:.3f} s over {conns_used} connection(s): "
        f"{rate:,.0f} msgs/s, {rate * size / 1e6:,.2f} MB/s, {figures}"
    )
    checked = "every reply verified" if mode == "request" else "delivery verified"
    _say(f"bench {mode} ok: {checked}")
    return 0


# -- demo ------------------------------------------------------------------------------------


class _Inbox:
    """One-way messages a demo peer received, and a way to wait for one."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self._changed = trio.Event()

    def add(self, body: bytes) -> None:
        self.bodies.append(body)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, body: bytes) -> None:
        while body not in self.bodies:
            await self._changed.wait()


class _Checks:
    def __init__(self) -> None:
        self.passed = 0
        self.failures: list[str] = []

    def check(self, ok: bool, what: str) -> None:
        if ok:
            self.passed += 1
        else:
            self.failures.append(what)
            _say(f"  !! FAILED: {what}")


def _show(body: bytes) -> str:
    return repr(body.decode("utf-8", errors="replace"))


async def _demo(profile: str, interrupt: trio.CancelScope) -> int:
    checks = _Checks()
    server_inbox = _Inbox()
    client_inbox = _Inbox()
    requests = 0
    messages = 0
    native = profile == NATIVE
    server_id = Identity.generate() if native else None
    client_id = Identity.generate() if native else None

    def expect_peer_key(seen: PublicKey | None, want: Identity | None, who: str) -> None:
        if want is not None:
            checks.check(seen == want.public_key, f"{who} sees the pinned key of its peer")

    announced = False

    async def server_handler(request: Request) -> bytes | None:
        nonlocal requests, messages, announced
        expect_peer_key(request.peer_public_key, client_id, "the server")
        if not announced and request.peer_public_key is not None:
            announced = True
            _say(f"server: the client proved it holds key {request.peer_public_key}")
        if request.oneway:
            _say(f"server <- client  message {_show(request.body)}")
            server_inbox.add(request.body)
            return None
        if request.body != b"call me back":
            reply = request.body.replace(b"ping", b"pong")
            _say(f"server <- client  request {_show(request.body)}, replying {_show(reply)}")
            return reply
        _say(f"server <- client  request {_show(request.body)}")
        question = b"are you there?"
        _say(f"server -> client  request {_show(question)} (a call back on the same connection)")
        answer = await request.connection.request(question)
        requests += 1
        checks.check(answer == b"yes, I am here", "the client answered the server's request")
        _say(f"server <- client  reply {_show(answer)} (verified)")
        note = b"thanks for answering"
        _say(f"server -> client  message {_show(note)}")
        await request.connection.send(note)
        messages += 1
        reply = b"called you back"
        _say(f"server: replying {_show(reply)}")
        return reply

    async def client_handler(request: Request) -> bytes | None:
        expect_peer_key(request.peer_public_key, server_id, "the client")
        if request.oneway:
            _say(f"client <- server  message {_show(request.body)}")
            client_inbox.add(request.body)
            return None
        reply = b"yes, I am here"
        _say(f"client <- server  request {_show(request.body)}, replying {_show(reply)}")
        return reply

    if native:
        assert server_id is not None
        assert client_id is not None
        _say("demo: profile native (Noise handshake; each peer pins the other's static key)")
        _say(f"demo: server public key {server_id.public_key}")
        _say(f"demo: client public key {client_id.public_key}")
        server = Server(
            server_handler, identity=server_id, trust=PinnedKeys([client_id.public_key])
        )
    else:
        _say("demo: profile monte-v1 (Go monte's handshake: encrypted, nobody authenticated)")
        server = Server(server_handler, handshake=MonteV1Handshake())

    async def exchange(client: Client) -> None:
        nonlocal requests, messages
        conn = await client.connection()
        checks.check(conn.profile == profile, f"the connection speaks {profile}")
        if server_id is not None:
            expect_peer_key(conn.peer_public_key, server_id, "the client")
            _say(
                f"client: connected over {conn.profile}; the server proved it holds "
                f"key {conn.peer_public_key}"
            )
        else:
            _say(f"client: connected over {conn.profile} (no keys to verify)")
        for i in range(1, 4):
            body = f"hello {i}".encode()
            _say(f"client -> server  message {_show(body)}")
            await client.send(body)
            messages += 1
            await server_inbox.wait_for(body)
            checks.check(True, f"the server received message {i}")
        for i in range(1, 4):
            body = f"ping {i}".encode()
            _say(f"client -> server  request {_show(body)}")
            reply = await client.request(body)
            requests += 1
            checks.check(reply == f"pong {i}".encode(), f"the reply to ping {i}")
            _say(f"client <- server  reply {_show(reply)} (verified)")
        body = b"call me back"
        _say(f"client -> server  request {_show(body)}")
        reply = await client.request(body)
        requests += 1
        checks.check(reply == b"called you back", "the reply to the call-back request")
        _say(f"client <- server  reply {_show(reply)} (verified)")
        await client_inbox.wait_for(b"thanks for answering")
        checks.check(True, "the client received the server's message")

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(server.serve, 0, "127.0.0.1")
        name = listeners[0].socket.getsockname()
        host, port = str(name[0]), int(name[1])
        _say(f"server: listening on {format_address(host, port)}")
        # Connecting is bounded by open_client's dial and handshake timeouts.
        async with open_client(
            host,
            port,
            handshake=None if native else MonteV1Handshake(),
            identity=client_id,
            trust=PinnedKeys([server_id.public_key]) if server_id is not None else None,
            handler=client_handler,
            max_conns=1,
        ) as client:
            # Time limit and interruption apply inside the block, so the client still
            # closes gracefully either way.
            with interrupt, trio.move_on_after(_DEMO_TIME_LIMIT) as timer:
                await exchange(client)
            if timer.cancelled_caught:
                checks.check(False, f"the exchange finished within {_DEMO_TIME_LIMIT} s")
        _say("client: closed its connection")
        await server.shutdown()
    if interrupt.cancel_called:
        return 130
    stats = server.statistics()
    checks.check(stats.requests_received == 4, "the server counted 4 requests")
    checks.check(stats.messages_received == 3, "the server counted 3 one-way messages")
    _say("server: shut down")
    if checks.failures:
        total = checks.passed + len(checks.failures)
        _say(f"demo FAILED: {len(checks.failures)} of {total} checks failed")
        return 1
    _say(f"demo finished: {requests} requests, {messages} messages, all verified")
    return 0


async def _interruptible(command: Callable[[trio.CancelScope], Awaitable[int]]) -> int:
    """Run ``command(interrupt)``; SIGINT or SIGTERM cancels ``interrupt`` (exit status 130).

    The command wraps its interruptible work in ``interrupt`` *inside* its client's block,
    so that connections still close gracefully; a second signal cancels everything.
    Signals become cancellations rather than a KeyboardInterrupt raised wherever the
    program happens to be.
    """
    interrupt = trio.CancelScope()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if not interrupt.cancel_called:
                        print(f"{PROG}: {name}: interrupted", file=sys.stderr, flush=True)
                        interrupt.cancel()
                    else:
                        print(f"{PROG}: {name} again: stopping now", file=sys.stderr, flush=True)
                        nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            status = await command(interrupt)
            nursery.cancel_scope.cancel()
    return 130 if interrupt.cancel_called else status


# -- main ------------------------------------------------------------------------------------


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` after every option that has a default and does not say it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            "default" in text
            or action.default is None
            or action.default is False
            or action.default is argparse.SUPPRESS
        ):
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``monte-trio``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Fast, fully-encrypted, bidirectional RPC over TCP for Trio: tools.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    keygen = commands.add_parser(
        "keygen",
        help="generate a static key pair and save its private key",
        description="Generate a static X25519 key pair, write the private key to PATH "
        "(mode 0600) and print the public key to give to peers.",
        formatter_class=_HelpFormatter,
    )
    keygen.set_defaults(command_parser=keygen)  # for its usage errors
    keygen.add_argument("path", metavar="PATH", help="where to write the private key (0600)")
    keygen.add_argument(
        "--passphrase-file",
        metavar="FILE",
        help="encrypt the key with the passphrase in FILE, which must be readable by its "
        "owner only (default: the key is not encrypted)",
    )
    keygen.add_argument(
        "--force", action="store_true", help="replace an existing PATH (default: refuse)"
    )

    serve = commands.add_parser(
        "serve",
        help="run an echo server",
        description="An echo server: replies to each request with its body and counts "
        "one-way messages. The native profile needs --trust. SIGINT (Ctrl-C) or SIGTERM "
        "stops it gracefully (exit status 130 after SIGINT, 0 after SIGTERM).",
        formatter_class=_HelpFormatter,
    )
    serve.set_defaults(command_parser=serve)  # for its usage errors
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=_port, default=0, help="port to listen on (0: a free port)")
    _add_security_options(serve, who="client")
    serve.add_argument(
        "--max-conns",
        type=_positive_int,
        default=256,
        help="established connections served at once (each may hold up to about 15 MiB with "
        "the standard limits: see the Reliability page)",
    )
    serve.add_argument(
        "--max-handshakes",
        type=_positive_int,
        default=128,
        help="sockets accepted but not yet connected; a new one evicts the oldest "
        "unfinished handshake",
    )
    serve.add_argument(
        "--max-record-size",
        type=_positive_int,
        default=None,
        metavar="BYTES",
        help="largest record accepted (default: the profile's; monte-v1 uses 4096, so "
        "raise it to bench monte-v1 with --size above 4076)",
    )

    bench = commands.add_parser(
        "bench",
        help="drive an echo server and measure throughput and latency",
        description="Sends N messages of S random bytes with C concurrent tasks over up to "
        "M connections. request mode checks every echoed reply; the send modes end with "
        "one request per connection to check delivery. Ctrl-C stops it (exit status 130).",
        formatter_class=_HelpFormatter,
    )
    bench.set_defaults(command_parser=bench)  # for its usage errors
    bench.add_argument("address", type=_address, metavar="HOST:PORT", help="the server")
    _add_security_options(bench, who="server")
    bench.add_argument("--mode", choices=MODES, default="request", help="what to send")
    bench.add_argument("-n", type=_positive_int, default=10_000, help="messages in total")
    bench.add_argument("--size", type=_non_negative_int, default=1400, help="bytes per message")
    bench.add_argument(
        "--concurrency", type=_positive_int, default=16, help="concurrent sending tasks"
    )
    bench.add_argument("--conns", type=_positive_int, default=4, help="most connections")

    demo = commands.add_parser(
        "demo",
        help="two peers in one process calling each other over loopback",
        description="Two peers in one process calling each other over loopback, every "
        "exchange checked. Ctrl-C stops it (exit status 130).",
        formatter_class=_HelpFormatter,
    )
    demo.set_defaults(command_parser=demo)  # for its usage errors
    demo.add_argument("--profile", choices=PROFILES, default=NATIVE, help="wire profile")
    return parser


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, or ``[exc]``."""
    inner = getattr(exc, "exceptions", None)
    if isinstance(inner, tuple) and inner and all(isinstance(e, BaseException) for e in inner):
        return [leaf for e in inner for leaf in _leaves(e)]
    return [exc]


_EXPECTED_ERRORS = (MonteError, OSError, CommandFailed)


def _os_causes(exc: BaseException) -> list[str]:
    """The system errors (``Connection refused``...) behind ``exc``, each named once.

    trio reports a failed connect as ``OSError("all attempts to connect ... failed")`` whose
    ``__cause__`` groups one error per address tried; a library error may wrap that again.
    """
    found: list[str] = []
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending and len(seen) < 100:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno:
            reason = os.strerror(current.errno)
            if reason not in found:
                found.append(reason)
        inner = getattr(current, "exceptions", None)
        if isinstance(inner, tuple):
            pending.extend(e for e in inner if isinstance(e, BaseException))
        if current.__cause__ is not None:
            pending.append(current.__cause__)
        elif current.__context__ is not None and not current.__suppress_context__:
            pending.append(current.__context__)
    return found


def _describe(exc: BaseException) -> str:
    """One line for ``exc``: its message, the system errors behind it, escaped."""
    if isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    # A key file error already says what happened to the file in its own words.
    causes = [] if isinstance(exc, KeyFileError) else _os_causes(exc)
    missing = [reason for reason in causes if reason not in text]
    if missing:
        text = f"{text} ({'; '.join(missing)})"
    return printable(text)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``monte-trio`` with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        return _dispatch(args)
    except SystemExit:
        raise
    except BaseException as exc:
        leaves = _leaves(exc)
        if all(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
            print(f"{PROG}: interrupted", file=sys.stderr, flush=True)
            return 130
        if all(isinstance(leaf, (*_EXPECTED_ERRORS, KeyboardInterrupt)) for leaf in leaves):
            first = next(leaf for leaf in leaves if isinstance(leaf, _EXPECTED_ERRORS))
            print(f"{PROG}: error: {_describe(first)}", file=sys.stderr, flush=True)
            return 1
        raise


def _dispatch(args: argparse.Namespace) -> int:
    command: str = args.command
    parser: argparse.ArgumentParser = args.command_parser
    if command == "keygen":
        return _keygen(parser, args)
    if command == "demo":
        return trio.run(_interruptible, functools.partial(_demo, args.profile))
    if command == "bench" and args.size > _MAX_BENCH_SIZE:
        parser.error(f"--size: at most {_MAX_BENCH_SIZE} bytes")
    who = "client" if command == "serve" else "server"
    security = _resolve_security(parser, args, who=who)
    if command == "serve":
        return trio.run(_serve, args, security)
    return trio.run(_interruptible, functools.partial(_bench, args, security))
