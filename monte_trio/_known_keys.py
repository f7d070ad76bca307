"""Trust on first use: :class:`KnownKeysFile` and its known-keys file format.

A :class:`KnownKeysFile` is the :class:`~monte_trio.TrustPolicy` in the style of
rpc25519's ``known_server_keys`` / ``known_client_keys`` files. A writable file learns new
keys; a read-only file (no write permission bits) is in lockdown and refuses unknown keys.

It is one class with its file: the format, its parser, the index of checks and the locked
learning share their invariants (a line never written that cannot be read back, one key per
``host:port``), so they stay in one module of about 600 lines.

Theory of operation of :class:`KnownKeysFile`
---------------------------------------------
Each line of the file is ``<printable key> <name>``, and the name says which ROLE the key
may play: ``host:port`` is the server at that address (what a client records), ``client:*``
is a client (what a server records; the ``*`` of older files means the same), and
``server:*`` is a server at any address (written by hand). A key recorded for one role
never authorises the other, so a peer that is both client and server (a chat) cannot be
impersonated as a server with a key it once presented as a client. Like SSH's
``known_hosts``, a client that already knows a key for ``host:port`` refuses any other key
for it, even while learning: a changed server key is what a man-in-the-middle looks like,
so only the operator may accept it, by editing the file.

Checks cost O(1): the file is parsed once into dictionaries and parsed again only when its
``stat`` signature (device, inode, size, mtime, ctime) changes, so edits take effect
without a restart. A check runs in a worker thread (one ``stat`` and dictionary look-ups),
under a per-object :class:`trio.Lock`.

Learning appends under an exclusive :func:`fcntl.flock` of the file itself, taken without
blocking (the task polls, so a handshake timeout still cancels it). Under the lock the file
is parsed again if anyone changed it, and the decision is made again, so two objects or two
processes never record different keys for one ``host:port`` (nor one key twice). Where
``fcntl`` is missing (Windows) learning is unlocked, and a warning says so once. At most
``max_entries`` entries are learned; beyond that new keys are refused and a warning is
logged. A line that does not parse is ignored with a logged warning, but then the file
learns nothing until it is fixed (it only accepts the keys it lists): a damaged entry must
not let a changed server key be learned in its place. Names are validated before they are
recorded, so the file never holds a line it cannot read back.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import sys
import unicodedata
from pathlib import Path
from typing import ClassVar, Final

import attrs
import trio

from ._exceptions import KeyFileError, PeerRejected
from ._keys import PublicKey
from ._trust import TrustPolicy

if sys.platform != "win32":
    import fcntl

__all__ = ["ANY_CLIENT", "ANY_PEER", "ANY_SERVER", "KnownKey", "KnownKeysFile"]

logger = logging.getLogger("monte_trio")


ANY_PEER: Final = "*"
"""The name older files give client keys; read as :data:`ANY_CLIENT`."""
ANY_CLIENT: Final = "client:*"
"""The name under which a known-keys file lists a client's key (what a server learns)."""
ANY_SERVER: Final = "server:*"
"""The name under which a known-keys file lists a server key accepted at any address."""
DEFAULT_MAX_ENTRIES: Final = 10_000
"""How many entries a :class:`KnownKeysFile` holds at most before it stops learning."""

_LOCK_PATIENCE = 10.0
"""Seconds a learning task waits for another process's lock on a known-keys file."""

_CLOEXEC: Final = getattr(os, "O_CLOEXEC", 0)
_READ_FLAGS: Final = os.O_RDONLY | _CLOEXEC
_LEARN_FLAGS: Final = os.O_RDWR | os.O_CREAT | os.O_APPEND | _CLOEXEC

_HEADER = """\
# monte_trio known keys: one "<public key> <name>" entry per line, where <name> is
#   host:port   the key of the server at that address (recorded by a client),
#   client:*    the key of a client (recorded by a server; "*" means the same),
#   server:*    the key of a server at any address (written by hand).
# A key listed for clients never authorises a server, and the other way round.
# Blank lines and lines starting with "#" are ignored. A damaged line is ignored
# with a warning, and the file learns no new key until it is fixed.
# While this file is writable, new keys are learned (appended). Remove its write
# permission (chmod a-w) to lock it down: unknown keys are then refused.
"""


@attrs.frozen
class KnownKey:
    """One entry of a known-keys file.

    Attributes:
        key: the public key.
        name: ``"host:port"`` of the server it belongs to, ``"server:*"`` for a server at
            any address, or ``"client:*"`` (or the older ``"*"``) for a client.
        line: the line number (from 1) of the entry in the file.
    """

    key: PublicKey
    name: str
    line: int

    @property
    def role(self) -> str:
        """``"client"`` if the entry authorises a client, ``"server"`` if a server."""
        return "client" if self.name in (ANY_CLIENT, ANY_PEER) else "server"


_PORT = re.compile(r"[0-9]{1,5}")


def _server_name_problem(name: str) -> str | None:
    """Why ``name`` is not a valid ``host:port``, or None if it is."""
    host, sep, port = name.rpartition(":")
    if not sep or not host:
        return 'it is not "host:port"'
    if not _PORT.fullmatch(port) or not 0 < int(port) < 65536:
        return f"{_abbreviate(port)!r} is not a port number (1 to 65535)"
    if host.startswith("#") or "*" in host:
        return 'a host name does not start with "#" nor contain "*"'
    # No Unicode category starts with "X" (an equivalent mutant adds "XX" around "CZ").
    if any(c.isspace() or unicodedata.category(c)[0] in "CZ" for c in host):  # pragma: no mutate
        return "a host name has no spaces or control characters"
    return None


def _name_problem(name: str) -> str | None:
    """Why ``name`` is not a valid known-keys entry name, or None if it is."""
    if name in (ANY_CLIENT, ANY_SERVER, ANY_PEER):
        return None
    return _server_name_problem(name)


def _name_key(name: str) -> str:
    # Host names are case-insensitive; compare like SSH's known_hosts does. (upper() is
    # an equivalent mutant: any one case folding, used for every key, compares the same.)
    return name.lower()  # pragma: no mutate


_Signature = tuple[int, int, int, int, int]


def _signature(info: os.stat_result) -> _Signature:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


@attrs.define(eq=False)
class _Index:
    """A known-keys file parsed once: look-ups by role in O(1)."""

    signature: _Signature | None
    """The ``stat`` signature of the file parsed, or None if it did not exist."""
    entries: int = 0
    lines: int = 0
    ends_with_newline: bool = True
    servers: dict[str, list[KnownKey]] = attrs.Factory(dict)
    any_server: set[PublicKey] = attrs.Factory(set)
    clients: dict[PublicKey, KnownKey] = attrs.Factory(dict)
    server_keys: set[PublicKey] = attrs.Factory(set)
    damaged: list[tuple[int, str]] = attrs.Factory(list)
    cap_warned: bool = False

    def add(self, entry: KnownKey) -> None:
        self.entries += 1
        if entry.role == "client":
            self.clients.setdefault(entry.key, entry)
        elif entry.name == ANY_SERVER:
            self.any_server.add(entry.key)
            self.server_keys.add(entry.key)
        else:
            self.servers.setdefault(_name_key(entry.name), []).append(entry)
            self.server_keys.add(entry.key)


def _parse_line(line: str, number: int) -> KnownKey | str | None:
    """The entry on line ``number``, a reason the line is damaged, or None for a blank or
    comment line."""
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    fields = stripped.split()
    if len(fields) != 2:
        return (
            f'expected "<public key> <name>", got {_abbreviate(stripped)!r}; fix or delete '
            "the line"
        )
    try:
        key = PublicKey.parse(fields[0])
    except ValueError as exc:
        return f"{exc}; fix or delete the line"
    problem = _name_problem(fields[1])
    if problem is not None:
        return (
            f'the name {_abbreviate(fields[1])!r} is neither "host:port", "{ANY_CLIENT}", '
            f'"{ANY_SERVER}" nor "{ANY_PEER}" ({problem}); fix or delete the line'
        )
    return KnownKey(key=key, name=fields[1], line=number)


@attrs.frozen
class _Learn:
    """The decision to record ``key`` under ``name``; ``accepted`` if it is already
    authorised (through ``server:*``), so failing to record it does not refuse it."""

    name: str
    accepted: bool = False


@attrs.define(eq=False)
class KnownKeysFile(TrustPolicy):
    """Trust on first use, recorded in a known-keys file.

    The file holds one ``<printable key> <name>`` entry per line. The name says which
    role the key may play, and a key listed for one role never authorises the other:

    * ``host:port``: the server at that address (what a client learns);
    * ``server:*``: a server at any address (written by hand);
    * ``client:*``: a client (what a server learns); ``*``, which older versions wrote
      for clients, means the same.

    Blank lines and lines starting with ``#`` are ignored.

    Verification:

    * A client (``peer="host:port"``): if the file lists keys for that name, the key must be
      one of them, **even in learn mode**: another key for a known server is refused as a
      possible man-in-the-middle (edit the file if the server's key really changed).
      Otherwise a key listed under ``server:*`` is accepted, and any other key is refused
      (lockdown) or learned; in learn mode both are then recorded under ``host:port``, so
      that no other key is accepted for that address afterwards.
    * A server (``peer=None``): a key listed under ``client:*`` (or ``*``) is accepted; any
      other key is learned under ``client:*`` (learn mode) or refused (lockdown).

    Checks cost O(1): the file is parsed once, and again only when it changes. Learning
    takes an exclusive lock on the file and decides again under it, so several objects or
    processes sharing a file never record different keys for one name. A damaged line is
    skipped with a logged warning, and while the file has one it learns nothing (it still
    accepts the keys it lists). Refusals raise :class:`PeerRejected` with the details (the
    file, the line to add or fix); the refused peer is only told :attr:`kind`.

    Args:
        path: the known-keys file. It need not exist: in learn mode it is created (mode
            0600, with an explanatory header) when the first key is learned; in lockdown a
            missing file refuses every key.
        lockdown: ``True`` refuses unknown keys; ``False`` learns them (and fails with
            :class:`KeyFileError` if the file cannot be written); ``None`` (the default)
            decides at each verification, like rpc25519: lockdown if the file exists and has
            no write permission bits at all, learn otherwise.
        max_entries: the most entries the file may hold: once it holds that many, new keys
            are refused (with a logged warning) instead of learned. It bounds the file and
            the memory of a server that learns client keys. Default 10,000.

    Raises:
        ValueError: ``max_entries`` is negative.
    """

    kind: ClassVar[str] = "known-keys file"

    path: Path = attrs.field(converter=Path)
    lockdown: bool | None = attrs.field(default=None, kw_only=True)
    max_entries: int = attrs.field(default=DEFAULT_MAX_ENTRIES, kw_only=True)
    _lock: trio.Lock = attrs.field(factory=trio.Lock, init=False, repr=False)
    _index: _Index | None = attrs.field(default=None, init=False, repr=False)

    @max_entries.validator
    def _check_max_entries(self, attribute: attrs.Attribute[int], value: int) -> None:
        if value < 0:
            raise ValueError(f"max_entries must be at least 0, got {value}")

    async def verify(self, key: PublicKey, *, peer: str | None) -> None:
        """Accept, learn or refuse ``key``. See :meth:`TrustPolicy.verify`.

        Raises:
            PeerRejected: the key is refused, or ``peer`` is not a valid ``host:port`` (a
                known-keys file records servers by address; nothing is recorded).
            KeyFileError: the file cannot be read, or a key to learn cannot be recorded.
        """
        if peer is not None:
            problem = _server_name_problem(peer)
            if problem is not None:
                raise PeerRejected(
                    f"cannot check the server's key {key} with known-keys file "
                    f"{self._name()!r}: it records servers by address, and this connection's "
                    f"peer is named {_abbreviate(peer)!r} ({problem}); give open_client a "
                    "host and port (also with connect=), or use PinnedKeys",
                    public_key=str(key),
                )
        async with self._lock:
            learn = await trio.to_thread.run_sync(self._check_sync, key, peer)
            if learn is None:
                return
            with trio.move_on_after(_LOCK_PATIENCE):
                delay = 0.001
                while not await trio.to_thread.run_sync(self._learn_sync, key, peer):
                    await trio.sleep(delay)
                    delay = min(delay * 2, 0.05)
                return
            raise KeyFileError(
                f"known-keys file {self._name()!r} stayed locked by another process for "
                f"{_LOCK_PATIENCE:g} s; is a process stuck while holding it?"
            )

    def entries(self) -> list[KnownKey]:
        """Read and return the file's entries, in file order (none if it does not exist).

        Unlike verification, which skips damaged lines, this refuses a damaged file.

        Raises:
            KeyFileError: the file cannot be read, or a line is damaged.
        """
        text = self._read_path()[0]
        if text is None:
            return []
        entries = []
        for number, line in enumerate(text.splitlines(), start=1):
            parsed = _parse_line(line, number)
            if isinstance(parsed, str):
                raise KeyFileError(f"{self._where(number)}: {parsed}")
            if parsed is not None:
                entries.append(parsed)
        return entries

    # -- reading ---------------------------------------------------------------------------

    def _name(self) -> str:
        return str(self.path)

    def _where(self, line: int) -> str:
        return f"known-keys file {self._name()!r}, line {line}"

    def _decode(self, data: bytes) -> str:
        try:
            return data.decode("utf-8-sig")  # pragma: no mutate (codec names ignore case)
        except UnicodeDecodeError as exc:
            raise KeyFileError(
                f"known-keys file {self._name()!r} is not UTF-8 text: {exc}"
            ) from exc

    def _read_path(self) -> tuple[str | None, os.stat_result | None]:
        """The file's text and the ``fstat`` of what was read; (None, None) if missing."""
        try:
            fd = os.open(self.path, _READ_FLAGS)
        except FileNotFoundError:
            return None, None
        except OSError as exc:
            raise KeyFileError(
                f"cannot read known-keys file {self._name()!r}: {exc.strerror or exc}"
            ) from exc
        try:
            info = os.fstat(fd)
            return self._decode(self._read_fd(fd, info)), info
        finally:
            os.close(fd)

    def _read_fd(self, fd: int, info: os.stat_result) -> bytes:
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(
                f"cannot read known-keys file {self._name()!r}: it is not a regular file"
            )
        # The fd is fresh (at offset 0). Read to the end, which the size only estimates
        # (the read size is a hint: its mutants are equivalent).
        data = bytearray()
        try:
            while chunk := os.read(fd, max(info.st_size, 65536)):  # pragma: no mutate
                data += chunk
        except OSError as exc:
            raise KeyFileError(
                f"cannot read known-keys file {self._name()!r}: {exc.strerror or exc}"
            ) from exc
        return bytes(data)

    def _build_index(self, text: str | None, info: os.stat_result | None) -> _Index:
        index = _Index(signature=None if info is None else _signature(info))
        if text is None:
            return index
        lines = text.splitlines()
        index.lines = len(lines)
        index.ends_with_newline = text == "" or text.endswith("\n")
        for number, line in enumerate(lines, start=1):
            parsed = _parse_line(line, number)
            if isinstance(parsed, str):
                index.damaged.append((number, parsed))
            elif parsed is not None:
                index.add(parsed)
        if index.damaged:
            number, reason = index.damaged[0]
            logger.warning(
                "%s: %s; %d damaged line(s) in all are ignored, and the file learns no new "
                "key until they are fixed (it still accepts the keys it lists)",
                self._where(number),
                reason,
                len(index.damaged),
            )
        return index

    def _current(self) -> tuple[_Index, os.stat_result | None]:
        """The index of the file as it is now: parsed again only if it changed."""
        try:
            info: os.stat_result | None = os.stat(self.path)
        except FileNotFoundError:
            info = None
        except OSError as exc:
            raise KeyFileError(
                f"cannot examine known-keys file {self._name()!r}: {exc.strerror or exc}"
            ) from exc
        signature = None if info is None else _signature(info)
        index = self._index
        if index is None or index.signature != signature:
            text, info = self._read_path()
            index = self._index = self._build_index(text, info)
        return index, info

    def _in_lockdown(self, info: os.stat_result | None) -> bool:
        if self.lockdown is not None:
            return self.lockdown
        if info is None:
            return False
        # Not os.access(): it says "writable" to root whatever the mode bits are.
        return stat.S_IMODE(info.st_mode) & 0o222 == 0

    # -- deciding --------------------------------------------------------------------------

    def _decide(
        self, index: _Index, key: PublicKey, peer: str | None, *, lockdown: bool
    ) -> _Learn | None:
        """None to accept; a :class:`_Learn` to record; raises PeerRejected to refuse."""
        file_name = self._name()
        learn: _Learn
        if peer is not None:
            named = index.servers.get(_name_key(peer))
            if named:
                if any(e.key == key for e in named):
                    return None
                lines = ", ".join(str(e.line) for e in named)
                raise PeerRejected(
                    f"the server {peer} presented the key {key}, but {file_name!r} records "
                    f"a different key for it (line {lines}). This may be a man-in-the-middle "
                    "attack. If the server's key legitimately changed, edit or delete that "
                    f"line of {file_name!r} and connect again.",
                    public_key=str(key),
                )
            learn = _Learn(peer, accepted=key in index.any_server)
        else:
            if key in index.clients:
                return None
            learn = _Learn(ANY_CLIENT)

        refusal = self._cannot_learn(index, lockdown)
        if refusal is None:
            return learn
        if learn.accepted:
            return None  # authorised by "server:*"; it just cannot be recorded
        who = "a client" if peer is None else f"the server {peer}"
        hint = ""
        if peer is not None and key in index.clients:
            hint = (
                f" It is listed for clients (line {index.clients[key].line}), which does not "
                f'authorise a server; to accept it for any server, add "{key} {ANY_SERVER}".'
            )
        elif peer is None and key in index.server_keys:
            hint = " It is listed for a server, which does not authorise a client."
        raise PeerRejected(
            f"{who} presented the unknown key {key}: {refusal}. To trust it, add the line "
            f'"{key} {learn.name}" to {file_name!r}.{hint}',
            public_key=str(key),
        )

    def _cannot_learn(self, index: _Index, lockdown: bool) -> str | None:
        """Why no key may be learned now, or None if one may."""
        file_name = self._name()
        if lockdown:
            if index.signature is None:
                return f"{file_name!r} does not exist and lockdown refuses every key"
            return f"{file_name!r} is in lockdown (read-only) and does not list it"
        if index.damaged:
            number, _ = index.damaged[0]
            return (
                f"{file_name!r} has a damaged line (line {number}, and "
                f"{len(index.damaged) - 1} more), and learns no new key until it is fixed"
            )
        if index.entries >= self.max_entries:
            if not index.cap_warned:
                index.cap_warned = True
                logger.warning(
                    "known-keys file %r holds %d entries, its limit (max_entries=%d): new "
                    "keys are refused until entries are removed or the limit is raised",
                    file_name,
                    index.entries,
                    self.max_entries,
                )
            return (
                f"{file_name!r} holds {index.entries} entries, its limit "
                f"(max_entries={self.max_entries}), and learns no more"
            )
        return None

    def _check_sync(self, key: PublicKey, peer: str | None) -> _Learn | None:
        """The fast path, in a worker thread: one stat and look-ups, unless the file
        changed. None if accepted (or refused by raising); a :class:`_Learn` to record."""
        index, info = self._current()
        return self._decide(index, key, peer, lockdown=self._in_lockdown(info))

    # -- learning --------------------------------------------------------------------------

    def _learn_sync(self, key: PublicKey, peer: str | None) -> bool:
        """Decide again and record, under the file's exclusive lock, in a worker thread.

        Returns:
            False if another process holds the lock (try again later), True when done.
        """
        try:
            fd = os.open(self.path, _LEARN_FLAGS, 0o600)
        except OSError as exc:
            raise KeyFileError(
                f"cannot record a new key in known-keys file {self._name()!r}: "
                f"{exc.strerror or exc}"
            ) from exc
        try:
            if not _lock_exclusive(fd, self._name()):
                return False
            info = os.fstat(fd)
            try:
                now = os.stat(self.path)
            except FileNotFoundError:
                return False  # removed meanwhile: open it again
            if (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino):
                return False  # replaced meanwhile (renamed over): lock the new file
            index = self._index
            if index is None or index.signature != _signature(info):
                text = self._decode(self._read_fd(fd, info))
                # (The signature only lets a later check skip parsing: an equivalent mutant.)
                index = self._index = self._build_index(text, info)  # pragma: no mutate
            learn = self._decide(index, key, peer, lockdown=self._in_lockdown(info))
            if learn is None:
                return True
            entry = f"{key} {learn.name}\n"
            if _name_problem(learn.name) is not None:  # pragma: no cover - checked before
                raise KeyFileError(f"refusing to record the invalid name {learn.name!r}")
            if info.st_size == 0:
                data, first_line = _HEADER + entry, _HEADER.count("\n") + 1
            elif index.ends_with_newline:
                data, first_line = entry, index.lines + 1
            else:
                data, first_line = "\n" + entry, index.lines + 1
            try:
                view = memoryview(data.encode("utf-8"))  # pragma: no mutate (as above)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
                after = os.fstat(fd)
            except OSError as exc:
                self._index = None  # what was written is unknown: parse it again
                raise KeyFileError(
                    f"cannot record a new key in known-keys file {self._name()!r}: "
                    f"{exc.strerror or exc}"
                ) from exc
            index.add(KnownKey(key=key, name=learn.name, line=first_line))
            index.lines = first_line
            index.ends_with_newline = True
            index.signature = _signature(after)  # pragma: no mutate (as above)
        finally:
            os.close(fd)  # releases the lock
        who = "a client" if peer is None else f"the server {peer}"
        logger.info("learned the key %s of %s, recorded in %s", key, who, self._name())
        # (False would only make the caller decide once more, and find the key recorded.)
        return True  # pragma: no mutate


_warned_no_lock = False


def _lock_exclusive(fd: int, name: str) -> bool:
    """Take an exclusive lock of ``fd`` without blocking; False if someone else holds it."""
    global _warned_no_lock
    # On other platforms this comparison is constant, and the branch never runs: its
    # mutants are equivalent here.
    if sys.platform == "win32":  # pragma: no cover, no mutate
        # pragma: no mutate block
        if not _warned_no_lock:
            _warned_no_lock = True
            logger.warning(
                "file locking (fcntl) is not available on this platform: processes that "
                "learn into one known-keys file (%r) at the same moment may record "
                "different keys for one name; give each process its own file",
                name,
            )
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        raise KeyFileError(
            f"cannot lock known-keys file {name!r} to record a key: {exc.strerror or exc}"
        ) from exc
    return True


def _abbreviate(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
