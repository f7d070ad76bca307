"""The ``monte-trio`` command line.

Most tests run the program's entry point in this process: ``main(argv)`` where no event
loop is needed, ``async_main(argv)`` inside the test's own trio run otherwise, with a
:class:`Terminal` in place of stdout and stderr. Real subprocesses remain where a
subprocess or a signal sent to the program is the point: Ctrl-C and SIGTERM, ``python -m
monte_trio`` and the console script, the benchmarks' fresh interpreter. Every subprocess is
bounded by ``trio.fail_after`` and killed (and reaped) on the way out, so a failing test
leaves no process behind.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest
import trio
from helpers import Proc, spawn_process

import monte_trio
from monte_trio import Identity, PublicKey
from monte_trio.__main__ import main
from monte_trio._cli import async_main, percentile

CLI = [sys.executable, "-m", "monte_trio"]
ROOT = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"^listening on 127\.0\.0\.1:(\d+)$")
SUMMARY = re.compile(
    r"server stopped: (\d+) connections, (\d+) requests, (\d+) one-way messages, "
    r"(\d+) failed handshakes"
)


def spawn(*args: str) -> AbstractAsyncContextManager[Proc]:
    """The CLI as a subprocess (killed and reaped on the way out)."""
    return spawn_process([*CLI, *args])


async def run_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    """Run the CLI as a subprocess to completion (at most 10 s; it is killed on timeout)."""
    with trio.fail_after(10):
        return await trio.run_process(
            [*CLI, *args], capture_stdout=True, capture_stderr=True, check=False
        )


Result = subprocess.CompletedProcess[bytes]


def completed(args: tuple[str, ...], code: object, stdout: str, stderr: str) -> Result:
    """What a run of the CLI gave, as :func:`run_cli` reports a subprocess's."""
    status = code if isinstance(code, int) else 1  # SystemExit("message") is status 1
    return subprocess.CompletedProcess(list(args), status, stdout.encode(), stderr.encode())


def out(result: Result) -> str:
    return result.stdout.decode()


def err(result: Result) -> str:
    return result.stderr.decode()


def assert_clean_error(result: Result, *fragments: str) -> None:
    """Exit status 1 and one ``monte-trio: error:`` line on stderr mentioning ``fragments``."""
    stderr = err(result)
    assert result.returncode == 1, (out(result), stderr)
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("monte-trio: error: ")]
    assert len(errors) == 1, stderr
    for fragment in fragments:
        assert fragment in errors[0], stderr


def run_in_process(capsys: pytest.CaptureFixture[str], *args: str) -> Result:
    """Run the CLI's entry point ``main`` in this process, in a test with no event loop.

    Usage errors (argparse's SystemExit) give status 2.
    """
    try:
        code: object = main(list(args))
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return completed(args, code, captured.out, captured.err)


class Output:
    """One of the program's output streams in this process: the text printed so far, read
    line by line as it is printed."""

    def __init__(self) -> None:
        self.text = ""
        self._read = 0
        self._changed = trio.Event()

    def write(self, text: str) -> int:
        self.text += text
        self._changed.set()
        self._changed = trio.Event()
        return len(text)

    def flush(self) -> None:
        pass

    async def readline(self) -> str:
        """The next line, once it is printed (callers bound the wait)."""
        while "\n" not in self.text[self._read :]:
            await self._changed.wait()
        end = self.text.index("\n", self._read)
        line = self.text[self._read : end]
        self._read = end + 1
        return line

    def take(self) -> str:
        """The text printed and not read yet."""
        rest = self.text[self._read :]
        self._read = len(self.text)
        return rest


class Terminal:
    """``sys.stdout`` and ``sys.stderr`` of the CLI run in this process (``async_main``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.out = Output()
        self.err = Output()
        self._monkeypatch = monkeypatch

    def install(self) -> None:
        """Put :attr:`out` and :attr:`err` in place (in the test's call: pytest's own
        capture takes ``sys.stdout`` back between a fixture's setup and the call)."""
        self._monkeypatch.setattr(sys, "stdout", self.out)
        self._monkeypatch.setattr(sys, "stderr", self.err)

    async def run(self, *args: str) -> Result:
        """Run the CLI to completion in this trio run (at most 10 s)."""
        self.install()
        self.out.take()
        self.err.take()
        with trio.fail_after(10):
            try:
                code: object = await async_main(list(args))
            except SystemExit as exc:
                code = exc.code
        return completed(args, code, self.out.take(), self.err.take())


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> Terminal:
    return Terminal(monkeypatch)


class Serving:
    """``monte-trio serve`` running in this process: its address and its exit status."""

    def __init__(self, terminal: Terminal) -> None:
        self.terminal = terminal
        self.port = ""
        self.address = ""
        self.status: int | None = None
        self.done = trio.Event()

    async def stop(self, signum: int = signal.SIGTERM) -> tuple[str, str]:
        """Send ``signum`` to this process, which serve's handler receives; wait for its
        quiet exit and return (rest of stdout, stderr).

        SIGTERM (a service manager's stop) ends it with status 0, SIGINT with 130.
        """
        # serve handles the signals from before it prints "listening on" until it exits.
        assert not self.done.is_set(), "serve exited before it was stopped"
        signal.raise_signal(signum)
        with trio.fail_after(10):
            await self.done.wait()
        rest, stderr = self.terminal.out.take(), self.terminal.err.take()
        assert self.status == (130 if signum == signal.SIGINT else 0), (rest, stderr)
        assert "Traceback" not in stderr
        return rest, stderr


@asynccontextmanager
async def serve(terminal: Terminal, *args: str) -> AsyncIterator[Serving]:
    """``monte-trio serve ARGS`` in this process, once listening (that line read); stopped
    by a signal (:meth:`Serving.stop`), else cancelled when the block ends."""
    serving = Serving(terminal)

    async def run() -> None:
        try:
            serving.status = await async_main(["serve", *args])
        finally:
            serving.done.set()

    async with trio.open_nursery() as nursery:
        terminal.install()
        terminal.out.take()
        terminal.err.take()
        nursery.start_soon(run)
        with trio.fail_after(10):
            line = await terminal.out.readline()
        match = LISTENING.match(line)
        assert match is not None, (line, terminal.err.text)
        serving.port = match.group(1)
        serving.address = f"127.0.0.1:{serving.port}"
        yield serving
        nursery.cancel_scope.cancel()


async def stop(server: Proc, signum: int = signal.SIGINT) -> tuple[str, str]:
    """Signal the server subprocess, wait for its quiet exit, return (rest of stdout, stderr).

    SIGINT (Ctrl-C) ends it with status 130, SIGTERM (a service manager's stop) with 0.
    """
    server.process.send_signal(signum)
    with trio.fail_after(10):
        rest = await server.read_rest()
        stderr = await server.read_stderr()
        code = await server.process.wait()
    assert code == (130 if signum == signal.SIGINT else 0), (rest, stderr)
    assert "Traceback" not in stderr
    return rest, stderr


def private_file(path: Path, data: bytes) -> Path:
    """Write a secret file readable by its owner only (the CLI refuses any other mode)."""
    path.write_bytes(data)
    path.chmod(0o600)
    return path


async def listening_port(server: Proc) -> str:
    """Read the server subprocess's ``listening on`` line; return its port."""
    with trio.fail_after(10):
        match = LISTENING.match(await server.readline())
    assert match is not None, server.seen
    return match.group(1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- keygen ----------------------------------------------------------------------------------


def test_keygen_writes_a_private_file_and_prints_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "id.key"
    result = run_in_process(capsys, "keygen", str(path))
    assert result.returncode == 0, err(result)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = PublicKey.parse(out(result).split()[-1])
    assert Identity.load(path).public_key == key

    again = run_in_process(capsys, "keygen", str(path))
    assert_clean_error(again, "already exists", "--force")
    assert Identity.load(path).public_key == key  # untouched

    forced = run_in_process(capsys, "keygen", str(path), "--force")
    assert forced.returncode == 0, err(forced)
    new_key = PublicKey.parse(out(forced).split()[-1])
    assert new_key != key
    assert Identity.load(path).public_key == new_key


def test_keygen_with_a_passphrase(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    private_file(tmp_path / "pass", b"correct horse\n")
    path = tmp_path / "id.key"
    result = run_in_process(
        capsys, "keygen", str(path), "--passphrase-file", str(tmp_path / "pass")
    )
    assert result.returncode == 0, err(result)
    key = PublicKey.parse(out(result).split()[-1])
    assert Identity.load(path, passphrase=b"correct horse").public_key == key


# -- serve and bench -------------------------------------------------------------------------


@pytest.mark.parametrize("wire", ["monte-v1", "native"])
async def test_serve_and_bench_every_mode(terminal: Terminal, wire: str) -> None:
    # native: the CLI's defaults (no --profile, a fresh key) and the explicit, warned
    # --trust any that serve requires; bench defaults to any (with a warning) itself.
    options = ["--profile", "monte-v1"] if wire == "monte-v1" else []
    trust = ["--trust", "any"] if wire == "native" else []
    async with serve(terminal, "--port", "0", *options, *trust) as server:
        warnings = terminal.err.take()
        if wire == "native":
            with trio.fail_after(10):
                PublicKey.parse(re.sub(r"^public key: ", "", await terminal.out.readline()))
        for mode in ["request", "send", "send-nowait"]:
            result = await terminal.run(
                "bench", server.address, *options, "--mode", mode,
                "-n", "200", "--concurrency", "8", "--size", "1000",
            )  # fmt: skip
            assert result.returncode == 0, (out(result), err(result))
            assert "msgs/s" in out(result)
            assert "MB/s" in out(result)
            assert "Traceback" not in err(result)
            verified = "every reply verified" if mode == "request" else "delivery verified"
            assert f"bench {mode} ok: {verified}" in out(result)
        rest, _ = await server.stop()
    summary = SUMMARY.search(rest)
    assert summary is not None, rest
    connections, requests, messages, failures = map(int, summary.groups())
    assert connections >= 3
    assert requests >= 200 + 2  # plus one delivery check per connection of the send modes
    assert messages == 400
    assert failures == 0
    if wire == "native":
        assert "clients are not authenticated" in warnings
    else:
        assert "monte-v1 authenticates nobody" in warnings


async def test_native_pinning_and_psk(terminal: Terminal, tmp_path: Path) -> None:
    psk = os.urandom(32)
    private_file(tmp_path / "psk.bin", psk)
    private_file(tmp_path / "psk.hex", psk.hex().encode() + b"\n")
    private_file(tmp_path / "other.hex", os.urandom(32).hex().encode())
    keygen = await terminal.run("keygen", str(tmp_path / "server.key"))
    server_key = out(keygen).split()[-1]
    wrong_key = str(Identity.generate().public_key)

    async with serve(
        terminal, "--identity", str(tmp_path / "server.key"), "--psk", str(tmp_path / "psk.hex"),
        "--trust", "any",
    ) as server:  # fmt: skip
        with trio.fail_after(10):
            assert await terminal.out.readline() == f"public key: {server_key}"
        address = server.address

        pinned = await terminal.run(
            "bench", address, "--trust", f"pin:{server_key}", "--psk", str(tmp_path / "psk.bin"),
            "-n", "100", "--concurrency", "4",
        )  # fmt: skip
        assert pinned.returncode == 0, (out(pinned), err(pinned))
        assert "bench request ok" in out(pinned)
        assert "warning" not in err(pinned)

        mismatch = await terminal.run(
            "bench", address, "--trust", f"pin:{wrong_key}", "--psk", str(tmp_path / "psk.bin"),
            "-n", "10",
        )  # fmt: skip
        assert_clean_error(mismatch, server_key, "not one of the 1 pinned key")

        wrong_psk = await terminal.run(
            "bench", address, "--trust", "any", "--psk", str(tmp_path / "other.hex"), "-n", "10"
        )
        assert_clean_error(wrong_psk)

        old_profile = await terminal.run("bench", address, "--profile", "monte-v1", "-n", "10")
        assert_clean_error(old_profile, "handshake")

        rest, _ = await server.stop(signal.SIGTERM)
    summary = SUMMARY.search(rest)
    assert summary is not None, rest
    assert int(summary.group(4)) >= 2  # at least the wrong psk and the monte-v1 client


async def test_bench_stops_promptly_on_sigint() -> None:
    # Both programs as subprocesses: the signals are the point, and so is a bench process
    # talking to a serve process.
    async with spawn("serve", "--profile", "monte-v1") as server:
        port = await listening_port(server)
        for mode in ["request", "send-nowait"]:
            async with spawn(
                "bench", f"127.0.0.1:{port}", "--profile", "monte-v1",
                "--mode", mode, "-n", "100000000",
            ) as bench:  # fmt: skip
                with trio.fail_after(10):
                    assert (await bench.readline()).startswith(f"bench {mode}:")
                    await trio.sleep(0.1)  # under way
                    bench.process.send_signal(signal.SIGINT)
                    rest = await bench.read_rest()
                    stderr = await bench.read_stderr()
                    assert await bench.process.wait() == 130, (rest, stderr)
                assert "monte-trio: SIGINT: interrupted" in stderr
                assert "Traceback" not in stderr
        rest, _ = await stop(server, signal.SIGTERM)  # a service manager's stop: status 0
    assert "received SIGTERM, shutting down gracefully" in rest
    summary = SUMMARY.search(rest)
    assert summary is not None, rest
    assert int(summary.group(2)) > 0  # the interrupted benches' requests were served


# -- bench --mode stream and serve's stream echo ---------------------------------------------

STREAM_FIGURES = re.compile(
    r"^stream: 8 MiB each way in [0-9.]+ s: [0-9,.]+ MB/s \(both directions counted\)$", re.M
)


async def test_bench_stream_mode_against_serve() -> None:
    # Both programs as subprocesses, as an operator runs them.
    async with spawn("serve", "--trust", "any") as server:
        port = await listening_port(server)
        result = await run_cli(
            "bench", f"127.0.0.1:{port}", "--trust", "any", "--mode", "stream", "--size", "8MiB"
        )
        assert result.returncode == 0, (out(result), err(result))
        lines = out(result)
        assert lines.startswith(
            f"bench stream: 8 MiB (8,388,608 bytes) over one stream to 127.0.0.1:{port} and back"
        ), lines
        assert STREAM_FIGURES.search(lines), lines
        match = re.search(r"^bench stream ok: SHA-256 of the echo matches what was sent "
                          r"\(([0-9a-f]{64})\)$", lines, re.M)  # fmt: skip
        assert match is not None, lines
        assert "Traceback" not in err(result)
        rest, stderr = await stop(server, signal.SIGTERM)
    assert "server stopped: 1 connections, 0 requests, 0 one-way messages, 0 failed " \
        "handshakes, 1 streams echoed" in rest, (rest, stderr)  # fmt: skip


@pytest.mark.parametrize("moment", ["digest", "transfer"])
async def test_bench_stream_stops_promptly_on_sigint(moment: str) -> None:
    # The digest of what will be sent comes first (in a worker thread), then the transfer:
    # Ctrl-C stops either. This server takes the stream and never reads it, so the
    # transfer waits for credit until interrupted.
    arrived = trio.Event()
    ended = trio.Event()

    async def never_read(stream: monte_trio.Stream) -> None:
        arrived.set()
        try:
            await trio.sleep_forever()
        finally:
            ended.set()

    server = monte_trio.Server(None, stream_handler=never_read, trust=monte_trio.AcceptAnyKey())
    size = "100GiB" if moment == "digest" else "8MiB"  # 100 GiB takes minutes to digest
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(server.serve, 0, "127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        async with spawn(
            "bench", f"127.0.0.1:{port}", "--trust", "any", "--mode", "stream", "--size", size
        ) as bench:
            with trio.fail_after(10):
                assert (await bench.readline()).startswith("bench stream: ")
                if moment == "transfer":
                    await arrived.wait()
                bench.process.send_signal(signal.SIGINT)
                rest = await bench.read_rest()
                stderr = await bench.read_stderr()
                assert await bench.process.wait() == 130, (rest, stderr)
                if moment == "transfer":
                    await ended.wait()  # the bench closed its connection: the handler ended
        nursery.cancel_scope.cancel()
    assert "monte-trio: SIGINT: interrupted" in stderr
    assert "Traceback" not in stderr
    assert "MB/s" not in rest
    assert arrived.is_set() == (moment == "transfer")


async def test_bench_sizes_take_units(terminal: Terminal) -> None:
    async with serve(terminal, "--trust", "any") as server:
        messages = await terminal.run(
            "bench", server.address, "--trust", "any", "--size", "2KiB", "-n", "20"
        )
        assert messages.returncode == 0, (out(messages), err(messages))
        assert "20 messages of 2048 bytes" in out(messages)
        stream = await terminal.run(
            "bench", server.address, "--trust", "any", "--mode", "stream", "--size", "3kB"
        )
        assert stream.returncode == 0, (out(stream), err(stream))
        assert "bench stream: 3,000 bytes over one stream" in out(stream)
        assert "bench stream ok" in out(stream)
        await server.stop(signal.SIGTERM)


def tampering_server(
    tamper: str,
) -> monte_trio.Server:
    """A server whose stream echo changes what it sends back: ``flip`` one bit of the first
    byte, ``drop`` the last byte, ``reorder`` two halves of the first chunk it reads."""

    async def bad_echo(stream: monte_trio.Stream) -> None:
        first = True
        held = b""
        while data := await stream.receive_some():
            if first and tamper == "flip":
                data = bytes([data[0] ^ 1]) + data[1:]
            elif first and tamper == "reorder":
                half = len(data) // 2
                data = data[half:] + data[:half]
            elif tamper == "drop":
                data, held = held + data[:-1], data[-1:]
            first = False
            await stream.send_all(data)
        await stream.send_eof()

    return monte_trio.Server(None, stream_handler=bad_echo, trust=monte_trio.AcceptAnyKey())


@pytest.mark.parametrize("tamper", ["flip", "drop", "reorder"])
async def test_bench_stream_fails_when_the_echo_differs(terminal: Terminal, tamper: str) -> None:
    server = tampering_server(tamper)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(server.serve, 0, "127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        result = await terminal.run(
            "bench", f"127.0.0.1:{port}", "--trust", "any", "--mode", "stream",
            "--size", "1MiB",
        )  # fmt: skip
        nursery.cancel_scope.cancel()
    assert_clean_error(result, "the echo differs from what was sent", "SHA-256")
    assert "bench stream ok" not in out(result)
    back = "1048575 bytes back" if tamper == "drop" else "1048576 bytes back"
    assert back in err(result)


async def test_bench_stream_against_a_server_without_streams(terminal: Terminal) -> None:
    server = monte_trio.Server(
        monte_trio.inline(lambda request: request.body), trust=monte_trio.AcceptAnyKey()
    )
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(server.serve, 0, "127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        result = await terminal.run(
            "bench", f"127.0.0.1:{port}", "--trust", "any", "--mode", "stream", "--size", "1MiB"
        )
        nursery.cancel_scope.cancel()
    assert_clean_error(result, "the stream failed", "serves no streams")


async def test_serve_echoes_streams_and_ends_a_reset_one_quietly(
    terminal: Terminal, caplog: pytest.LogCaptureFixture
) -> None:
    async with serve(terminal, "--trust", "any") as server:
        async with monte_trio.open_client(
            "127.0.0.1", int(server.port), trust=monte_trio.AcceptAnyKey()
        ) as client:
            with trio.fail_after(10):
                # A client that half-closes first: everything comes back, then the end.
                async with await client.open_stream() as stream:
                    payload = os.urandom(100_000)
                    await stream.send_all(payload)
                    await stream.send_eof()
                    echoed = b""
                    while data := await stream.receive_some():
                        echoed += data
                    assert echoed == payload
                # A client that gives up part-way: the echo ends without an error.
                stream = await client.open_stream()
                await stream.send_all(b"partial")
                assert await stream.receive_some() == b"partial"
                await stream.reset()
                # The connection still serves streams and calls.
                async with await client.open_stream() as again:
                    await again.send_all(b"still here")
                    await again.send_eof()
                    assert await again.receive_some() == b"still here"
                    assert await again.receive_some() == b""
                assert await client.request(b"and calls") == b"and calls"
        rest, stderr = await server.stop(signal.SIGTERM)
    assert "2 streams echoed" in rest, rest
    errors = [record for record in caplog.records if record.levelname == "ERROR"]
    assert errors == [], [record.getMessage() for record in errors]
    assert "stream handler raised" not in stderr


@pytest.mark.parametrize("wire", ["monte-v1", "native"])
async def test_demo(terminal: Terminal, wire: str) -> None:
    result = await terminal.run("demo", "--profile", wire)
    assert result.returncode == 0, (out(result), err(result))
    lines = out(result).splitlines()
    assert lines[-1] == "demo finished: 5 requests, 4 messages, all verified"
    assert any("server -> client  request" in line for line in lines)  # the call back
    assert any("client <- server  message" in line for line in lines)
    assert "FAILED" not in out(result)
    if wire == "native":
        keys = [line.split()[-1] for line in lines if "public key" in line]
        assert len(keys) == 2
        for key in keys:
            PublicKey.parse(key)
        assert any(f"proved it holds key {keys[0]}" in line for line in lines)
        assert any(f"proved it holds key {keys[1]}" in line for line in lines)


# -- errors ----------------------------------------------------------------------------------


async def test_bench_against_nothing_is_a_clean_error(terminal: Terminal) -> None:
    result = await terminal.run("bench", f"127.0.0.1:{free_port()}", "--profile", "monte-v1")
    assert_clean_error(result, "could not connect", "Connection refused")


async def test_bench_says_why_it_could_not_connect(terminal: Terminal) -> None:
    # trio reports "all attempts to connect ... failed" and keeps the reason in a group of
    # per-address errors; the CLI shows that reason.
    result = await terminal.run("bench", "127.0.0.1:1", "--trust", "any", "-n", "1")
    assert_clean_error(result, "127.0.0.1:1", "Connection refused")


async def test_serve_on_a_busy_port_names_the_address_and_the_cause(terminal: Terminal) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = await terminal.run("serve", "--port", str(port), "--trust", "any")
    assert_clean_error(result, f"127.0.0.1:{port}", "Address already in use")


def test_serve_requires_an_explicit_trust_policy(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_in_process(capsys, "serve")
    assert result.returncode == 2, (out(result), err(result))
    stderr = err(result)
    assert stderr.startswith("usage: monte-trio serve")
    assert "needs --trust" in stderr
    for choice in ["'pin:KEY[,KEY...]' accepts exactly", "'tofu:FILE' trusts on first use",
                   "'any' accepts every client key"]:  # fmt: skip
        assert choice in stderr
    assert "Traceback" not in stderr
    assert out(result) == ""  # nothing served


async def test_serve_with_trust_any_warns(terminal: Terminal) -> None:
    async with serve(terminal, "--trust", "any") as server:
        stderr = terminal.err.take()
        rest, _ = await server.stop(signal.SIGTERM)
    assert "warning: --trust any" in stderr
    assert "clients are not authenticated" in stderr
    assert "received SIGTERM, shutting down gracefully" in rest


async def test_ctrl_c_stops_serve_quietly_with_status_130() -> None:
    for profile in ["native", "monte-v1"]:
        trust = ["--trust", "any"] if profile == "native" else []
        async with spawn("serve", "--profile", profile, *trust) as server:
            await listening_port(server)
            rest, _ = await stop(server, signal.SIGINT)  # asserts 130, no traceback
        assert "received SIGINT, shutting down gracefully" in rest
        assert "server stopped:" in rest


async def test_version() -> None:
    result = await run_cli("--version")  # a subprocess: the installed program's version
    assert result.returncode == 0, err(result)
    assert out(result).strip() == f"monte-trio {monte_trio.__version__}"


@pytest.mark.parametrize(
    ("command", "defaults"),
    [
        ("keygen", ["(default: the key is not encrypted)", "(default: refuse)"]),
        (
            "serve",
            [
                "(default: 127.0.0.1)",
                "(default: 0)",
                "(default: native)",
                "(default: 256)",
                "(default: a fresh key for this run)",
                "(default: none)",
                "(default: the profile's",
            ],
        ),
        (
            "bench",
            [
                "(default: request)",
                "(default: 10000)",
                "(default: 1400)",
                "(default: 256MiB)",
                "MB/s counts both directions",
                "(default: 16)",
                "(default: 4)",
                "(default: any, with a warning)",
            ],
        ),
        ("demo", ["(default: native)"]),
    ],
)
def test_help_shows_defaults(
    capsys: pytest.CaptureFixture[str], command: str, defaults: list[str]
) -> None:
    result = run_in_process(capsys, command, "--help")
    assert result.returncode == 0, err(result)
    text = " ".join(out(result).split())  # argparse wraps lines
    for default in defaults:
        assert default in text, text


# -- key, psk and passphrase files -----------------------------------------------------------


async def test_serve_with_an_encrypted_key_end_to_end(terminal: Terminal, tmp_path: Path) -> None:
    key = tmp_path / "server.key"
    passphrase = private_file(tmp_path / "pass", "pässphrase\n".encode())
    made = await terminal.run("keygen", str(key), "--passphrase-file", str(passphrase))
    assert made.returncode == 0, err(made)
    server_key = out(made).split()[-1]
    assert Identity.load(key, passphrase="pässphrase".encode()).public_key == (
        PublicKey.parse(server_key)
    )
    async with serve(
        terminal, "--identity", str(key), "--passphrase-file", str(passphrase), "--trust", "any"
    ) as server:
        with trio.fail_after(10):
            assert await terminal.out.readline() == f"public key: {server_key}"
        bench = await terminal.run(
            "bench", server.address, "--trust", f"pin:{server_key}", "-n", "20"
        )
        assert bench.returncode == 0, (out(bench), err(bench))
        assert "bench request ok" in out(bench)
        await server.stop(signal.SIGTERM)


def test_key_file_errors_name_the_flag_that_fixes_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "server.key"
    passphrase = private_file(tmp_path / "pass", b"right\n")
    wrong = private_file(tmp_path / "wrong", b"wrong\n")
    made = run_in_process(capsys, "keygen", str(key), "--passphrase-file", str(passphrase))
    assert made.returncode == 0, err(made)
    plain = tmp_path / "plain.key"
    assert (run_in_process(capsys, "keygen", str(plain))).returncode == 0

    no_passphrase = run_in_process(capsys, "serve", "--identity", str(key), "--trust", "any")
    assert_clean_error(no_passphrase, "--identity", "encrypted", "--passphrase-file FILE")

    wrong_passphrase = run_in_process(
        capsys, "serve", "--identity", str(key), "--passphrase-file", str(wrong), "--trust", "any"
    )
    assert_clean_error(wrong_passphrase, "--identity", f"--passphrase-file {wrong}")

    not_encrypted = run_in_process(
        capsys,
        "serve",
        "--identity",
        str(plain),
        "--passphrase-file",
        str(passphrase),
        "--trust",
        "any",
    )
    assert_clean_error(not_encrypted, "not encrypted", "--passphrase-file")

    missing = run_in_process(
        capsys, "bench", "127.0.0.1:1", "--identity", str(tmp_path / "nope.key")
    )
    assert_clean_error(missing, "--identity", "monte-trio keygen")

    plain.chmod(0o644)
    readable = run_in_process(capsys, "serve", "--identity", str(plain), "--trust", "any")
    assert_clean_error(readable, "--identity", "0644", "chmod 600")

    for result in [no_passphrase, wrong_passphrase, not_encrypted, missing, readable]:
        assert "passphrase=" not in err(result)  # the Python API's words, not the CLI's


@pytest.mark.parametrize("option", ["--psk", "--passphrase-file"])
def test_secret_files_readable_by_others_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str
) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(os.urandom(32).hex().encode())
    secret.chmod(0o644)
    key = tmp_path / "id.key"
    assert (run_in_process(capsys, "keygen", str(key))).returncode == 0
    result = run_in_process(
        capsys, "serve", "--identity", str(key), "--trust", "any", option, str(secret)
    )
    assert result.returncode == 2, (out(result), err(result))
    assert f"{option} {secret}" in err(result)
    assert "0644" in err(result)
    assert "chmod 600" in err(result)
    assert "Traceback" not in err(result)


# -- text chosen by the peer -----------------------------------------------------------------


async def test_peer_supplied_text_is_printed_escaped(terminal: Terminal) -> None:
    async def hostile(request: monte_trio.Request) -> bytes:
        raise ValueError("\x1b[2J\x1b]0;owned\x07 screen cleared")

    server = monte_trio.Server(hostile, trust=monte_trio.AcceptAnyKey())
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(server.serve, 0, "127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        result = await terminal.run("bench", f"127.0.0.1:{port}", "--trust", "any", "-n", "1")
        nursery.cancel_scope.cancel()
    assert_clean_error(result, "screen cleared")
    assert "\x1b" not in err(result)
    assert "\x07" not in err(result)
    assert "\\x1b[2J" in err(result)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "--trust", "any", "--psk", "{short}"], "32 raw bytes or 64 hexadecimal"),
        (["bench", "127.0.0.1:1", "--psk", "{short}"], "32 raw bytes"),
        (["serve", "--trust", "any", "--psk", "{missing}"], "does not exist"),
        (["serve"], "needs --trust"),
        (["serve", "--profile", "monte-v1", "--trust", "any"], "only for the native profile"),
        (["serve", "--trust", "pin:nonsense"], "--trust"),
        (["serve", "--trust", "maybe"], "unknown trust policy"),
        (["bench", "localhost"], "expected HOST:PORT"),
        (["bench", "127.0.0.1:1", "--mode", "fast"], "invalid choice"),
        (["bench", "127.0.0.1:1", "--mode", "stream", "--profile", "monte-v1"], "has no streams"),
        (["bench", "127.0.0.1:1", "--size", "5MiB"], "at most 4194304 bytes per message"),
        (["bench", "127.0.0.1:1", "--mode", "stream", "--size", "1.5GiB"], "not a size"),
        (["bench", "127.0.0.1:1", "--size", "-1"], "not a size"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_usage_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    private_file(tmp_path / "short", b"0123456789")
    paths = {"short": str(tmp_path / "short"), "missing": str(tmp_path / "missing")}
    result = run_in_process(capsys, *(arg.format(**paths) for arg in args))
    assert result.returncode == 2, (out(result), err(result))
    assert message in err(result)
    assert "Traceback" not in err(result)


async def test_console_script() -> None:
    script = Path(sys.executable).parent / "monte-trio"
    if not script.exists():
        pytest.skip(f"the console script is not installed next to {sys.executable}")
    with trio.fail_after(10):
        result = await trio.run_process(
            [str(script), "demo", "--profile", "monte-v1"], capture_stdout=True, check=False
        )
    assert result.returncode == 0
    assert out(result).splitlines()[-1].startswith("demo finished:")


# -- the percentile shared by bench and benchmarks/ ------------------------------------------


@pytest.mark.parametrize("p", [0, 1, 7, 50, 99, 100])
def test_percentile_of_one_value_is_that_value(p: float) -> None:
    assert percentile([42.5], p) == 42.5


def test_percentile_is_the_nearest_rank_without_interpolation() -> None:
    values = [10, 20, 30, 40]
    assert percentile(values, 0) == 10  # the minimum, not an extrapolation below it
    assert percentile(values, 25) == 10  # rank ceil(25 * 4 / 100) = 1
    assert percentile(values, 25.001) == 20
    assert percentile(values, 50) == 20  # not 25, the midpoint an interpolation gives
    assert percentile(values, 75) == 30
    assert percentile(values, 99) == 40
    assert percentile(values, 100) == 40  # the maximum


def test_integer_percentiles_of_a_hundred_values_are_exact() -> None:
    # p / 100 * n rounds up to 7.000000000000001 for p = 7: rank 8 instead of 7.
    hundred = list(range(1, 101))
    assert [percentile(hundred, p) for p in range(1, 101)] == hundred
    thousand = list(range(1, 1001))
    assert percentile(thousand, 1) == 10
    assert percentile(thousand, 99) == 990
    assert percentile(thousand, 99.9) == 999


@pytest.mark.parametrize("p", [-0.001, 100.001, float("nan"), float("inf")])
def test_percentile_outside_0_to_100_is_refused(p: float) -> None:
    with pytest.raises(ValueError, match="between 0 and 100"):
        percentile([1, 2, 3], p)


def test_percentile_of_nothing_is_refused() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)


async def test_benchmarks_use_the_same_percentile_without_loading_the_library() -> None:
    # A fresh interpreter: importing the workloads must not load trio or monte_trio into
    # the asyncio peers' clients (their peak RSS is reported), yet use this very function.
    script = (
        "import sys, benchmarks.workloads as w; "
        "print(w.percentile.__code__.co_filename); "
        "print(sorted(m for m in ('trio', 'monte_trio') if m in sys.modules)); "
        "print(w.percentile(list(range(1, 101)), 7))"
    )
    with trio.fail_after(10):
        result = await trio.run_process(
            [sys.executable, "-c", script], cwd=ROOT, capture_stdout=True, capture_stderr=True
        )
    filename, loaded, p7 = out(result).splitlines()
    # The same source (the tests may run against an installed copy of the package).
    ours = await trio.Path(percentile.__code__.co_filename).read_bytes()
    assert await trio.Path(filename).read_bytes() == ours
    assert loaded == "[]"
    assert p7 == "7"
