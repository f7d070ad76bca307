"""A standalone mutation fuzzer for monte_trio's sans-IO decoders and handshakes.

Usage::

    python tests/fuzz_target.py --seconds 60 [--seed N] [--target NAME ...] [--list]

Each target takes one input (bytes) and feeds it to a decoder or state machine, checking
that only the documented exceptions escape and that the documented invariants hold (for
example: a record opener only ever yields authentic plaintexts, in order; a codec never
returns a message larger than its limit). Inputs are seeded from valid wire data (sealed
records, encoded frames, real handshake messages) and mutated; an input whose outcome was
not seen before is kept in the corpus, a cheap stand-in for coverage feedback. Every target
is deterministic in its input (fixed keys; chunking is derived from the input), so the hex
printed on a failure reproduces it with ``--reproduce TARGET HEX``.

Exit status: 0 if nothing undocumented happened, 1 on the first failure (after printing the
target, the traceback and the input in hex), 2 on bad arguments. atheris is not used.
"""

from __future__ import annotations

import argparse
import random
import re
import struct
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence

import attrs
import trio
import trio.testing

from monte_trio import (
    AcceptAnyKey,
    ConnectionConfig,
    HandshakeError,
    Identity,
    MonteV1Handshake,
    NoiseHandshake,
    RemoteProtocolError,
)
from monte_trio._proto import _native as wire
from monte_trio._proto._frames import FrameKind, MonteV1Codec
from monte_trio._proto._monte_v1 import MonteV1HandshakeState
from monte_trio._proto._noise import HandshakeState
from monte_trio._proto._records import (
    MONTE_V1_NONCE,
    NOISE_AESGCM_NONCE,
    NOISE_CHACHAPOLY_NONCE,
    NonceFormat,
    RecordOpener,
    RecordSealer,
)

__all__ = ["TARGETS", "FuzzFailure", "Target", "main", "run"]

KEY = bytes(range(32))
MAX_RECORD = 512
PLAINTEXTS = [b"", b"a", b"hello world", bytes(100), bytes(range(256)), b"x" * 496, b"end"] * 3
"""What every record seed carries, in order: an opener may only ever yield a prefix of it."""
REKEY_CHOICES: list[int | None] = [None, 1, 2, 5]
PSK = bytes(range(100, 132))
STATIC_I, STATIC_R = bytes([1] * 32), bytes([2] * 32)
EPHEMERAL_I, EPHEMERAL_R = bytes([3] * 32), bytes([4] * 32)
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


class Invariant(AssertionError):
    """A documented invariant was broken (always a failure)."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise Invariant(message)


def chunks(data: bytes, seed: int) -> list[bytes]:
    """Split ``data`` into pieces whose sizes are derived from ``seed`` (deterministic)."""
    rng = random.Random(seed)
    pieces = []
    pos = 0
    while pos < len(data):
        size = rng.choice((1, 2, 3, 4, 5, 7, 16, 31, 100, 517, 4096))
        pieces.append(data[pos : pos + size])
        pos += size
    return pieces


def short_frames(data: bytes) -> list[bytes]:
    """Split ``data`` into plaintexts framed as ``u8 length | bytes`` (last one may be cut)."""
    out = []
    pos = 0
    while pos < len(data):
        n = data[pos]
        out.append(data[pos + 1 : pos + 1 + n])
        pos += 1 + n
    return out


def join_short_frames(plaintexts: Sequence[bytes]) -> bytes:
    return b"".join(bytes([len(p)]) + p for p in plaintexts)


# ---------------------------------------------------------------------------------------
# Targets: each returns an outcome label, raises an allowed exception, or fails
# ---------------------------------------------------------------------------------------


def _records_target(fmt: NonceFormat, rekey_allowed: bool) -> Callable[[bytes], str]:
    def target(data: bytes) -> str:
        if len(data) < 2:
            return "short"
        rekey = REKEY_CHOICES[data[1] % len(REKEY_CHOICES)] if rekey_allowed else None
        opener = RecordOpener(KEY, fmt, max_record_size=MAX_RECORD, rekey_interval=rekey)
        got: list[bytes] = []
        try:
            for piece in [*chunks(data[2:], data[0]), b""]:
                got.extend(opener.receive_data(piece))
        except RemoteProtocolError as exc:
            check(got == PLAINTEXTS[: len(got)], "unauthentic record before the error")
            for later in (b"\x00", b""):
                try:
                    opener.receive_data(later)
                except RemoteProtocolError as again:
                    check(again is exc, "a broken opener raised a different error")
                else:
                    raise Invariant("a broken opener accepted more data") from None
            raise
        check(got == PLAINTEXTS[: len(got)], "the opener yielded unauthentic records")
        check(opener.buffered == 0, "bytes left buffered after a clean end of stream")
        return f"ok:{len(got)}"

    return target


def _record_seeds(fmt: NonceFormat, rekey_allowed: bool) -> list[bytes]:
    seeds = []
    for i, rekey in enumerate(REKEY_CHOICES if rekey_allowed else [None]):
        sealer = RecordSealer(KEY, fmt, max_record_size=MAX_RECORD, rekey_interval=rekey)
        sealed = sealer.seal_many(list(PLAINTEXTS))
        for chunk_seed in (0, 1, 7):
            seeds.append(bytes([chunk_seed, i]) + sealed)
        seeds.append(bytes([3, i]) + sealed[: len(sealed) // 2])
    return seeds


def monte_v1_codec_target(data: bytes) -> str:
    if not data:
        return "empty"
    codec = MonteV1Codec(initiator=bool(data[0] & 1), max_record_size=4096)
    kinds = Counter[str]()
    for plaintext in short_frames(data[1:]):
        kind, ident, payload = codec.decode(plaintext)
        check(kind in (FrameKind.ONEWAY, FrameKind.REQUEST, FrameKind.REPLY), "bad kind")
        check(payload == plaintext[4:], "payload is not the record after the seq")
        check(ident == _U32.unpack_from(plaintext)[0], "id is not the seq")
        kinds[FrameKind(kind).name] += 1
    return "ok:" + ",".join(sorted(kinds))


def _monte_v1_codec_seeds() -> list[bytes]:
    out: list[bytes | None] = []
    codec = MonteV1Codec(initiator=True, max_record_size=4096)
    for kind, ident in ((0, 0), (1, 1), (2, 2), (1, 3)):
        codec.encode(kind, ident, b"payload %d" % ident, out)
    return [b"\x01" + join_short_frames([p for p in out if p is not None])]


def _native_limit(byte: int) -> int:
    return 1 + byte * 4


def native_codec_target(data: bytes) -> str:
    if not data:
        return "empty"
    limit = _native_limit(data[0])
    codec = wire.NativeCodec(max_record_size=1024, send_limit=1 << 20, receive_limit=limit)
    frames = 0
    for plaintext in short_frames(data[1:]):
        frame = codec.decode(plaintext)
        if frame is None:
            continue
        kind, _, payload = frame
        check(kind <= FrameKind.GOAWAY, f"unknown kind {kind} decoded")
        check(len(payload) <= limit, f"message of {len(payload)} bytes > limit {limit}")
        frames += 1
    return f"ok:{min(frames, 3)}"


def _native_codec_seeds() -> list[bytes]:
    out: list[bytes | None] = []
    codec = wire.NativeCodec(max_record_size=16 + 6 + 20, send_limit=1 << 20, receive_limit=1000)
    codec.encode(FrameKind.REQUEST, 1, bytes(range(90)), out)
    codec.encode(FrameKind.PING, 7, b"12345678", out)
    codec.encode(FrameKind.REPLY, 2, b"", out)
    codec.encode(FrameKind.GOAWAY, 9, b"", out)
    records = [p for p in out if p is not None]
    return [bytes([255]) + join_short_frames(records), bytes([10]) + join_short_frames(records)]


def native_codec_roundtrip_target(data: bytes) -> str:
    """Encode frames described by ``data``, then decode them: they must come back whole."""
    if len(data) < 2:
        return "short"
    # room for a whole control frame in one record: control frames are never split
    record = 16 + wire.HEADER.size + wire.MAX_CONTROL_PAYLOAD + data[0] % 64
    frames = []
    pos = 1
    while pos + 6 <= len(data):
        kind = data[pos] % 8
        (ident,) = _U32.unpack_from(data, pos + 1)
        # control frames (CANCEL and up) carry at most MAX_CONTROL_PAYLOAD bytes
        size = (
            data[pos + 5] * 3
            if kind < FrameKind.CANCEL
            else data[pos + 5] % (wire.MAX_CONTROL_PAYLOAD + 1)
        )
        frames.append((kind, ident, data[pos + 6 : pos + 6 + size]))
        pos += 6 + size
    encoder = wire.NativeCodec(max_record_size=record, send_limit=1 << 20, receive_limit=1 << 20)
    decoder = wire.NativeCodec(max_record_size=record, send_limit=1 << 20, receive_limit=1 << 20)
    out: list[bytes | None] = []
    for frame in frames:
        before = len(out)
        size = encoder.encode(*frame, out)
        pieces = [p for p in out[before:] if p is not None]
        check(size == sum(map(len, pieces)), "encode() returned a wrong size")
        check(all(len(p) <= record - 16 for p in pieces), "a record exceeds the limit")
    decoded = [f for f in (decoder.decode(p) for p in out if p is not None) if f is not None]
    check(decoded == frames, "frames did not round trip")
    return f"ok:{min(len(frames), 3)}"


def hello_target(data: bytes) -> str:
    hello = wire.Hello.decode(data)
    check(
        wire.MIN_RECORD_SIZE <= hello.max_record_size <= wire.MAX_RECORD,
        "hello record size out of range",
    )
    check(hello.max_message_size >= wire.MIN_MESSAGE_SIZE, "hello message size below the floor")
    again = hello.encode()
    check(again[0] == data[0] and again[2:] == data[2 : len(again)], "hello not re-encoded")
    check(again[1] == 0, "hello flags are not zero")
    return "ok"


def preamble_target(data: bytes) -> str:
    who = "server" if data[:1] == b"s" else "client"
    version, byte = wire.decode_preamble(data[1:], who=who)
    check(data[1:] == wire.encode_preamble(byte, version), "preamble does not re-encode")
    return "ok"


def verdict_target(data: bytes) -> str:
    accepted, reason = wire.decode_verdict(data)
    check(accepted == (data[0] == 0), "verdict misread")
    check(reason == data[1:].decode("utf-8", errors="replace"), "reason misread")
    return "accept" if accepted else "refuse"


def _key_received(state: MonteV1HandshakeState) -> bool:
    return state.peer_public is not None


def monte_v1_handshake_target(data: bytes) -> str:
    """Responder side: the peer's key then records, in chunks, then EOF."""
    if not data:
        return "empty"
    state = MonteV1HandshakeState(initiator=False, private_key=STATIC_R)
    rest = b""
    for piece in [*chunks(data[1:], data[0]), b""]:
        if not _key_received(state):
            rest += state.receive_data(piece)  # b"" before the key: HandshakeError
            if _key_received(state):
                check(state.data_to_send() == state.public, "the key was not sent")
        elif piece:
            rest += piece
    check(state.complete, "complete without a key")
    check(rest == data[1 + 32 :], "bytes after the key were lost")
    _, opener = state.records(max_record_size=4096)
    records = opener.receive_data(rest) if rest else []
    opener.receive_data(b"")
    return f"ok:{min(len(records), 2)}"


def _monte_v1_handshake_seeds() -> list[bytes]:
    client = MonteV1HandshakeState(initiator=True, private_key=STATIC_I)
    server = MonteV1HandshakeState(initiator=False, private_key=STATIC_R)
    key = client.data_to_send()
    server.receive_data(key)
    client.receive_data(server.data_to_send())
    sealer, _ = client.records(max_record_size=4096)
    return [bytes([seed]) + key + sealer.seal_many([b"\x00\x00\x00\x01hi"]) for seed in (0, 5)]


def _native_pair(selector: int) -> tuple[HandshakeState, HandshakeState]:
    psk = bool(selector & 1)
    cipher = "ChaChaPoly" if selector & 2 else "AESGCM"
    name = wire.protocol_name(psk=psk, cipher=cipher)
    pro = wire.prologue(name, wire.encode_preamble(wire.FLAG_PSK if psk else 0))
    psks = [PSK] if psk else []
    init = HandshakeState(name, initiator=True, prologue=pro, s=STATIC_I, e=EPHEMERAL_I, psks=psks)
    resp = HandshakeState(
        name, initiator=False, prologue=pro, s=STATIC_R, e=EPHEMERAL_R, psks=psks
    )
    return init, resp


def _native_messages(selector: int) -> list[bytes]:
    init, resp = _native_pair(selector)
    hello = wire.Hello().encode()
    msg1 = init.write_message(b"")
    resp.read_message(msg1)
    msg2 = resp.write_message(hello)
    init.read_message(msg2)
    msg3 = init.write_message(hello)
    return [msg1, msg2, msg3]


def noise_read_target(data: bytes) -> str:
    """The native profile's XX / XXpsk3 (with its prologue): read message ``step``."""
    if not data:
        return "empty"
    selector, step = data[0] & 3, (data[0] >> 2) % 3
    init, resp = _native_pair(selector)
    messages = _native_messages(selector)
    reader = resp if step != 1 else init
    if step >= 1:
        init.write_message(b"")
        resp.read_message(messages[0])
        resp.write_message(wire.Hello().encode())
    if step == 2:
        init.read_message(messages[1])
        init.write_message(wire.Hello().encode())
    try:
        payload = reader.read_message(data[1:])
    except RemoteProtocolError:
        check(reader.broken, "a failed read left the state usable")
        raise
    if step == 0:
        # msg1's payload is not authenticated yet: a change must break message 2 instead.
        if data[1:] != messages[0]:
            try:
                init.write_message(b"")
                init.read_message(reader.write_message(wire.Hello().encode()))
            except RemoteProtocolError:
                return "msg1-altered-then-refused"
            raise Invariant("an altered message 1 went unnoticed by the initiator")
        return "ok"
    check(data[1:] == messages[step], "an altered handshake message was accepted")
    check(wire.Hello.decode(payload) == wire.Hello(), "the hello did not survive")
    return "ok"


def _noise_seeds() -> list[bytes]:
    seeds = []
    for selector in range(4):
        for step, message in enumerate(_native_messages(selector)):
            seeds.append(bytes([selector | step << 2]) + message)
    return seeds


async def _respond(handshake: NoiseHandshake | MonteV1Handshake, data: bytes) -> str:
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(data)
    await client.send_stream.aclose()
    with trio.fail_after(5):
        secure = await handshake.handshake(
            server, initiator=False, peer=None, config=ConnectionConfig()
        )
    await secure.aclose()
    return "handshake-done"


_NATIVE_SERVER = NoiseHandshake(Identity.generate(), trust=AcceptAnyKey())


def native_responder_target(data: bytes) -> str:
    """A native server's whole handshake, over memory streams, on hostile client bytes."""
    return trio.run(_respond, _NATIVE_SERVER, data)


def monte_v1_responder_target(data: bytes) -> str:
    return trio.run(_respond, MonteV1Handshake(), data)


def _native_responder_seeds() -> list[bytes]:
    preamble = wire.encode_preamble(0)
    psk_preamble = wire.encode_preamble(wire.FLAG_PSK)
    msg1 = _native_messages(0)[0]
    framed = preamble + _U16.pack(len(msg1)) + msg1
    return [framed, framed + _U16.pack(64) + bytes(64), psk_preamble + bytes(34), preamble]


@attrs.frozen
class Target:
    name: str
    function: Callable[[bytes], str]
    allowed: tuple[type[BaseException], ...]
    seeds: Callable[[], list[bytes]]
    weight: int = 10


TARGETS: dict[str, Target] = {
    t.name: t
    for t in [
        Target(
            "records-monte-v1",
            _records_target(MONTE_V1_NONCE, False),
            (RemoteProtocolError,),
            lambda: _record_seeds(MONTE_V1_NONCE, False),
        ),
        Target(
            "records-noise-aesgcm",
            _records_target(NOISE_AESGCM_NONCE, True),
            (RemoteProtocolError,),
            lambda: _record_seeds(NOISE_AESGCM_NONCE, True),
        ),
        Target(
            "records-noise-chachapoly",
            _records_target(NOISE_CHACHAPOLY_NONCE, True),
            (RemoteProtocolError,),
            lambda: _record_seeds(NOISE_CHACHAPOLY_NONCE, True),
        ),
        Target(
            "monte-v1-codec", monte_v1_codec_target, (RemoteProtocolError,), _monte_v1_codec_seeds
        ),
        Target("native-codec", native_codec_target, (RemoteProtocolError,), _native_codec_seeds),
        Target(
            "native-codec-roundtrip",
            native_codec_roundtrip_target,
            (),
            lambda: [bytes([5, 1, 0, 0, 0, 1, 40, *range(120)])],
        ),
        Target(
            "hello",
            hello_target,
            (RemoteProtocolError,),
            lambda: [wire.Hello().encode(), wire.Hello(max_record_size=65).encode() + b"more"],
            weight=3,
        ),
        Target(
            "preamble",
            preamble_target,
            (HandshakeError,),
            lambda: [b"s" + wire.encode_preamble(0), b"c" + wire.encode_preamble(1)],
            weight=2,
        ),
        Target(
            "verdict",
            verdict_target,
            (RemoteProtocolError,),
            lambda: [wire.encode_verdict(True), wire.encode_verdict(False, "no, sorry")],
            weight=2,
        ),
        Target(
            "monte-v1-handshake",
            monte_v1_handshake_target,
            (HandshakeError, RemoteProtocolError),
            _monte_v1_handshake_seeds,
        ),
        Target("noise-read", noise_read_target, (RemoteProtocolError,), _noise_seeds),
        Target(
            "native-responder",
            native_responder_target,
            (HandshakeError,),
            _native_responder_seeds,
            weight=3,
        ),
        Target(
            "monte-v1-responder",
            monte_v1_responder_target,
            (HandshakeError,),
            lambda: [bytes(range(32)) + _U32.pack(20) + bytes(20), bytes(range(40))],
            weight=3,
        ),
    ]
}


# ---------------------------------------------------------------------------------------
# Mutation
# ---------------------------------------------------------------------------------------

_INTERESTING_U32 = [0, 1, 15, 16, 17, 511, 512, 513, 4096, 65535, 65536, 0x7FFFFFFF, 0xFFFFFFFF]
_INTERESTING_U8 = [0, 1, 0x7F, 0x80, 0xFF]


def mutate(data: bytes, rng: random.Random, corpus: Sequence[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 8))):
        op = rng.randrange(9)
        n = len(buf)
        if op == 0 and n:  # flip a bit
            buf[rng.randrange(n)] ^= 1 << rng.randrange(8)
        elif op == 1 and n:  # an interesting byte
            buf[rng.randrange(n)] = rng.choice(_INTERESTING_U8)
        elif op == 2 and n >= 4:  # an interesting length
            at = rng.randrange(n - 3)
            buf[at : at + 4] = _U32.pack(rng.choice(_INTERESTING_U32))
        elif op == 3:  # insert random bytes
            at = rng.randrange(n + 1)
            buf[at:at] = rng.randbytes(rng.choice((1, 2, 4, 16, 64)))
        elif op == 4 and n:  # delete a range
            at = rng.randrange(n)
            del buf[at : at + rng.choice((1, 2, 4, 16, 64))]
        elif op == 5 and n:  # duplicate a range
            at = rng.randrange(n)
            buf[at:at] = buf[at : at + rng.choice((1, 4, 16, 100))]
        elif op == 6 and n:  # truncate
            del buf[rng.randrange(n) :]
        elif op == 7 and corpus:  # splice with another input
            other = rng.choice(corpus)
            at = rng.randrange(n + 1)
            buf = buf[:at] + other[rng.randrange(len(other) + 1) :]
        elif op == 8 and n:  # overwrite a range with random bytes
            at = rng.randrange(n)
            size = rng.choice((1, 2, 4, 8, 32))
            buf[at : at + size] = rng.randbytes(size)
    return bytes(buf[:70_000])


def _signature(outcome: str | BaseException) -> str:
    if isinstance(outcome, str):
        return outcome
    return type(outcome).__name__ + ":" + re.sub(r"\d+", "N", str(outcome))[:60]


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------


@attrs.define
class FuzzFailure:
    target: str
    data: bytes
    error: BaseException

    def describe(self) -> str:
        tb = "".join(traceback.format_exception(self.error))
        return (
            f"FAILURE in target {self.target!r}: {type(self.error).__name__}: {self.error}\n"
            f"{tb}\ninput ({len(self.data)} bytes, hex):\n{self.data.hex()}\n"
            f"reproduce: python tests/fuzz_target.py --reproduce {self.target} <hex>"
        )


@attrs.define
class Report:
    executions: Counter[str] = attrs.field(factory=Counter)
    outcomes: dict[str, Counter[str]] = attrs.field(factory=dict)
    corpus_sizes: dict[str, int] = attrs.field(factory=dict)
    failure: FuzzFailure | None = None
    elapsed: float = 0.0


def execute(target: Target, data: bytes) -> str | BaseException:
    """Run one input; return the outcome (a label or an allowed exception), or raise."""
    try:
        return target.function(data)
    except Invariant:
        raise
    except target.allowed as exc:
        return exc


def run(
    *,
    seconds: float | None = None,
    iterations: int | None = None,
    seed: int = 0,
    names: Sequence[str] | None = None,
    targets: Sequence[Target] | None = None,
    max_corpus: int = 300,
) -> Report:
    """Fuzz until ``seconds`` have passed or ``iterations`` inputs ran (whichever first).

    ``names`` picks targets of :data:`TARGETS` (default: all); ``targets`` gives them.
    """
    if seconds is None and iterations is None:
        raise ValueError("give seconds or iterations")
    rng = random.Random(seed)
    if targets is None:
        targets = [TARGETS[n] for n in (names or sorted(TARGETS))]
    report = Report()
    corpora: dict[str, list[bytes]] = {}
    seen: dict[str, set[str]] = {}
    started = time.monotonic()
    deadline = None if seconds is None else started + seconds

    def one(target: Target, data: bytes) -> bool:
        try:
            outcome = execute(target, data)
        except BaseException as exc:  # anything else is undocumented: report it
            if isinstance(exc, KeyboardInterrupt):
                raise
            report.failure = FuzzFailure(target.name, data, exc)
            return False
        report.executions[target.name] += 1
        sig = _signature(outcome)
        report.outcomes.setdefault(target.name, Counter())[sig] += 1
        if sig not in seen[target.name] and len(corpora[target.name]) < max_corpus:
            seen[target.name].add(sig)
            corpora[target.name].append(data)
        return True

    for target in targets:  # every seed first: they must all pass
        corpora[target.name] = []
        seen[target.name] = set()
        for data in target.seeds():
            if not one(target, data):
                return _finish(report, corpora, started)
    weighted = [t for t in targets for _ in range(t.weight)]
    count = 0
    while True:
        if iterations is not None and count >= iterations:
            break
        if deadline is not None and count % 16 == 0 and time.monotonic() >= deadline:
            break
        count += 1
        target = rng.choice(weighted)
        corpus = corpora[target.name]
        if rng.random() < 0.05 or not corpus:
            data = rng.randbytes(rng.choice((0, 1, 4, 8, 18, 33, 64, 300, 2000)))
        else:
            data = mutate(rng.choice(corpus), rng, corpus)
        if not one(target, data):
            break
    return _finish(report, corpora, started)


def _finish(report: Report, corpora: dict[str, list[bytes]], started: float) -> Report:
    report.corpus_sizes = {name: len(c) for name, c in corpora.items()}
    report.elapsed = time.monotonic() - started
    return report


def summary(report: Report) -> str:
    total = sum(report.executions.values())
    lines = [
        f"{total} executions in {report.elapsed:.1f} s "
        f"({total / max(report.elapsed, 1e-9):.0f}/s), "
        f"{'FAILED' if report.failure else 'no undocumented exception'}"
    ]
    for name in sorted(report.executions):
        outcomes = report.outcomes.get(name, Counter())
        top = ", ".join(f"{sig} x{n}" for sig, n in outcomes.most_common(3))
        lines.append(
            f"  {name:<26} {report.executions[name]:>8} runs, "
            f"{len(outcomes):>3} outcomes, corpus {report.corpus_sizes.get(name, 0):>3}: {top}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=60.0, help="time budget (default 60)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--target", action="append", choices=sorted(TARGETS), help="repeatable")
    parser.add_argument("--list", action="store_true", help="list the targets and exit")
    parser.add_argument("--reproduce", nargs=2, metavar=("TARGET", "HEX"))
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(sorted(TARGETS)))
        return 0
    if args.reproduce:
        name, hex_input = args.reproduce
        if name not in TARGETS:
            parser.error(f"unknown target {name!r}")
        data = bytes.fromhex(hex_input)
        try:
            print(f"{name}: outcome {_signature(execute(TARGETS[name], data))}")
        except BaseException as exc:
            print(FuzzFailure(name, data, exc).describe())
            return 1
        return 0
    if args.seconds <= 0:
        parser.error("--seconds must be positive")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    print(f"fuzzing {len(args.target or TARGETS)} targets for {args.seconds} s, seed {seed}")
    report = run(seconds=args.seconds, seed=seed, names=args.target)
    print(summary(report))
    if report.failure is not None:
        print(report.failure.describe())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
