"""Pieces shared by the benchmark server, client and peers (no event loop imported here)."""

from __future__ import annotations

import datetime
import importlib.util
import ipaddress
import json
import os
import resource
import signal
import threading
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

# A control request is a short body starting with this tag; benchmark payloads are 1400 bytes
# or 1 MiB, so they can never be mistaken for one (the length is checked first).
CTL_TAG = b"\xffCTL:"
CTL_MAX = 64
CTL_STATS = CTL_TAG + b"stats"
CTL_ECHO_ON = CTL_TAG + b"echo1"
CTL_ECHO_OFF = CTL_TAG + b"echo0"


def is_ctl(body: bytes | memoryview) -> bool:
    return len(body) < CTL_MAX and bytes(body[: len(CTL_TAG)]) == CTL_TAG


# ServerStreaming: the request of the server-streaming call is the message count and a
# seed (8 bytes each, big-endian); the server streams ``count`` messages, the seed's
# STREAMED_DISTINCT payloads in turn, so the client can check every message it gets.
STREAMED_DISTINCT = 64


def streaming_request(count: int, seed: int) -> bytes:
    """The request of a ServerStreaming call: stream ``count`` messages made from ``seed``."""
    return count.to_bytes(8, "big") + seed.to_bytes(8, "big")


def parse_streaming_request(body: bytes) -> tuple[int, int]:
    """(count, seed) of a ServerStreaming request (ValueError if it is not one)."""
    if len(body) != 16:
        raise ValueError(f"a ServerStreaming request has 16 bytes, not {len(body)}")
    return int.from_bytes(body[:8], "big"), int.from_bytes(body[8:], "big")


def streamed_payloads(seed: int, size: int) -> list[bytes]:
    """The STREAMED_DISTINCT messages of ``size`` bytes a ServerStreaming server cycles
    through for ``seed`` (the client makes the same ones to check what it gets)."""
    import random

    rng = random.Random(seed)
    return [rng.randbytes(size) for _ in range(STREAMED_DISTINCT)]


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _status_kib(field: str) -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss_kib() -> int:
    """Peak RSS of this process image (VmHWM; ru_maxrss would carry the parent's peak
    across fork + exec)."""
    return _status_kib("VmHWM:") or int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def current_rss_kib() -> int:
    return _status_kib("VmRSS:")


def raise_nofile_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return int(soft)


class ServerState:
    """What every peer's server counts and reports through control requests."""

    def __init__(self) -> None:
        self.count = 0  # one-way messages received
        self.requests = 0
        self.echo = False  # reply with the request body (1 MiB workload, verification)

    def stats(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "requests": self.requests,
            "cpu_s": cpu_seconds(),
            "peak_rss_kib": peak_rss_kib(),
            "rss_kib": current_rss_kib(),
        }

    def ctl(self, body: bytes | memoryview) -> bytes:
        cmd = bytes(body)
        if cmd == CTL_ECHO_ON:
            self.echo = True
        elif cmd == CTL_ECHO_OFF:
            self.echo = False
        elif cmd != CTL_STATS:
            return b'{"error": "unknown control command"}'
        return json.dumps(self.stats()).encode()

    def reply(self, body: bytes | memoryview) -> bytes:
        """Reply body for a request (control, echo or the empty reply monte's benchmarks use)."""
        if len(body) < CTL_MAX and is_ctl(body):
            return self.ctl(body)
        self.requests += 1
        return bytes(body) if self.echo else b""


def watch_stdin_then_terminate() -> None:
    """Send SIGTERM to this process when stdin reaches EOF (the harness closes it to stop us)."""

    def run() -> None:
        try:
            while os.read(0, 65536):  # raw fd: no buffered-reader lock held at shutdown
                pass
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=run, name="stdin-watch", daemon=True).start()


# --------------------------------------------------------------------------- TLS material


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path

    @property
    def cert_pem(self) -> bytes:
        return self.cert.read_bytes()

    @property
    def key_pem(self) -> bytes:
        return self.key.read_bytes()


def make_self_signed(directory: Path) -> TlsFiles:
    """A self-signed ECDSA P-256 certificate for localhost / 127.0.0.1 / ::1 in ``directory``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(directory / "cert.pem", directory / "key.pem")
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(files.key, 0o600)
    return files


def tls_files(directory: str | None) -> TlsFiles:
    if directory is None:
        import tempfile

        directory = tempfile.mkdtemp(prefix="monte-bench-tls-")
    d = Path(directory)
    if (d / "cert.pem").exists() and (d / "key.pem").exists():
        return TlsFiles(d / "cert.pem", d / "key.pem")
    return make_self_signed(d)


# --------------------------------------------------------------------------- peer interface


@dataclass(frozen=True)
class PeerOptions:
    """Options every peer's server and client get."""

    host: str = "127.0.0.1"
    tls_dir: str | None = None
    big: bool = False  # configure for 1 MiB messages
    methods: str = ""  # serve and call methods with this codec (the method workloads)
    streams: bool = False  # also echo byte streams (the stream workloads)


class BenchClient(Protocol):
    """The three calls of monte's client that the workloads use."""

    async def request(self, body: bytes) -> bytes: ...

    async def send(self, body: bytes) -> None: ...

    def send_nowait(self, body: bytes) -> None: ...


class OpenClient(Protocol):
    def __call__(
        self, port: int, opts: PeerOptions, max_conns: int
    ) -> AbstractAsyncContextManager[BenchClient]: ...


class TaskGroup(Protocol):
    def start_soon(self, fn: Callable[[], Awaitable[None]]) -> None: ...


class EventLike(Protocol):
    def set(self) -> None: ...

    def is_set(self) -> bool: ...

    async def wait(self) -> Any: ...


class Runtime(Protocol):
    """The few event-loop primitives the workload drivers need (trio or asyncio)."""

    would_block: tuple[type[BaseException], ...]

    async def sleep(self, seconds: float) -> None: ...

    async def gather(self, fns: Sequence[Callable[[], Awaitable[None]]]) -> None: ...

    def task_group(self) -> AbstractAsyncContextManager[TaskGroup]: ...

    def event(self) -> EventLike: ...

    def semaphore(self, n: int) -> AbstractAsyncContextManager[Any]: ...

    async def with_timeout(self, fn: Callable[[], Awaitable[Any]], seconds: float) -> Any:
        """``await fn()``, raising TimeoutError after ``seconds``."""


# --------------------------------------------------------------------------- statistics


def _load_monte_trio_stats() -> ModuleType:
    """monte_trio's ``_cli/_stats.py`` (the percentile ``monte-trio bench`` reports), alone.

    One definition serves both, but a plain ``from monte_trio._cli import percentile`` would
    run ``monte_trio/__init__.py`` and load trio and cryptography into every benchmark client,
    about 17 MiB of peak RSS charged to the asyncio peers (grpc, zmq). The module imports only
    the standard library, so it is loaded from its file without its package.
    """
    package = importlib.util.find_spec("monte_trio")  # finds it without importing it
    if package is None or not package.submodule_search_locations:
        raise ImportError("monte_trio is not installed; run `pip install -e .` in the repo")
    path = Path(next(iter(package.submodule_search_locations))) / "_cli" / "_stats.py"
    spec = importlib.util.spec_from_file_location("_monte_trio_cli_stats", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if TYPE_CHECKING:
    from monte_trio._cli._stats import percentile as percentile
else:
    percentile = _load_monte_trio_stats().percentile  # nearest rank, p from 0 to 100
