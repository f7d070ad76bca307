"""``monte-trio call``, the methods ``serve`` exposes, ``pubkey``, ``keygen --psk`` and
``serve``'s logging options, run in this process (as tests/test_cli.py does)."""

from __future__ import annotations

import json
import logging
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_cli import Terminal, err, out, run_in_process, serve

from monte_trio import Identity, PublicKey
from monte_trio._version import __version__


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> Terminal:
    return Terminal(monkeypatch)


@pytest.fixture
def library_log_level() -> Iterator[None]:
    logger = logging.getLogger("monte_trio")
    level = logger.level
    yield
    logger.setLevel(level)


async def test_call_echo_and_info_while_bench_still_gets_raw_echoes(
    terminal: Terminal,
) -> None:
    async with serve(terminal, "--port", "0", "--trust", "any") as server:
        result = await terminal.run("call", server.address, "echo", '{"a": [1, 2.5, null]}')
        assert result.returncode == 0, err(result)
        assert out(result) == '{"a": [1, 2.5, null]}\n'
        result = await terminal.run("call", server.address, "echo", '"x"', "2", "true")
        assert out(result) == '["x", 2, true]\n'
        result = await terminal.run("call", server.address, "echo", '"\\u001b[2J \\u202e"')
        assert "\x1b" not in out(result)
        assert "\u202e" not in out(result)
        result = await terminal.run("call", server.address, "info")
        assert result.returncode == 0, err(result)
        info = json.loads(out(result))
        assert info["version"] == __version__
        assert info["uptime"] >= 0
        assert info["connections"]["active"] >= 1
        assert info["connections"]["accepted"] >= 4
        result = await terminal.run("bench", server.address, "-n", "50", "--size", "100")
        assert result.returncode == 0, err(result)
        assert "bench request ok: every reply verified" in out(result)
        await server.stop()


async def test_a_failed_call_exits_1_with_the_typed_error(terminal: Terminal) -> None:
    async with serve(terminal, "--port", "0", "--trust", "any") as server:
        result = await terminal.run("call", server.address, "no.such\x1b[2J")
        assert result.returncode == 1
        stderr = err(result)
        assert "monte-trio: error: no method named 'no.such" in stderr
        assert "(NOT_FOUND)" in stderr
        assert "\x1b" not in stderr
        assert "Traceback" not in stderr
        result = await terminal.run("call", server.address, "info", "1")
        assert result.returncode == 1
        assert "(INVALID_ARGUMENTS)" in err(result)
        await server.stop()


def test_call_arguments_must_be_json(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_in_process(capsys, "call", "127.0.0.1:1", "echo", "{not json")
    assert result.returncode == 2
    assert "argument 1 is not a JSON value" in err(result)


async def test_call_against_nothing_is_a_clean_error(terminal: Terminal) -> None:
    result = await terminal.run("call", "127.0.0.1:1", "echo")
    assert result.returncode == 1
    assert "monte-trio: error: could not connect" in err(result)


def test_pubkey_prints_the_public_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    identity = Identity.generate()
    identity.save(tmp_path / "id.key")
    result = run_in_process(capsys, "pubkey", str(tmp_path / "id.key"))
    assert result.returncode == 0, err(result)
    assert PublicKey.parse(out(result).strip()) == identity.public_key
    result = run_in_process(capsys, "pubkey", str(tmp_path / "missing.key"))
    assert result.returncode == 1
    assert "monte-trio: error:" in err(result)


async def test_keygen_psk_writes_a_private_file_serve_and_call_accept(
    terminal: Terminal, tmp_path: Path
) -> None:
    path = tmp_path / "psk"
    result = await terminal.run("keygen", "--psk", str(path))
    assert result.returncode == 0, err(result)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(bytes.fromhex(path.read_text().strip())) == 32
    result = await terminal.run("keygen", "--psk", str(path))
    assert result.returncode == 1
    assert "already exists" in err(result)
    async with serve(terminal, "--port", "0", "--trust", "any", "--psk", str(path)) as server:
        result = await terminal.run("call", server.address, "echo", "1", "--psk", str(path))
        assert out(result) == "1\n", err(result)
        result = await terminal.run("call", server.address, "echo", "1")  # no psk: refused
        assert result.returncode == 1
        await server.stop()


def test_keygen_takes_a_path_or_psk(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_in_process(capsys, "keygen").returncode == 2
    both = run_in_process(capsys, "keygen", str(tmp_path / "k"), "--psk", str(tmp_path / "p"))
    assert both.returncode == 2


@pytest.mark.usefixtures("library_log_level")
@pytest.mark.parametrize(
    ("options", "level"),
    [([], logging.NOTSET), (["-v"], logging.INFO), (["-vv"], logging.DEBUG),
     (["--log-level", "error"], logging.ERROR)],
)  # fmt: skip
async def test_serve_log_level(terminal: Terminal, options: list[str], level: int) -> None:
    logging.getLogger("monte_trio").setLevel(logging.NOTSET)
    async with serve(terminal, "--port", "0", "--trust", "any", *options) as server:
        assert logging.getLogger("monte_trio").level == level
        await server.stop()
