"""Downloads over byte streams: the client names a resource, the server streams it back.

Run the demo (a server and a client in one process, on 127.0.0.1)::

    python examples/download.py

It downloads two files at once over one connection (a stream each), makes calls on the
same connection while they run, and asks for a file the server does not have. Or run the
two sides apart::

    python examples/download.py serve DIR --port 5000 [--client-key=KEY]
    python examples/download.py get 127.0.0.1:5000 NAME [--out FILE] [--server-key=KEY]

``serve`` prints ``listening on HOST:PORT`` and ``public key: KEY`` (pin it with
``get --server-key=KEY``) and serves the files of ``DIR`` (plain names only, nothing
hidden); Ctrl-C or SIGTERM stops it gracefully (exit status 130 or 0). ``get`` writes the
file to ``--out`` (default: NAME in the current directory).

The protocol, on one :class:`monte_trio.Stream` per download (each header a 4-byte
length, then JSON):

1. the client sends ``{"get": NAME}`` and half-closes (``send_eof``): it has nothing more
   to say;
2. the server answers ``{"size": N}`` (or ``{"error": ...}``), then the N bytes of the
   file as it reads them, then ``{"sha256": ...}`` of what it sent (computed on the way:
   the file is read once), then the end of the stream.

The client reads the bytes as they arrive and writes them out; flow control paces the
server to the client's disk and network, and the server holds at most a stream window of
it in memory. A failed download leaves no file behind. Exit status: 0 when every SHA-256
matched, 1 on an error, 130 if stopped with Ctrl-C.

(The wire also defines streaming calls, whose parts are messages rather than bytes; this
example needs only a byte stream.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import trio

import monte_trio

CHUNK = 256 * 1024  # bytes read from the file, or from the stream, at a time
MAX_HEADER = 4096  # bytes of JSON a header may hold


class DownloadError(Exception):
    """The download failed; the message says why."""


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
            raise DownloadError(f"the stream ended {size - len(data)} bytes early")
        data += chunk
    return data


async def receive_header(stream: monte_trio.Stream) -> dict[str, Any]:
    size = int.from_bytes(await receive_exactly(stream, 4), "big")
    if size > MAX_HEADER:
        raise DownloadError(f"a header of {size} bytes (at most {MAX_HEADER})")
    header = json.loads(await receive_exactly(stream, size))
    if not isinstance(header, dict):
        raise DownloadError("a header that is not a JSON object")
    return header


# -- the server ------------------------------------------------------------------------------


class FileServer:
    """A ``stream_handler`` that streams the files of ``directory`` to whoever asks."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def __call__(self, stream: monte_trio.Stream) -> None:
        try:
            request = await receive_header(stream)
            # The client half-closes after its request: read up to that end, so that
            # closing our side never cuts a client still finishing its request.
            if await stream.receive_some():
                raise DownloadError("the request went on after its header")
            await self.send(stream, str(request.get("get", "")))
        except (DownloadError, ValueError) as exc:  # a client breaking the rules
            print(f"server: refused a request: {exc}", flush=True)
            await stream.reset()
        except trio.BrokenResourceError:  # the client gave up, or its connection was lost
            pass

    async def send(self, stream: monte_trio.Stream, name: str) -> None:
        # Never trust a name from the network: a bare file name, no path, nothing hidden.
        path = trio.Path(self.directory / name)
        if Path(name).name != name or name.startswith(".") or not await path.is_file():
            await send_header(stream, {"error": f"no file named {name!r}"})
            return
        async with await trio.open_file(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size  # of the file as opened
            await send_header(stream, {"size": size})
            digest = hashlib.sha256()
            left = size
            while left > 0:
                data = await file.read(min(CHUNK, left))
                if not data:
                    raise DownloadError(f"{name} shrank while it was being sent")
                digest.update(data)
                await stream.send_all(data)  # waits while the client is slower
                left -= len(data)
        await send_header(stream, {"sha256": digest.hexdigest()})
        await stream.send_eof()


# -- the client ------------------------------------------------------------------------------


async def download(client: monte_trio.Client, name: str, out: Path) -> tuple[int, str]:
    """Download ``name`` into ``out``; return its size and SHA-256 (checked)."""
    async with await client.open_stream() as stream:
        await send_header(stream, {"get": name})
        await stream.send_eof()  # the request is complete
        answer = await receive_header(stream)
        if "size" not in answer:
            raise DownloadError(f"{name}: {answer.get('error', 'refused')}")
        size = int(answer["size"])
        digest = hashlib.sha256()
        partial = trio.Path(f"{out}.part")
        try:
            async with await trio.open_file(partial, "wb") as file:
                left = size
                while left > 0:
                    data = await stream.receive_some(min(CHUNK, left))
                    if not data:
                        raise DownloadError(f"{name}: the stream ended {left:,} bytes early")
                    digest.update(data)
                    await file.write(data)
                    left -= len(data)
            trailer = await receive_header(stream)
            if trailer.get("sha256") != digest.hexdigest():
                raise DownloadError(f"{name}: the SHA-256 differs from the server's")
            await partial.rename(out)
        finally:
            if await partial.exists():
                await partial.unlink()  # a failed download leaves nothing behind
    return size, digest.hexdigest()


# -- running it ------------------------------------------------------------------------------


async def demo() -> int:
    """A server and a client on loopback: two downloads at once, calls beside them."""
    trust = monte_trio.AcceptAnyKey()  # for the demo; pin keys in real use

    async def pong(request: monte_trio.Request) -> bytes:
        return b"pong"

    with tempfile.TemporaryDirectory(prefix="download-") as tmp:
        served, saved = Path(tmp) / "served", Path(tmp) / "saved"
        served.mkdir()
        saved.mkdir()
        files = {"notes.txt": b"streams carry bytes of any size\n" * 1000}
        files["data.bin"] = os.urandom(8 * 1024 * 1024)
        for name, content in files.items():
            (served / name).write_bytes(content)
        server = monte_trio.Server(pong, stream_handler=FileServer(served), trust=trust)
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(server.serve, 0, "127.0.0.1")
            port = listeners[0].socket.getsockname()[1]
            async with monte_trio.open_client("127.0.0.1", port, trust=trust) as client:
                results: dict[str, tuple[int, str]] = {}
                calls = 0

                async def fetch(name: str) -> None:
                    results[name] = await download(client, name, saved / name)

                async with trio.open_nursery() as downloads:
                    for name in files:
                        downloads.start_soon(fetch, name)
                    while len(results) < len(files):  # calls go on meanwhile
                        if await client.request(b"ping") == b"pong":
                            calls += 1
                for name, (size, sha256) in sorted(results.items()):
                    same = (saved / name).read_bytes() == files[name]
                    print(f"client: {name}: {size:,} bytes, SHA-256 {sha256[:16]}..., "
                          f"{'identical' if same else 'DIFFERENT'}", flush=True)  # fmt: skip
                print(f"client: {'some' if calls else 'no'} calls answered meanwhile",
                      flush=True)  # fmt: skip
                try:
                    await download(client, "missing.txt", saved / "missing.txt")
                except DownloadError as exc:
                    print(f"client: {exc}", flush=True)
            await server.shutdown()
        return 0


async def serve(directory: Path, port: int, client_keys: list[str]) -> int:
    identity = monte_trio.Identity.generate()
    trust: monte_trio.TrustPolicy
    if client_keys:
        trust = monte_trio.PinnedKeys(client_keys)
    else:
        print("warning: no --client-key: serving files to any client", file=sys.stderr)
        trust = monte_trio.AcceptAnyKey()
    server = monte_trio.Server(
        None, stream_handler=FileServer(directory), identity=identity, trust=trust
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


async def get(address: str, name: str, out: Path | None, server_key: str | None) -> int:
    host, _, port = address.rpartition(":")
    trust: monte_trio.TrustPolicy
    if server_key is not None:
        trust = monte_trio.PinnedKeys([server_key])
    else:
        print("warning: no --server-key: downloading from any server", file=sys.stderr)
        trust = monte_trio.AcceptAnyKey()
    async with monte_trio.open_client(host, int(port), trust=trust) as client:
        size, sha256 = await download(client, name, out or Path(Path(name).name))
    print(f"{name}: {size:,} bytes, SHA-256 {sha256}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Downloads over byte streams.")
    commands = parser.add_subparsers(dest="command")
    serving = commands.add_parser("serve", help="serve the files of a directory")
    serving.add_argument("directory", type=Path)
    serving.add_argument("--port", type=int, default=5000, help="0 picks a free port")
    serving.add_argument("--client-key", action="append", default=[], metavar="KEY")
    getting = commands.add_parser("get", help="download a file")
    getting.add_argument("address", metavar="HOST:PORT")
    getting.add_argument("name")
    getting.add_argument("--out", type=Path, default=None, help="default: NAME, here")
    getting.add_argument("--server-key", metavar="KEY", help="write --server-key=KEY")
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return trio.run(serve, args.directory, args.port, args.client_key)
        if args.command == "get":
            return trio.run(get, args.address, args.name, args.out, args.server_key)
        return trio.run(demo)
    except (monte_trio.MonteError, DownloadError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
