"""Trust policies at their edges: exact file contents after learning, the entry cap, the
file lock held by someone else, and what each refusal says.

``tests/test_trust.py`` covers the policies' rules; these tests pin the details a mutation
review found loose: line numbers, the byte layout of appended entries, the moment a
limit bites, and a learner that must wait for (and decide again under) another holder's
lock.
"""

from __future__ import annotations

import fcntl
import logging
import os
import resource
import signal
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from monte_trio import Identity, KeyFileError, PeerRejected, PublicKey
from monte_trio._known_keys import KnownKey, KnownKeysFile
from monte_trio._trust import PinnedKeys

SERVER = "example.com:4433"
TIMEOUT = 5


def new_key() -> PublicKey:
    return Identity.generate().public_key


class HeldLock:
    """The exclusive lock of a file, held as another process would hold it (flock locks
    belong to an open file, so another open in this process contends too)."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


async def next_retry(after: float = -1.0) -> float:
    """Wait until a verify() blocked by the lock sleeps before a retry that ends later than
    ``after`` (by a millisecond: the same deadline, computed again, may differ in its last
    bits); return when that retry is due (``trio.current_time()`` scale).

    Its sleep is the only deadline within a second: the tests' own are seconds away. The
    first retry comes within a few milliseconds.
    """
    start = trio.current_time()
    while trio.current_time() < start + 2:
        due = trio.current_time() + trio.lowlevel.current_statistics().seconds_to_next_deadline
        if due < trio.current_time() + 1 and due > after + 0.001:
            assert due - trio.current_time() < 0.06, "the retries come within 50 ms"
            return due
        await trio.lowlevel.checkpoint()
    raise AssertionError("verify() never waited for the lock")


async def while_locked(
    path: Path, verify: Callable[[], Awaitable[None]], meanwhile: Callable[[], None]
) -> None:
    """Run ``verify`` while ``path`` is locked; once it has tried and waited twice, run
    ``meanwhile``, then release the lock and let it finish."""
    lock = HeldLock(path)
    try:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(verify)
                await next_retry(await next_retry())
                meanwhile()
                lock.release()
    finally:
        lock.release()


# --- the lock of the file ------------------------------------------------------------------


async def test_learning_waits_for_the_lock_then_records(tmp_path: Path) -> None:
    path = tmp_path / "known"
    path.write_text("")
    key = new_key()
    policy = KnownKeysFile(path)

    def nothing_written() -> None:
        assert path.read_text() == ""

    await while_locked(path, lambda: policy.verify(key, peer=SERVER), nothing_written)
    assert [(e.key, e.name) for e in policy.entries()] == [(key, SERVER)]


async def test_under_the_lock_the_decision_is_made_again(tmp_path: Path) -> None:
    # Another process records a different key for the name while we wait: refused.
    path = tmp_path / "known"
    path.write_text("")
    ours, theirs = new_key(), new_key()
    policy = KnownKeysFile(path)

    async def refused() -> None:
        with pytest.raises(PeerRejected, match=r"different key for it \(line 1\)"):
            await policy.verify(ours, peer=SERVER)

    def record_theirs() -> None:
        with path.open("a") as f:
            f.write(f"{theirs} {SERVER}\n")

    await while_locked(path, refused, record_theirs)
    assert path.read_text() == f"{theirs} {SERVER}\n"


async def test_a_key_recorded_meanwhile_is_accepted_and_not_recorded_twice(
    tmp_path: Path,
) -> None:
    path = tmp_path / "known"
    path.write_text("")
    key = new_key()
    policy = KnownKeysFile(path)

    def record_it() -> None:
        with path.open("a") as f:
            f.write(f"{key} client:*\n")

    await while_locked(path, lambda: policy.verify(key, peer=None), record_it)
    assert path.read_text() == f"{key} client:*\n"


async def test_a_file_locked_down_meanwhile_refuses(tmp_path: Path) -> None:
    path = tmp_path / "known"
    path.write_text("")
    key = new_key()
    policy = KnownKeysFile(path)
    # root may still open the read-only file (and must then refuse as lockdown); anyone
    # else fails to open it for writing.
    expected: type[Exception] = PeerRejected if os.geteuid() == 0 else KeyFileError

    async def refused() -> None:
        with pytest.raises(expected):
            await policy.verify(key, peer=None)

    await while_locked(path, refused, lambda: path.chmod(0o444))
    assert path.read_text() == ""


async def test_lockdown_refuses_without_waiting_for_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "known"
    path.write_text("")
    path.chmod(0o444)
    lock = HeldLock(path)
    try:
        with trio.fail_after(TIMEOUT):
            with pytest.raises(PeerRejected, match="is in lockdown"):
                await KnownKeysFile(path).verify(new_key(), peer=None)
    finally:
        lock.release()


@pytest.mark.parametrize("mode", [0o444, 0o555, 0o445, 0o551, 0o400, 0o000])
async def test_any_mode_without_write_bits_is_lockdown(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "known"
    path.write_text("")
    path.chmod(mode)
    with trio.fail_after(TIMEOUT):
        with pytest.raises(PeerRejected, match="lockdown"):
            await KnownKeysFile(path).verify(new_key(), peer=None)
    for writable in (0o200, 0o020, 0o002):
        path.chmod(mode | writable | 0o600)
        with trio.fail_after(TIMEOUT):
            await KnownKeysFile(path).verify(new_key(), peer=None)


# --- what learning writes ------------------------------------------------------------------


async def test_learned_entries_follow_each_other_line_by_line(tmp_path: Path) -> None:
    path = tmp_path / "known"
    a, b, c, intruder = new_key(), new_key(), new_key(), new_key()
    path.write_text(f"# mine\n{a} client:*\n")
    policy = KnownKeysFile(path)
    with trio.fail_after(TIMEOUT):
        await policy.verify(b, peer=SERVER)
        await policy.verify(c, peer="other.example:1")
        assert path.read_text() == f"# mine\n{a} client:*\n{b} {SERVER}\n{c} other.example:1\n"
        # The line numbers the object keeps are those of the file.
        with pytest.raises(PeerRejected, match=r"records a different key for it \(line 3\)"):
            await policy.verify(intruder, peer=SERVER)
        with pytest.raises(PeerRejected, match=r"\(line 4\)"):
            await KnownKeysFile(path).verify(intruder, peer="other.example:1")


async def test_learning_after_a_missing_final_newline(tmp_path: Path) -> None:
    path = tmp_path / "known"
    a, b, c, intruder = new_key(), new_key(), new_key(), new_key()
    path.write_text(f"{a} client:*")
    policy = KnownKeysFile(path)
    with trio.fail_after(TIMEOUT):
        await policy.verify(b, peer=SERVER)
        await policy.verify(c, peer=None)
        assert path.read_text() == f"{a} client:*\n{b} {SERVER}\n{c} client:*\n"
        with pytest.raises(PeerRejected, match=r"\(line 2\)"):
            await policy.verify(intruder, peer=SERVER)


async def test_learning_into_a_file_holding_only_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "known"
    path.write_bytes(b"\xef\xbb\xbf")
    key, intruder = new_key(), new_key()
    policy = KnownKeysFile(path)
    with trio.fail_after(TIMEOUT):
        await policy.verify(key, peer=SERVER)
        assert path.read_bytes() == b"\xef\xbb\xbf" + f"{key} {SERVER}\n".encode()
        assert policy.entries() == [KnownKey(key=key, name=SERVER, line=1)]
        with pytest.raises(PeerRejected, match=r"\(line 1\)"):
            await policy.verify(intruder, peer=SERVER)


async def test_a_large_file_is_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "known"
    keys = [new_key() for _ in range(1200)]  # about 70 KB: more than one 64 KiB read
    path.write_text("".join(f"{key} host{i}.example:1\n" for i, key in enumerate(keys)))
    assert path.stat().st_size > 65536
    policy = KnownKeysFile(path, lockdown=True)
    with trio.fail_after(TIMEOUT):
        await policy.verify(keys[-1], peer="host1199.example:1")
    assert len(policy.entries()) == 1200


async def test_learning_is_logged_with_the_role(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "known"
    server_key, client_key = new_key(), new_key()
    policy = KnownKeysFile(path)
    with trio.fail_after(TIMEOUT), caplog.at_level(logging.INFO, logger="monte_trio"):
        await policy.verify(server_key, peer=SERVER)
        await policy.verify(client_key, peer=None)
    assert [r.getMessage() for r in caplog.records] == [
        f"learned the key {server_key} of the server {SERVER}, recorded in {path}",
        f"learned the key {client_key} of a client, recorded in {path}",
    ]


async def test_a_failed_write_is_reported_and_the_file_read_again(tmp_path: Path) -> None:
    path = tmp_path / "known"
    first = new_key()
    path.write_text(f"{first} client:*\n")
    policy = KnownKeysFile(path)
    size = path.stat().st_size
    # A file size limit makes the append fail (EFBIG), as a full disk would.
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, old_limit[1]))
        with trio.fail_after(TIMEOUT):
            with pytest.raises(KeyFileError, match="cannot record a new key in known-keys"):
                await policy.verify(new_key(), peer=None)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    # Whatever reached the file is read again: the object still works.
    second = new_key()
    with trio.fail_after(TIMEOUT):
        await policy.verify(first, peer=None)
        await policy.verify(second, peer=None)
    assert policy.entries()[0].key == first
    assert policy.entries()[-1].key == second


# --- the entry cap -------------------------------------------------------------------------


@pytest.mark.parametrize("cap", [1, 3])
async def test_the_cap_bites_at_exactly_max_entries(
    tmp_path: Path, cap: int, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "known"
    path.write_text("".join(f"{new_key()} client:*\n" for _ in range(cap - 1)))
    policy = KnownKeysFile(path, max_entries=cap)
    with trio.fail_after(TIMEOUT), caplog.at_level(logging.WARNING, logger="monte_trio"):
        await policy.verify(new_key(), peer=None)  # the last one that fits
        for _ in range(2):
            with pytest.raises(PeerRejected) as refused:
                await policy.verify(new_key(), peer=None)
            assert f"{str(path)!r} holds {cap} entries, its limit (max_entries={cap})" in str(
                refused.value
            )
    assert len(path.read_text().splitlines()) == cap + _header_lines(path)
    assert [r.getMessage() for r in caplog.records] == [
        f"known-keys file {str(path)!r} holds {cap} entries, its limit (max_entries={cap}): "
        "new keys are refused until entries are removed or the limit is raised"
    ]


def _header_lines(path: Path) -> int:
    return sum(line.startswith("#") for line in path.read_text().splitlines())


async def test_a_cap_of_zero_learns_nothing(tmp_path: Path) -> None:
    path = tmp_path / "known"
    with trio.fail_after(TIMEOUT):
        with pytest.raises(PeerRejected, match=r"holds 0 entries"):
            await KnownKeysFile(path, max_entries=0).verify(new_key(), peer=SERVER)
    assert not path.exists()
    with pytest.raises(ValueError, match="max_entries must be at least 0, got -1"):
        KnownKeysFile(path, max_entries=-1)


# --- what refusals say ---------------------------------------------------------------------


async def test_damaged_lines_are_counted(tmp_path: Path) -> None:
    path = tmp_path / "known"
    path.write_text(f"{new_key()} client:*\nbad\nbad too\nworse still!\n")
    with trio.fail_after(TIMEOUT):
        with pytest.raises(PeerRejected) as refused:
            await KnownKeysFile(path).verify(new_key(), peer=None)
    assert (
        f"{str(path)!r} has a damaged line (line 2, and 2 more), and learns no new key until "
        "it is fixed" in str(refused.value)
    )


@pytest.mark.parametrize(
    ("peer", "reason"),
    [
        ("example.com", 'it is not "host:port"'),
        (":4433", 'it is not "host:port"'),
        ("example.com:", "'' is not a port number (1 to 65535)"),
        ("example.com:0", "'0' is not a port number (1 to 65535)"),
        ("#example.com:1", 'a host name does not start with "#" nor contain "*"'),
        ("ex*ample.com:1", 'a host name does not start with "#" nor contain "*"'),
        ("ex ample.com:1", "a host name has no spaces or control characters"),
        ("ex\u200bample.com:1", "a host name has no spaces or control characters"),
    ],
)
async def test_an_invalid_server_name_is_explained(tmp_path: Path, peer: str, reason: str) -> None:
    key = new_key()
    with trio.fail_after(TIMEOUT):
        with pytest.raises(PeerRejected) as refused:
            await KnownKeysFile(tmp_path / "known").verify(key, peer=peer)
    assert f"is named {peer!r} ({reason}); give open_client" in str(refused.value)
    assert refused.value.public_key == str(key)
    assert not (tmp_path / "known").exists()


@pytest.mark.parametrize("size", [80, 81])
def test_a_damaged_entry_is_quoted_in_full_up_to_80_characters(tmp_path: Path, size: int) -> None:
    path = tmp_path / "known"
    line = "a" * 37 + " " + "b" * (size - 44) + " extra"  # three fields
    assert len(line) == size
    shown = line if size <= 80 else line[:77] + "..."
    path.write_text(f"{line}\n")
    with pytest.raises(KeyFileError) as error:
        KnownKeysFile(path).entries()
    assert str(error.value).endswith(f"line 1: expected \"<public key> <name>\", got {shown!r}; "
                                     "fix or delete the line")  # fmt: skip
    name = "n" * size
    shown = name if size <= 80 else name[:77] + "..."
    path.write_text(f"{new_key()} {name}\n")
    with pytest.raises(KeyFileError) as error:
        KnownKeysFile(path).entries()
    assert f"the name {shown!r} is neither" in str(error.value)
    assert str(error.value).endswith('(it is not "host:port"); fix or delete the line')


async def test_refusals_name_the_peer_and_the_hint(tmp_path: Path) -> None:
    path = tmp_path / "known"
    client_key, server_key, other_server_key, stranger = (new_key() for _ in range(4))
    path.write_text(
        f"{client_key} client:*\n{server_key} server:*\n{other_server_key} other.example:1\n"
    )
    path.chmod(stat.S_IRUSR)
    policy = KnownKeysFile(path)
    with trio.fail_after(TIMEOUT):
        with pytest.raises(PeerRejected) as refused:
            await policy.verify(stranger, peer=None)
        assert str(refused.value) == (
            f"a client presented the unknown key {stranger}: {str(path)!r} is in lockdown "
            f'(read-only) and does not list it. To trust it, add the line "{stranger} '
            f'client:*" to {str(path)!r}.'
        )
        with pytest.raises(PeerRejected) as refused:
            await policy.verify(server_key, peer=None)
        assert str(refused.value).endswith(
            ". It is listed for a server, which does not authorise a client."
        )
        with pytest.raises(PeerRejected) as refused:
            await policy.verify(client_key, peer=SERVER)
        assert str(refused.value).startswith(f"the server {SERVER} presented the unknown key")
        assert "It is listed for clients (line 1), which does not authorise a server" in str(
            refused.value
        )
        # A key recorded for another server is not one "listed for clients": no hint.
        with pytest.raises(PeerRejected) as refused:
            await policy.verify(other_server_key, peer=SERVER)
        assert str(refused.value).endswith(f"to {str(path)!r}.")


async def test_a_missing_file_in_lockdown_is_named(tmp_path: Path) -> None:
    path = tmp_path / "missing"
    with trio.fail_after(TIMEOUT):
        with pytest.raises(PeerRejected) as refused:
            await KnownKeysFile(path, lockdown=True).verify(new_key(), peer=SERVER)
    assert f"{str(path)!r} does not exist and lockdown refuses every key" in str(refused.value)


async def test_pinned_keys_refusal_names_the_peer() -> None:
    pinned, stranger = new_key(), new_key()
    policy = PinnedKeys([pinned])
    with trio.fail_after(TIMEOUT):
        for peer, who in ((SERVER, f"server {SERVER}"), (None, "client")):
            with pytest.raises(PeerRejected) as refused:
                await policy.verify(stranger, peer=peer)
            assert str(refused.value) == (
                f"the {who} presented the key {stranger}, which is not one of the 1 pinned key(s)"
            )
            assert refused.value.public_key == str(stranger)
