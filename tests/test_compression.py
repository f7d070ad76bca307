"""Per-message compression (sans-IO): the hello's compression field, the codec registry,
the envelope, bounded decompression (bombs fail before memory is used) and the vectors in
tests/vectors/native-v2.json. Tests that need a codec's package skip without it
(``pip install monte_trio[compression]``)."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import struct
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monte_trio import RemoteProtocolError
from monte_trio._proto import _compression as comp
from monte_trio._proto import _wire2 as wire

LZ4 = comp.CompressionId.LZ4
ZSTD = comp.CompressionId.ZSTD
HAS_LZ4 = comp.is_available(LZ4)
HAS_ZSTD = comp.is_available(ZSTD)
needs_lz4 = pytest.mark.skipif(not HAS_LZ4, reason="lz4 is not installed")
needs_zstd = pytest.mark.skipif(not HAS_ZSTD, reason="zstandard is not installed")
CODECS = [
    pytest.param(LZ4, marks=needs_lz4, id="lz4"),
    pytest.param(ZSTD, marks=needs_zstd, id="zstd"),
]
BOTH = (int(LZ4), int(ZSTD))
TLV = struct.Struct(">HH")
VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parent / "vectors" / "native-v2.json").read_text()
)["compression"]
JSON_BODY = b"".join(
    b'{"id": %d, "user": "user-%04d", "active": true, "tags": ["alpha", "beta"]}, ' % (i, i * 7)
    for i in range(200)
)


def _with_field(type_: int, value: bytes, base: bytes | None = None) -> bytes:
    return (wire.Hello2().encode() if base is None else base) + TLV.pack(type_, len(value)) + value


# -- the hello field -----------------------------------------------------------------------


def test_hello_sends_the_list_in_order_as_field_13() -> None:
    hello = wire.Hello2(compression=[2, 1])
    assert hello.compression == (2, 1)
    encoded = hello.encode()
    assert encoded == wire.Hello2().encode() + bytes.fromhex("000d00020201")
    assert int(wire.HelloType.COMPRESSION) == 13
    assert wire.Hello2.decode(encoded) == hello


def test_hello_without_compression_sends_nothing_and_means_none() -> None:
    encoded = wire.Hello2().encode()
    assert all(t != 13 for t, _ in _types(encoded))
    assert wire.Hello2.decode(encoded).compression == ()
    assert comp.agree(BOTH, wire.Hello2.decode(encoded).compression) is None


def _types(encoded: bytes) -> list[tuple[int, int]]:
    out, offset = [], 0
    while offset < len(encoded):
        type_, length = TLV.unpack_from(encoded, offset)
        out.append((type_, length))
        offset += 4 + length
    return out


def test_hello_keeps_unknown_ids_and_agreement_ignores_them() -> None:
    hello = wire.Hello2.decode(_with_field(13, bytes([200, 2, 0])))
    assert hello.compression == (200, 2, 0)
    assert comp.agree(BOTH, hello.compression) == (ZSTD if HAS_ZSTD else None)
    assert comp.agree(BOTH, (200, 0)) is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_with_field(13, b""), "compression is empty"),
        (_with_field(13, b"\x01\x02\x01"), "distinct"),
        (_with_field(13, b"\x02", _with_field(13, b"\x01")), "compression appears twice"),
    ],
    ids=["empty", "duplicate-id", "field-twice"],
)
def test_hello_rejects_a_malformed_compression_field(data: bytes, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        wire.Hello2.decode(data)


def test_hello_check_rejects_ids_that_are_not_distinct_bytes() -> None:
    wire.Hello2(compression=(1, 2, 255, 0)).check()
    for ids in [(1, 1), (256,), (-1,)]:
        with pytest.raises(RemoteProtocolError, match="compression ids"):
            wire.Hello2(compression=ids).check()
    with pytest.raises(TypeError, match="an iterable of codec ids, not 5"):
        wire.Hello2(compression=5)
    assert wire.Hello2(compression=[comp.CompressionId.ZSTD]).compression == (2,)


def test_compressed_flag_is_free_on_every_message_kind() -> None:
    assert comp.FLAG_COMPRESSED == 0x08
    assert comp.FLAG_COMPRESSED & (wire.FLAG_MORE | wire.FLAG_END | wire.FLAG_NESTED) == 0


# -- agreement and configuration -----------------------------------------------------------


@pytest.mark.skipif(not (HAS_LZ4 and HAS_ZSTD), reason="needs lz4 and zstandard")
def test_agree_follows_the_peers_preference_among_codecs_both_listed() -> None:
    assert comp.agree(BOTH, (2, 1)) == ZSTD
    assert comp.agree(BOTH, (1, 2)) == LZ4
    assert comp.agree((1,), (2, 1)) == LZ4  # we compress only with a codec we offered
    assert comp.agree((), (1, 2)) is None
    assert comp.agree(BOTH, ()) is None


@pytest.mark.skipif(not (HAS_LZ4 and HAS_ZSTD), reason="needs lz4 and zstandard")
def test_resolve_names_in_order_and_defaults_to_the_installed_preference() -> None:
    assert comp.resolve(None) == comp.available() == (1, 2)
    assert comp.resolve(["zstd", "lz4"]) == (2, 1)
    assert comp.resolve([]) == ()
    assert comp.codec_name(1) == "lz4"
    assert comp.codec_name(2) == "zstd"
    assert comp.codec_name(9) == "codec 9"


def test_resolve_explains_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="unknown compression codec 'gzip'; choose from"):
        comp.resolve(["gzip"])
    if HAS_LZ4:
        with pytest.raises(ValueError, match="listed twice"):
            comp.resolve(["lz4", "lz4"])


def test_a_missing_package_makes_its_codec_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(comp, "_BACKENDS", {})
    real = importlib.import_module

    def no_zstd(name: str, package: str | None = None) -> Any:
        if name == "zstandard":
            raise ImportError("No module named 'zstandard'")
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", no_zstd)
    assert not comp.is_available(ZSTD)
    assert ZSTD not in comp.available()
    with pytest.raises(ValueError, match=r"needs the zstandard package: pip install monte_trio\["):
        comp.resolve(["zstd"])
    with pytest.raises(ValueError, match="zstd is not available: install the zstandard"):
        comp.Compressor(ZSTD)
    with pytest.raises(comp.CompressionError, match="uses zstd, which is not available"):
        comp.decompress(ZSTD, b"\x28\xb5\x2f\xfd", 10)
    assert comp.agree(BOTH, (2,)) is None


def test_compressor_refuses_an_unknown_codec() -> None:
    with pytest.raises(ValueError, match="codec 7 is not available: no such codec"):
        comp.Compressor(7)


# -- compressing ---------------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
def test_compress_puts_the_envelope_first(codec: int) -> None:
    flag, payload = comp.Compressor(codec).compress(JSON_BODY)
    assert flag == comp.FLAG_COMPRESSED
    assert payload[0] == codec
    assert int.from_bytes(payload[1:5], "big") == len(JSON_BODY)
    assert len(payload) < len(JSON_BODY) / 3
    assert comp.decompress_body(payload, accepted=(codec,), max_size=len(JSON_BODY)) == JSON_BODY


@pytest.mark.parametrize("codec", CODECS)
def test_bodies_below_the_threshold_travel_as_they_are(codec: int) -> None:
    compressor = comp.Compressor(codec)
    assert compressor.threshold == comp.DEFAULT_THRESHOLD == 1024
    short = JSON_BODY[: comp.DEFAULT_THRESHOLD - 1]
    flag, payload = compressor.compress(short)
    assert (flag, payload) == (0, short)
    assert payload is short
    at = JSON_BODY[: comp.DEFAULT_THRESHOLD]
    assert compressor.compress(at)[0] == comp.FLAG_COMPRESSED
    assert comp.Compressor(codec, threshold=64).compress(JSON_BODY[:200])[0] != 0


@pytest.mark.parametrize("codec", CODECS)
def test_incompressible_bodies_travel_as_they_are(codec: int) -> None:
    noise = hashlib.shake_256(b"noise").digest(8192)
    assert comp.Compressor(codec).compress(noise) == (0, noise)


@pytest.mark.parametrize("codec", CODECS)
def test_a_result_that_is_not_smaller_is_not_sent(codec: int) -> None:
    """Distinct bytes never shrink: codec output plus envelope is not smaller than the
    body, so the body goes as it is, whatever the threshold."""
    compressor = comp.Compressor(codec, threshold=0)
    for n in range(1, 64):
        body = bytes(range(n))
        flag, payload = compressor.compress(body)
        raw = comp.compress(codec, body)
        assert raw is not None
        if comp.ENVELOPE_SIZE + len(raw) >= n:
            assert (flag, payload) == (0, body)
        else:  # pragma: no cover - distinct bytes never shrink
            assert flag == comp.FLAG_COMPRESSED
    assert compressor.compress(b"a" * 64)[0] == comp.FLAG_COMPRESSED


@pytest.mark.parametrize("codec", CODECS)
@settings(max_examples=150, deadline=None)
@given(body=st.one_of(st.binary(max_size=3000), st.text(max_size=1500).map(str.encode)))
def test_any_body_round_trips(codec: int, body: bytes) -> None:
    flag, payload = comp.Compressor(codec, threshold=0).compress(body)
    if flag:
        assert len(payload) < len(body)
        assert comp.decompress_body(payload, accepted=(codec,), max_size=len(body)) == body
    else:
        assert payload is body


@pytest.mark.parametrize("codec", CODECS)
def test_compression_is_stateless_across_messages(codec: int) -> None:
    """The same body compresses to the same bytes whatever was compressed before it: no
    context carries over from one message to the next."""
    compressor = comp.Compressor(codec)
    first = compressor.compress(JSON_BODY)
    for other in (JSON_BODY[::-1], JSON_BODY[:5000] * 3, JSON_BODY):
        compressor.compress(other)
    assert compressor.compress(JSON_BODY) == first
    assert comp.Compressor(codec).compress(JSON_BODY) == first


@pytest.mark.parametrize("codec", CODECS)
def test_threads_compress_and_decompress_at_once(codec: int) -> None:
    bodies = [JSON_BODY[i * 100 :] for i in range(8)]
    errors: list[BaseException] = []

    def work(body: bytes) -> None:
        try:
            for _ in range(50):
                flag, payload = comp.Compressor(codec).compress(body)
                assert flag
                assert comp.decompress_body(payload, accepted=BOTH, max_size=len(body)) == body
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert not any(t.is_alive() for t in threads)


# -- the envelope --------------------------------------------------------------------------


def _envelope(codec: int, size: int, data: bytes = b"x" * 8) -> bytes:
    return comp.ENVELOPE.pack(codec, size) + data


@pytest.mark.parametrize(
    ("head", "wire_size", "code", "message"),
    [
        (b"\x01\x00\x00\x04", 100, wire.ErrorCode.FRAME_SIZE, "shorter than its envelope"),
        (_envelope(3, 100), 13, wire.ErrorCode.PROTOCOL, "codec 3, never offered"),
        (_envelope(1, 4097), 13, wire.ErrorCode.FRAME_SIZE, "declares 4097 bytes, over"),
        (_envelope(1, 13), 13, wire.ErrorCode.PROTOCOL, "of 13 bytes declares 13: not smaller"),
        (_envelope(1, 0), 13, wire.ErrorCode.PROTOCOL, "not smaller"),
    ],
    ids=["short", "codec-not-offered", "over-max", "not-smaller", "empty"],
)
def test_read_envelope_checks_before_anything_is_buffered(
    head: bytes, wire_size: int, code: int, message: str
) -> None:
    with pytest.raises(comp.CompressionError, match=message) as info:
        comp.read_envelope(head, accepted=BOTH, max_size=4096, wire_size=wire_size)
    assert info.value.code == code
    assert isinstance(info.value, RemoteProtocolError)


def test_read_envelope_returns_codec_and_size_at_the_limits() -> None:
    head = _envelope(2, 4096)
    assert comp.read_envelope(head, accepted=(2,), max_size=4096, wire_size=4095) == (2, 4096)
    with pytest.raises(comp.CompressionError, match="over the limit of 4095"):
        comp.read_envelope(head, accepted=(2,), max_size=4095, wire_size=13)
    with pytest.raises(comp.CompressionError, match="never offered"):
        comp.read_envelope(head, accepted=(1,), max_size=4096, wire_size=13)


@pytest.mark.parametrize("codec", CODECS)
def test_a_body_that_decompresses_to_another_size_is_refused(codec: int) -> None:
    _, payload = comp.Compressor(codec).compress(JSON_BODY)
    n = len(JSON_BODY)
    longer = comp.ENVELOPE.pack(codec, n + 1) + payload[comp.ENVELOPE_SIZE :]
    with pytest.raises(comp.CompressionError) as info:
        comp.decompress_body(longer, accepted=(codec,), max_size=n + 1)
    assert str(info.value) == f"a compressed body declares {n + 1} bytes and decompresses to {n}"
    assert info.value.code == wire.ErrorCode.PROTOCOL
    shorter = comp.ENVELOPE.pack(codec, n - 1) + payload[comp.ENVELOPE_SIZE :]
    with pytest.raises(comp.CompressionError) as info:
        comp.decompress_body(shorter, accepted=(codec,), max_size=n)
    assert info.value.code == wire.ErrorCode.PROTOCOL  # within M: a malformed body


@pytest.mark.parametrize("codec", CODECS)
def test_garbage_and_truncated_data_fail_cleanly(codec: int) -> None:
    _, payload = comp.Compressor(codec).compress(JSON_BODY)
    for bad in (
        payload[:-3],
        payload[: comp.ENVELOPE_SIZE + 10],
        payload + b"\x00\x01",  # trailing bytes after the block or frame
        payload[: comp.ENVELOPE_SIZE] + b"\xff" * 64,
    ):
        with pytest.raises(comp.CompressionError) as info:
            comp.decompress_body(bad, accepted=(codec,), max_size=len(JSON_BODY))
        assert info.value.code in (wire.ErrorCode.PROTOCOL, wire.ErrorCode.FRAME_SIZE)


# -- decompression bombs -------------------------------------------------------------------


def lz4_bomb(size: int) -> bytes:
    """An LZ4 block of ``size`` bytes of ``a``: one literal, a match of offset 1 covering
    all but the last 5 bytes, 5 literals (about size / 255 bytes)."""
    ml = size - 6 - 4
    out = bytearray([0x1F, ord("a"), 1, 0])
    n = ml - 15
    out += b"\xff" * (n // 255) + bytes([n % 255])
    return bytes(out + b"\x50" + b"aaaaa")


def zstd_rle(size: int, declared: int | None = None) -> bytes:
    """A Zstandard frame by hand: single segment, an 8-byte content size (``declared``,
    default ``size``), one RLE block of ``size`` bytes of ``a`` (at most 128 KiB)."""
    header = b"\x28\xb5\x2f\xfd\xe0" + (size if declared is None else declared).to_bytes(
        8, "little"
    )
    return header + (1 | 1 << 1 | size << 3).to_bytes(3, "little") + b"a"


def _peak(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        try:
            fn()
        except comp.CompressionError:
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@needs_lz4
def test_lz4_bomb_fails_at_one_byte_over_its_size_without_the_memory() -> None:
    size = 16 * 1024 * 1024
    bomb = lz4_bomb(size)
    assert len(bomb) < 70_000
    assert comp.decompress(LZ4, bomb, size) == b"a" * size  # exactly max_size: fine
    with pytest.raises(comp.CompressionError, match=f"within {size - 1} bytes"):
        comp.decompress(LZ4, bomb, size - 1)  # one byte over the bound
    # A small declared size: the 16 MiB never exist, not even for a moment.
    with pytest.raises(comp.CompressionError, match="within 1024 bytes"):
        comp.decompress(LZ4, bomb, 1024)
    assert _peak(lambda: comp.decompress(LZ4, bomb, 1024)) < 64 * 1024
    envelope = comp.ENVELOPE.pack(LZ4, size) + bomb
    assert len(comp.decompress_body(envelope, accepted=(1,), max_size=size)) == size
    with pytest.raises(comp.CompressionError, match="over the limit") as info:
        comp.decompress_body(envelope, accepted=(1,), max_size=size - 1)
    assert info.value.code == wire.ErrorCode.FRAME_SIZE
    assert _peak(lambda: comp.decompress_body(envelope, accepted=(1,), max_size=size - 1)) < 16384


@needs_zstd
def test_zstd_bomb_fails_at_one_byte_over_its_size_without_the_memory() -> None:
    size = 16 * 1024 * 1024
    zstandard: Any = importlib.import_module("zstandard")
    frame = zstandard.ZstdCompressor(level=1).compress(b"\x00" * size)
    assert len(frame) < 2000
    assert comp.decompress(ZSTD, frame, size) == b"\x00" * size
    with pytest.raises(comp.CompressionError, match=f"{size} bytes, over the limit of {size - 1}"):
        comp.decompress(ZSTD, frame, size - 1)
    assert _peak(lambda: comp.decompress(ZSTD, frame, size - 1)) < 64 * 1024
    envelope = comp.ENVELOPE.pack(ZSTD, size) + frame
    assert len(comp.decompress_body(envelope, accepted=(2,), max_size=size)) == size
    with pytest.raises(comp.CompressionError, match="over the limit"):
        comp.decompress_body(envelope, accepted=(2,), max_size=size - 1)


@needs_zstd
def test_zstd_frame_claiming_a_terabyte_allocates_nothing() -> None:
    """Without the check of the frame's content size, zstandard would allocate what the
    header claims (here 1 TiB) before decoding a byte."""
    frame = zstd_rle(1000, declared=2**40)
    with pytest.raises(comp.CompressionError, match="1099511627776 bytes, over the limit") as info:
        comp.decompress(ZSTD, frame, 16 * 1024 * 1024)
    assert info.value.code == wire.ErrorCode.FRAME_SIZE
    assert _peak(lambda: comp.decompress(ZSTD, frame, 16 * 1024 * 1024)) < 64 * 1024
    assert comp.decompress(ZSTD, zstd_rle(1000), 1000) == b"a" * 1000


@needs_zstd
def test_zstd_frames_must_state_their_size_and_need_nothing_else() -> None:
    zstandard: Any = importlib.import_module("zstandard")
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(JSON_BODY)
    with pytest.raises(comp.CompressionError, match="does not state its content size"):
        comp.decompress(ZSTD, no_size, len(JSON_BODY))
    skippable = b"\x50\x2a\x4d\x18" + (4).to_bytes(4, "little") + b"skip"
    with pytest.raises(comp.CompressionError, match="not a Zstandard frame"):
        comp.decompress(ZSTD, skippable, 100)
    with pytest.raises(comp.CompressionError, match="frame header is invalid"):
        comp.decompress(ZSTD, b"\x28\xb5\x2f\xfd", 100)
    with pytest.raises(comp.CompressionError, match="does not decompress"):
        comp.decompress(ZSTD, zstd_rle(1000) + b"extra", 1000)


@needs_lz4
def test_lz4_refuses_sizes_beyond_its_format() -> None:
    with pytest.raises(comp.CompressionError, match="may not decompress to more") as info:
        comp.decompress(LZ4, b"\x10a", comp.LZ4_MAX_INPUT + 1)
    assert info.value.code == wire.ErrorCode.FRAME_SIZE
    with pytest.raises(comp.CompressionError, match="an empty LZ4 block"):
        comp.decompress(LZ4, b"", 10)
    with pytest.raises(comp.CompressionError, match="at least 1 byte"):
        comp.decompress(LZ4, b"\x10a", 0)


# -- vectors -------------------------------------------------------------------------------


def test_vector_hellos_carry_field_13() -> None:
    for hello in VECTORS["hellos"]:
        fields = {k: v for k, v in hello.items() if k != "encoded"}
        encoded = bytes.fromhex(hello["encoded"])
        assert wire.Hello2(**fields).encode() == encoded
        assert (13, len(fields["compression"])) in _types(encoded)
        assert wire.Hello2.decode(encoded).compression == tuple(fields["compression"])


@pytest.mark.parametrize("case", VECTORS["cases"], ids=lambda c: c["what"][:40])
def test_vector_compressed_messages(case: dict[str, Any]) -> None:
    """The first frame alone carries the flag; the body (reassembled like any other) is the
    envelope, whose header is readable before anything is decompressed."""
    payload = bytes.fromhex(case["payload"])
    body = bytes.fromhex(case["body"])
    assert hashlib.sha256(body).hexdigest() == case["body_sha256"]
    plaintexts = [bytes.fromhex(p) for p in case["plaintexts"]]
    assembled = b""
    for n, plaintext in enumerate(plaintexts):
        kind, flags, length, _ident = wire.HEADER.unpack_from(plaintext)
        assert len(plaintext) == wire.HEADER_SIZE + length
        data = plaintext[wire.HEADER_SIZE :]
        if n == 0:
            assert flags & comp.FLAG_COMPRESSED
            if flags & wire.FLAG_MORE:
                assert int.from_bytes(data[:4], "big") == len(payload)  # total: wire bytes
                data = data[4:]
        else:
            assert kind == wire.Kind.CONTINUATION
            assert not flags & comp.FLAG_COMPRESSED
        assembled += data
    assert assembled == payload
    head = plaintexts[0][wire.HEADER_SIZE + (4 if len(plaintexts) > 1 else 0) :]
    codec, size = comp.read_envelope(
        head, accepted=(1, 2), max_size=len(body), wire_size=len(payload)
    )
    assert (codec, size) == (case["codec"], len(body))
    if not comp.is_available(codec):
        pytest.skip(f"{comp.codec_name(codec)} is not installed")
    assert comp.decompress_body(payload, accepted=(codec,), max_size=len(body)) == body


# -- the measurement script ----------------------------------------------------------------


@pytest.mark.skipif(not (HAS_LZ4 or HAS_ZSTD), reason="needs lz4 or zstandard")
def test_benchmark_script_measures_and_writes_its_section(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    page = tmp_path / "benchmarks.rst"
    page.write_text("Benchmarks\n==========\n\nThe suite.\n")
    out = tmp_path / "compression.json"
    cmd = [sys.executable, "-m", "benchmarks.compression", "--quick", "--json", str(out)]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for _ in range(2):  # the second run replaces the section it wrote
        done = subprocess.run(
            [*cmd, "--rst", str(page)], cwd=root, env=env, capture_output=True, timeout=300
        )
        assert done.returncode == 0, done.stderr.decode()
    rows = json.loads(out.read_text())["rows"]
    assert {r["kind"] for r in rows} == {"json", "msgpack", "random"}
    assert all(r["compress_us"] > 0 and r["decompress_us"] > 0 and r["ratio"] > 0 for r in rows)
    text = page.read_text()
    assert text.startswith("Benchmarks\n==========\n\nThe suite.\n\n\nCompression codecs\n")
    assert text.count("Compression codecs\n------------------\n") == 1
    assert "   * - json\n     - 1 KiB\n" in text
