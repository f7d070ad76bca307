"""Hardening of trust policies and key files (issue 9, item 8), through public behaviour.

Real servers and clients on 127.0.0.1, known-keys files shared by processes, and a hostile
server crafted from the sans-IO modules under ``monte_trio._proto``.
"""

from __future__ import annotations

import functools
import logging
import os
import struct
import subprocess
import sys
import time
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
import trio
from helpers import LOCALHOST, echo, running_server

from monte_trio import (
    AcceptAnyKey,
    HandshakeError,
    Identity,
    KnownKeysFile,
    NativeHandshake,
    PeerRejected,
    PinnedKeys,
    PublicKey,
    Server,
    TrustPolicy,
    open_client,
)
from monte_trio._proto import _native_hello as wire
from monte_trio._proto import _wire2 as wire2
from monte_trio._proto._noise import HandshakeState
from monte_trio._util import escape_peer_text

SERVER = "example.com:4433"


def data_lines(path: Path) -> list[str]:
    """The non-comment, non-blank lines of a known-keys file."""
    return [
        line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]


def serving(
    identity: Identity, trust: TrustPolicy, port: int = 0
) -> AbstractAsyncContextManager[tuple[Server, int]]:
    """A native server on 127.0.0.1 (``port``, or a free one); yields ``(server, port)``."""
    return running_server(echo, NativeHandshake(identity, trust=trust), port=port)


async def call(port: int, identity: Identity, trust: TrustPolicy) -> bytes:
    """Dial 127.0.0.1:``port`` and make one call."""
    async with open_client(LOCALHOST, port, identity=identity, trust=trust) as client:
        return await client.request(b"hello")


# --- known-keys checks are O(1): parse once, parse again only when the file changes ------


async def test_checks_parse_the_file_once_and_again_only_when_it_changes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "known"
    keys = [PublicKey(os.urandom(32)) for _ in range(20_000)]
    # One damaged line: each parse logs exactly one warning, a public way to count parses.
    path.write_text("damaged line\n" + "".join(f"{key} client:*\n" for key in keys))
    policy = KnownKeysFile(path)
    with caplog.at_level(logging.WARNING, logger="monte_trio"):
        started = time.perf_counter()
        for i in range(500):
            await policy.verify(keys[(i * 7919) % len(keys)], peer=None)
        elapsed = time.perf_counter() - started
        assert len(caplog.records) == 1, "the file was parsed more than once"
        # Re-parsing 20,000 lines per check takes minutes for 500 checks; a parsed index
        # takes milliseconds. The bound is generous for a loaded machine.
        assert elapsed < 10
        # A change (appended by someone else) is seen at the next check.
        new = PublicKey(os.urandom(32))
        with path.open("a") as f:
            f.write(f"{new} client:*\n")
        await policy.verify(new, peer=None)
        assert len(caplog.records) == 2


# --- writes happen under an exclusive file lock, re-checked under it ----------------------

_RACER = r"""
import sys, trio
from monte_trio import KnownKeysFile, PeerRejected, PublicKey
key = PublicKey.parse(sys.argv[1])
print("ready", flush=True)
for line in sys.stdin:
    path, peer = line.split()
    try:
        trio.run(lambda: KnownKeysFile(path).verify(key, peer=peer))
        print("accepted", flush=True)
    except PeerRejected:
        print("refused", flush=True)
"""


def test_two_processes_never_both_learn_a_key_for_one_name(tmp_path: Path) -> None:
    trials = 15
    filler = "".join(f"{PublicKey(os.urandom(32))} *\n" for _ in range(2_000))
    paths = []
    for trial in range(trials):
        path = tmp_path / f"known{trial}"
        path.write_text(filler)  # an existing file: both processes append to it
        paths.append(path)
    keys = [str(Identity.generate().public_key) for _ in range(2)]
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, key],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for key in keys
    ]
    try:
        for racer in racers:
            assert racer.stdout is not None
            assert racer.stdout.readline() == "ready\n"
        for trial, path in enumerate(paths):
            peer = f"host{trial}.example:4433"
            for racer in racers:  # both start at once: the verify dominates the write
                assert racer.stdin is not None
                racer.stdin.write(f"{path} {peer}\n")
                racer.stdin.flush()
            outcomes = sorted(racer.stdout.readline().strip() for racer in racers)  # type: ignore[union-attr]
            # Exactly one key is learned for the name; the other process is refused.
            assert outcomes == ["accepted", "refused"], f"trial {trial}: {outcomes}"
            recorded = [line for line in data_lines(path) if line.endswith(peer)]
            assert len(recorded) == 1, f"trial {trial}: {recorded}"
    finally:
        for racer in racers:
            assert racer.stdin is not None
            racer.stdin.close()
        for racer in racers:
            racer.wait(timeout=20)
            assert racer.stdout is not None
            racer.stdout.close()
    assert [racer.returncode for racer in racers] == [0, 0]


# --- learning is capped -------------------------------------------------------------------


async def test_learning_stops_at_max_entries(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "known"
    policy = KnownKeysFile(path, max_entries=3)
    learned = [Identity.generate().public_key for _ in range(3)]
    for key in learned:
        await policy.verify(key, peer=None)
    with caplog.at_level(logging.WARNING, logger="monte_trio"):
        for _ in range(3):
            with pytest.raises(PeerRejected, match=r"max_entries=3\), and learns no more"):
                await policy.verify(Identity.generate().public_key, peer=None)
            with pytest.raises(PeerRejected, match="max_entries=3"):
                await policy.verify(Identity.generate().public_key, peer=SERVER)
    assert [r.levelname for r in caplog.records] == ["WARNING"]  # logged once, not per key
    assert "max_entries=3" in caplog.text
    for key in learned:  # known keys are still accepted
        await policy.verify(key, peer=None)
    assert len(data_lines(path)) == 3
    with pytest.raises(ValueError, match="max_entries"):
        KnownKeysFile(path, max_entries=-1)
    assert KnownKeysFile(path).max_entries == 10_000


# --- names are validated whatever path records them ---------------------------------------


async def test_open_client_with_connect_never_damages_the_known_keys_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "known"
    server_identity = Identity.generate()
    async with serving(server_identity, AcceptAnyKey()) as (_, port):

        async def connect() -> trio.abc.Stream:
            return await trio.open_tcp_stream(LOCALHOST, port)

        with trio.fail_after(10):
            # No host and port: the peer has no "host:port" name to record a key under.
            with pytest.raises(PeerRejected, match="records servers by address"):
                async with open_client(connect=connect, trust=KnownKeysFile(path)):
                    pass  # pragma: no cover
            assert not path.exists()
            # With a host and port, connect= works and records that name.
            async with open_client(
                LOCALHOST, port, connect=connect, trust=KnownKeysFile(path)
            ) as client:
                assert await client.request(b"x") == b"x"
            # Every later check of the file works.
            assert await call(port, Identity.generate(), KnownKeysFile(path)) == b"hello"
    assert data_lines(path) == [f"{server_identity.public_key} {LOCALHOST}:{port}"]


# --- the chat scenario: one tofu file per peer, each peer both server and client ----------


async def test_chat_peers_with_tofu_refuse_an_impersonator_in_both_directions(
    tmp_path: Path,
) -> None:
    # Like examples/chat.py --trust tofu:FILE: each peer serves and dials the other with one
    # identity and one known-keys file.
    alice, bob, mallory = Identity.generate(), Identity.generate(), Identity.generate()
    alice_trust = KnownKeysFile(tmp_path / "alice_known")
    bob_trust = KnownKeysFile(tmp_path / "bob_known")
    with trio.fail_after(20):
        async with serving(alice, alice_trust) as (_, alice_port):
            async with serving(bob, bob_trust) as (_, bob_port):
                # First contact, both ways. Whoever dials first, each peer's server has
                # learned the other's key as a client's before or after its client dials.
                assert await call(alice_port, bob, bob_trust) == b"hello"
                assert await call(bob_port, alice, alice_trust) == b"hello"
                assert await call(alice_port, bob, bob_trust) == b"hello"
            # Bob is gone; Mallory listens on his address with her own key.
            async with serving(mallory, AcceptAnyKey(), bob_port):
                with pytest.raises(PeerRejected, match="man-in-the-middle"):
                    await call(bob_port, alice, alice_trust)
        # Alice is gone; Mallory listens on her address.
        async with serving(mallory, AcceptAnyKey(), alice_port):
            with pytest.raises(PeerRejected, match="man-in-the-middle"):
                await call(alice_port, bob, bob_trust)
        # The real peers are still accepted at their addresses.
        async with serving(bob, bob_trust, bob_port):
            assert await call(bob_port, alice, alice_trust) == b"hello"
    assert f"{bob.public_key} {LOCALHOST}:{bob_port}" in data_lines(tmp_path / "alice_known")
    assert f"{alice.public_key} {LOCALHOST}:{alice_port}" in data_lines(tmp_path / "bob_known")


# --- refusals: the peer learns the kind of policy, the details go to the log --------------


@pytest.mark.parametrize("kind", ["known-keys file", "pinned keys"])
async def test_refused_client_is_told_the_kind_of_policy_only(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "secret-dir" / "known_clients"
    path.parent.mkdir()
    known = [Identity.generate().public_key for _ in range(7)]
    path.write_text("".join(f"{key} client:*\n" for key in known))
    path.chmod(0o444)  # lockdown
    trust: TrustPolicy = KnownKeysFile(path) if kind == "known-keys file" else PinnedKeys(known)
    stranger = Identity.generate()
    with trio.fail_after(10), caplog.at_level(logging.INFO, logger="monte_trio"):
        async with serving(Identity.generate(), trust) as (_, port):
            with pytest.raises(PeerRejected) as info:
                await call(port, stranger, AcceptAnyKey())
    message = str(info.value)
    assert message == (
        f"the server refused our key {stranger.public_key}: this server's trust policy "
        f"({kind}) does not accept it"
    )
    assert "secret-dir" not in message
    assert "7" not in message.replace(str(stranger.public_key), "")
    # The refusing side logs the details.
    server_log = caplog.text
    assert str(stranger.public_key) in server_log
    assert (str(path) if kind == "known-keys file" else "7 pinned") in server_log


# --- a hostile server's verdict reason is escaped before it reaches a message -------------

_U16 = struct.Struct(">H")


async def _receive_exactly(stream: trio.SocketStream, buffer: bytearray, n: int) -> bytes:
    while len(buffer) < n:
        data = await stream.receive_some(65536)
        if not data:
            raise AssertionError("the client closed the connection early")
        buffer += data
    chunk = bytes(buffer[:n])
    del buffer[:n]
    return chunk


async def _refuse_with(stream: trio.SocketStream, reason: bytes) -> None:
    """Play a native server up to the verdict, and refuse the client with ``reason``."""
    buffer = bytearray()
    preamble = await _receive_exactly(stream, buffer, wire.PREAMBLE_SIZE)
    name = wire.protocol_name(psk=False)
    state = HandshakeState(
        name,
        initiator=False,
        prologue=wire2.prologue(name, preamble),
        s=Identity.generate().private_bytes(),
        psks=[],
    )
    (length,) = _U16.unpack(await _receive_exactly(stream, buffer, 2))
    state.read_message(await _receive_exactly(stream, buffer, length))
    msg2 = state.write_message(wire2.Hello2().encode())
    await stream.send_all(wire.encode_preamble(wire.Status.OK) + _U16.pack(len(msg2)) + msg2)
    (length,) = _U16.unpack(await _receive_exactly(stream, buffer, 2))
    client_hello = wire2.Hello2.decode(
        state.read_message(await _receive_exactly(stream, buffer, length))
    )
    initiator_to_responder, responder_to_initiator = state.split()
    sealer, _ = wire.transport(
        responder_to_initiator,
        initiator_to_responder,
        peer_max_record=client_hello.max_record_size,
        own_max_record=wire2.MAX_RECORD,
    )
    await stream.send_all(sealer.seal(bytes([wire.VERDICT_REFUSE]) + reason))
    await stream.receive_some(1)  # until the client closes


@pytest.mark.parametrize(
    "reason",
    [
        "\x1b[2J\x1b]0;pwned\x07 go away\r\nfake: line \u202e",
        "\x1b[2J" + "A" * 59_995,  # 60,000 bytes
    ],
    ids=["escapes", "60000-bytes"],
)
async def test_hostile_verdict_reason_is_escaped_and_bounded(reason: str) -> None:
    async def hostile(stream: trio.SocketStream) -> None:
        async with stream:
            await _refuse_with(stream, reason.encode())

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, hostile, 0, host=LOCALHOST)
            )
            port = listeners[0].socket.getsockname()[1]
            # Refused as PeerRejected (reason shown, escaped and cut), or as a protocol
            # error when the verdict is longer than the 1,024 bytes a reason may have.
            with pytest.raises(HandshakeError) as info:
                await call(port, Identity.generate(), AcceptAnyKey())
            nursery.cancel_scope.cancel()
    message = str(info.value)
    assert len(message) < 1_300
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or c == "\u202e" for c in message)
    if isinstance(info.value, PeerRejected):
        assert "\\x1b[2J" in message


def test_escape_peer_text() -> None:
    assert escape_peer_text("\x1b[2J") == "\\x1b[2J"
    assert escape_peer_text("a\tb\nc\rd\x00\x7f\x9b\u202e\u2028é日本 \\x") == (
        "a\\x09b\\x0ac\\x0dd\\x00\\x7f\\x9b\\u202e\\u2028é日本 \\x"
    )
    assert escape_peer_text(escape_peer_text("\x1b\U000f0000")) == "\\x1b\\U000f0000"
    long = escape_peer_text("\x1b" * 60_000)
    assert long.startswith("\\x1b" * 1024)
    assert long.endswith("... [cut at 1024 characters]")
    assert len(long) == 4 * 1024 + len("... [cut at 1024 characters]")
    assert escape_peer_text("plain text") == "plain text"
