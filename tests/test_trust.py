"""Tests of monte_trio._trust: trust policies and the known-keys file."""

from __future__ import annotations

import base64
import functools
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import ParamSpec

import pytest
import trio

from monte_trio._cli._security import parse_trust
from monte_trio._exceptions import KeyFileError, PeerRejected
from monte_trio._keys import Identity, PublicKey
from monte_trio._known_keys import KnownKey, KnownKeysFile
from monte_trio._trust import AcceptAnyKey, PinnedKeys, TrustPolicy

SERVER = "example.com:4433"
P = ParamSpec("P")


def bounded(test: Callable[P, Awaitable[None]]) -> Callable[P, Awaitable[None]]:
    """Fail a test that takes more than 10 s (worker threads and file locks) instead of
    letting it hang."""

    @functools.wraps(test)
    async def run(*args: P.args, **kwargs: P.kwargs) -> None:
        with trio.fail_after(10):
            await test(*args, **kwargs)

    return run


def new_key() -> PublicKey:
    return Identity.generate().public_key


def data_lines(path: Path) -> list[str]:
    """The non-comment, non-blank lines of a known-keys file."""
    return [
        line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]


# --- AcceptAnyKey and PinnedKeys ---------------------------------------------------------


@bounded
async def test_accept_any_key() -> None:
    policy: TrustPolicy = AcceptAnyKey()
    assert policy.kind == "accept any key"
    accepted = 0
    for peer in (SERVER, "[::1]:1", None):
        for _ in range(3):
            await policy.verify(new_key(), peer=peer)  # raises if it refuses
            accepted += 1
    assert accepted == 9
    # It is a checkpoint, like every trio async function: a cancelled caller stops there.
    with trio.CancelScope() as scope:
        scope.cancel()
        await policy.verify(new_key(), peer=None)
        raise AssertionError("verify() is not a checkpoint")  # pragma: no cover
    assert scope.cancelled_caught


@bounded
async def test_pinned_keys_accepts_listed_and_refuses_others() -> None:
    a, b, stranger = new_key(), new_key(), new_key()
    policy = PinnedKeys([a, str(b)])
    assert policy.keys == frozenset({a, b})
    await policy.verify(a, peer=SERVER)
    await policy.verify(b, peer=None)
    for peer in (SERVER, None):
        with pytest.raises(PeerRejected, match="not one of the 2 pinned") as info:
            await policy.verify(stranger, peer=peer)
        assert info.value.public_key == str(stranger)


def test_pinned_keys_argument_errors() -> None:
    with pytest.raises(ValueError, match="at least one key"):
        PinnedKeys([])
    with pytest.raises(ValueError, match="not a public key"):
        PinnedKeys(["bogus"])
    with pytest.raises(TypeError, match="wrap a single key in a list"):
        PinnedKeys(str(new_key()))
    with pytest.raises(TypeError, match="wrap a single key in a list"):
        PinnedKeys(new_key())  # type: ignore[arg-type]


# --- KnownKeysFile: client side ----------------------------------------------------------


@bounded
async def test_client_learns_server_key_and_accepts_it_again(tmp_path: Path) -> None:
    path = tmp_path / "known_server_keys"
    policy = KnownKeysFile(path)
    key = new_key()
    await policy.verify(key, peer=SERVER)
    assert path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().startswith("#")  # explanatory header
    assert policy.entries() == [KnownKey(key=key, name=SERVER, line=policy.entries()[0].line)]
    await policy.verify(key, peer=SERVER)
    # A fresh object (e.g. after a restart) reads the same file.
    await KnownKeysFile(path).verify(key, peer=SERVER)
    assert data_lines(path) == [f"{key} {SERVER}"]


@bounded
async def test_client_refuses_changed_server_key_even_in_learn_mode(tmp_path: Path) -> None:
    path = tmp_path / "known_server_keys"
    policy = KnownKeysFile(path)
    good, evil = new_key(), new_key()
    await policy.verify(good, peer=SERVER)
    line = policy.entries()[0].line
    with pytest.raises(PeerRejected, match="man-in-the-middle") as info:
        await policy.verify(evil, peer=SERVER)
    assert info.value.public_key == str(evil)
    message = str(info.value)
    assert str(path) in message
    assert f"line {line}" in message
    assert data_lines(path) == [f"{good} {SERVER}"]  # nothing learned
    # Host names compare case-insensitively.
    with pytest.raises(PeerRejected, match="man-in-the-middle"):
        await policy.verify(evil, peer=SERVER.upper())
    await policy.verify(good, peer=SERVER.upper())


@bounded
async def test_client_names_are_separate(tmp_path: Path) -> None:
    policy = KnownKeysFile(tmp_path / "known")
    a, b = new_key(), new_key()
    await policy.verify(a, peer="a.example:1")
    await policy.verify(b, peer="b.example:1")
    await policy.verify(a, peer="a.example:2")  # another port is another server
    assert [(e.key, e.name) for e in policy.entries()] == [
        (a, "a.example:1"),
        (b, "b.example:1"),
        (a, "a.example:2"),
    ]


@bounded
async def test_client_accepts_key_listed_under_server_star(tmp_path: Path) -> None:
    path = tmp_path / "known"
    key, other = new_key(), new_key()
    path.write_text(f"{key} server:*\n")
    path.chmod(0o444)
    policy = KnownKeysFile(path)
    await policy.verify(key, peer=SERVER)
    with pytest.raises(PeerRejected, match="lockdown"):
        await policy.verify(other, peer=SERVER)
    # A name-specific entry takes precedence over "server:*".
    path.chmod(0o644)
    path.write_text(f"{key} server:*\n{other} {SERVER}\n")
    with pytest.raises(PeerRejected, match="man-in-the-middle"):
        await policy.verify(key, peer=SERVER)


@bounded
async def test_key_accepted_through_server_star_is_recorded_under_host_port(
    tmp_path: Path,
) -> None:
    path = tmp_path / "known"
    key, impostor = new_key(), new_key()
    path.write_text(f"{key} server:*\n")
    policy = KnownKeysFile(path)
    await policy.verify(key, peer=SERVER)
    assert data_lines(path) == [f"{key} server:*", f"{key} {SERVER}"]
    # So another key at that address is refused, not learned.
    with pytest.raises(PeerRejected, match="man-in-the-middle"):
        await policy.verify(impostor, peer=SERVER)
    await policy.verify(key, peer=SERVER)  # not recorded twice
    assert len(data_lines(path)) == 2


@pytest.mark.parametrize("name", ["*", "client:*"])
@bounded
async def test_client_key_never_authorises_a_server(tmp_path: Path, name: str) -> None:
    path = tmp_path / "known"
    key = new_key()
    path.write_text(f"{key} {name}\n")
    path.chmod(0o444)
    with pytest.raises(PeerRejected, match=r"listed for clients \(line 1\)") as info:
        await KnownKeysFile(path).verify(key, peer=SERVER)
    assert f"{key} server:*" in str(info.value)  # how to accept it for servers
    # A client presenting it is accepted.
    await KnownKeysFile(path).verify(key, peer=None)


@bounded
async def test_server_key_never_authorises_a_client(tmp_path: Path) -> None:
    path = tmp_path / "known"
    a, b = new_key(), new_key()
    path.write_text(f"{a} {SERVER}\n{b} server:*\n")
    path.chmod(0o444)
    for key in (a, b):
        with pytest.raises(PeerRejected, match=r"lockdown.*listed for a server"):
            await KnownKeysFile(path).verify(key, peer=None)


@bounded
async def test_several_keys_for_one_name(tmp_path: Path) -> None:
    path = tmp_path / "known"
    a, b, c = new_key(), new_key(), new_key()
    path.write_text(f"{a} {SERVER}\n{b} {SERVER}\n")
    policy = KnownKeysFile(path)
    await policy.verify(a, peer=SERVER)
    await policy.verify(b, peer=SERVER)
    with pytest.raises(PeerRejected, match=r"line 1, 2"):
        await policy.verify(c, peer=SERVER)


@bounded
async def test_invalid_peer_is_refused_and_never_recorded(tmp_path: Path) -> None:
    path = tmp_path / "known"
    policy = KnownKeysFile(path)
    peers = ["", "*", "peer", "client:*", "server:*", "a b:1", "#x:1", "h:0", "h:65536"]
    peers += ["h:x", "h\x1b[2J:1", "*.example:1", "h:1 extra"]
    for peer in peers:
        with pytest.raises(PeerRejected, match="records servers by address") as info:
            await policy.verify(new_key(), peer=peer)
        assert "\x1b" not in str(info.value)
    assert not path.exists()
    # Valid names, IPv6 included, are recorded and read back.
    await policy.verify(new_key(), peer="::1:4433")
    await policy.verify(new_key(), peer="[::1]:4434")
    assert [e.name for e in policy.entries()] == ["::1:4433", "[::1]:4434"]


@bounded
async def test_ipv6_names_are_recorded_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "known"
    policy = KnownKeysFile(path)
    server, impostor, other = new_key(), new_key(), new_key()
    await policy.verify(server, peer="[::1]:4433")
    assert data_lines(path) == [f"{server} [::1]:4433"]
    # Checked like any host:port: the same key again, another refused, ports separate.
    await policy.verify(server, peer="[::1]:4433")
    with pytest.raises(PeerRejected, match="man-in-the-middle"):
        await policy.verify(impostor, peer="[::1]:4433")
    await policy.verify(other, peer="[::1]:4434")
    await KnownKeysFile(path).verify(server, peer="[::1]:4433")  # read back by a new object
    with pytest.raises(PeerRejected, match="man-in-the-middle"):
        await KnownKeysFile(path).verify(impostor, peer="[::1]:4433")
    assert [(e.key, e.name) for e in policy.entries()] == [
        (server, "[::1]:4433"),
        (other, "[::1]:4434"),
    ]
    # Written by hand, in lockdown, with the long form too.
    path.write_text(f"{server} [::1]:4433\n{other} [2001:db8::1]:65535\n")
    path.chmod(0o444)
    locked = KnownKeysFile(path)
    await locked.verify(server, peer="[::1]:4433")
    await locked.verify(other, peer="[2001:DB8::1]:65535")
    for key, peer in ((impostor, "[::1]:4433"), (server, "[::1]:4434"), (other, "[::1]:65535")):
        with pytest.raises(PeerRejected):
            await locked.verify(key, peer=peer)


@pytest.mark.parametrize("port", ["1", "65535", "00443", "4433"])
@bounded
async def test_port_edges_accepted(tmp_path: Path, port: str) -> None:
    path = tmp_path / "known"
    key = new_key()
    await KnownKeysFile(path).verify(key, peer=f"h.example:{port}")
    assert KnownKeysFile(path).entries()[0].name == f"h.example:{port}"
    path.write_text(f"{key} h.example:{port}\n")
    await KnownKeysFile(path, lockdown=True).verify(key, peer=f"h.example:{port}")


@pytest.mark.parametrize("port", ["0", "00000", "65536", "99999", "012345", "-1", "+1", ""])
@bounded
async def test_port_edges_refused(tmp_path: Path, port: str) -> None:
    path = tmp_path / "known"
    key = new_key()
    with pytest.raises(PeerRejected, match="records servers by address"):
        await KnownKeysFile(path).verify(key, peer=f"h.example:{port}")
    assert not path.exists()
    # In a file, such a line is damaged: entries() says so, and the key is not accepted.
    path.write_text(f"{key} h.example:{port}\n")
    with pytest.raises(KeyFileError, match="line 1"):
        KnownKeysFile(path).entries()
    with pytest.raises(PeerRejected, match="damaged line"):
        await KnownKeysFile(path).verify(key, peer="h.example:1")


# --- KnownKeysFile: server side ----------------------------------------------------------


@bounded
async def test_server_learns_client_keys_as_star(tmp_path: Path) -> None:
    path = tmp_path / "known_client_keys"
    policy = KnownKeysFile(path)
    a, b = new_key(), new_key()
    await policy.verify(a, peer=None)
    await policy.verify(b, peer=None)
    await policy.verify(a, peer=None)
    assert data_lines(path) == [f"{a} client:*", f"{b} client:*"]
    assert [e.role for e in policy.entries()] == ["client", "client"]


@bounded
async def test_server_accepts_old_star_entries_as_clients(tmp_path: Path) -> None:
    path = tmp_path / "known"
    key = new_key()
    path.write_text(f"{key} *\n")  # what earlier versions recorded for clients
    await KnownKeysFile(path, lockdown=True).verify(key, peer=None)
    await KnownKeysFile(path).verify(key, peer=None)
    assert data_lines(path) == [f"{key} *"]


# --- KnownKeysFile: lockdown -------------------------------------------------------------


@bounded
async def test_read_only_file_is_lockdown(tmp_path: Path) -> None:
    path = tmp_path / "known"
    known, unknown = new_key(), new_key()
    path.write_text(f"# my servers\n\n{known} {SERVER}\n")
    path.chmod(0o444)
    policy = KnownKeysFile(path)
    await policy.verify(known, peer=SERVER)
    for peer in ("other.example:1", None):
        with pytest.raises(PeerRejected, match="lockdown") as info:
            await policy.verify(unknown, peer=peer)
        assert info.value.public_key == str(unknown)
        assert f"{unknown} " in str(info.value)  # tells the operator the line to add
    assert len(data_lines(path)) == 1
    # Making the file writable again switches back to learning, without a new object.
    path.chmod(0o644)
    await policy.verify(unknown, peer=None)
    assert data_lines(path)[-1] == f"{unknown} client:*"


@bounded
async def test_explicit_lockdown(tmp_path: Path) -> None:
    path = tmp_path / "known"
    known, unknown = new_key(), new_key()
    path.write_text(f"{known} client:*\n{known} server:*\n")
    policy = KnownKeysFile(path, lockdown=True)
    await policy.verify(known, peer=None)
    await policy.verify(known, peer=SERVER)
    with pytest.raises(PeerRejected, match="lockdown"):
        await policy.verify(unknown, peer=None)
    assert len(data_lines(path)) == 2


@pytest.mark.parametrize("peer", [SERVER, None])
@bounded
async def test_missing_file_in_lockdown_refuses(tmp_path: Path, peer: str | None) -> None:
    path = tmp_path / "missing"
    policy = KnownKeysFile(path, lockdown=True)
    with pytest.raises(PeerRejected, match="does not exist"):
        await policy.verify(new_key(), peer=peer)
    assert not path.exists()
    assert policy.entries() == []


@bounded
async def test_learning_fails_when_file_cannot_be_written(tmp_path: Path) -> None:
    path = tmp_path / "no such directory" / "known"
    with pytest.raises(KeyFileError, match="cannot record a new key") as info:
        await KnownKeysFile(path).verify(new_key(), peer=None)
    assert str(path) in str(info.value)


# --- KnownKeysFile: file format ----------------------------------------------------------


@pytest.mark.parametrize(
    ("bad_line", "match"),
    [
        ("justonefield", "expected"),
        ("{key} host:1 extra", "expected"),
        ("notakey host:1", "not a public key"),
        ("{key} hostwithoutport", "neither"),
        ("{key} host:notaport", "neither"),
        ("{key} host:99999", "neither"),
        ("{key} client:", "neither"),
    ],
)
@bounded
async def test_damaged_line_is_skipped_and_stops_learning(
    tmp_path: Path, bad_line: str, match: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "known"
    key, server_key, unknown = new_key(), new_key(), new_key()
    path.write_text(f"# comment\n\n{key} *\n{bad_line.format(key=key)}\n{server_key} {SERVER}\n")
    policy = KnownKeysFile(path)
    # The listed keys are still accepted: one damaged line does not poison every check.
    with caplog.at_level("WARNING", logger="monte_trio"):
        await policy.verify(key, peer=None)
        await policy.verify(server_key, peer=SERVER)
    assert "line 4" in caplog.text
    assert len(caplog.records) == 1  # once per change of the file, not per check
    # But nothing new is learned while it is damaged: fail closed.
    for peer in (None, "other.example:1"):
        with pytest.raises(PeerRejected, match=r"damaged line \(line 4") as info:
            await policy.verify(unknown, peer=peer)
        assert str(path) in str(info.value)
    # entries() is strict and says where and why.
    with pytest.raises(KeyFileError, match=match) as error:
        policy.entries()
    assert "line 4" in str(error.value)
    # Fixing the file (deleting the line) restores learning, without a new object.
    path.write_text(f"{key} *\n{server_key} {SERVER}\n")
    await policy.verify(unknown, peer=None)
    assert data_lines(path)[-1] == f"{unknown} client:*"


@bounded
async def test_comments_blank_lines_and_standard_base64(tmp_path: Path) -> None:
    path = tmp_path / "known"
    key = new_key()
    path.write_text(f"\n# a comment\n   \n  {base64.b64encode(key.raw).decode()}   {SERVER}  \n")
    policy = KnownKeysFile(path, lockdown=True)
    assert policy.entries() == [KnownKey(key=key, name=SERVER, line=4)]
    await policy.verify(key, peer=SERVER)


@bounded
async def test_append_after_missing_final_newline(tmp_path: Path) -> None:
    path = tmp_path / "known"
    a, b = new_key(), new_key()
    path.write_text(f"{a} *")  # no trailing newline
    await KnownKeysFile(path).verify(b, peer=None)
    assert data_lines(path) == [f"{a} *", f"{b} client:*"]


@bounded
async def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "known"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(KeyFileError, match="not UTF-8"):
        await KnownKeysFile(path).verify(new_key(), peer=None)
    with pytest.raises(KeyFileError, match="cannot read"):
        await KnownKeysFile(tmp_path).verify(new_key(), peer=None)  # a directory


@bounded
async def test_concurrent_verifies_record_a_new_key_once(tmp_path: Path) -> None:
    path = tmp_path / "known"
    policy = KnownKeysFile(path)
    server_key, client_key = new_key(), new_key()
    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(lambda: policy.verify(server_key, peer=SERVER))
            nursery.start_soon(lambda: policy.verify(client_key, peer=None))
    assert sorted(data_lines(path)) == sorted([f"{server_key} {SERVER}", f"{client_key} client:*"])


@bounded
async def test_two_objects_on_one_file_concurrently(tmp_path: Path) -> None:
    path = tmp_path / "known"
    policies = [KnownKeysFile(path), KnownKeysFile(path)]
    key = new_key()
    async with trio.open_nursery() as nursery:
        for _ in range(10):
            for policy in policies:
                nursery.start_soon(functools.partial(policy.verify, key, peer=None))
    # The file lock and the re-check under it record the key exactly once.
    assert data_lines(path) == [f"{key} client:*"]


@bounded
async def test_edits_take_effect_without_a_new_object(tmp_path: Path) -> None:
    path = tmp_path / "known"
    key = new_key()
    policy = KnownKeysFile(path)
    await policy.verify(key, peer=SERVER)
    # The operator replaces the server's key (same size, same second): it is re-read.
    other = new_key()
    path.write_text(path.read_text().replace(str(key), str(other)))
    await policy.verify(other, peer=SERVER)
    with pytest.raises(PeerRejected, match="man-in-the-middle"):
        await policy.verify(key, peer=SERVER)
    # Deleting the file forgets every key.
    path.unlink()
    await policy.verify(key, peer=SERVER)
    assert data_lines(path) == [f"{key} {SERVER}"]


# --- parse_trust -------------------------------------------------------------------------


def test_parse_trust_forms(tmp_path: Path) -> None:
    assert parse_trust("any") == AcceptAnyKey()
    assert parse_trust(" any ") == AcceptAnyKey()
    a, b = new_key(), new_key()
    pinned = parse_trust(f"pin:{a}")
    assert isinstance(pinned, PinnedKeys)
    assert pinned.keys == {a}
    pinned = parse_trust(f"pin:{a}, {b},")
    assert isinstance(pinned, PinnedKeys)
    assert pinned.keys == {a, b}
    tofu = parse_trust(f"tofu:{tmp_path / 'known'}")
    assert isinstance(tofu, KnownKeysFile)
    assert tofu.path == tmp_path / "known"
    assert tofu.lockdown is None


@pytest.mark.parametrize(
    "name", ["a:b", "C:\\keys\\known", "known:", ":known", "x:1", "tofu:known"]
)
@bounded
async def test_parse_trust_tofu_path_with_colons(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    tofu = parse_trust(f"tofu:{path}")
    assert isinstance(tofu, KnownKeysFile)
    assert tofu.path == path
    key = new_key()
    await tofu.verify(key, peer=None)  # it learns into that very file
    assert data_lines(path) == [f"{key} client:*"]
    spaced = parse_trust(f"  tofu:{path}  ")
    assert isinstance(spaced, KnownKeysFile)
    assert spaced.path == path


@pytest.mark.parametrize(
    "spec",
    ["", "none", "ANY", "anything", "pin:", "pin:,", "pin:nonsense", "tofu:", "tofu: ", "file:x"],
)
def test_parse_trust_errors(spec: str) -> None:
    with pytest.raises(ValueError, match="trust") as info:
        parse_trust(spec)
    if spec != "pin:nonsense":
        assert "tofu:FILE" in str(info.value)
    else:
        assert "not a public key" in str(info.value)
