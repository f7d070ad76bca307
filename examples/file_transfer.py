"""A resumable file transfer over a byte stream, checked with SHA-256.

Run the demo (a server and a client in one process, on 127.0.0.1)::

    python examples/file_transfer.py

It sends a file of random bytes but stops part-way, as an interrupted transfer would (it
half-closes after 1 MiB); then it sends the file again, on a new connection: the server
says how much it already holds and only the rest travels. Or run the two sides apart::

    python examples/file_transfer.py serve DIR --port 5000 [--client-key=KEY]
    python examples/file_transfer.py send 127.0.0.1:5000 FILE [--server-key=KEY]

``serve`` prints ``listening on HOST:PORT`` and ``public key: KEY`` (pin it with
``send --server-key=KEY``) and stores what it receives in ``DIR``; without
``--client-key`` it takes files from any client (with a warning). Ctrl-C or SIGTERM
stops it gracefully (exit status 130 or 0).

The protocol, on one :class:`monte_trio.Stream` per file (each header a 4-byte length,
then JSON):

1. the client sends ``{"name", "size", "sha256"}`` of the whole file;
2. the server answers ``{"have": N}``: the bytes of that file (same SHA-256) it kept from
   an earlier, interrupted transfer (0 at first);
3. the client sends the file from byte N on, then half-closes (``send_eof``);
4. the server appends them, checks the size and the SHA-256 of the whole file, and
   answers ``{"ok": true, "sha256": ...}`` (or ``{"ok": false, "error": ...}``, keeping
   the part it has for the next attempt when the file is only incomplete).

Flow control does the pacing: the client's ``send_all`` waits while the server's disk
writes are slower than the network, and the server never holds more than the stream's
window in memory. The exit status is 0 when the server confirmed the SHA-256, 1 on an
error, 130 if stopped with Ctrl-C.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import trio

import monte_trio

CHUNK = 256 * 1024  # bytes read from the file, or from the stream, at a time
MAX_HEADER = 4096  # bytes of JSON a header may hold
DEMO_SIZE = 3 * 1024 * 1024 + 12345  # the demo's file: a bit over 3 MiB
DEMO_GIVE_UP = 1024 * 1024  # the demo's first attempt stops after this many bytes


class TransferError(Exception):
    """The other side broke the protocol, or the transfer failed; the message says how."""


# -- headers: a 4-byte length, then JSON ---------------------------------------------------


async def send_header(stream: monte_trio.Stream, header: dict[str, Any]) -> None:
    body = json.dumps(header).encode()
    await stream.send_all(len(body).to_bytes(4, "big") + body)


async def receive_exactly(stream: monte_trio.Stream, size: int) -> bytes:
    """``size`` bytes (never more: ``receive_some`` is asked for what is missing)."""
    data = b""
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            raise TransferError(f"the stream ended {size - len(data)} bytes into a header")
        data += chunk
    return data


async def receive_header(stream: monte_trio.Stream) -> dict[str, Any]:
    size = int.from_bytes(await receive_exactly(stream, 4), "big")
    if size > MAX_HEADER:
        raise TransferError(f"a header of {size} bytes (at most {MAX_HEADER})")
    header = json.loads(await receive_exactly(stream, size))
    if not isinstance(header, dict):
        raise TransferError("a header that is not a JSON object")
    return header


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file (blocking: run it in a thread)."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# -- the server ------------------------------------------------------------------------------


class FileReceiver:
    """A ``stream_handler`` that stores each file sent to it in ``directory``.

    An unfinished file waits in ``directory/.partial/SHA256``, named by the SHA-256 of
    the whole file (so a resumed transfer continues only the same content) and is moved
    to its name once complete and checked.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.partial = directory / ".partial"
        self.partial.mkdir(parents=True, exist_ok=True)
        self.busy: dict[str, trio.Event] = {}  # files being received now, by SHA-256

    async def __call__(self, stream: monte_trio.Stream) -> None:
        try:
            await self.receive(stream)
        except (TransferError, ValueError, KeyError) as exc:  # a client breaking the rules
            print(f"server: refused a transfer: {exc}", flush=True)
            await stream.reset()
        except trio.BrokenResourceError:  # the client gave up, or its connection was lost
            pass

    async def receive(self, stream: monte_trio.Stream) -> None:
        offer = await receive_header(stream)
        name, size, sha256 = str(offer["name"]), int(offer["size"]), str(offer["sha256"])
        # Never trust a name from the network: a bare file name, no path, nothing hidden.
        if Path(name).name != name or name.startswith(".") or not name:
            raise TransferError(f"the name {name!r} is not a plain file name")
        if not re.fullmatch(r"[0-9a-f]{64}", sha256) or size < 0:
            raise TransferError("the offer's size or SHA-256 is malformed")
        # The same file from another stream (an earlier attempt whose end has not been
        # seen yet, say): wait for it to end, then resume after what it stored.
        with trio.move_on_after(10):
            while sha256 in self.busy:
                await self.busy[sha256].wait()
        if sha256 in self.busy:
            await send_header(stream, {"ok": False, "error": "already being received"})
            return
        self.busy[sha256] = done = trio.Event()
        try:
            await self.append(stream, name, size, sha256)
        finally:
            del self.busy[sha256]
            done.set()

    async def append(self, stream: monte_trio.Stream, name: str, size: int, sha256: str) -> None:
        part = trio.Path(self.partial / sha256)
        have = (await part.stat()).st_size if await part.exists() else 0
        if have > size:  # not a prefix of this file after all: start again
            await part.unlink()
            have = 0
        await send_header(stream, {"have": have})
        async with await trio.open_file(part, "ab") as file:
            try:
                while data := await stream.receive_some(CHUNK):
                    if have + len(data) > size:
                        raise TransferError(f"more than the {size} bytes offered for {name}")
                    await file.write(data)
                    have += len(data)
            finally:
                # Whatever happens, what arrived is on disk for the next attempt.
                await file.flush()
        if have < size:
            print(f"server: {name}: incomplete, kept {have:,} of {size:,} bytes", flush=True)
            await send_header(stream, {"ok": False, "have": have, "error": "incomplete"})
            return
        actual = await trio.to_thread.run_sync(sha256_of, Path(part))
        if actual != sha256:
            await part.unlink()  # not the file that was offered: nothing worth keeping
            await send_header(stream, {"ok": False, "error": "the SHA-256 differs"})
            return
        await part.rename(self.directory / name)
        print(f"server: {name}: complete, {size:,} bytes, SHA-256 verified", flush=True)
        await send_header(stream, {"ok": True, "sha256": actual})


# -- the client ------------------------------------------------------------------------------


async def send_file(
    client: monte_trio.Client, path: Path, *, give_up_after: int | None = None
) -> str | None:
    """Send ``path`` (the part the server does not hold yet); return its SHA-256 once the
    server confirmed it. With ``give_up_after``, stop after sending that many bytes (the
    demo's interruption: the server keeps them) and return ``None``."""
    size = (await trio.Path(path).stat()).st_size
    sha256 = await trio.to_thread.run_sync(sha256_of, path)
    async with await client.open_stream() as stream:
        await send_header(stream, {"name": path.name, "size": size, "sha256": sha256})
        answer = await receive_header(stream)
        if "have" not in answer:
            raise TransferError(f"the server refused {path.name}: {answer.get('error')}")
        have = int(answer["have"])
        if have:
            print(f"client: the server already has {have:,} bytes; sending the remaining "
                  f"{size - have:,}", flush=True)  # fmt: skip
        sent = 0
        async with await trio.open_file(path, "rb") as file:
            await file.seek(have)
            while data := await file.read(CHUNK):
                if give_up_after is not None and sent + len(data) > give_up_after:
                    print(f"client: stopping after {sent:,} bytes", flush=True)
                    break
                await stream.send_all(data)
                sent += len(data)
        await stream.send_eof()
        result = await receive_header(stream)
    if give_up_after is not None and result.get("error") == "incomplete":
        return None
    if not result.get("ok") or result.get("sha256") != sha256:
        raise TransferError(f"the server did not confirm {path.name}: {result.get('error')}")
    print(f"client: {path.name}: the server holds it, SHA-256 {sha256}", flush=True)
    return sha256


# -- running it ------------------------------------------------------------------------------


async def demo() -> int:
    """A server and a client on loopback: an interrupted transfer, then its resumption."""
    trust = monte_trio.AcceptAnyKey()  # for the demo; pin keys in real use
    with tempfile.TemporaryDirectory(prefix="file-transfer-") as tmp:
        source = Path(tmp) / "example.bin"
        source.write_bytes(os.urandom(DEMO_SIZE))
        received = Path(tmp) / "received"
        server = monte_trio.Server(
            None, stream_handler=FileReceiver(received), trust=trust
        )  # no handler: a server of streams only
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(server.serve, 0, "127.0.0.1")
            port = listeners[0].socket.getsockname()[1]
            print(f"client: sending {source.name} ({DEMO_SIZE:,} bytes)", flush=True)
            async with monte_trio.open_client("127.0.0.1", port, trust=trust) as client:
                await send_file(client, source, give_up_after=DEMO_GIVE_UP)
            async with monte_trio.open_client("127.0.0.1", port, trust=trust) as client:
                await send_file(client, source)  # a new connection: it resumes
            await server.shutdown()
        same = (received / source.name).read_bytes() == source.read_bytes()
        print(f"demo: the received file is {'identical' if same else 'DIFFERENT'}", flush=True)
        return 0 if same else 1


async def serve(directory: Path, port: int, client_keys: list[str]) -> int:
    identity = monte_trio.Identity.generate()
    trust: monte_trio.TrustPolicy
    if client_keys:
        trust = monte_trio.PinnedKeys(client_keys)
    else:
        print("warning: no --client-key: taking files from any client", file=sys.stderr)
        trust = monte_trio.AcceptAnyKey()
    server = monte_trio.Server(
        None, stream_handler=FileReceiver(directory), identity=identity, trust=trust
    )
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(server.serve, port, "127.0.0.1")
            host, real_port = listeners[0].socket.getsockname()[:2]
            print(f"listening on {host}:{real_port}", flush=True)
            print(f"public key: {identity.public_key}", flush=True)
            stopped_by: int = signal.SIGTERM
            async for signum in signals:
                stopped_by = signum
                break
            await server.shutdown()
    return 130 if stopped_by == signal.SIGINT else 0


async def send(address: str, path: Path, server_key: str | None) -> int:
    host, _, port = address.rpartition(":")
    trust: monte_trio.TrustPolicy
    if server_key is not None:
        trust = monte_trio.PinnedKeys([server_key])
    else:
        print("warning: no --server-key: sending to any server", file=sys.stderr)
        trust = monte_trio.AcceptAnyKey()
    async with monte_trio.open_client(host, int(port), trust=trust) as client:
        await send_file(client, path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A resumable file transfer over a stream.")
    commands = parser.add_subparsers(dest="command")
    serving = commands.add_parser("serve", help="receive files into a directory")
    serving.add_argument("directory", type=Path)
    serving.add_argument("--port", type=int, default=5000, help="0 picks a free port")
    serving.add_argument("--client-key", action="append", default=[], metavar="KEY")
    sending = commands.add_parser("send", help="send a file")
    sending.add_argument("address", metavar="HOST:PORT")
    sending.add_argument("file", type=Path)
    sending.add_argument("--server-key", metavar="KEY", help="write --server-key=KEY")
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return trio.run(serve, args.directory, args.port, args.client_key)
        if args.command == "send":
            return trio.run(send, args.address, args.file, args.server_key)
        return trio.run(demo)
    except (monte_trio.MonteError, TransferError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
