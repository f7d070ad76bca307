"""The ``monte-trio`` command line, run as real subprocesses on loopback.

Every subprocess is bounded by ``trio.fail_after`` and killed (and reaped) on the way out,
so a failing test leaves no process behind.
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
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from conftest import Proc

from monte_trio import Identity, PublicKey

CLI = [sys.executable, "-m", "monte_trio"]
LISTENING = re.compile(r"^listening on 127\.0\.0\.1:(\d+)$")
SUMMARY = re.compile(
    r"server stopped: (\d+) connections, (\d+) requests, (\d+) one-way messages, "
    r"(\d+) failed handshakes"
)


@asynccontextmanager
async def spawn(*args: str) -> AsyncIterator[Proc]:
    process = await trio.lowlevel.open_process(
        [*CLI, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        yield Proc(process)
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            for pipe in (process.stdin, process.stdout, process.stderr):
                if pipe is not None:
                    await pipe.aclose()


async def run_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    """Run the CLI to completion (at most 10 s; it is killed on timeout)."""
    with trio.fail_after(10):
        return await trio.run_process(
            [*CLI, *args], capture_stdout=True, capture_stderr=True, check=False
        )


def out(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stdout.decode()


def err(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stderr.decode()


def assert_clean_error(result: subprocess.CompletedProcess[bytes], *fragments: str) -> None:
    """Exit status 1 and one ``monte-trio: error:`` line on stderr mentioning ``fragments``."""
    stderr = err(result)
    assert result.returncode == 1, (out(result), stderr)
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("monte-trio: error: ")]
    assert len(errors) == 1, stderr
    for fragment in fragments:
        assert fragment in errors[0], stderr


async def stop(server: Proc, signum: int = signal.SIGINT) -> tuple[str, str]:
    """Signal the server, wait for it to exit 0 and return (rest of stdout, stderr)."""
    server.process.send_signal(signum)
    with trio.fail_after(10):
        rest = await server.read_rest()
        stderr = await server.read_stderr()
        code = await server.process.wait()
    assert code == 0, (rest, stderr)
    return rest, stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- keygen ----------------------------------------------------------------------------------


async def test_keygen_writes_a_private_file_and_prints_the_key(tmp_path: Path) -> None:
    path = tmp_path / "id.key"
    result = await run_cli("keygen", str(path))
    assert result.returncode == 0, err(result)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = PublicKey.parse(out(result).split()[-1])
    assert Identity.load(path).public_key == key

    again = await run_cli("keygen", str(path))
    assert_clean_error(again, "already exists", "--force")
    assert Identity.load(path).public_key == key  # untouched

    forced = await run_cli("keygen", str(path), "--force")
    assert forced.returncode == 0, err(forced)
    new_key = PublicKey.parse(out(forced).split()[-1])
    assert new_key != key
    assert Identity.load(path).public_key == new_key


async def test_keygen_with_a_passphrase(tmp_path: Path) -> None:
    (tmp_path / "pass").write_bytes(b"correct horse\n")
    path = tmp_path / "id.key"
    result = await run_cli("keygen", str(path), "--passphrase-file", str(tmp_path / "pass"))
    assert result.returncode == 0, err(result)
    key = PublicKey.parse(out(result).split()[-1])
    assert Identity.load(path, passphrase=b"correct horse").public_key == key


# -- serve and bench -------------------------------------------------------------------------


@pytest.mark.parametrize("wire", ["monte-v1", "native"])
async def test_serve_and_bench_every_mode(wire: str) -> None:
    # native: the CLI's defaults (no --profile, a fresh key, --trust any with a warning).
    options = ["--profile", "monte-v1"] if wire == "monte-v1" else []
    async with spawn("serve", "--port", "0", *options) as server:
        with trio.fail_after(10):
            match = LISTENING.match(await server.readline())
            assert match is not None, server.seen
            port = match.group(1)
            if wire == "native":
                PublicKey.parse(re.sub(r"^public key: ", "", await server.readline()))
        for mode in ["request", "send", "send-nowait"]:
            result = await run_cli(
                "bench", f"127.0.0.1:{port}", *options, "--mode", mode,
                "-n", "200", "--concurrency", "8", "--size", "1000",
            )  # fmt: skip
            assert result.returncode == 0, (out(result), err(result))
            assert "msgs/s" in out(result)
            assert "MB/s" in out(result)
            assert "Traceback" not in err(result)
            verified = "every reply verified" if mode == "request" else "delivery verified"
            assert f"bench {mode} ok: {verified}" in out(result)
        rest, stderr = await stop(server)
    summary = SUMMARY.search(rest)
    assert summary is not None, rest
    connections, requests, messages, failures = map(int, summary.groups())
    assert connections >= 3
    assert requests >= 200 + 2  # plus one delivery check per connection of the send modes
    assert messages == 400
    assert failures == 0
    if wire == "native":
        assert "clients are not authenticated" in stderr
    else:
        assert "monte-v1 authenticates nobody" in stderr


async def test_native_pinning_and_psk(tmp_path: Path) -> None:
    psk = os.urandom(32)
    (tmp_path / "psk.bin").write_bytes(psk)
    (tmp_path / "psk.hex").write_text(psk.hex() + "\n")
    (tmp_path / "other.hex").write_text(os.urandom(32).hex())
    keygen = await run_cli("keygen", str(tmp_path / "server.key"))
    server_key = out(keygen).split()[-1]
    wrong_key = str(Identity.generate().public_key)

    async with spawn(
        "serve", "--identity", str(tmp_path / "server.key"), "--psk", str(tmp_path / "psk.hex")
    ) as server:
        with trio.fail_after(10):
            match = LISTENING.match(await server.readline())
            assert match is not None, server.seen
            assert await server.readline() == f"public key: {server_key}"
        address = f"127.0.0.1:{match.group(1)}"

        pinned = await run_cli(
            "bench", address, "--trust", f"pin:{server_key}", "--psk", str(tmp_path / "psk.bin"),
            "-n", "100", "--concurrency", "4",
        )  # fmt: skip
        assert pinned.returncode == 0, (out(pinned), err(pinned))
        assert "bench request ok" in out(pinned)
        assert "warning" not in err(pinned)

        mismatch = await run_cli(
            "bench", address, "--trust", f"pin:{wrong_key}", "--psk", str(tmp_path / "psk.bin"),
            "-n", "10",
        )  # fmt: skip
        assert_clean_error(mismatch, server_key, "not one of the 1 pinned key")

        wrong_psk = await run_cli(
            "bench", address, "--trust", "any", "--psk", str(tmp_path / "other.hex"), "-n", "10"
        )
        assert_clean_error(wrong_psk)

        old_profile = await run_cli("bench", address, "--profile", "monte-v1", "-n", "10")
        assert_clean_error(old_profile, "handshake")

        rest, _ = await stop(server, signal.SIGTERM)
    summary = SUMMARY.search(rest)
    assert summary is not None, rest
    assert int(summary.group(4)) >= 2  # at least the wrong psk and the monte-v1 client


async def test_bench_stops_promptly_on_sigint() -> None:
    async with spawn("serve", "--profile", "monte-v1") as server:
        with trio.fail_after(10):
            match = LISTENING.match(await server.readline())
            assert match is not None, server.seen
        for mode in ["request", "send-nowait"]:
            async with spawn(
                "bench", f"127.0.0.1:{match.group(1)}", "--profile", "monte-v1",
                "--mode", mode, "-n", "100000000",
            ) as bench:  # fmt: skip
                with trio.fail_after(10):
                    assert (await bench.readline()).startswith(f"bench {mode}:")
                    await trio.sleep(0.3)  # well under way
                    bench.process.send_signal(signal.SIGINT)
                    rest = await bench.read_rest()
                    stderr = await bench.read_stderr()
                    assert await bench.process.wait() == 130, (rest, stderr)
                assert "monte-trio: SIGINT: interrupted" in stderr
                assert "Traceback" not in stderr
        await stop(server)


@pytest.mark.parametrize("wire", ["monte-v1", "native"])
async def test_demo(wire: str) -> None:
    result = await run_cli("demo", "--profile", wire)
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


async def test_bench_against_nothing_is_a_clean_error() -> None:
    result = await run_cli("bench", f"127.0.0.1:{free_port()}", "--profile", "monte-v1")
    assert_clean_error(result, "could not connect")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "--psk", "{short}"], "32 raw bytes or 64 hexadecimal characters"),
        (["bench", "127.0.0.1:1", "--psk", "{short}"], "32 raw bytes"),
        (["serve", "--psk", "{missing}"], "cannot read it"),
        (["serve", "--profile", "monte-v1", "--trust", "any"], "only for the native profile"),
        (["serve", "--trust", "pin:nonsense"], "--trust"),
        (["serve", "--trust", "maybe"], "unknown trust policy"),
        (["bench", "localhost"], "expected HOST:PORT"),
        (["bench", "127.0.0.1:1", "--mode", "fast"], "invalid choice"),
        (["frobnicate"], "invalid choice"),
    ],
)
async def test_bad_usage_exits_2(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "short").write_bytes(b"0123456789")
    paths = {"short": str(tmp_path / "short"), "missing": str(tmp_path / "missing")}
    result = await run_cli(*(arg.format(**paths) for arg in args))
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
